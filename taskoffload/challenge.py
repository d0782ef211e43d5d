"""
The challenge of a pool with a shared secret (``--secret-file``): the worker's
first line, :class:`Challenge`, and the client's answer, :class:`Auth`, an
HMAC-SHA256 of the nonce (``docs/protocol.rst``, "Challenge").
:mod:`taskoffload.wire` decodes them and re-exports these names.
"""

from __future__ import annotations

import hashlib
import hmac

import attrs
import orjson

__all__ = ["Auth", "Challenge", "auth_digest", "encode_auth", "encode_challenge"]


@attrs.frozen
class Challenge:
    """
    Sent first by a worker that has a shared secret: the client must answer with
    :class:`Auth` before anything else.
    """

    nonce: str


@attrs.frozen
class Auth:
    """A client's answer to a :class:`Challenge`: HMAC-SHA256(secret, nonce), hex."""

    digest: str


def auth_digest(secret: bytes, nonce: str) -> str:
    """The answer to a challenge with ``nonce`` under ``secret``."""
    return hmac.new(secret, nonce.encode("ascii"), hashlib.sha256).hexdigest()


def encode_challenge(challenge: Challenge) -> bytes:
    """Encode a challenge as one line."""
    return orjson.dumps({"challenge": challenge.nonce}) + b"\n"


def encode_auth(auth: Auth) -> bytes:
    """Encode an answer to a challenge as one line."""
    return orjson.dumps({"auth": auth.digest}) + b"\n"
