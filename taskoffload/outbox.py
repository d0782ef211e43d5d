"""
The embedded outbox: where the ``send_mail`` example task's mail goes in role
``all`` when neither ``--smtp-host`` nor ``--smtp-port`` is given, so that the
examples work out of the box without an SMTP server on ``localhost:25``.

It is a real SMTP server (``twisted.mail``'s ESMTP server side) on a free
loopback port: every recipient is accepted (up to :data:`MAX_RECIPIENTS` a
message), nothing is relayed, and each message is kept in an :class:`Outbox`
(the latest :data:`KEEP`, each cut down to its envelope and subject), which the
gateway serves at ``/outbox``.

:class:`PoolWithOutbox` is the worker pool that runs it: the SMTP port is bound
first, in ``privilegedStartService`` before the pool's own socket, and the
pool's configuration is remade with its address in the workers' environment
(``TASKOFFLOAD_SMTP_HOST``, ``TASKOFFLOAD_SMTP_PORT``) before the fork server
starts.  It closes last, once the workers have exited, so that mail sent while
they drain still arrives.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.policy import default as default_policy
from typing import Any, Final

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.logger import Logger
from twisted.mail.interfaces import IMessageDelivery, IMessageSMTP
from twisted.mail.smtp import ESMTP, Address, SMTPBadRcpt, SMTPFactory, User
from zope.interface import implementer

from taskoffload.config import PoolConfig
from taskoffload.interfaces import IProcessControl
from taskoffload.supervisor import WorkerPoolService

__all__ = [
    "KEEP",
    "MAX_HEAD",
    "MAX_RECIPIENTS",
    "MAX_SUBJECT",
    "Outbox",
    "OutboxFactory",
    "PoolWithOutbox",
]

_log = Logger(namespace="taskoffload.outbox")

#: How many messages an :class:`Outbox` keeps (the latest); its count goes on.
KEEP: Final = 100

#: Bytes of a message's header kept while it arrives, to read its subject from;
#: the rest of the message, and of a longer header, is only counted.
MAX_HEAD: Final = 16 * 1024

#: Characters of a subject kept.
MAX_SUBJECT: Final = 500

#: Recipients one message may have; beyond them each is refused with ``452``,
#: as RFC 5321 allows once 100 are accepted.
MAX_RECIPIENTS: Final = 100

#: Seconds an SMTP connection may stay silent before the outbox closes it.
SMTP_TIMEOUT: Final = 60

#: Where the outbox listens: loopback, a port the system picks.
LOOPBACK: Final = "127.0.0.1"


class Outbox:
    """
    The latest messages the embedded SMTP server received, and how many it has.

    :param keep: how many messages to keep; older ones are forgotten, and still
        counted.
    :param clock: returns the time, in seconds since the epoch, a message is
        received at.
    :ivar count: every message received since the start.
    """

    def __init__(self, keep: int = KEEP, clock: Callable[[], float] = time.time) -> None:
        self._messages: deque[dict[str, Any]] = deque(maxlen=keep)
        self._clock = clock
        self.count = 0

    def add(self, sender: str, recipients: list[str], head: bytes, size: int) -> dict[str, Any]:
        """
        Keep one message received.

        :param sender: its envelope sender (``MAIL FROM``).
        :param recipients: its envelope recipients (``RCPT TO``).
        :param head: its header, or the first :data:`MAX_HEAD` bytes of it.
        :param size: its length in bytes, as received.
        :return: what is kept of it (see :meth:`to_json`).
        """
        received = datetime.fromtimestamp(self._clock(), timezone.utc)
        record = {
            "from": sender,
            "to": list(recipients),
            "subject": _subject(head),
            "size": size,
            "received": received.isoformat(timespec="milliseconds"),
        }
        self._messages.append(record)
        self.count += 1
        return record

    def to_json(self) -> dict[str, Any]:
        """
        The ``/outbox`` document: ``count``, every message received, and
        ``messages``, the kept ones, latest first, each ``{"from", "to",
        "subject", "size", "received"}`` (an ISO 8601 time, UTC).
        """
        return {"count": self.count, "messages": list(reversed(self._messages))}


def _subject(head: bytes) -> str | None:
    """The ``Subject`` of a message header (encoded words decoded), cut short."""
    subject = BytesHeaderParser(policy=default_policy).parsebytes(head).get("subject")
    return None if subject is None else str(subject)[:MAX_SUBJECT]


@implementer(IMessageSMTP)
class _Message:
    """One message as it arrives: its header kept (up to :data:`MAX_HEAD`), its size counted."""

    def __init__(self, outbox: Outbox, sender: str, recipients: list[str]) -> None:
        self._outbox = outbox
        self._sender = sender
        self._recipients = recipients
        self._head: list[bytes] = []
        self._head_size = 0
        self._in_head = True
        self._size = 0

    def lineReceived(self, line: bytes) -> None:
        self._size += len(line) + 2  # and its CRLF
        if not self._in_head:
            return
        if not line or self._head_size + len(line) + 1 > MAX_HEAD:
            self._in_head = False  # the body, or a header too long to keep whole
            return
        self._head.append(line)
        self._head_size += len(line) + 1

    def eomReceived(self) -> Deferred[None]:
        head = b"\n".join(self._head) + b"\n\n"
        self._outbox.add(self._sender, self._recipients, head, self._size)
        self._head = []
        return defer.succeed(None)

    def connectionLost(self) -> None:
        self._head = []


@implementer(IMessageSMTP)
class _Unkept:
    """A message's copy for its second and later recipients: the first one's is kept."""

    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(IMessageDelivery)
class _Delivery:
    """
    One SMTP connection's delivery: any sender, any recipient (up to
    :data:`MAX_RECIPIENTS` a message), and each message kept once in the outbox
    with all its recipients.
    """

    def __init__(self, outbox: Outbox) -> None:
        self._outbox = outbox
        self._sender = ""
        self._recipients: list[str] = []

    def receivedHeader(self, helo: tuple[bytes, bytes], origin: Address, recipients: Any) -> None:
        return None  # no Received: header is added

    def validateFrom(self, helo: tuple[bytes, bytes], origin: Address) -> Address:
        # A new message, with a list of its own (the previous one keeps the old).
        self._sender = str(origin)
        self._recipients = []
        return origin

    def validateTo(self, user: User) -> Callable[[], IMessageSMTP]:
        recipients = self._recipients
        if len(recipients) >= MAX_RECIPIENTS:
            raise SMTPBadRcpt(user, 452, "Too many recipients")
        recipients.append(str(user.dest))
        sender = self._sender
        if len(recipients) > 1:
            # The SMTP server makes one message per recipient, at DATA, once
            # every recipient is known: the first recipient's keeps them all.
            return _Unkept
        return lambda: _Message(self._outbox, sender, recipients)


class OutboxFactory(SMTPFactory):
    """
    An ESMTP server that keeps every message it receives in ``outbox``.

    :param outbox: where the messages go.
    """

    protocol = ESMTP
    domain = b"localhost"
    noisy = False

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def buildProtocol(self, addr: IAddress | None) -> ESMTP:
        smtp: ESMTP = super().buildProtocol(addr)
        smtp.delivery = _Delivery(self.outbox)
        smtp.noisy = False  # no log line per message
        smtp.timeout = SMTP_TIMEOUT
        return smtp


class PoolWithOutbox(WorkerPoolService):
    """
    A worker pool whose ``send_mail`` goes to an embedded outbox.

    :param config: the pool's configuration; its ``env`` gets the outbox's
        address when the outbox listens.
    :param outbox: where the mail goes; a new one by default.
    :param shown_at: where the gateway serves the outbox (said in the start
        log), or ``None`` if it is not served.
    :ivar smtp_port: the outbox's listening port, while it listens.
    """

    def __init__(
        self,
        config: PoolConfig,
        outbox: Outbox | None = None,
        reactor: Any = None,
        processes: IProcessControl | None = None,
        shown_at: str | None = "/outbox",
    ) -> None:
        super().__init__(config, reactor, processes)
        self.outbox = outbox if outbox is not None else Outbox()
        self.shown_at = shown_at
        self.smtp_port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        """Bind the outbox's port, then the pool's (see :class:`WorkerPoolService`)."""
        self._listen_smtp()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen_smtp()
        super().startService()
        assert self.smtp_port is not None
        host = self.smtp_port.getHost()
        address = f"{host.host}:{host.port}" if isinstance(host, IPv4Address) else str(host)
        if self.shown_at is not None:
            _log.info(
                "Mail from send_mail goes to the embedded outbox on {address} (see "
                "{shown_at}); give --smtp-host to deliver it for real",
                address=address,
                shown_at=self.shown_at,
            )
        else:
            _log.info(
                "Mail from send_mail goes to the embedded outbox on {address} (not served "
                "at /outbox with more than one gateway process); give --smtp-host to "
                "deliver it for real",
                address=address,
            )

    def _listen_smtp(self) -> None:
        if self.smtp_port is not None:
            return
        # Bound at once (not through an endpoint's Deferred): the workers'
        # environment needs its port before the pool goes on.
        port = self.reactor.listenTCP(0, OutboxFactory(self.outbox), interface=LOOPBACK)
        self.smtp_port = port
        env = {
            **self.config.env,
            "TASKOFFLOAD_SMTP_HOST": LOOPBACK,
            "TASKOFFLOAD_SMTP_PORT": str(port.getHost().port),
        }
        self.config = attrs.evolve(self.config, env=env)

    def stopService(self) -> Deferred[None]:
        """Stop the pool, then, its workers gone, the outbox's port."""
        return super().stopService().addBoth(self._close_smtp)

    def _close_smtp(self, result: Any) -> Deferred[Any]:
        port, self.smtp_port = self.smtp_port, None
        closed = (
            defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        )
        return closed.addBoth(lambda _: result)
