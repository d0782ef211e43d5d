"""
The task server that runs inside each worker process: a line protocol that decodes
requests, checks the connection's answer to its challenge, runs each request's
task through a :class:`~taskoffload.running.TaskRunner` and writes one final reply
per request, and the factory that counts the process's work across connections.

(:class:`~taskoffload.acceptor.SharedSocketAcceptor`, which takes connections from
the shared listening socket, and the deadline seam of :mod:`taskoffload.running`
are importable from here too.)
"""

from __future__ import annotations

import hmac
import os
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload import wire
from taskoffload._transport import write_now
from taskoffload.acceptor import SharedSocketAcceptor
from taskoffload.catalogue import catalogue
from taskoffload.extensions import gateway_only
from taskoffload.lost import JOURNAL_ENV, LostQuery, worker_answer
from taskoffload.registry import TaskRegistry
from taskoffload.running import DeadlineExceeded, ISyncDeadlines, TaskRunner, final_reply
from taskoffload.settings import WorkerSettings, WorkerSettingsFields

if TYPE_CHECKING:
    # typing.Unpack is new in Python 3.11; this package still runs on 3.10.
    from typing_extensions import Unpack

__all__ = [
    "DeadlineExceeded",
    "ISyncDeadlines",
    "SharedSocketAcceptor",
    "TaskServerFactory",
    "TaskServerProtocol",
    "WorkerSettings",
]

#: Seconds a TaskClient connection counts as busy after its session line while its
#: first request is on its way, so that a burst of connections spreads over idle workers.
RESERVATION_SECONDS = 1.0

#: Seconds a new connection counts as busy before its first byte: long enough
#: for a client that sends at once, short enough that silent connections cannot
#: stall accepting.
FIRST_BYTE_SECONDS = 0.05


class _Job:
    """One request on one connection, from arrival to final reply."""

    __slots__ = ("deferred", "done", "request")

    def __init__(self, request: wire.Request) -> None:
        self.request = request
        self.deferred: Deferred[Any] | None = None
        self.done = False


