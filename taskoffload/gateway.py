"""
The WebSocket gateway: Autobahn's side of it.  Each client's text frames go to
its :class:`~taskoffload.session.GatewaySession`, which runs them on the worker
pool (an :class:`~taskoffload.interfaces.ITaskPool`) and says what to send back.

The gateway's other parts are re-exported here: :class:`GatewayAccess` (who may
connect), :class:`GatewayLimits` (its bounds) and :class:`GatewayStats` (its
counters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from taskoffload._transport import write_now
from taskoffload.access import GatewayAccess
from taskoffload.defaults import AUTO_PING
from taskoffload.detach import DetachedCalls
from taskoffload.fairshare import LaneShares
from taskoffload.flights import Flights
from taskoffload.ingest import FairIngest
from taskoffload.interfaces import ITaskPool
from taskoffload.session import GatewayLimits, GatewaySession
from taskoffload.stats import GatewayStats

__all__ = [
    "GatewayAccess",
    "GatewayFactory",
    "GatewayLimits",
    "GatewayProtocol",
    "GatewayStats",
]


@implementer(IPushProducer)
class _ReadPauser:
    """
    Registered as the producer of a WebSocket connection's transport: when the
    client stops reading its replies and the write buffer fills, stop reading its
    requests too, instead of buffering without end.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        #: Why reading is paused: the client's replies fill the write buffer
        #: (``"writes"``), its messages wait for their turn (``"ingest"``).
        self._why: set[str] = set()

    def pause(self, why: str) -> None:
        """Stop reading, for ``why``."""
        if not self._why:
            self._transport.pauseProducing()
        self._why.add(why)

    def resume(self, why: str) -> None:
        """Read again, unless paused for another reason too."""
        if why in self._why:
            self._why.discard(why)
            if not self._why:
                self._transport.resumeProducing()

    def pauseProducing(self) -> None:
        self.pause("writes")

    def resumeProducing(self) -> None:
        self.resume("writes")

    def stopProducing(self) -> None:
        pass


class GatewayProtocol(WebSocketServerProtocol):
    """One WebSocket client: its frames go to its session, its session's replies go out."""

    factory: GatewayFactory
    #: From the opening handshake on.
    _session: GatewaySession | None = None
    _pauser: _ReadPauser | None = None

    def onConnect(self, request: ConnectionRequest) -> None:
        refusal = self.factory.access.refusal(request.headers, request.params)
        if refusal is not None:
            code, reason = refusal
            raise ConnectionDeny(code, reason)

    def onOpen(self) -> None:
        self._session = self.factory.session(self._send_reply)
        transport: Any = self.transport
        self._pauser = pauser = _ReadPauser(transport)
        try:
            transport.registerProducer(pauser, True)
        except RuntimeError:
            # Behind twisted.web's WebSocketResource the HTTPChannel that handed the
            # connection over is still its producer, and never pauses it (its request
            # never ends): take its place.
            transport.unregisterProducer()
            transport.registerProducer(pauser, True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self.factory.ingest.forget(self)
        if self._session is not None:
            self._session.close()

    def dataReceived(self, data: bytes) -> None:
        ingest = self.factory.ingest
        if ingest.exhausted and self.state == self.STATE_OPEN:
            # This turn has handled its share: parse these bytes in their turn
            # (Autobahn parses every frame of a read at once), and read no more
            # of this client until then.
            ingest.received(
                self, lambda: super(GatewayProtocol, self).dataReceived(data), hold=True
            )
            return
        super().dataReceived(data)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self._session
        if session is not None:
            # Its turn among the connections' messages (see taskoffload.ingest).
            self.factory.ingest.received(self, lambda: session.received(payload, isBinary))

    def pause_reading(self) -> None:
        """Its messages wait for their turn: read no more of them for now."""
        if self._pauser is not None:
            self._pauser.pause("ingest")

    def resume_reading(self) -> None:
        """Its waiting messages have been handled: read again."""
        if self._pauser is not None:
            self._pauser.resume("ingest")

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        # Autobahn fails a connection whose frame or message is over the limit
        # (close code 1009) without a word to our client: give it the documented
        # bad_request first.  (Overrides Autobahn's internal method: no public hook.)
        if code == 1009 and self._session is not None:
            self._session.too_long()
        super()._fail_connection(code, reason)

    def _send_reply(self, payload: bytes) -> None:
        self.sendMessage(payload)

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Autobahn hands each frame to transport.write, which the reactor sends on
        # its next turn after registering the socket for writing and before
        # unregistering it: a lone reply waits, and costs two more system calls.
        # write_now sends the first frame of a turn at once and the rest together.
        # (Chopped and synchronous writes, and a queue, keep Autobahn's own path.)
        if sync or chopsize or self.send_queue or self.state != self.STATE_OPEN:
            super().sendData(data, sync, chopsize)
            return
        write_now(self.transport, data)
        self.trafficStats.outgoingOctetsWireLevel += len(data)


class GatewayFactory(WebSocketServerFactory):
    """
    Builds :class:`GatewayProtocol` for every WebSocket client.

    :param pool: where tasks run.
    :param clock: provides ``seconds()`` and ``callLater()``, for latencies and
        for the deadlines of calls waiting for their share of the pool.
    :param limits: the gateway's bounds.
    :param stats: the counters ``/status`` and ``/metrics`` read.
    :param auto_ping: seconds between pings; a peer silent for as long again is dropped.
    :param access: who may connect; by default anyone.
    :param process: names this process among several gateway processes, in
        the resume tokens it gives; ``None`` for a lone gateway.
    """

    protocol = GatewayProtocol  # type: ignore[assignment]  # Autobahn's factories take a protocol class

    def __init__(
        self,
        pool: ITaskPool,
        clock: Any = None,
        limits: GatewayLimits | None = None,
        stats: GatewayStats | None = None,
        auto_ping: float = AUTO_PING,
        url: str | None = None,
        access: GatewayAccess | None = None,
        process: str | None = None,
    ) -> None:
        super().__init__(url)
        self.pool = pool
        self.access = access or GatewayAccess()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.limits = limits or GatewayLimits()
        self.stats = stats or GatewayStats()
        #: The pool, divided among the clients.
        self.fair_share = LaneShares(pool, clock)
        #: The clients' messages, a bounded number per reactor turn.
        self.ingest = FairIngest(clock)
        #: The keyed calls running (single flight), and the detachable calls.
        self.flights = Flights()
        self.detached = self.stats.detached = DetachedCalls(clock, process)
        self.setProtocolOptions(
            maxMessagePayloadSize=self.limits.max_message,
            maxFramePayloadSize=self.limits.max_message,
            autoPingInterval=auto_ping,
            autoPingTimeout=auto_ping,
            tcpNoDelay=True,
            # Close with a handshake, so an error reply sent just before is delivered.
            failByDrop=False,
        )

    def session(self, send: Callable[[bytes], object]) -> GatewaySession:
        """
        :param send: sends one reply to the new client.
        :return: the session of a client whose handshake has just completed.
        """
        return GatewaySession(
            send,
            self.fair_share,
            self.stats,
            self.limits,
            self.clock,
            flights=self.flights,
            detached=self.detached,
        )
