"""
Gateway access end to end: the real ``twistd -n taskoffload`` with ``--token-file``,
``--allowed-origin`` and an ``ssl:`` listening endpoint, driven with ``websockets``
(in ``asyncio.run``) and ``urllib`` over loopback.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.support import IntegrationTestCase, Twistd, free_ports

TOKEN = "Zq8-access-token-4242-unmistakable"


def start_gateway(
    start, tmp_path: Path, *extra: str, listen: str = "tcp:{port}:interface=127.0.0.1"
) -> tuple[Twistd, int]:
    """Role all with one worker, the token in a file, and ``extra`` options. :return: tree, port."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    port, pool_port = free_ports(2)
    tree = start(
        "--count=1",
        "--listen",
        listen.format(port=port),
        "--pool-listen",
        f"tcp:{pool_port}:interface=127.0.0.1",
        "--token-file",
        str(token_file),
        *extra,
    )
    tree.wait_for_log("Gateway listening on")
    tree.wait_for_log("All 1 workers serving")
    return tree, port


async def noop(url: str, **options: Any) -> dict[str, Any]:
    """Open the WebSocket at ``url``, run ``noop`` and :return: its reply."""
    options.setdefault("proxy", None)
    async with connect(url, open_timeout=10, **options) as ws:
        await ws.send(json.dumps({"id": 1, "function": "noop"}))
        return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def refused_status(url: str, **options: Any) -> int:
    """Open the WebSocket at ``url`` expecting a refusal; :return: its HTTP status."""
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, open_timeout=10, proxy=None, **options)
    return refused.value.response.status_code


def run(scenario: Any) -> Any:
    return asyncio.run(asyncio.wait_for(scenario, 30))


_http = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    """The HTTP status of ``GET url``."""
    try:
        with _http.open(urllib.request.Request(url, headers=headers or {}), timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A key and a self-signed certificate for 127.0.0.1, in PEM files. :return: both paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class GatewayAccessTests(IntegrationTestCase):
    """Tests of gateway access end to end."""

    def test_token_required(self):
        """Without the token, or with a wrong one, the WebSocket handshake is refused 401."""
        _, port = start_gateway(self.twistd, self.tmp_path)
        url = f"ws://127.0.0.1:{port}/ws"

        async def scenario() -> None:
            assert await refused_status(url) == 401
            assert await refused_status(url + "?token=wrong") == 401
            assert (
                await refused_status(url, additional_headers={"Authorization": "Bearer wrong"})
                == 401
            )

        run(scenario())

    def test_token_presented(self):
        """The token as a Bearer header or as ?token= opens the WebSocket, and tasks run."""
        _, port = start_gateway(self.twistd, self.tmp_path)
        url = f"ws://127.0.0.1:{port}/ws"

        async def scenario() -> None:
            header = {"Authorization": f"Bearer {TOKEN}"}
            assert await noop(url, additional_headers=header) == {"id": 1, "result": None}
            assert await noop(f"{url}?token={TOKEN}") == {"id": 1, "result": None}

        run(scenario())

    def test_status_and_metrics_need_token(self):
        """/status and /metrics answer 401 without the token, 200 with it; / stays public."""
        _, port = start_gateway(self.twistd, self.tmp_path)
        base = f"http://127.0.0.1:{port}"
        for path in ("/status", "/metrics"):
            assert http_status(base + path) == 401
            assert http_status(f"{base}{path}?token=wrong") == 401
            assert http_status(f"{base}{path}?token={TOKEN}") == 200
            assert http_status(base + path, {"Authorization": f"Bearer {TOKEN}"}) == 200
        assert http_status(base + "/") == 200

    def test_foreign_origin_refused(self):
        """A browser origin not in --allowed-origin is refused 403; a listed one is served."""
        _, port = start_gateway(
            self.twistd, self.tmp_path, "--allowed-origin", "https://app.example"
        )
        url = f"ws://127.0.0.1:{port}/ws?token={TOKEN}"

        async def scenario() -> None:
            assert await refused_status(url, origin="https://evil.example") == 403
            assert await noop(url, origin="https://app.example") == {"id": 1, "result": None}
            assert await noop(url) == {"id": 1, "result": None}  # no Origin: not a browser

        run(scenario())

    def test_token_never_logged(self):
        """After handshakes and HTTP requests carrying the token, twistd's log never shows it."""
        tree, port = start_gateway(self.twistd, self.tmp_path)
        base = f"http://127.0.0.1:{port}"

        async def scenario() -> None:
            assert await noop(f"ws://127.0.0.1:{port}/ws?token={TOKEN}") == {
                "id": 1,
                "result": None,
            }
            header = {"Authorization": f"Bearer {TOKEN}"}
            assert await noop(f"ws://127.0.0.1:{port}/ws", additional_headers=header)
            assert await refused_status(f"ws://127.0.0.1:{port}/ws?token={TOKEN}x") == 401

        run(scenario())
        referer = {"Referer": f"{base}/?token={TOKEN}"}
        assert http_status(f"{base}/status?token={TOKEN}", referer) == 200
        assert http_status(f"{base}/metrics?token={TOKEN}x") == 401
        tree.wait_for_log('"GET /metrics HTTP/1.1" 401')  # the access log is written
        log = tree.log()
        assert '"GET /status HTTP/1.1" 200' in log
        assert TOKEN not in log

    def test_wss(self):
        """Listening on an ssl: endpoint, the gateway serves wss:// and https:// with the token."""
        key, cert = self_signed(self.tmp_path)
        _, port = start_gateway(
            self.twistd,
            self.tmp_path,
            listen=f"ssl:{{port}}:privateKey={key}:certKey={cert}:interface=127.0.0.1",
        )
        trusting = ssl.create_default_context(cafile=str(cert))

        async def scenario() -> None:
            url = f"wss://127.0.0.1:{port}/ws"
            reply = await noop(f"{url}?token={TOKEN}", ssl=trusting)
            assert reply == {"id": 1, "result": None}
            assert await refused_status(url, ssl=trusting) == 401

        run(scenario())
        https = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=trusting)
        )
        with https.open(f"https://127.0.0.1:{port}/status?token={TOKEN}", timeout=10) as response:
            assert json.loads(response.read())["gateway"]["requests"] >= 1
