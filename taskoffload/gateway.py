"""
The WebSocket gateway: each text frame is a request (``docs/protocol.rst``), pushed to the
worker pool through an :class:`~taskoffload.client.ITaskPool`; each client gets
its reply when the task's Deferred fires.

Every path ends in exactly one final reply per request: Autobahn ignores what
``onMessage`` returns, so every Deferred here carries its own errback.
"""

from __future__ import annotations

import hmac
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload import wire
from taskoffload.client import cancelled_error
from taskoffload.defaults import AUTO_PING
from taskoffload.errors import TaskError
from taskoffload.interfaces import ITaskPool

__all__ = [
    "GatewayAccess",
    "GatewayFactory",
    "GatewayLimits",
    "GatewayProtocol",
    "GatewayStats",
]

_log = Logger(namespace="taskoffload.gateway")

#: Latencies kept for the percentiles in ``/status``.
LATENCY_WINDOW = 10_000

#: Distinct function names counted in ``/status`` and ``/metrics``; calls to
#: others are counted as ``OTHER_FUNCTIONS``.  Names come from clients, so
#: without a bound a client could grow the counters without end.
MAX_FUNCTION_NAMES = 1000
#: How calls to names the pool does not know are counted.
UNKNOWN_FUNCTIONS = "(unknown)"
#: How calls beyond :data:`MAX_FUNCTION_NAMES` are counted.
OTHER_FUNCTIONS = "(other)"


class GatewayLimits:
    """
    The gateway's bounds.

    :param max_inflight_per_client: requests (batch items included) one client may
        have unanswered before further ones get ``overloaded``.
    :param max_pending: the same bound over all clients together.
    :param max_message: the longest frame accepted, in bytes.
    """

    def __init__(
        self,
        max_inflight_per_client: int = 1000,
        max_pending: int = 100_000,
        max_message: int = wire.DEFAULT_MAX_MESSAGE,
    ) -> None:
        self.max_inflight_per_client = max_inflight_per_client
        self.max_pending = max_pending
        self.max_message = max_message


class GatewayAccess:
    """
    Who may use the gateway.

    :param token: when given, every WebSocket handshake and every ``/status`` and
        ``/metrics`` request must present it, as ``Authorization: Bearer TOKEN`` or
        as the query parameter ``token``.
    :param allowed_origins: when given, a WebSocket handshake whose ``Origin``
        header (sent by browsers) is not one of these is refused; a handshake with
        no ``Origin`` (not a browser) is allowed.
    """

    def __init__(self, token: str | None = None, allowed_origins: Iterable[str] = ()) -> None:
        self._token = token.encode("utf-8") if token else None
        self.allowed_origins = frozenset(_origin(o) for o in allowed_origins)

    @property
    def token_required(self) -> bool:
        """Whether a token must be presented."""
        return self._token is not None

    def presents_token(self, authorization: bytes | None, query_tokens: Sequence[bytes]) -> bool:
        """
        :param authorization: the ``Authorization`` header, if any.
        :param query_tokens: the values of the query parameter ``token``.
        :return: whether the request may pass: no token is required, or one of
            those it presents is the token.
        """
        if self._token is None:
            return True
        presented = list(query_tokens)
        if authorization is not None:
            scheme, _, credentials = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                presented.append(credentials.strip())
        # Compare every candidate in constant time; no early exit on a match.
        matches = [hmac.compare_digest(candidate, self._token) for candidate in presented]
        return any(matches)

    def origin_allowed(self, origin: str | None) -> bool:
        """:return: whether a handshake with this ``Origin`` header (or none) may pass."""
        if origin is None or not self.allowed_origins:
            return True
        return _origin(origin) in self.allowed_origins

    def refusal(
        self, headers: Mapping[str, str], params: Mapping[str, Sequence[str]]
    ) -> tuple[int, str] | None:
        """
        :param headers: a WebSocket handshake's headers, names in lower case
            (as Autobahn gives them).
        :param params: its query parameters, each a list of values.
        :return: ``(HTTP status, reason)`` if the handshake is to be refused, else
            ``None``. The reason never quotes the credentials presented.
        """
        if not self.origin_allowed(headers.get("origin")):
            return 403, "origin not allowed"
        authorization = headers.get("authorization")
        if not self.presents_token(
            # Autobahn decodes headers as ISO-8859-1 and the query as UTF-8.
            authorization.encode("latin-1") if authorization is not None else None,
            [value.encode("utf-8") for value in params.get("token", ())],
        ):
            return 401, "a valid token is required"
        return None


