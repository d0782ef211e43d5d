"""
The gateway's extensions of a request, read from a decoded message: ``batch``
(run each item), ``key`` (single flight: join a running call with the same
function and key, :mod:`taskoffload.flights`) and ``detach`` (keep the call
when the WebSocket closes, :mod:`taskoffload.detach`), and the ``resume``
message that picks a detached call up again.

A worker serves none of them: it answers a request carrying one with
``bad_request``.  Pure: what is wrong raises :class:`ValueError` with the
message for the caller, which :mod:`taskoffload.wire` turns into a
``bad_request`` reply.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

import attrs

__all__ = [
    "EXTENSION_FIELDS",
    "MAX_KEY_LENGTH",
    "MAX_TOKEN_LENGTH",
    "Resume",
    "gateway_only",
    "read_extensions",
    "read_resume",
]

#: The request fields read here.
EXTENSION_FIELDS: Final = frozenset({"batch", "key", "detach"})

#: The longest ``key``, in characters.
MAX_KEY_LENGTH: Final = 200

#: The longest resume token accepted, in characters (the gateway's are far shorter).
MAX_TOKEN_LENGTH: Final = 200


@attrs.frozen
class Resume:
    """
    Pick up the detached call that ``token`` names (``{"resume": TOKEN}``).

    :ivar after: the ``seq`` of the last progress message already seen: only
        later ones are replayed; ``None`` to replay every one kept.
    """

    token: str
    after: int | None = None
    #: A resume is no request: an error answering it carries ``"id": null``.
    id: ClassVar[None] = None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_extensions(obj: Mapping[str, Any]) -> dict[str, Any]:
    """
    :param obj: a decoded request.
    :return: its ``batch`` (a tuple, or ``None``), ``key`` (a string, or ``None``)
        and ``detach`` (seconds, or ``None``), as keyword arguments of
        :class:`~taskoffload.wire.Request`.
    :raises ValueError: for an ill-typed one, or a ``key`` on a batch.
    """
    batch = obj.get("batch")
    if batch is not None:
        if not isinstance(batch, list):
            raise ValueError('"batch" must be a list of argument objects or lists')
        batch = tuple(batch)
    key = obj.get("key")
    if key is not None:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LENGTH:
            raise ValueError(f'"key" must be a string of 1 to {MAX_KEY_LENGTH} characters')
        if batch is not None:
            raise ValueError('a batch cannot have a "key": send its items as keyed requests')
    detach = obj.get("detach")
    if detach is not None:
        if not _is_number(detach) or not detach > 0:
            raise ValueError('"detach" must be a positive number of seconds')
        detach = float(detach)
    return {"batch": batch, "key": key, "detach": detach}


def read_resume(obj: Mapping[str, Any]) -> Resume:
    """
    :param obj: a decoded message holding ``resume``.
    :raises ValueError: unless it is ``{"resume": TOKEN}`` with a non-empty
        string, and at most ``"after"``, a whole number from 0 (or null).
    """
    token = obj["resume"]
    after = obj.get("after")
    if (
        obj.keys() - {"resume", "after"}
        or not isinstance(token, str)
        or not 0 < len(token) <= MAX_TOKEN_LENGTH
        or not (after is None or (isinstance(after, int) and not isinstance(after, bool)))
        or (after is not None and after < 0)
    ):
        raise ValueError(
            'a resume is {"resume": TOKEN} with the token the gateway gave, and optionally '
            '"after": SEQ, the seq of the last progress message already seen'
        )
    return Resume(token=token, after=after)


def gateway_only(message: object) -> str | None:
    """
    :return: what ``message`` (a decoded :class:`~taskoffload.wire.Request` or
        :class:`Resume`) asks that only the gateway serves, in words for a
        worker's ``bad_request`` reply ("batches ..."); ``None`` for nothing.
    """
    if isinstance(message, Resume):
        return "resumes"
    if getattr(message, "batch", None) is not None:
        return "batches"
    if getattr(message, "key", None) is not None:
        return "keyed requests (single flight)"
    if getattr(message, "detach", None) is not None:
        return "detached requests"
    return None
