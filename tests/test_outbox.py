"""
Unit tests for :mod:`taskoffload.outbox`, the embedded outbox of role ``all``:
its SMTP server driven with SMTP conversations on a ``StringTransport`` (and by
Twisted's own SMTP client over ``twisted.test.iosim``), the bounds of what it
keeps, ``/outbox`` on the gateway's site, and how ``twistd taskoffload`` wires it
(the pool started on a memory reactor whose ``listenTCP`` binds real loopback
sockets, with a stand-in fork server that records its configuration line).
"""

from __future__ import annotations

import io
from email.message import EmailMessage
from typing import Any

import orjson
import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.mail.smtp import SMTPSenderFactory
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.resource import getChildForRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from taskoffload import tap
from taskoffload.access import GatewayAccess
from taskoffload.deaths import JOURNAL_ENV
from taskoffload.gateway import GatewayFactory
from taskoffload.outbox import (
    MAX_HEAD,
    MAX_RECIPIENTS,
    MAX_SUBJECT,
    Outbox,
    OutboxFactory,
    PoolWithOutbox,
)
from taskoffload.service import GatewayService
from taskoffload.stats import GatewayMetrics
from taskoffload.supervisor import PoolConfig, WorkerPoolService
from taskoffload.testing import FakeTaskPool
from taskoffload.web import make_site
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl
from tests.socket_reactor import SocketReactor

#: 2024-05-01T12:00:00Z, the stand-in clock's time.
NOON = 1714564800.0

LOOPBACK = "tcp:0:interface=127.0.0.1"


def mail(subject: str = "Hello", body: str = "Hi there.", to: str = "bob@example.org") -> bytes:
    """A message as ``send_mail`` makes it, as bytes."""
    message = EmailMessage()
    message["From"] = "taskoffload@localhost"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    return message.as_bytes()


def transaction(sender: str, recipients: list[str], message: bytes) -> list[bytes]:
    """The client's lines of one SMTP mail transaction (dot-stuffed)."""
    data = [b"." + line if line.startswith(b".") else line for line in message.splitlines()]
    return [
        f"MAIL FROM:<{sender}>".encode(),
        *(f"RCPT TO:<{r}>".encode() for r in recipients),
        b"DATA",
        *data,
        b".",
    ]


class Conversation:
    """One SMTP connection to an :class:`OutboxFactory`, on a ``StringTransport``."""

    def __init__(self, outbox: Outbox) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.protocol = OutboxFactory(outbox).buildProtocol(self.transport.getPeer())
        self.protocol.makeConnection(self.transport)
        self.say(b"EHLO client.example.org")

    def say(self, *lines: bytes) -> list[int]:
        """Send ``lines``; :return: the reply codes they got (one per reply)."""
        self.transport.clear()
        self.protocol.dataReceived(b"".join(line + b"\r\n" for line in lines))
        replies = self.transport.value().decode().splitlines()
        # Multi-line replies (EHLO's) have a "-" after the code on all lines but the last.
        return [int(line[:3]) for line in replies if line[3:4] != "-"]

    def send(self, sender: str, recipients: list[str], message: bytes) -> list[int]:
        return self.say(*transaction(sender, recipients, message))


def clocked() -> Outbox:
    return Outbox(clock=lambda: NOON)


# The SMTP server


def test_a_message_is_kept_with_its_recipients_and_subject() -> None:
    """One message to two recipients is accepted at each step and kept once, with
    its envelope, its subject, its size and when it was received."""
    outbox = clocked()
    smtp = Conversation(outbox)
    message = mail(subject="Quarterly report")
    replies = smtp.send("alice@example.org", ["bob@example.org", "carol@example.org"], message)
    assert replies == [250, 250, 250, 354, 250]
    assert smtp.say(b"QUIT") == [221]
    assert outbox.to_json() == {
        "count": 1,
        "messages": [
            {
                "from": "alice@example.org",
                "to": ["bob@example.org", "carol@example.org"],
                "subject": "Quarterly report",
                "size": len(message.replace(b"\n", b"\r\n")),
                "received": "2024-05-01T12:00:00.000+00:00",
            }
        ],
    }


def test_an_encoded_subject_is_decoded() -> None:
    """A subject beyond ASCII (sent as RFC 2047 encoded words) is kept as text."""
    outbox = clocked()
    Conversation(outbox).send("a@example.org", ["b@example.org"], mail(subject="Grüße, 世界"))
    assert outbox.to_json()["messages"][0]["subject"] == "Grüße, 世界"