@implementer(IHalfCloseableProtocol)
class TaskServerProtocol(LineReceiver):
    """
    Serve newline-delimited JSON requests on one connection.

    Requests on one connection run one after another, in order, so replies to
    id-less requests come back in request order; ``cancel`` messages act at once.
    """

    delimiter = b"\n"
    MAX_LENGTH = wire.DEFAULT_MAX_MESSAGE
    factory: TaskServerFactory

    def __init__(self) -> None:
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._reservation: IDelayedCall | None = None
        self._partial: IDelayedCall | None = None
        self._closing = False
        self._nonce: str | None = None
        self._input_closed = False
        self._reject_when_busy = False

    # LineReceiver / IProtocol

    def connectionMade(self) -> None:
        self.MAX_LENGTH = self.factory.settings.max_message
        secret = self.factory.settings.secret
        if secret is not None:
            self._nonce = os.urandom(16).hex()
            self._send(wire.encode_challenge(wire.Challenge(nonce=self._nonce)))
        else:
            self._nonce = None
        self._reservation = self.factory.clock.callLater(FIRST_BYTE_SECONDS, self._release)
        # The first line, too, must come within idle_timeout: a silent connection
        # is closed like a stalled one.
        self._partial = self.factory.clock.callLater(
            self.factory.settings.idle_timeout, self._partial_timed_out
        )
        self.factory.connection_opened(self)

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self._reservation is not None and not self._reject_when_busy:
            # The client sent something, but not a whole request: it is here, but
            # need not hold the slot while it trickles (a TaskClient's reservation
            # instead ends with its first request, after the session line).
            self._release()
        # A line must be completed within idle_timeout of its first byte, so a
        # client that trickles or stalls (slowloris) cannot hold a connection.
        if self._buffer and not self._closing:  # LineReceiver's unfinished line
            if self._partial is None:
                self._partial = self.factory.clock.callLater(
                    self.factory.settings.idle_timeout, self._partial_timed_out
                )
        elif self._partial is not None:
            self._partial.cancel()
            self._partial = None

    def _partial_timed_out(self) -> None:
        self._partial = None
        self._refuse(
            wire.BAD_REQUEST,
            f"incomplete message: no newline within {self.factory.settings.idle_timeout:g} s",
        )

    def _refuse(self, code: str, message: str) -> None:
        """Send an id-less error, then close the connection; read nothing more."""
        if self._closing:
            return
        self._closing = True
        self._send(wire.encode_reply(wire.ErrorReply(id=None, code=code, message=message)))
        self.transport.loseConnection()  # type: ignore[union-attr]  # connected

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if self.factory.stopping and self.idle:
            # Not run: the goodbye that follows tells the client so.
            self.close()
            return
        try:
            message = wire.decode_message(line)
        except wire.BadMessage as e:
            if self._nonce is not None:
                self._unauthorized("answer the challenge first")
                return
            self._send(wire.encode_reply(e.to_reply()))
            return
        if self._nonce is not None:
            # A shared secret guards this port: nothing runs before the answer.
            secret = self.factory.settings.secret
            assert secret is not None
            if isinstance(message, wire.Auth) and hmac.compare_digest(
                message.digest, wire.auth_digest(secret, self._nonce)
            ):
                self._nonce = None
            else:
                self._unauthorized("wrong or missing answer to the challenge")
            return
        if isinstance(message, wire.Auth):
            return  # no challenge was sent: nothing to check
        if isinstance(message, wire.Cancel):
            self._cancel(message.id)
            return
        if isinstance(message, LostQuery):
            self._release()  # it brings no task: hold no slot for one
            self._send(worker_answer(message.pid))
            return
        if isinstance(message, wire.Session):
            self._reject_when_busy = message.reject_when_busy
            self._send(self.factory.session_ack)
            if message.reject_when_busy:
                # A TaskClient sends its first request once it has the ack: hold
                # the slot for it.
                if self._reservation is not None and self._reservation.active():
                    self._reservation.cancel()
                self._reservation = self.factory.clock.callLater(RESERVATION_SECONDS, self._release)
                self.factory.state_changed(self)
            return
        if self._reject_when_busy and self.idle and self.factory.at_limit:
            # This process is busy with another connection's work; the client
            # will send this request where a worker is free.
            self._send(
                wire.encode_reply(
                    wire.ErrorReply(
                        id=message.id,
                        code=wire.OVERLOADED,
                        message="this worker is busy; send the request to another",
                        type=wire.WORKER_BUSY,
                    )
                )
            )
            return
        refused = gateway_only(message)  # says "resumes" for every resume
        if refused is not None or isinstance(message, wire.Resume):
            why = f"{refused} are served by the gateway, not by a worker"
            self._send(wire.encode_reply(wire.ErrorReply(message.id, wire.BAD_REQUEST, why)))
            return
        self._queue.append(_Job(message))
        if self._reservation is not None:
            self._release()
        self._next()
        self.factory.state_changed(self)  # queued behind a running one, or started

    def _unauthorized(self, why: str) -> None:
        self._refuse(wire.UNAUTHORIZED, why)

    def readConnectionLost(self) -> None:
        """
        The client closed its side (``printf ... | nc -N``): answer what it sent,
        then close.
        """
        self._input_closed = True
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        """Nothing more can be written: give up on the connection."""
        self.transport.loseConnection()  # type: ignore[union-attr]  # connected

    def _close_if_done(self) -> None:
        if self._closing or not self.idle:
            return
        if self.factory.stopping:
            # Stopping: a connection whose work is done says goodbye, so its
            # client sends what comes next to another worker.
            self.close()
        elif self._input_closed:
            self._closing = True
            self.transport.loseConnection()  # type: ignore[union-attr]  # connected

    def lineLengthExceeded(self, line: bytes) -> None:
        """Answer an oversize line with ``bad_request``, then close the connection."""
        self._refuse(wire.BAD_REQUEST, f"message longer than the limit of {self.MAX_LENGTH} bytes")

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008  # Twisted's signature
        self._closing = True
        if self._reservation is not None:
            self._reservation.cancel()
            self._reservation = None
        if self._partial is not None:
            self._partial.cancel()
            self._partial = None
        self._queue.clear()
        running = self._running
        if running is not None and running.deferred is not None and not running.done:
            running.deferred.cancel()
        self.factory.connection_closed(self)

    # Bookkeeping the factory reads

    @property
    def busy(self) -> bool:
        """The connection has a task queued or running, or awaits its first request."""
        return self._reservation is not None or self._running is not None or bool(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing is running or queued on this connection."""
        return self._running is None and not self._queue

    def _release(self) -> None:
        if self._reservation is not None:
            if self._reservation.active():
                self._reservation.cancel()
            self._reservation = None
            self.factory.state_changed(self)

    # Running requests

    def _next(self) -> None:
        if self._running is not None or not self._queue or self._closing:
            return
        job = self._queue.popleft()
        self._running = job
        self.factory.state_changed(self)
        d = self.factory.run(job.request, lambda value: self._progress(job, value))
        job.deferred = d
        d.addBoth(self._finished, job)

    def _finished(self, outcome: wire.Result | wire.ErrorReply | Failure, job: _Job) -> None:
        job.done = True
        if self._running is job:
            self._running = None
        reply = final_reply(job.request.id, outcome)
        if not self._closing:
            # The final reply goes out now, not after the next poll: the client is
            # waiting for it to send this worker more work.
            write_now(self.transport, wire.encode_reply(reply))
        self.factory.state_changed(self)
        self._next()
        self._close_if_done()
        self.factory.task_finished()

    def _progress(self, job: _Job, value: Any) -> None:
        if not job.done and not self._closing:
            self._send(wire.encode_reply(wire.Progress(id=job.request.id, progress=value)))

    def _cancel(self, request_id: wire.RequestId) -> None:
        running = self._running
        if running is not None and running.request.id == request_id:
            if running.deferred is not None:
                running.deferred.cancel()
            return
        for job in self._queue:
            if job.request.id == request_id:
                self._queue.remove(job)
                self._send(
                    wire.encode_reply(
                        wire.ErrorReply(
                            id=request_id, code=wire.CANCELLED, message="cancelled before it ran"
                        )
                    )
                )
                self.factory.state_changed(self)
                return
        # Already answered: its final reply is on its way or delivered.

    def _send(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]  # connected

    def close(self) -> None:
        """
        Close the connection.  An idle one first gets a goodbye: from then on
        nothing more is read, so its client knows a request it has just sent did
        not run and can send it elsewhere.
        """
        if self.idle and not self._closing:
            self._send(wire.encode_goodbye(wire.Goodbye(reason="worker stopping")))
        self._closing = True
        if self._reservation is not None:
            self._release()
        self.transport.loseConnection()  # type: ignore[union-attr]  # connected


class TaskServerFactory(Factory):
    """
    Builds :class:`TaskServerProtocol` for all connections of one worker process,
    keeps count of their work (capacity, draining, stopping) and runs their
    requests through one :class:`~taskoffload.running.TaskRunner`.

    :param registry: the tasks that may run.
    :param clock: for deadlines and reservations.
    :param settings: how connections are served; the defaults if not given.
    :param sync_deadlines: interrupts synchronous tasks at their deadline; without
        it only Deferred-returning tasks are held to one.
    :param capacity_changed: called with ``True`` when the process can take a new
        connection and ``False`` when it is at its limit.
    :param after_task: called after each task's final reply is written (the
        worker process uses it to decide when to recycle itself).
    :param overrides: fields of ``settings`` to replace, as keywords (a test's
        shorthand for a changed copy of the settings).
    """

    protocol = TaskServerProtocol  # type: ignore[assignment]  # a Protocol subclass, as Twisted expects

    def __init__(
        self,
        registry: TaskRegistry,
        clock: IReactorTime,
        settings: WorkerSettings | None = None,
        *,
        sync_deadlines: ISyncDeadlines | None = None,
        capacity_changed: Callable[[bool], None] | None = None,
        after_task: Callable[[], None] | None = None,
        **overrides: Unpack[WorkerSettingsFields],
    ) -> None:
        settings = attrs.evolve(settings if settings is not None else WorkerSettings(), **overrides)
        self.settings = settings
        self.runner = TaskRunner(
            registry,
            clock,
            task_timeout=settings.task_timeout,
            sync_deadlines=sync_deadlines,
            lane=settings.lane,
        )
        self._after_task = after_task
        #: Set by :meth:`begin_stop`.
        self.stopping = False
        retry = tuple(sorted(name for name, spec in registry.tasks.items() if spec.retry))
        #: The reply to a session line, the same for every connection.
        self.session_ack = wire.encode_session_ack(
            wire.SessionAck(
                worker=settings.worker_id,
                retry=retry,
                slots=settings.pool_slots,
                concurrency=settings.concurrency,
                lane=settings.lane,
                lanes=settings.lanes,
                routes=registry.routes(),
                tasks=tuple(catalogue(registry.tasks)),
                deaths=JOURNAL_ENV in os.environ,
            )
        )
        self.clock = clock
        self.connections: set[TaskServerProtocol] = set()
        # The connections that are busy, and those with a task queued or running,
        # kept as each reports a change (state_changed): counting them by a scan
        # of every connection cost a worker with 50 connections a third of its
        # time per task.
        self._busy: set[TaskServerProtocol] = set()
        self._active: set[TaskServerProtocol] = set()
        self._capacity_changed = capacity_changed
        self._had_capacity = True
        self._drained: list[Deferred[None]] = []
        self._closed: list[Deferred[None]] = []
        # Connections are gated by capacity, but an idle connection may bring work
        # while others run; the semaphore keeps ``concurrency`` a hard bound.
        self._slots = defer.DeferredSemaphore(settings.concurrency)

    @property
    def busy_connections(self) -> int:
        """Connections with work queued, running, or about to arrive."""
        return len(self._busy)

    @property
    def has_capacity(self) -> bool:
        """Fewer than ``concurrency`` connections are busy."""
        return self.busy_connections < self.settings.concurrency

    @property
    def at_limit(self) -> bool:
        """As many connections have work as ``concurrency`` allows."""
        return self.running >= self.settings.concurrency

    @property
    def running(self) -> int:
        """Connections with a task queued or running."""
        return len(self._active)

    def connection_opened(self, connection: TaskServerProtocol) -> None:
        """Record a new connection."""
        self.connections.add(connection)
        self.state_changed(connection)

    def connection_closed(self, connection: TaskServerProtocol) -> None:
        """Forget a closed connection."""
        self.connections.discard(connection)
        self._busy.discard(connection)
        self._active.discard(connection)
        self.state_changed()
        if not self.connections and self._closed:
            waiters, self._closed = self._closed, []
            for d in waiters:
                d.callback(None)

    def state_changed(self, connection: TaskServerProtocol | None = None) -> None:
        """
        Recompute capacity, telling the acceptor, and fire :meth:`drain` waiters.

        :param connection: the connection whose state changed, if it is open.
        """
        if connection is not None and connection in self.connections:
            if connection.busy:
                self._busy.add(connection)
            else:
                self._busy.discard(connection)
            if connection.idle:
                self._active.discard(connection)
            else:
                self._active.add(connection)
        capacity = self.has_capacity
        if capacity != self._had_capacity:
            self._had_capacity = capacity
            if self._capacity_changed is not None:
                self._capacity_changed(capacity)
        if self._drained and self.busy_connections == 0:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def task_finished(self) -> None:
        """A task's final reply was written."""
        if self._after_task is not None:
            self._after_task()

    def drain(self) -> Deferred[None]:
        """
        :return: a Deferred that fires once no task is queued or running on any
            connection, and no newly accepted connection is still awaiting its
            first request.
        """
        if self.busy_connections == 0:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def begin_stop(self) -> None:
        """
        Stop taking work: idle connections say goodbye and close now, the others
        once their running task has replied; requests that arrive meanwhile are
        not run (the goodbye tells their clients).
        """
        self.stopping = True
        for connection in list(self.connections):
            connection._close_if_done()

    def close_all(self) -> Deferred[None]:
        """
        Close every connection once its pending replies are written.

        :return: a Deferred that fires when all connections are closed.
        """
        if not self.connections:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._closed.append(d)
        for connection in list(self.connections):
            connection.close()
        return d

    @property
    def tasks_done(self) -> int:
        """How many tasks have ended, however they ended."""
        return self.runner.tasks_done

    def run(
        self, request: wire.Request, progress: Callable[[Any], None]
    ) -> Deferred[wire.Result | wire.ErrorReply]:
        """
        Run one request's task once fewer than ``concurrency`` tasks run.

        :return: a Deferred firing with the final reply; it fails with
            :class:`CancelledError` if cancelled.
        """
        return self.runner.run(request, progress, slots=self._slots)
