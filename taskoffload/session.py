"""
One WebSocket client's conversation with the gateway, below the framing: each
message is a request (``docs/protocol.rst``), run through the client's line at the
pool (:mod:`taskoffload.fairshare`), and answered when the task's Deferred fires.

Every path ends in exactly one final reply per request: nobody waits on the
Deferreds here, so each carries its own errback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from taskoffload import wire
from taskoffload.detach import DEFAULT_MAX_DETACH, DetachedCall, DetachedCalls, detach_problem
from taskoffload.errors import TaskError
from taskoffload.fairshare import FairShare, LaneShares
from taskoffload.flights import Flights
from taskoffload.lost import LostQuery
from taskoffload.stats import GatewayStats

__all__ = ["GatewayLimits", "GatewaySession"]

_log = Logger(namespace="taskoffload.gateway")


class GatewayLimits:
    """
    The gateway's bounds.

    :param max_inflight_per_client: requests (batch items included) one client may
        have unanswered before further ones get ``overloaded``.
    :param max_pending: the same bound over all clients together.
    :param max_message: the longest frame accepted, in bytes.
    :param max_detach: the most seconds a request may ask to outlive its connection.
    """

    def __init__(
        self,
        max_inflight_per_client: int = 1000,
        max_pending: int = 100_000,
        max_message: int = wire.DEFAULT_MAX_MESSAGE,
        max_detach: float = DEFAULT_MAX_DETACH,
    ) -> None:
        self.max_inflight_per_client = max_inflight_per_client
        self.max_pending = max_pending
        self.max_message = max_message
        self.max_detach = max_detach


class _Pending:
    """One request in flight for one client."""

    __slots__ = ("deferreds", "held", "id", "reply")

    def __init__(self, request_id: wire.RequestId) -> None:
        self.id = request_id
        self.deferreds: list[Deferred[Any]] = []
        self.reply: bytes | None = None
        #: A detachable request's record (its replies go through it).
        self.held: DetachedCall | None = None

    def cancel(self) -> None:
        for d in list(self.deferreds):
            d.cancel()


class _Line:
    """
    The client's line at the pool (:mod:`taskoffload.fairshare`), closed once
    the client has gone and no call that outlives it is left: a call shared by a
    key, or a detached one.  The others are cancelled when the client goes, so
    they are not counted (nor is anything added to their path).
    """

    def __init__(self, line: Any) -> None:
        self._line = line
        self._calls = 0
        self._gone = False

    def call(self, outlives: bool, *call: Any) -> Deferred[Any]:
        if not outlives:
            return self._line.call(*call)  # type: ignore[no-any-return]  # the line is Any
        self._calls += 1

        def ended(outcome: Any) -> Any:
            self._calls -= 1
            if self._gone and not self._calls:
                self._line.close()
            return outcome

        d: Deferred[Any] = self._line.call(*call)
        return d.addBoth(ended)

    def close(self) -> None:
        self._gone = True
        if not self._calls:
            self._line.close()


class GatewaySession:
    """
    One client: many requests in flight, replies matched by ``id``, those
    without an id answered in the order they came.  The client is counted in
    ``stats`` from its creation until :meth:`close`.

    :param send: called with each reply, one JSON document (without a newline).
    :param share: the pool, shared with the other clients.
    :param stats: the gateway's counters.
    :param limits: the gateway's bounds.
    :param clock: for latencies.
    :param flights: the keyed calls running, shared by the gateway's sessions.
    :param detached: the detachable calls, shared by the gateway's sessions.
    """

    def __init__(
        self,
        send: Callable[[bytes], object],
        share: FairShare | LaneShares,
        stats: GatewayStats,
        limits: GatewayLimits,
        clock: IReactorTime,
        flights: Flights | None = None,
        detached: DetachedCalls | None = None,
    ) -> None:
        self._send = send
        self._line = _Line(share.client())
        self._flights = flights if flights is not None else Flights()
        self._detached = detached if detached is not None else DetachedCalls(clock)
        self._stats = stats
        self._limits = limits
        self._clock = clock
        self._by_id: dict[wire.RequestId, _Pending] = {}
        # Requests without an id, answered in the order they came.
        self._unnamed: deque[_Pending] = deque()
        self._count = 0
        self._open = True
        stats.clients += 1
        # Where this client's calls wait: counted in stats.waiting().
        stats.shares = share

    @property
    def open(self) -> bool:
        """Whether the client is still there (replies are sent)."""
        return self._open

    def received(self, payload: bytes, binary: bool = False) -> None:
        """Handle one message from the client: a request, a cancel, or junk."""
        if binary:
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
                pending.cancel()
            else:
                self._detached.cancel(self, message.id)  # one this client resumed
            return
        if isinstance(message, wire.Resume):
            refused = self._detached.resume(message, self, self._reply)
            if refused is not None:
                self._reply_now(refused)
            return
        if isinstance(message, (wire.Session, wire.Auth, LostQuery)):
            self._reply_now(
                wire.ErrorReply(
                    None, wire.BAD_REQUEST, "session, auth and lost lines are for the worker port"
                )
            )
            return
        self._request(message)

    def too_long(self) -> None:
        """The client sent a message over the limit: tell it (before it is dropped)."""
        if self._open:
            self._reply_now(
                wire.ErrorReply(
                    None,
                    wire.BAD_REQUEST,
                    f"message longer than the limit of {self._limits.max_message} bytes",
                )
            )

    def close(self) -> None:
        """The client has gone: cancel its unfinished calls at the workers; send nothing more."""
        if not self._open:
            return
        self._open = False
        self._stats.clients -= 1
        for pending in [*self._by_id.values(), *self._unnamed]:
            if pending.held is None:
                pending.cancel()
        self._detached.release(self)  # a detachable call waits for a resume instead
        self._line.close()

    def _request(self, message: wire.Request) -> None:
        if message.id is not None and message.id in self._by_id:
            self._reply_now(
                wire.ErrorReply(
                    message.id, wire.BAD_REQUEST, f"id {message.id!r} is already in flight"
                )
            )
            return
        items = len(message.batch) if message.batch is not None else 1
        limits = self._limits
        if message.batch is not None and not message.batch:
            self._reply_now(wire.ErrorReply(message.id, wire.BAD_REQUEST, "an empty batch"))
            return
        problem = detach_problem(message, limits.max_detach)
        if problem is not None:
            self._reply_now(wire.ErrorReply(message.id, wire.BAD_REQUEST, problem))
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
        if self._stats.inflight + self._detached.waiting + items > limits.max_pending:
            self._overloaded(message, f"the gateway has {limits.max_pending} requests pending")
            return
        pending = _Pending(message.id)
        if message.id is None:
            self._unnamed.append(pending)
        else:
            self._by_id[message.id] = pending
        self._count += items
        self._stats.started(items)
        if message.detach is not None:
            pending.held = self._detached.hold(message.id, message.detach, items, self, self._reply)
            pending.held.cancel = pending.cancel
        if message.batch is None:
            self._single(pending, message)
        else:
            self._batch(pending, message, message.batch)

    # Sending

    def _reply(self, data: bytes) -> None:
        if self._open:
            self._send(data[:-1])  # one message per frame, without the newline

    def _reply_now(self, reply: wire.Reply) -> None:
        self._reply(wire.encode_reply(reply))
        if isinstance(reply, wire.ErrorReply):
            self._stats.rejected("-", reply.code)

    def _overloaded(self, message: wire.Request, why: str) -> None:
        self._reply(
            wire.encode_reply(wire.ErrorReply(message.id, wire.OVERLOADED, f"{why}; retry later"))
        )
        self._stats.rejected(message.function, wire.OVERLOADED)

    def _finish(self, pending: _Pending, reply: bytes, items: int) -> None:
        self._count -= items
        if pending.id is not None:
            del self._by_id[pending.id]
            if pending.held is not None:
                pending.held.finished(reply)  # to whichever connection holds it now
            else:
                self._reply(reply)
            return
        pending.reply = reply
        while self._unnamed and self._unnamed[0].reply is not None:
            done = self._unnamed.popleft()
            assert done.reply is not None
            self._reply(done.reply)

    # One call

    def _call(
        self,
        pending: _Pending,
        request: wire.Request,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        on_progress: Callable[[Any], None] | None,
    ) -> Deferred[Any]:
        """Run ``request``'s task on ``args`` and ``kwargs`` (one batch item's), or join
        the run of its ``key``; the Deferred fires with its result or a TaskError,
        never fails.  A keyed or detached call may go on after this client has gone."""
        started = self._clock.seconds()
        function, timeout, key = request.function, request.timeout, request.key
        if key is None:
            outlives = pending.held is not None
            d = self._line.call(outlives, function, args, kwargs, timeout, on_progress)
        else:
            d = self._flights.call(
                function,
                key,
                lambda p: self._line.call(True, function, args, kwargs, timeout, p),
                on_progress,
            )

        def done(outcome: Any) -> Any:
            seconds = self._clock.seconds() - started
            if isinstance(outcome, Failure):
                error = _as_task_error(outcome, function)
                self._stats.finished(function, error.code, seconds)
                return error
            self._stats.finished(function, "ok", seconds)
            return outcome

        d.addBoth(done)
        return d

    def _progress(self, pending: _Pending, value: Any) -> None:
        if pending.held is not None:
            pending.held.progress(value)  # numbered, kept, sent to its holder
        else:
            self._reply(wire.encode_reply(wire.Progress(pending.id, value)))

    def _single(self, pending: _Pending, request: wire.Request) -> None:
        def progress(value: Any) -> None:
            self._progress(pending, value)

        d = self._call(pending, request, request.args, request.kwargs, progress)
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
                results[index] = {"error": wire.error_object(outcome.to_reply(None))}
                counts["failed"] += 1
            else:
                results[index] = {"result": outcome}
            counts["done"] += 1
            self._progress(pending, {**counts, "total": total})
            if counts["done"] == total:
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
                self._stats.finished(request.function, wire.BAD_REQUEST, 0.0)
                d.addCallback(item_done, index)
                continue
            d = self._call(pending, request, args, kwargs, None)
            pending.deferreds.append(d)
            d.addCallback(item_done, index).addErrback(
                _log_failure, "Batch {id!r} item failed to report", request.id
            )


def _as_task_error(failure: Failure, function: str) -> TaskError:
    if failure.check(TaskError):
        error: TaskError = failure.value  # type: ignore[assignment]  # checked above
        return error
    if failure.check(CancelledError):
        return TaskError(wire.CANCELLED, "cancelled")
    _log.failure("Unexpected failure calling {function}", failure, function=function)
    return TaskError(
        wire.WORKER_LOST, f"the gateway could not run the task: {failure.getErrorMessage()}"
    )


def _log_failure(failure: Failure, message: str, request_id: wire.RequestId) -> None:
    _log.failure(message, failure, id=request_id)