def _origin(origin: str) -> str:
    # Browsers send scheme://host[:port] in lower case; be lenient with the
    # configured ones.
    return origin.strip().rstrip("/").lower()


class GatewayStats:
    """
    What ``/status`` and ``/metrics`` report: clients, requests in flight, totals
    by function and by outcome, and recent latencies.

    :param on_finished: also called with (function, outcome, seconds) for each
        final reply, e.g. to feed Prometheus metrics.
    """

    def __init__(self, on_finished: Callable[[str, str, float], None] | None = None) -> None:
        self.clients = 0
        self.inflight = 0
        self.requests = 0
        self.by_function: Counter[str] = Counter()
        self.by_outcome: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._on_finished = on_finished

    def started(self, count: int = 1) -> None:
        self.inflight += count

    def _name(self, function: str, outcome: str) -> str:
        # The name a call is counted under: see MAX_FUNCTION_NAMES.
        if outcome == wire.UNKNOWN_FUNCTION:
            return UNKNOWN_FUNCTIONS
        if function in self.by_function or len(self.by_function) < MAX_FUNCTION_NAMES:
            return function
        return OTHER_FUNCTIONS

    def finished(self, function: str, outcome: str, seconds: float) -> None:
        """Count one final reply; ``outcome`` is ``ok`` or an error code."""
        function = self._name(function, outcome)
        self.inflight -= 1
        self.requests += 1
        self.by_function[function] += 1
        self.by_outcome[outcome] += 1
        self.latencies.append(seconds)
        if self._on_finished is not None:
            self._on_finished(function, outcome, seconds)

    def rejected(self, function: str, outcome: str) -> None:
        """Count a request answered without reaching the pool."""
        function = self._name(function, outcome)
        self.requests += 1
        self.by_function[function] += 1
        self.by_outcome[outcome] += 1
        if self._on_finished is not None:
            self._on_finished(function, outcome, 0.0)

    def percentiles(self) -> dict[str, float | None]:
        """p50, p90, p99 and max of the recent latencies, in milliseconds."""
        ordered = sorted(self.latencies)
        if not ordered:
            return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}

        def at(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

        return {
            "p50_ms": at(0.50),
            "p90_ms": at(0.90),
            "p99_ms": at(0.99),
            "max_ms": round(ordered[-1] * 1000, 3),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "clients": self.clients,
            "inflight": self.inflight,
            "requests": self.requests,
            "by_function": dict(self.by_function),
            "by_outcome": dict(self.by_outcome),
            "latency": self.percentiles(),
        }


@implementer(IPushProducer)
class _ReadPauser:
    """
    Registered as the producer of a WebSocket connection's transport: when the
    client stops reading its replies and the write buffer fills, stop reading its
    requests too, instead of buffering without end.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class _Pending:
    """One request in flight for one client."""

    __slots__ = ("deferreds", "function", "id", "reply", "started")

    def __init__(self, request_id: wire.RequestId, function: str, started: float) -> None:
        self.id = request_id
        self.function = function
        self.started = started
        self.deferreds: list[Deferred[Any]] = []
        self.reply: bytes | None = None


class _Ticket:
    """One call of one client, waiting for its share of the pool or running there."""

    __slots__ = (
        "args",
        "deadline",
        "function",
        "kwargs",
        "on_progress",
        "outcome",
        "submitted",
        "timer",
    )

    def __init__(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_progress: Callable[[Any], None] | None,
    ) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.on_progress = on_progress
        self.deadline: float | None = None
        self.timer: Any = None
        self.outcome: Deferred[Any]
        self.submitted: Deferred[Any] | None = None


class GatewayProtocol(WebSocketServerProtocol):
    """One WebSocket client: many requests in flight, replies matched by ``id``."""

    factory: GatewayFactory

    def onConnect(self, request: ConnectionRequest) -> None:
        refusal = self.factory.access.refusal(request.headers, request.params)
        if refusal is not None:
            code, reason = refusal
            raise ConnectionDeny(code, reason)

    def onOpen(self) -> None:
        # Calls not yet handed to the pool, and how many are: see _admit.
        self._waiting: deque[_Ticket] = deque()
        self._submitted = 0
        self._by_id: dict[wire.RequestId, _Pending] = {}
        # Requests without an id, answered in the order they came.
        self._unnamed: deque[_Pending] = deque()
        self._count = 0
        self._open = True
        self.factory.stats.clients += 1
        transport: Any = self.transport
        pauser = _ReadPauser(transport)
        try:
            transport.registerProducer(pauser, True)
        except RuntimeError:
            # Behind twisted.web's WebSocketResource the HTTPChannel that handed the
            # connection over is still its producer, and never pauses it (its request
            # never ends): take its place.
            transport.unregisterProducer()
            transport.registerProducer(pauser, True)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        if not getattr(self, "_open", False):
            return
        self._open = False
        self.factory.stats.clients -= 1
        # Unfinished work of a client that left is cancelled at the workers.
        for pending in [*self._by_id.values(), *self._unnamed]:
            for d in pending.deferreds:
                d.cancel()
        self.factory.active.discard(self)
        self.factory.held.discard(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self._reply_now(
                wire.ErrorReply(
                    None, wire.BAD_REQUEST, "binary frames are not requests; send JSON text"
                )
            )
            return
        try:
            message = wire.decode_message(payload)
        except wire.BadMessage as e:
            self._reply_now(e.to_reply())
            return
        if isinstance(message, wire.Cancel):
            pending = self._by_id.get(message.id)
            if pending is not None:
                for d in list(pending.deferreds):
                    d.cancel()
            return
        if isinstance(message, (wire.Session, wire.Auth)):
            self._reply_now(
                wire.ErrorReply(
                    None, wire.BAD_REQUEST, "session and auth lines are for the worker port"
                )
            )
            return
        if message.id is not None and message.id in self._by_id:
            self._reply_now(
                wire.ErrorReply(
                    message.id, wire.BAD_REQUEST, f"id {message.id!r} is already in flight"
                )
            )
            return
        items = len(message.batch) if message.batch is not None else 1
        limits = self.factory.limits
        if message.batch is not None and not message.batch:
            self._reply_now(wire.ErrorReply(message.id, wire.BAD_REQUEST, "an empty batch"))
            return
        if items > limits.max_inflight_per_client:
            self._reply_now(
                wire.ErrorReply(
                    message.id,
                    wire.BAD_REQUEST,
                    f"a batch of {items} items is more than the {limits.max_inflight_per_client} "
                    "a connection may have in flight; split it",
                )
            )
            return
        if self._count + items > limits.max_inflight_per_client:
            self._overloaded(
                message,
                f"more than {limits.max_inflight_per_client} requests in flight on this connection",
            )
            return
        if self.factory.stats.inflight + items > limits.max_pending:
            self._overloaded(message, f"the gateway has {limits.max_pending} requests pending")
            return
        pending = _Pending(message.id, message.function, self.factory.clock.seconds())
        if message.id is None:
            self._unnamed.append(pending)
        else:
            self._by_id[message.id] = pending
        self._count += items
        self.factory.stats.started(items)
        if message.batch is None:
            self._single(pending, message)
        else:
            self._batch(pending, message, message.batch)

    def _fail_connection(self, code: int = 1001, reason: str = "going away") -> None:
        # Autobahn fails a connection whose frame or message is over the limit
        # (close code 1009) without a word to our client: give it the documented
        # bad_request first.  (Overrides Autobahn's internal method: no public hook.)
        if code == 1009 and getattr(self, "_open", False):
            self._reply_now(
                wire.ErrorReply(
                    None,
                    wire.BAD_REQUEST,
                    f"message longer than the limit of {self.factory.limits.max_message} bytes",
                )
            )
        super()._fail_connection(code, reason)

    # Sending

    def _reply(self, data: bytes) -> None:
        if self._open:
            self.sendMessage(data[:-1])  # one message per frame, without the newline

    def _reply_now(self, reply: wire.Reply) -> None:
        self._reply(wire.encode_reply(reply))
        if isinstance(reply, wire.ErrorReply):
            self.factory.stats.rejected("-", reply.code)

    def _overloaded(self, message: wire.Request, why: str) -> None:
        self._reply(
            wire.encode_reply(wire.ErrorReply(message.id, wire.OVERLOADED, f"{why}; retry later"))
        )
        self.factory.stats.rejected(message.function, wire.OVERLOADED)

    def _finish(self, pending: _Pending, reply: bytes, items: int) -> None:
        self._count -= items
        if pending.id is not None:
            del self._by_id[pending.id]
            self._reply(reply)
            return
        pending.reply = reply
        while self._unnamed and self._unnamed[0].reply is not None:
            done = self._unnamed.popleft()
            assert done.reply is not None
            self._reply(done.reply)

    # One request

    def _call(
        self,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_progress: Callable[[Any], None] | None,
    ) -> Deferred[wire.Result | wire.ErrorReply]:
        """Run one task; the Deferred always fires with a reply record, never fails."""
        started = self.factory.clock.seconds()
        ticket = _Ticket(function, args, kwargs, on_progress)
        d: Deferred[Any] = Deferred(lambda _: self._cancel_ticket(ticket))
        ticket.outcome = d
        if timeout is not None:
            ticket.deadline = started + timeout
            ticket.timer = self.factory.clock.callLater(timeout, self._ticket_expired, ticket)
        self._waiting.append(ticket)
        self.factory.active.add(self)
        self._admit()

        def done(outcome: Any) -> Any:
            seconds = self.factory.clock.seconds() - started
            if isinstance(outcome, Failure):
                error = _as_task_error(outcome, function)
                self.factory.stats.finished(function, error.code, seconds)
                return error
            self.factory.stats.finished(function, "ok", seconds)
            return outcome

        d.addBoth(done)
        return d

    # Fair admission: each client may have its share of the pool's task slots in
    # the pool's queue at once; the rest wait here.  So one client's burst (a
    # batch of thousands, say) queues behind itself, and another client's call
    # takes the next free slot instead of waiting behind the whole burst.

    def admit(self) -> None:
        """Hand the pool what waiting calls this client's share allows."""
        if getattr(self, "_open", False):
            self._admit()

    def _admit(self) -> None:
        share = self.factory.share()
        while self._waiting and self._submitted < share:
            ticket = self._waiting.popleft()
            if ticket.timer is not None:
                ticket.timer.cancel()
                ticket.timer = None
            timeout = None
            if ticket.deadline is not None:
                timeout = ticket.deadline - self.factory.clock.seconds()
                if timeout <= 0:
                    ticket.outcome.errback(TaskError(wire.TIMEOUT, "no worker was free in time"))
                    continue
            self._submitted += 1
            ticket.submitted = maybeDeferred(
                self.factory.pool.send_task,
                ticket.function,
                ticket.args,
                ticket.kwargs,
                timeout=timeout,
                on_progress=ticket.on_progress,
            )
            ticket.submitted.addBoth(self._ticket_done, ticket)
        self._update_sharing()

    def _update_sharing(self) -> None:
        """Keep the factory's ``active`` and ``held`` sets true of this client."""
        if self._waiting:
            self.factory.held.add(self)
        else:
            self.factory.held.discard(self)
            if not self._submitted:
                self.factory.active.discard(self)

    def _ticket_done(self, outcome: Any, ticket: _Ticket) -> None:
        self._submitted -= 1
        ticket.submitted = None
        if not ticket.outcome.called:
            if isinstance(outcome, Failure):
                ticket.outcome.errback(outcome)
            else:
                ticket.outcome.callback(outcome)
        self._admit()
        if self.factory.held and self not in self.factory.active:
            # This client has left: the others' shares grew (one fewer active
            # client), so those held back take the freed slots now rather than
            # when their own calls next finish.
            self.factory.admit_held()

    def _cancel_ticket(self, ticket: _Ticket) -> None:
        if ticket.submitted is not None:
            ticket.submitted.cancel()  # the pool sends the cancel; its failure follows
            return
        self._drop_waiting(ticket, cancelled_error())

    def _ticket_expired(self, ticket: _Ticket) -> None:
        ticket.timer = None
        self._drop_waiting(ticket, TaskError(wire.TIMEOUT, "no worker was free in time"))

    def _drop_waiting(self, ticket: _Ticket, error: TaskError) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            if ticket.timer is not None:
                ticket.timer.cancel()
                ticket.timer = None
            if not ticket.outcome.called:
                ticket.outcome.errback(error)
            self._update_sharing()

    def _single(self, pending: _Pending, request: wire.Request) -> None:
        def progress(value: Any) -> None:
            self._reply(wire.encode_reply(wire.Progress(request.id, value)))

        d = self._call(request.function, request.args, request.kwargs, request.timeout, progress)
        pending.deferreds.append(d)

        def reply(outcome: Any) -> None:
            if isinstance(outcome, TaskError):
                record: wire.Reply = outcome.to_reply(request.id)
            else:
                record = wire.Result(request.id, outcome)
            self._finish(pending, wire.encode_reply(record), 1)

        d.addCallback(reply).addErrback(
            _log_failure, "Replying to request {id!r} failed", request.id
        )

    # A batch

    def _batch(self, pending: _Pending, request: wire.Request, items: tuple[Any, ...]) -> None:
        total = len(items)
        results: list[dict[str, Any] | None] = [None] * total
        counts = {"done": 0, "failed": 0}

        def item_done(outcome: Any, index: int) -> None:
            if isinstance(outcome, TaskError):
                error: dict[str, Any] = {"code": outcome.code, "message": outcome.message}
                if outcome.type is not None:
                    error["type"] = outcome.type
                results[index] = {"error": error}
                counts["failed"] += 1
            else:
                results[index] = {"result": outcome}
            counts["done"] += 1
            if counts["done"] < total:
                self._reply(
                    wire.encode_reply(wire.Progress(request.id, {**counts, "total": total}))
                )
                return
            self._reply(wire.encode_reply(wire.Progress(request.id, {**counts, "total": total})))
            self._finish(pending, wire.encode_reply(wire.Result(request.id, results)), total)

        for index, item in enumerate(items):
            if isinstance(item, dict):
                args: tuple[Any, ...] = ()
                kwargs = {**request.kwargs, **item}
            elif isinstance(item, list):
                args, kwargs = tuple(item), dict(request.kwargs)
            else:
                d: Deferred[Any] = Deferred()
                d.callback(
                    TaskError(
                        wire.BAD_REQUEST,
                        "a batch item is an object (keywords) or a list (positional)",
                    )
                )
                self.factory.stats.finished(request.function, wire.BAD_REQUEST, 0.0)
                d.addCallback(item_done, index)
                continue
            d = self._call(request.function, args, kwargs, request.timeout, None)
            pending.deferreds.append(d)
            d.addCallback(item_done, index).addErrback(
                _log_failure, "Batch {id!r} item failed to report", request.id
            )


def _as_task_error(failure: Failure, function: str) -> TaskError:
    if failure.check(TaskError):
        error: TaskError = failure.value  # type: ignore[assignment]  # checked above
        return error
    from twisted.internet.defer import CancelledError

    if failure.check(CancelledError):
        return TaskError(wire.CANCELLED, "cancelled")
    _log.failure("Unexpected failure calling {function}", failure, function=function)
    return TaskError(
        wire.WORKER_LOST, f"the gateway could not run the task: {failure.getErrorMessage()}"
    )


def _log_failure(failure: Failure, message: str, request_id: wire.RequestId) -> None:
    _log.failure(message, failure, id=request_id)


#: The pool slots assumed until the pool says how many it has.
FIRST_SHARE = 16


class GatewayFactory(WebSocketServerFactory):
    """
    Builds :class:`GatewayProtocol` for every WebSocket client.

    :param pool: where tasks run.
    :param clock: provides ``seconds()``, for latencies.
    :param limits: the gateway's bounds.
    :param stats: the counters ``/status`` and ``/metrics`` read.
    :param auto_ping: seconds between pings; a peer silent for as long again is dropped.
    :param access: who may connect; by default anyone.
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
    ) -> None:
        super().__init__(url)
        self.pool = pool
        self.access = access or GatewayAccess()
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.limits = limits or GatewayLimits()
        self.stats = stats or GatewayStats()
        #: Clients with calls waiting or running, among which the pool is shared.
        self.active: set[GatewayProtocol] = set()
        #: Of those, the clients with calls waiting beyond their share.
        self.held: set[GatewayProtocol] = set()
        self.setProtocolOptions(
            maxMessagePayloadSize=self.limits.max_message,
            maxFramePayloadSize=self.limits.max_message,
            autoPingInterval=auto_ping,
            autoPingTimeout=auto_ping,
            tcpNoDelay=True,
            # Close with a handshake, so an error reply sent just before is delivered.
            failByDrop=False,
        )

    def admit_held(self) -> None:
        """Let the clients held back take what their shares now allow."""
        for client in list(self.held):
            client.admit()

    def share(self) -> int:
        """
        :return: how many calls one client may have at the pool at once: the
            pool's :meth:`~taskoffload.client.ITaskPool.capacity` (or
            :data:`FIRST_SHARE` until it has said) divided among the active clients.
        """
        # What the pool takes at once: its slots, or more if it prefetches.  Until
        # the pool has said, assume a small one: the first burst must not all
        # queue ahead of everyone else.
        total = self.pool.capacity() or FIRST_SHARE
        return max(1, -(-total // max(1, len(self.active))))
