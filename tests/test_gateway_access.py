"""
Unit tests for the gateway's access rules, :class:`taskoffload.gateway.GatewayAccess`:
the rules alone, and the opening handshake of a real Autobahn ``GatewayProtocol``
over a ``StringTransport`` refused or accepted by them.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator

import pytest
import txaio
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from taskoffload.gateway import GatewayAccess, GatewayFactory
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module

TOKEN = "s3cret-Token_42"


# The rules


def test_no_token_needed_by_default() -> None:
    """Without a token configured, any request passes, with or without credentials."""
    access = GatewayAccess()
    assert not access.token_required
    assert access.presents_token(None, [])
    assert access.refusal({}, {}) is None


@pytest.mark.parametrize(
    "authorization",
    [b"Bearer " + TOKEN.encode(), b"bearer " + TOKEN.encode(), b"  Bearer  " + TOKEN.encode()],
)
def test_bearer_header(authorization: bytes) -> None:
    """The token in ``Authorization: Bearer`` passes (the scheme in any case)."""
    assert GatewayAccess(TOKEN).presents_token(authorization, [])


def test_query_token() -> None:
    """The token as the query parameter ``token`` passes."""
    assert GatewayAccess(TOKEN).presents_token(None, [TOKEN.encode()])


@pytest.mark.parametrize(
    ("authorization", "query"),
    [
        (None, []),
        (b"Bearer wrong", []),
        (None, [b"wrong"]),
        (b"Bearer " + TOKEN.encode()[:-1], []),
        (b"Basic " + TOKEN.encode(), []),
        (TOKEN.encode(), []),
        (b"Bearer", [b""]),
    ],
)
def test_missing_or_wrong_token(authorization: bytes | None, query: list[bytes]) -> None:
    """No token, a wrong one, a prefix of it or another scheme does not pass."""
    assert not GatewayAccess(TOKEN).presents_token(authorization, query)


def test_any_presented_token_may_match() -> None:
    """A right token passes even beside a wrong one (header and query both given)."""
    assert GatewayAccess(TOKEN).presents_token(b"Bearer wrong", [TOKEN.encode()])


def test_origins_any_by_default() -> None:
    """Without --allowed-origin every origin passes."""
    assert GatewayAccess().origin_allowed("https://evil.example")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("https://app.example", True),
        ("HTTPS://APP.EXAMPLE", True),
        ("http://localhost:8080", True),
        ("https://evil.example", False),
        ("http://app.example", False),
        ("null", False),
    ],
)
def test_allowed_origins(origin: str | None, allowed: bool) -> None:
    """Only the listed origins pass; a request with no Origin (not a browser) passes."""
    access = GatewayAccess(allowed_origins=["https://app.example/", "http://localhost:8080"])
    assert access.origin_allowed(origin) is allowed


def test_refusal_codes() -> None:
    """A foreign origin is refused 403, a missing token 401; neither reason quotes credentials."""
    access = GatewayAccess(TOKEN, ["https://app.example"])
    refused = access.refusal({"origin": "https://evil.example"}, {"token": [TOKEN]})
    assert refused is not None and refused[0] == 403
    refused = access.refusal({"authorization": "Bearer nope-nope"}, {"token": ["also-nope"]})
    assert refused is not None and refused[0] == 401
    assert "nope" not in refused[1]
    assert access.refusal({"origin": "https://app.example"}, {"token": [TOKEN]}) is None
    assert access.refusal({"authorization": f"Bearer {TOKEN}"}, {}) is None


# The handshake, through Autobahn


@pytest.fixture
def txaio_clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clock]:
    """Autobahn's timers (through txaio) on a Clock instead of the global reactor."""
    clock = Clock()
    monkeypatch.setattr(txaio.config, "loop", clock)
    yield clock


def opening(access: GatewayAccess, target: bytes = b"/ws", *headers: bytes) -> bytes:
    """What the gateway answers an opening handshake for ``target`` with ``headers``."""
    protocol = GatewayFactory(FakeTaskPool(), access=access).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    key = base64.b64encode(os.urandom(16))
    protocol.dataReceived(
        b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )
    return transport.value()


def status_line(response: bytes) -> bytes:
    return response.split(b"\r\n", 1)[0]


def test_handshake_without_token_refused(txaio_clock: Clock) -> None:
    """A handshake without the token is answered 401 and never upgraded."""
    response = opening(GatewayAccess(TOKEN))
    assert status_line(response).startswith(b"HTTP/1.1 401")
    assert TOKEN.encode() not in response


def test_handshake_wrong_token_refused(txaio_clock: Clock) -> None:
    """A handshake with a wrong token, in the header or the query, is answered 401."""
    access = GatewayAccess(TOKEN)
    assert status_line(opening(access, b"/ws", b"Authorization: Bearer wrong")).startswith(
        b"HTTP/1.1 401"
    )
    assert status_line(opening(access, b"/ws?token=wrong")).startswith(b"HTTP/1.1 401")


def test_handshake_with_token(txaio_clock: Clock) -> None:
    """The token in the Authorization header or the query upgrades the connection."""
    access = GatewayAccess(TOKEN)
    by_header = opening(access, b"/ws", b"Authorization: Bearer " + TOKEN.encode())
    assert status_line(by_header).startswith(b"HTTP/1.1 101")
    by_query = opening(access, b"/ws?token=" + TOKEN.encode())
    assert status_line(by_query).startswith(b"HTTP/1.1 101")


def test_handshake_foreign_origin_refused(txaio_clock: Clock) -> None:
    """A browser handshake from an origin not allowed is answered 403, even with the token."""
    access = GatewayAccess(TOKEN, ["https://app.example"])
    response = opening(access, b"/ws?token=" + TOKEN.encode(), b"Origin: https://evil.example")
    assert status_line(response).startswith(b"HTTP/1.1 403")
    allowed = opening(access, b"/ws?token=" + TOKEN.encode(), b"Origin: https://app.example")
    assert status_line(allowed).startswith(b"HTTP/1.1 101")


def test_handshake_open_by_default(txaio_clock: Clock) -> None:
    """With no access rules any handshake is upgraded, whatever its origin."""
    response = opening(GatewayAccess(), b"/ws", b"Origin: https://anywhere.example")
    assert status_line(response).startswith(b"HTTP/1.1 101")


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