def test_messages_on_one_connection_keep_their_own_recipients() -> None:
    """Each mail transaction of a connection is its own message, with its own envelope."""
    outbox = clocked()
    smtp = Conversation(outbox)
    smtp.send("a@example.org", ["one@example.org", "two@example.org"], mail(subject="first"))
    smtp.send("c@example.org", ["three@example.org"], mail(subject="second"))
    kept = [(m["from"], m["to"], m["subject"]) for m in outbox.to_json()["messages"]]
    assert kept == [
        ("c@example.org", ["three@example.org"], "second"),
        ("a@example.org", ["one@example.org", "two@example.org"], "first"),
    ]


def test_the_latest_are_kept_and_the_count_goes_on() -> None:
    """Past its bound the outbox forgets the oldest message, latest first, and
    still counts every one."""
    outbox = Outbox(keep=3, clock=lambda: NOON)
    smtp = Conversation(outbox)
    for i in range(7):
        assert smtp.send("a@example.org", [f"u{i}@example.org"], mail(subject=f"m{i}"))[-1] == 250
    document = outbox.to_json()
    assert document["count"] == 7
    assert [m["subject"] for m in document["messages"]] == ["m6", "m5", "m4"]
    assert outbox.count == 7


class HeadRecorder(Outbox):
    """An outbox that also records the header bytes each message arrived with."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []

    def add(self, sender: str, recipients: list[str], head: bytes, size: int) -> dict[str, Any]:
        self.heads.append(head)
        return super().add(sender, recipients, head, size)


def test_a_huge_message_is_counted_not_kept() -> None:
    """A 2 MiB body is counted in ``size`` but never held: only the header is,
    and the subject is cut to its bound."""
    outbox = HeadRecorder()
    body = ("x" * 70 + "\n") * 30_000
    message = mail(subject="s" * 2000, body=body)
    assert Conversation(outbox).send("a@example.org", ["b@example.org"], message)[-1] == 250
    [record] = outbox.to_json()["messages"]
    assert record["size"] > 2_000_000
    assert record["subject"] == "s" * MAX_SUBJECT
    [head] = outbox.heads
    assert len(head) < 4096
    assert b"xxxx" not in head


def test_a_huge_header_is_kept_up_to_its_bound() -> None:
    """A header longer than :data:`MAX_HEAD` is kept only up to it: a subject past
    the bound is not read, yet the message is counted."""
    outbox = HeadRecorder()
    filler = b"".join(b"X-Filler-%d: %s\n" % (i, b"f" * 60) for i in range(2000))
    message = filler + b"Subject: too late\n\nbody\n"
    assert Conversation(outbox).send("a@example.org", ["b@example.org"], message)[-1] == 250
    [head] = outbox.heads
    assert len(head) <= MAX_HEAD + 2
    [record] = outbox.to_json()["messages"]
    assert record["subject"] is None
    assert record["size"] > len(filler)
    assert outbox.count == 1


def test_recipients_past_the_bound_are_refused() -> None:
    """Recipients past :data:`MAX_RECIPIENTS` are refused with 452; the message
    goes to those accepted."""
    outbox = clocked()
    recipients = [f"u{i}@example.org" for i in range(MAX_RECIPIENTS + 2)]
    replies = Conversation(outbox).send("a@example.org", recipients, mail())
    assert replies == [250] + [250] * MAX_RECIPIENTS + [452, 452] + [354, 250]
    [record] = outbox.to_json()["messages"]
    assert record["to"] == recipients[:MAX_RECIPIENTS]


def test_a_message_cut_off_is_not_kept() -> None:
    """A connection lost before the message's end keeps nothing of it."""
    outbox = clocked()
    smtp = Conversation(outbox)
    smtp.say(b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.org>", b"DATA", b"Subject: x")
    smtp.protocol.connectionLost(Failure(ConnectionError("gone")))
    assert outbox.to_json() == {"count": 0, "messages": []}


def test_twisted_smtp_client_delivers_to_it() -> None:
    """Twisted's own SMTP client, over an in-memory connection, delivers to it."""
    outbox = clocked()
    sent: Deferred[Any] = Deferred()
    client_factory = SMTPSenderFactory(
        "alice@example.org", ["bob@example.org"], io.BytesIO(mail(subject="via iosim")), sent
    )
    _client, _server, pump = iosim.connectedServerAndClient(
        lambda: OutboxFactory(outbox).buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
    )
    pump.flush()
    results: list[Any] = []
    sent.addBoth(results.append)
    # (recipients accepted, each with its RCPT reply): the message was delivered.
    assert results == [(1, [(b"bob@example.org", 250, b"Recipient address accepted")])]
    [record] = outbox.to_json()["messages"]
    assert (record["to"], record["subject"]) == (["bob@example.org"], "via iosim")


# /outbox


def site(outbox: Outbox | None, access: GatewayAccess | None = None) -> Site:
    document = {"gateway": {}, "pool": None}
    return make_site(
        GatewayFactory(FakeTaskPool()),
        lambda: document,
        GatewayMetrics(lambda: document),
        access=access,
        outbox=outbox.to_json if outbox is not None else None,
    )


def get(served: Site, path: bytes, headers: dict[bytes, bytes] | None = None) -> DummyRequest:
    """Render a GET of ``path``; :return: the request, with what was written."""
    request = DummyRequest(path[1:].split(b"/"))
    for name, value in (headers or {}).items():
        request.requestHeaders.setRawHeaders(name, [value])
    body = getChildForRequest(served.resource, request).render(request)
    if isinstance(body, bytes):
        request.write(body)
    return request


def test_outbox_serves_its_document() -> None:
    """/outbox serves the outbox's document as JSON, afresh at each request."""
    outbox = clocked()
    served = site(outbox)
    assert orjson.loads(b"".join(get(served, b"/outbox").written)) == {"count": 0, "messages": []}
    Conversation(outbox).send("a@example.org", ["b@example.org"], mail(subject="fresh"))
    request = get(served, b"/outbox")
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    document = orjson.loads(b"".join(request.written))
    assert document == outbox.to_json()
    assert document["count"] == 1 and document["messages"][0]["subject"] == "fresh"


def test_no_outbox_no_page() -> None:
    """Without an outbox, /outbox is not found."""
    assert get(site(None), b"/outbox").responseCode == 404
    assert get(site(clocked()), b"/outbox").responseCode in (None, 200)


def test_outbox_needs_the_token() -> None:
    """With a token, /outbox needs it as /status does."""
    served = site(clocked(), GatewayAccess(token="s3cret"))
    refused = get(served, b"/outbox")
    assert refused.responseCode == 401
    assert b"count" not in b"".join(refused.written)
    allowed = get(served, b"/outbox", {b"authorization": b"Bearer s3cret"})
    assert allowed.responseCode in (None, 200)
    assert orjson.loads(b"".join(allowed.written))["count"] == 0


def test_the_gateway_service_serves_its_outbox() -> None:
    """GatewayService puts the outbox it is given on its site."""
    outbox = clocked()
    reactor = MemoryReactorClock()
    GatewayService(LOOPBACK, ["tcp:127.0.0.1:1"], reactor=reactor, outbox=outbox).startService()
    [(_port, served, _backlog, _interface)] = reactor.tcpServers
    assert orjson.loads(b"".join(get(served, b"/outbox").written))["count"] == 0


# The pool that runs it


def start(pool: WorkerPoolService, processes: FakeProcessControl) -> PoolConfig:
    """Start ``pool`` as twistd does; :return: the configuration its fork server was sent."""
    pool.privilegedStartService()
    pool.startService()
    [spawned] = processes.spawned
    return PoolConfig.from_json(spawned.transport.value().splitlines()[0])


def stop(pool: WorkerPoolService, reactor: MemoryReactorClock) -> None:
    """Stop ``pool``, its stand-in fork server exiting."""
    stopped: list[Any] = []
    pool.stopService().addBoth(stopped.append)
    fork_server = pool._fork_servers.current
    if fork_server is not None:
        fork_server.processEnded(Failure(ProcessDone(0)))
    reactor.advance(0)
    assert stopped == [None]


def test_the_outbox_is_bound_first_and_the_workers_told() -> None:
    """The outbox's port is bound on loopback before the pool's, and the fork server's
    configuration line tells the workers its address, the rest of ``env`` kept."""
    reactor, processes = SocketReactor(), FakeProcessControl()
    config = PoolConfig(listen=LOOPBACK, count=1, env={"OTHER": "1"})
    pool = PoolWithOutbox(config, reactor=reactor, processes=processes)
    sent = start(pool, processes)
    try:
        assert pool.smtp_port is not None
        port = pool.smtp_port.getHost().port
        assert port != 0
        smtp, workers = reactor.tcpServers
        assert (smtp[0], smtp[3]) == (0, "127.0.0.1")
        assert isinstance(smtp[1], OutboxFactory) and smtp[1].outbox is pool.outbox
        assert not isinstance(workers[1], OutboxFactory)
        assert sent.env == {
            "OTHER": "1",
            "TASKOFFLOAD_SMTP_HOST": "127.0.0.1",
            "TASKOFFLOAD_SMTP_PORT": str(port),
            JOURNAL_ENV: pool.deaths.journal.directory,  # type: ignore[union-attr]  # started
        }
    finally:
        stop(pool, reactor)


def test_the_start_log_says_where_mail_goes() -> None:
    """The start log names the outbox's address, /outbox, and how to send for real."""
    reactor, processes = SocketReactor(), FakeProcessControl()
    pool = PoolWithOutbox(
        PoolConfig(listen=LOOPBACK, count=1), reactor=reactor, processes=processes
    )
    with capturedLogs() as events:
        start(pool, processes)
    try:
        assert pool.smtp_port is not None
        port = pool.smtp_port.getHost().port
        said = [formatEvent(e) for e in events if "outbox" in formatEvent(e)]
        assert said == [
            f"Mail from send_mail goes to the embedded outbox on 127.0.0.1:{port} "
            "(see /outbox); give --smtp-host to deliver it for real"
        ]
    finally:
        stop(pool, reactor)


def test_the_outbox_closes_after_the_workers() -> None:
    """At stop the outbox listens on while the workers drain, and closes once they are gone."""
    reactor, processes = SocketReactor(), FakeProcessControl()
    pool = PoolWithOutbox(
        PoolConfig(listen=LOOPBACK, count=1), reactor=reactor, processes=processes
    )
    start(pool, processes)
    port = pool.smtp_port
    assert isinstance(port, tcp.Port)
    stopped: list[Any] = []
    pool.stopService().addBoth(stopped.append)
    reactor.advance(0)
    assert pool.smtp_port is port and port.connected
    # The stop waits for the fork server this pool spawned (its workers with it).
    [spawned] = processes.spawned
    assert pool._fork_servers.current is spawned.protocol
    spawned.protocol.processEnded(Failure(ProcessDone(0)))
    reactor.advance(0)
    assert stopped == [None]
    assert pool.smtp_port is None and not port.connected


# twistd taskoffload


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def services(*args: str) -> tuple[WorkerPoolService | None, Any]:
    """The pool (if any) and the gateway (if any) ``makeService`` wires for ``args``."""
    top = list(tap.makeService(parse(*args)))
    pools = [s for s in top if isinstance(s, WorkerPoolService)]
    gateways = [s for s in top if isinstance(s, GatewayService)]
    return (pools[0] if pools else None), (gateways[0] if gateways else None)


def test_role_all_by_default_mails_to_the_outbox() -> None:
    """Role all without --smtp-host: the pool runs the outbox, the gateway serves it,
    and the workers' environment points at it once started."""
    pool, gateway = services("--count=1", f"--pool-listen={LOOPBACK}")
    assert isinstance(pool, PoolWithOutbox)
    assert isinstance(gateway, GatewayService)
    assert gateway.outbox is pool.outbox
    reactor, processes = SocketReactor(), FakeProcessControl()
    pool._reactor, pool._processes = reactor, processes  # on a memory reactor instead
    sent = start(pool, processes)
    try:
        assert pool.smtp_port is not None
        assert sent.env == {
            "TASKOFFLOAD_SMTP_HOST": "127.0.0.1",
            "TASKOFFLOAD_SMTP_PORT": str(pool.smtp_port.getHost().port),
            JOURNAL_ENV: pool.deaths.journal.directory,  # type: ignore[union-attr]  # started
        }
    finally:
        stop(pool, reactor)


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (["--smtp-host=mail.example.org"], ("mail.example.org", "25")),
        (["--smtp-host=mail.example.org", "--smtp-port=2525"], ("mail.example.org", "2525")),
        (["--smtp-port=2525"], ("localhost", "2525")),
    ],
)
def test_role_all_with_an_smtp_server_has_no_outbox(args: list[str], env: tuple[str, str]) -> None:
    """Role all told of an SMTP server delivers to it: no outbox, and no /outbox."""
    pool, gateway = services("--count=1", *args)
    assert type(pool) is WorkerPoolService
    assert gateway.outbox is None
    assert pool.config.env == {"TASKOFFLOAD_SMTP_HOST": env[0], "TASKOFFLOAD_SMTP_PORT": env[1]}


def test_role_worker_keeps_localhost_25() -> None:
    """Role worker runs no outbox: its workers send to localhost:25 unless told otherwise."""
    pool, gateway = services("--role=worker", "--count=1")
    assert type(pool) is WorkerPoolService and gateway is None
    assert pool.config.env == {"TASKOFFLOAD_SMTP_HOST": "localhost", "TASKOFFLOAD_SMTP_PORT": "25"}


def test_role_gateway_has_no_outbox() -> None:
    """Role gateway runs no pool, so no outbox."""
    pool, gateway = services("--role=gateway")
    assert pool is None and gateway.outbox is None


def test_several_gateway_processes_keep_the_outbox_unshown() -> None:
    """With several gateway processes the outbox still takes the mail; the log says
    /outbox does not show it."""
    pool, _ = services("--count=1", "--gateway-processes=2")
    assert isinstance(pool, PoolWithOutbox)
    assert pool.shown_at is None


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
