"""
The client side of the worker port: :class:`TaskClient` sends tasks to a pool over
reused connections and fires one Deferred per task with its result.

Connections carry one request at a time (a worker runs one task at a time, so a
second request on a busy connection would wait behind the first).  A call takes the
most recently used idle connection, else opens a new one, else waits its turn; idle
connections close after a short time so they do not pin workers.
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import ClientCreator, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload import wire
from taskoffload._transport import write_now
from taskoffload.defaults import DEFAULT_POOL
from taskoffload.errors import TaskError
from taskoffload.interfaces import ITaskPool

__all__ = [
    "CONNECT_BACKOFF",
    "DEFAULT_POOL",
    "ITaskPool",
    "PoolAddress",
    "TaskClient",
    "TaskClientProtocol",
    "TaskError",
]

#: Seconds an address is skipped after a connection attempt to it failed.
CONNECT_BACKOFF: Final = 1.0

#: Connections in a row that an address may close before a worker takes them and
#: still be tried again at once; then it backs off like a refusing one.
EARLY_CLOSE_RETRIES: Final = 8

#: Connection attempts made to a pool before it has said how many task slots it has.
FIRST_CONNECTS: Final = 16

#: Connections in a row that may land on a worker the client already holds enough
#: connections to, and be closed to try for another worker; then one is kept.
DUPLICATE_RETRIES: Final = 4

# Slack when comparing reactor times, so float rounding never delays an expiry by
# one more timer round.
_EPSILON: Final = 1e-6

_FOREVER: Final = float("inf")


# What a TaskClient checks, says and counts, in one place so that
# taskoffload.testing.FakeTaskPool checks, says and counts the same.

#: The log format of the failure that a caller's ``on_progress`` raised, with the
#: task name as ``function``.
ON_PROGRESS_RAISED: Final = "on_progress of {function!r} raised"


def check_timeout(timeout: float | None, *, or_none: bool = False) -> None:
    """
    Check a timeout given to a pool.

    :param timeout: seconds, or ``None``, which always passes.
    :param or_none: the message says that ``None`` is allowed too (where it is
        the default).
    :raises ValueError: if ``timeout`` is not ``None`` nor a positive finite number.
    """
    if timeout is not None and not 0 < timeout < _FOREVER:
        suffix = ", or None" if or_none else ""
        raise ValueError(f"timeout must be a positive number of seconds{suffix}")


def encode_request_or_error(request: wire.Request) -> bytes | TaskError:
    """
    Encode ``request`` as the client writes it.

    :return: the line, delimiter included, or the ``bad_request``
        :class:`TaskError` a call fails with when its arguments cannot be sent.
    """
    try:
        return wire.encode_request(request)
    except (TypeError, ValueError, RecursionError) as e:
        return TaskError(wire.BAD_REQUEST, f"the arguments cannot be sent as JSON: {e}")


def timeout_error(seconds: float) -> TaskError:
    """
    :param seconds: the call's timeout.
    :return: the error of a call that had no reply within its timeout.
    """
    return TaskError(wire.TIMEOUT, f"no reply within {seconds:g} seconds")


def cancelled_error() -> TaskError:
    """:return: the error of a call whose caller cancelled its Deferred."""
    return TaskError(wire.CANCELLED, "cancelled by the caller")


def pool_capacity(slots: int | None, prefetch: int) -> int | None:
    """
    :param slots: how many tasks the pool runs at once, or ``None`` if unknown.
    :param prefetch: how many calls are sent ahead on each busy connection.
    :return: how many calls the pool takes at once: ``slots`` times one more
        than ``prefetch``; ``None`` without ``slots``.
    """
    if slots is None:
        return None
    return slots * (1 + prefetch)


@attrs.frozen
class PoolAddress:
    """
    Where a pool listens: ``tcp:HOST:PORT`` (or ``HOST:PORT``, IPv6 hosts in
    brackets) or ``unix:PATH``.

    :ivar kind: ``"tcp"`` or ``"unix"``.
    """

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, text: str) -> PoolAddress:
        """
        :raises ValueError: if ``text`` is not one of the accepted forms.
        """
        if text.startswith("unix:"):
            if len(text) == 5:
                raise ValueError(f"{text!r} is not a pool address: unix:PATH needs a path")
            return cls(kind="unix", path=text[5:])
        rest = text[4:] if text.startswith("tcp:") else text
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"{text!r} is not a pool address: use tcp:HOST:PORT, HOST:PORT or unix:PATH"
            )
        return cls(kind="tcp", host=host, port=int(port))

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


# A call's life: queued (waiting for a connection), sent (on a connection, its
# Deferred unfired), abandoned (still on a connection, but the caller has had its
# answer: timeout, cancel, or a broken connection), finished.
_QUEUED: Final = 0
_SENT: Final = 1
_ABANDONED: Final = 2
_FINISHED: Final = 3


class _Call:
    """One task, from :meth:`TaskClient.send_task` to its final reply."""

    deferred: Deferred[Any]

    __slots__ = (
        "args",
        "connection",
        "deadline",
        "deferred",
        "function",
        "id",
        "kwargs",
        "on_progress",
        "retried",
        "state",
        "timeout",
        "timer",
    )

    def __init__(
        self,
        request_id: int,
        function: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        on_progress: Callable[[Any], object] | None,
    ) -> None:
        self.id = request_id
        self.function = function
        self.args = args
        self.kwargs = kwargs
        self.timeout = timeout
        self.on_progress = on_progress
        self.deadline: float | None = None
        self.timer: IDelayedCall | None = None
        self.state = _QUEUED
        self.connection: TaskClientProtocol | None = None
        #: Sent a second time after its first connection was lost.
        self.retried = False


class _Target:
    """One pool address and the client's load on it."""

    __slots__ = (
        "address",
        "busy",
        "connecting",
        "down_until",
        "duplicates",
        "early_closes",
        "error",
        "opened",
        "retry",
        "slots",
        "workers",
    )

    def __init__(self, address: PoolAddress) -> None:
        self.address = address
        #: Connections with a request on them, answered or not.
        self.busy = 0
        #: Connection attempts under way.
        self.connecting = 0
        #: Reactor time before which new connections go elsewhere.
        self.down_until = 0.0
        #: Why the last connection attempt failed, if it did.
        self.error: str | None = None
        #: The pool's idempotent tasks, from the latest session acknowledgement.
        self.retry: frozenset[str] = frozenset()
        #: Tasks the pool runs at once (workers x concurrency), once it has said.
        self.slots: int | None = None
        #: Connections in a row closed before a worker took them.
        self.early_closes = 0
        #: Open connections to it (accepted by a worker, not yet forgotten).
        self.opened = 0
        #: Of those, how many each worker process (by pid) accepted.
        self.workers: Counter[int] = Counter()
        #: Connections in a row closed because their worker already had enough.
        self.duplicates = 0

    def __str__(self) -> str:
        return str(self.address)


def _handed_back(reply: wire.Reply) -> bool:
    """The worker did not run the request: it was busy with another connection's."""
    return (
        type(reply) is wire.ErrorReply
        and reply.code == wire.OVERLOADED
        and reply.type == wire.WORKER_BUSY
    )


_SESSION: Final = wire.encode_session(wire.Session(reject_when_busy=True))


class TaskClientProtocol(LineReceiver):
    """
    One connection to a pool: writes request and cancel lines, reads reply lines
    and hands them to its :class:`TaskClient`, which owns all bookkeeping.

    :ivar target: the address it is connected to.
    :ivar call: the request on it, if any.
    """

    delimiter = b"\n"
    MAX_LENGTH = wire.DEFAULT_MAX_MESSAGE

    def __init__(self, client: TaskClient, target: _Target, max_message: int) -> None:
        self.MAX_LENGTH = max_message
        self.client = client
        self.target = target
        #: The call the worker runs (or will run first) on this connection.
        self.call: _Call | None = None
        #: With prefetch: calls sent behind :attr:`call`, queued at the worker.
        self.ahead: deque[_Call] = deque()
        self.idle_since = 0.0
        self.lost = False
        #: The worker has accepted the connection (its session acknowledgement came).
        self.accepted = False
        #: The process id of the worker that accepted it, if it said.
        self.worker: int | None = None
        #: How many tasks that worker runs at once, as it said.
        self.concurrency = 1
        #: Fires with this protocol once accepted; fails if lost before.
        self.ready: Deferred[TaskClientProtocol] = Deferred(lambda d: self._abort())

    def connectionMade(self) -> None:
        if self.target.address.kind == "tcp":
            # Requests and replies are single small writes; Nagle would hold each back.
            transport = self.transport
            if ITCPTransport.providedBy(transport):
                transport.setTcpNoDelay(True)
        # Ask a busy worker to hand requests back rather than queue them behind
        # another connection's task (see wire.Session).  With a secret, that waits
        # for the worker's challenge.
        if self.client._secret is None:
            self.send(_SESSION)

    def lineReceived(self, line: bytes) -> None:
        try:
            reply = wire.decode_reply(line)
        except wire.BadMessage as e:
            self.client._bad_reply(self, e.message)
            return
        if isinstance(reply, wire.Challenge):
            if self.client._secret is None:
                if not self.ready.called:
                    why = "the pool asks for a shared secret; give the client secret=..."
                    self.ready.errback(Failure(ConnectionRefusedError(why)))
                self.close()
                return
            answer = wire.Auth(digest=wire.auth_digest(self.client._secret, reply.nonce))
            self.send(wire.encode_auth(answer) + _SESSION)
            return
        if isinstance(reply, wire.SessionAck):
            # The latest word on the pool's task modules, which a reload may change.
            self.target.retry = frozenset(reply.retry)
            if reply.slots:
                self.target.slots = reply.slots
            if not self.accepted:
                self.accepted = True
                self.worker = reply.worker
                self.concurrency = reply.concurrency or 1
                self.ready.callback(self)
            return
        if isinstance(reply, wire.Goodbye):
            self.client._goodbye(self)
            return
        self.client._reply_received(self, reply)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport

    def lineLengthExceeded(self, line: bytes) -> None:
        self.client._bad_reply(self, f"a reply longer than the limit of {self.MAX_LENGTH} bytes")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        if not self.accepted and not self.ready.called:
            # Still queued in the pool's listening socket: nothing was sent on it.
            self.ready.errback(reason)
        self.client._connection_lost(self, reason)

    def send(self, data: bytes) -> None:
        """Write ``data`` to the connection, sending it now (see :mod:`._transport`)."""
        assert self.transport is not None
        write_now(self.transport, data)

    def close(self) -> None:
        """Close the connection once what was written is sent."""
        assert self.transport is not None
        self.transport.loseConnection()


@implementer(ITaskPool)
class TaskClient:
    """
    Run tasks on one or more worker pools over reused connections.

    At most one request is in flight per connection.  A call takes the most
    recently used idle connection, else opens a new one (to the address with the
    fewest requests in flight, ties taken in turn) while fewer than
    ``max_connections`` exist, else waits in line.  An address that refuses a
    connection is skipped for :data:`CONNECT_BACKOFF` seconds; a request not yet
    sent then goes to another address, and fails with ``worker_lost`` only when
    every address has failed.

    A request that was sent is sent again only if the worker hands it back
    unrun (busy, or stopping), or if its task is idempotent: when the pool's
    session acknowledgement lists the task (``@task(retry=True)``) and the
    connection is lost (or dropped after a bad reply) before the result, the
    request goes once more, with what is left of its timeout, on another
    connection, so to another worker; the caller sees only the second attempt's
    reply, and a second loss fails it with ``worker_lost``.  Progress may then
    repeat.  A call that timed out or was cancelled is never sent again.

    Request ids are consecutive integers from 1, in the order of the calls.

    :param reactor: provides ``IReactorTime`` and ``IReactorTCP``, and
        ``IReactorUNIX`` for ``unix:`` addresses.
    :param addresses: pool addresses, see :class:`PoolAddress`.
    :param idle_timeout: seconds an unused connection stays open.
    :param timeout: the default seconds to wait for a result, or ``None`` to wait
        as long as it takes.
    :param max_connections: bound on open and opening connections together.
    :param max_message: longest reply line accepted, in bytes.
    :param connect_timeout: seconds a connection attempt may take.
    :param secret: the pools' shared secret, if they ask for one (an HMAC
        challenge on each connection).
    :param prefetch: while calls wait for a free connection, send up to this many
        of them ahead on each busy connection, where the worker queues them and
        starts each the moment the task before it ends, instead of a round trip
        later.  The cost: a prefetched call waits for the tasks ahead of it even
        if another worker frees first, and if its worker is lost it fails with
        ``worker_lost`` (or is sent again, if idempotent) like the call ahead of
        it, since the client cannot tell whether it had started.
    :raises ValueError: for an unreadable address or an out-of-range number.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        addresses: Sequence[str],
        *,
        idle_timeout: float = 2.0,
        timeout: float | None = None,
        max_connections: int = 1024,
        max_message: int = wire.DEFAULT_MAX_MESSAGE,
        connect_timeout: float = 5.0,
        secret: bytes | None = None,
        prefetch: int = 0,
    ) -> None:
        if isinstance(addresses, str):
            raise ValueError("addresses is a sequence of address strings, not one string")
        if not addresses:
            raise ValueError("a TaskClient needs at least one pool address")
        if idle_timeout < 0:
            raise ValueError("idle_timeout must not be negative")
        check_timeout(timeout, or_none=True)
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_message < 1:
            raise ValueError("max_message must be at least 1")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be positive")
        if prefetch < 0:
            raise ValueError("prefetch must not be negative")
        self._reactor = reactor
        self._secret = secret
        self._idle_timeout = idle_timeout
        self._timeout = timeout
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._max_message = max_message
        self._targets = [_Target(PoolAddress.parse(text)) for text in addresses]
        self._next_target = 0
        self._ids = itertools.count(1)
        # Waiting calls, oldest first.  Calls that time out or are cancelled while
        # waiting stay in the deque, marked finished, and are skipped when reached:
        # removing them would cost a scan each.  ``_queued`` counts the live ones.
        self._queue: deque[_Call] = deque()
        self._queued = 0
        # Idle connections, in the order they became idle: the newest is taken
        # first, the oldest expires first, so one timer serves them all.
        self._idle: deque[TaskClientProtocol] = deque()
        self._idle_timer: IDelayedCall | None = None
        self._connections: set[TaskClientProtocol] = set()
        self._connects: set[Deferred[TaskClientProtocol]] = set()
        self._closed = False
        self._close_waiters: list[Deferred[None]] = []
        self._prefetch = prefetch
        # Busy connections with room for a prefetched call, in the order they got
        # it (a dict as an ordered set: each at most once, forgotten with it; one
        # whose call was answered since is skipped when reached).
        self._prefetchable: dict[TaskClientProtocol, None] = {}

    # ITaskPool

    def call(self, function: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)`` with the client's default timeout.

        :return: a Deferred that fires with the result or fails with
            :class:`TaskError`.
        """
        return self.send_task(function, args, kwargs)

    def send_task(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Any], object] | None = None,
    ) -> Deferred[Any]:
        """
        Run ``function(*args, **kwargs)``.

        When ``timeout`` passes first, the Deferred fails with ``timeout`` and a
        cancel is sent; cancelling the Deferred fails it with ``cancelled`` and
        sends a cancel if the request was sent.  Either way the connection is
        reused only after the worker's final reply.  If the connection is lost
        first, the Deferred fails with ``worker_lost``, unless the pool declares
        the task idempotent: then it is sent once more (see :class:`TaskClient`).

        :param function: the registered name of the task.
        :param args: positional arguments; JSON-serializable.
        :param kwargs: keyword arguments; JSON-serializable.
        :param timeout: seconds to wait for the result, counted from now; ``None``
            for the client's default.  It is sent along so the worker enforces it too.
        :param on_progress: called with each progress value the task reports
            before its result; what it raises is logged.
        :return: a Deferred that fires with the result or fails with
            :class:`TaskError`.
        :raises ValueError: if ``timeout`` is not positive.
        """
        check_timeout(timeout)
        if timeout is None:
            timeout = self._timeout
        if self._closed:
            return defer.fail(TaskError(wire.WORKER_LOST, "client closed"))
        call = _Call(
            next(self._ids),
            function,
            tuple(args),
            dict(kwargs) if kwargs else {},
            timeout,
            on_progress,
        )
        call.deferred = Deferred(functools.partial(self._cancel, call))
        if timeout is not None:
            call.deadline = self._reactor.seconds() + timeout
            call.timer = self._reactor.callLater(timeout, self._timed_out, call)
        if self._idle and not self._queued:
            connection = self._idle.pop()
            error = self._send(connection, call)
            if error is not None:
                self._idle.append(connection)
                self._answer(call, error)
        else:
            self._queue.append(call)
            self._queued += 1
            self._dispatch()
        return call.deferred

    def slots(self) -> int | None:
        """
        :return: how many tasks the pools run at once, as they said when they
            accepted a connection; ``None`` before any has.
        """
        known = [t.slots for t in self._targets if t.slots]
        return sum(known) if known else None

    def capacity(self) -> int | None:
        """
        :return: how many calls the pools take at once before calls wait in this
            client: their slots, times one more than ``prefetch``; ``None``
            before any pool has said how many slots it has.
        """
        return pool_capacity(self.slots(), self._prefetch)

    # Lifecycle

    def close(self) -> Deferred[None]:
        """
        Close every connection and refuse new calls.  Calls waiting or in flight
        fail with ``worker_lost`` ("client closed").

        :return: a Deferred that fires when every connection is gone.
        """
        closed: Deferred[None] = Deferred()
        self._close_waiters.append(closed)
        if not self._closed:
            self._closed = True
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            dropped = [call for call in self._queue if call.state == _QUEUED]
            for call in dropped:
                call.state = _FINISHED
            self._queue.clear()
            self._queued = 0
            self._idle.clear()
            for connection in list(self._connections):
                for sent in (connection.call, *connection.ahead):
                    if sent is not None and sent.state == _SENT:
                        sent.state = _ABANDONED
                        dropped.append(sent)
                connection.close()
            for connect in list(self._connects):
                connect.cancel()
            for call in dropped:
                self._answer(call, TaskError(wire.WORKER_LOST, "client closed"))
        self._check_closed()
        return closed

    # Sending

    def _dispatch(self) -> None:
        """
        Give waiting calls to idle connections, open connections for the rest
        and, with prefetch, send what those will not take ahead on busy ones.
        """
        while self._queued and self._idle:
            self._use(self._idle.pop())
        while (
            self._queued > len(self._connects)
            and len(self._connections) + len(self._connects) < self._max_connections
        ):
            target = self._choose_target()
            if target is None:
                if self._all_down():
                    self._fail_unserved()
                break  # every pool has as many connections as it has slots: wait
            self._connect(target)
        if self._prefetch:
            self._prefetch_calls()

    def _prefetch_calls(self) -> None:
        """Send waiting calls ahead on busy connections, but those opening connections will take."""
        while self._queued > len(self._connects) and self._prefetchable:
            connection = next(iter(self._prefetchable))
            del self._prefetchable[connection]
            if connection.call is None or len(connection.ahead) >= self._prefetch:
                continue  # its call was answered (it is idle) since it was offered
            call = self._next_waiting()
            if call is None:
                return
            error = self._send(connection, call, ahead=True)
            if error is not None:
                self._offer(connection)
                self._answer(call, error)

    def _offer(self, connection: TaskClientProtocol) -> None:
        """Let a busy connection take prefetched calls, if it has room for one."""
        if connection.call is not None and len(connection.ahead) < self._prefetch:
            # Appended last: one call ahead on each busy connection before a second.
            self._prefetchable[connection] = None

    def _next_waiting(self) -> _Call | None:
        """Take the oldest waiting call out of the line."""
        while self._queued:
            call = self._queue.popleft()
            if call.state != _QUEUED:
                continue
            self._queued -= 1
            if not self._queued:
                self._queue.clear()
            return call
        return None

    def _use(self, connection: TaskClientProtocol) -> None:
        """Send the oldest waiting call on a free connection, or let it idle."""
        failed: list[tuple[_Call, TaskError]] = []
        while (call := self._next_waiting()) is not None:
            error = self._send(connection, call)
            if error is None:
                break
            failed.append((call, error))
        else:
            connection.idle_since = self._reactor.seconds()
            self._idle.append(connection)
            if self._idle_timer is None:
                self._idle_timer = self._reactor.callLater(self._idle_timeout, self._expire_idle)
        for call, error in failed:
            self._answer(call, error)

    def _send(
        self, connection: TaskClientProtocol, call: _Call, ahead: bool = False
    ) -> TaskError | None:
        """
        Write ``call``'s request on ``connection``, as its current call or, with
        ``ahead``, as the one queued behind it.

        :return: ``None``, or the error that kept the request from being written;
            the connection is then untouched and the call still unanswered.
        """
        timeout = None
        if call.deadline is not None:
            # What is left of the caller's deadline, so the worker keeps the same one.
            timeout = max(round(call.deadline - self._reactor.seconds(), 3), 0.001)
        request = wire.Request(
            id=call.id, function=call.function, args=call.args, kwargs=call.kwargs, timeout=timeout
        )
        line = encode_request_or_error(request)
        if isinstance(line, TaskError):
            call.state = _FINISHED
            return line
        call.state = _SENT
        call.connection = connection
        if ahead:
            connection.ahead.append(call)
        else:
            connection.call = call
        self._offer(connection)
        connection.target.busy += 1
        connection.send(line)
        return None

    def _answer(self, call: _Call, outcome: Any) -> None:
        """Fire ``call``'s Deferred with a result or a :class:`TaskError`."""
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if isinstance(outcome, TaskError):
            call.deferred.errback(outcome)
        else:
            call.deferred.callback(outcome)

    def _timed_out(self, call: _Call) -> None:
        call.timer = None
        assert call.timeout is not None  # only a call with a timeout has a timer
        self._give_up(call, timeout_error(call.timeout))

    def _cancel(self, call: _Call, deferred: Deferred[Any]) -> None:
        self._give_up(call, cancelled_error())

    def _give_up(self, call: _Call, error: TaskError) -> None:
        """Answer ``call`` with ``error`` now, and cancel it if it was sent."""
        if call.state == _QUEUED:
            call.state = _FINISHED
            self._queued -= 1
            if not self._queued:
                self._queue.clear()
        elif call.state == _SENT:
            call.state = _ABANDONED
            assert call.connection is not None
            call.connection.send(wire.encode_cancel(wire.Cancel(id=call.id)))
        else:
            return
        self._answer(call, error)

    # Connections

    def _choose_target(self) -> _Target | None:
        """
        :return: the address for a new connection: the one with the fewest
            requests in flight and attempts under way, ties taken in turn, among
            those not backing off; ``None`` if all are.
        """
        now = self._reactor.seconds()
        count = len(self._targets)
        best: _Target | None = None
        best_index = 0
        best_load = 0
        for offset in range(count):
            index = (self._next_target + offset) % count
            target = self._targets[index]
            if target.down_until > now or self._at_capacity(target):
                continue
            load = target.busy + target.connecting
            if best is None or load < best_load:
                best, best_index, best_load = target, index, load
        if best is not None:
            self._next_target = (best_index + 1) % count
        return best

    def _all_down(self) -> bool:
        now = self._reactor.seconds()
        return all(target.down_until > now for target in self._targets)

    def _at_capacity(self, target: _Target) -> bool:
        """
        More connections to ``target`` would only wait: it has as many as the pool
        has task slots (it says how many when it accepts one), or, until it has
        said, :data:`FIRST_CONNECTS` attempts are under way.  Calls beyond wait
        here, and go out in order as connections free up, instead of queueing in
        the pool's listening socket where the first worker to accept takes them.
        """
        if target.slots is None:
            return target.connecting >= FIRST_CONNECTS
        return target.opened + target.connecting >= target.slots

    def _connect(self, target: _Target) -> None:
        address = target.address
        target.connecting += 1
        creator = ClientCreator(self._reactor, TaskClientProtocol, self, target, self._max_message)
        connecting: Deferred[TaskClientProtocol]
        if address.kind == "unix":
            connecting = creator.connectUNIX(address.path, timeout=self._connect_timeout)
        else:
            connecting = creator.connectTCP(
                address.host, address.port, timeout=self._connect_timeout
            )
        # Requests wait until the worker has accepted the connection, so none sits
        # in the listening socket's queue where a stopping pool would drop it.
        connecting.addCallback(lambda protocol: protocol.ready)
        self._connects.add(connecting)
        connecting.addCallbacks(
            self._connected,
            self._connect_failed,
            callbackArgs=(connecting, target),
            errbackArgs=(connecting, target),
        ).addErrback(self._log_failure, "Connection bookkeeping for {address} failed", target)

    def _connected(
        self,
        connection: TaskClientProtocol,
        connecting: Deferred[TaskClientProtocol],
        target: _Target,
    ) -> None:
        if connection.lost:
            # Closed by the other side before we got it: as good as refused.
            self._connect_failed(Failure(ConnectionError("closed at once")), connecting, target)
            return
        self._connects.discard(connecting)
        target.connecting -= 1
        if self._closed:
            connection.close()
            self._check_closed()
            return
        target.down_until = 0.0
        target.error = None
        target.early_closes = 0
        worker = connection.worker
        if worker is not None:
            held = target.workers[worker]
            if (
                held >= connection.concurrency
                and self._queued
                and target.duplicates < DUPLICATE_RETRIES
            ):
                # Each worker takes connections while it has a free slot, so a
                # fast one can take a second while others have none: the calls
                # would then crowd onto it (two tasks in a row) while another
                # worker idles.  Its first connection will bring it work; try
                # again for a worker without one.
                target.duplicates += 1
                connection.close()
                self._dispatch()
                return
            target.duplicates = 0
            target.workers[worker] = held + 1
        self._connections.add(connection)
        target.opened += 1
        if not self._queued:
            # Accepted after the calls it was opened for went elsewhere: holding
            # it idle would keep its worker reserved for nothing.
            self._retire(connection)
            return
        self._use(connection)
        # Its acknowledgement may have told us the pool's size: open what more
        # connections the waiting calls need.
        self._dispatch()

    def _connect_failed(
        self, reason: Failure, connecting: Deferred[TaskClientProtocol], target: _Target
    ) -> None:
        self._connects.discard(connecting)
        target.connecting -= 1
        if self._closed:
            self._check_closed()
            return
        if reason.check(error.ConnectionDone, error.ConnectionLost):
            # Connected, then closed before a worker took the connection: a
            # balancer in front of a pool that is stopping, or a stopping pool's
            # accept queue.  Nothing was sent on it: try a fresh connection at
            # once, unless the address keeps doing it.
            target.early_closes += 1
            if target.early_closes <= EARLY_CLOSE_RETRIES:
                self._dispatch()
                return
        target.early_closes = 0
        target.down_until = self._reactor.seconds() + CONNECT_BACKOFF
        target.error = reason.getErrorMessage()
        self.log.warn(
            "Could not connect to {address}: {error}", address=str(target), error=target.error
        )
        self._dispatch()

    def _fail_unserved(self) -> None:
        """Every address is backing off: fail the waiting calls no connection is coming for."""
        message = (
            "; ".join(
                f"could not connect to {target}: {target.error}"
                for target in self._targets
                if target.error is not None
            )
            or "no pool address is available"
        )
        unserved = self._queued - len(self._connects)
        failed: list[_Call] = []
        # The newest calls go: the oldest are first in line for what connects.
        while unserved > 0:
            call = self._queue.pop()
            if call.state != _QUEUED:
                continue
            call.state = _FINISHED
            self._queued -= 1
            unserved -= 1
            failed.append(call)
        if not self._queued:
            self._queue.clear()
        for call in failed:
            self._answer(call, TaskError(wire.WORKER_LOST, message))

    def _expire_idle(self) -> None:
        """Close the connections idle for ``idle_timeout``; wait for the next one."""
        self._idle_timer = None
        now = self._reactor.seconds()
        while self._idle and self._idle[0].idle_since + self._idle_timeout <= now + _EPSILON:
            self._idle.popleft().close()
        if self._idle:
            delay = self._idle[0].idle_since + self._idle_timeout - now
            self._idle_timer = self._reactor.callLater(max(delay, 0.0), self._expire_idle)

    def _log_failure(self, failure: Failure, message: str, target: _Target) -> None:
        self.log.failure(message, failure, address=str(target))

    def _check_closed(self) -> None:
        if self._closed and not self._connections and not self._connects:
            waiters, self._close_waiters = self._close_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    # Called by TaskClientProtocol

    def _reply_received(
        self, connection: TaskClientProtocol, reply: wire.Result | wire.ErrorReply | wire.Progress
    ) -> None:
        if connection.ahead and not isinstance(reply, wire.Progress):
            for ahead in connection.ahead:
                if reply.id == ahead.id:
                    self._ahead_answered(connection, ahead, reply)
                    return
        call = connection.call
        if call is None or (
            reply.id != call.id and not (reply.id is None and type(reply) is wire.ErrorReply)
        ):
            # An id-less error answers a request the worker could not read at all.
            self._bad_reply(connection, f"a reply to request {reply.id!r}, which is not in flight")
            return
        if isinstance(reply, wire.Progress):
            if call.state == _SENT and call.on_progress is not None:
                try:
                    call.on_progress(reply.progress)
                except Exception:
                    self.log.failure(ON_PROGRESS_RAISED, function=call.function)
            return
        connection.call = None
        connection.target.busy -= 1
        state = call.state
        call.connection = None
        if _handed_back(reply):
            # The request did not run: this connection's worker is busy with other
            # work.  Drop the connection (an idle worker accepts the next one) and
            # send the request again, ahead of the calls waiting.  A call sent
            # behind it gets its own answer first.
            if not connection.ahead:
                self._retire(connection)
            else:
                self._promote(connection)
            self._resend(call, state)
            return
        call.state = _FINISHED
        # Free the connection first so that waiting calls keep their place in line
        # ahead of any call the caller makes when its Deferred fires.
        if not self._closed:
            if connection.ahead:
                self._promote(connection)
                self._dispatch()
            else:
                self._use(connection)
        if state == _SENT:
            self._answer_reply(call, reply)

    def _answer_reply(self, call: _Call, reply: wire.Result | wire.ErrorReply) -> None:
        """Fire ``call``'s Deferred with what its final reply says."""
        if type(reply) is wire.Result:
            self._answer(call, reply.result)
        else:
            assert isinstance(reply, wire.ErrorReply)
            self._answer(call, TaskError.from_reply(reply))

    def _promote(self, connection: TaskClientProtocol) -> None:
        """The call sent ahead on ``connection`` is now the one its worker runs."""
        connection.call = connection.ahead.popleft()
        self._offer(connection)

    def _ahead_answered(
        self, connection: TaskClientProtocol, call: _Call, reply: wire.Result | wire.ErrorReply
    ) -> None:
        """
        A final reply to the call sent ahead, before the current call's: it was
        cancelled, or handed back, before it ran.
        """
        connection.ahead.remove(call)
        connection.target.busy -= 1
        call.connection = None
        state = call.state
        if _handed_back(reply):
            self._resend(call, state)
            return
        call.state = _FINISHED
        if not self._closed:
            self._offer(connection)
            self._dispatch()
        if state == _SENT:
            self._answer_reply(call, reply)

    def _resend(self, call: _Call, state: int) -> None:
        """Put a call that was sent but did not run back at the head of the line."""
        if state == _SENT and not self._closed:
            self._requeue(call)
            self._dispatch()
        else:
            call.state = _FINISHED

    def _requeue(self, call: _Call) -> None:
        """Put a call, detached from its connection, at the head of the line."""
        call.state = _QUEUED
        self._queue.appendleft(call)
        self._queued += 1

    def _may_retry(self, call: _Call, target: _Target) -> bool:
        """
        :return: whether a sent call whose connection to ``target`` broke before
            its reply is to be sent once more: its task is idempotent, and this
            was its first attempt.
        """
        return not call.retried and not self._closed and call.function in target.retry

    def _retry(self, call: _Call, connection: TaskClientProtocol, why: str) -> None:
        """Requeue a call that :meth:`_may_retry` after ``connection`` broke; caller dispatches."""
        call.retried = True
        target = connection.target
        self.log.info(
            "Sending {function!r} once more: the connection to {address} broke with it "
            "in flight ({why})",
            function=call.function,
            address=str(target),
            why=why,
        )
        if connection.worker is not None:
            # The worker's idle connections most likely broke with it, their loss not
            # yet seen: the second attempt must go to another worker, not out on one.
            for same in [
                c for c in self._idle if c.target is target and c.worker == connection.worker
            ]:
                self._retire(same)
        self._requeue(call)

    def _goodbye(self, connection: TaskClientProtocol) -> None:
        """The worker closes this connection and read nothing after its goodbye."""
        self._retire(connection)
        unrun = [c for c in (connection.call, *connection.ahead) if c is not None]
        connection.call = None
        connection.ahead.clear()
        # Back to the head of the line in the order they were sent.
        for call in reversed(unrun):
            connection.target.busy -= 1
            call.connection = None
            if call.state == _SENT and not self._closed:
                self._requeue(call)
            else:
                call.state = _FINISHED
        if not self._closed:
            self._dispatch()

    def _forget(self, connection: TaskClientProtocol) -> None:
        """Stop counting a connection: it is closed or closing."""
        if connection in self._connections:
            self._connections.remove(connection)
            target = connection.target
            target.opened -= 1
            if connection.worker is not None:
                target.workers[connection.worker] -= 1
                if not target.workers[connection.worker]:
                    del target.workers[connection.worker]
        if connection in self._idle:
            self._idle.remove(connection)
        self._prefetchable.pop(connection, None)

    def _retire(self, connection: TaskClientProtocol) -> None:
        """Close a connection that has nothing in flight, and stop counting it."""
        self._forget(connection)
        connection.close()

    def _bad_reply(self, connection: TaskClientProtocol, why: str) -> None:
        self.log.warn(
            "Dropping the connection to {address} after a bad reply: {why}",
            address=str(connection.target),
            why=why,
        )
        if connection in self._idle:
            self._idle.remove(connection)
        self._prefetchable.pop(connection, None)
        connection.close()
        for lost_ahead in self._drop_ahead(connection, f"bad reply: {why}"):
            self._answer(
                lost_ahead,
                TaskError(wire.WORKER_LOST, f"bad reply from {connection.target}: {why}"),
            )
        call = connection.call
        if call is not None and call.state == _SENT:
            if self._may_retry(call, connection.target):
                # Detach the call and forget the closing connection now, so that its
                # loss later cannot touch the call's second attempt.
                connection.call = None
                connection.target.busy -= 1
                call.connection = None
                self._forget(connection)
                self._retry(call, connection, f"bad reply: {why}")
                self._dispatch()
                return
            call.state = _ABANDONED
            message = f"bad reply from {connection.target}: {why}"
            self._answer(call, TaskError(wire.WORKER_LOST, message))

    def _drop_ahead(self, connection: TaskClientProtocol, why: str) -> list[_Call]:
        """
        Detach the calls sent ahead on a connection that is lost or dropped.
        They may have started (the reply to the call before one may be what was
        lost), so each is sent again only if idempotent, like a running call.

        :return: the calls whose callers are to get ``worker_lost``.
        """
        lost: list[_Call] = []
        for ahead in reversed(connection.ahead):
            connection.target.busy -= 1
            ahead.connection = None
            if ahead.state == _SENT and self._may_retry(ahead, connection.target):
                self._retry(ahead, connection, why)
                continue
            if ahead.state == _SENT:
                lost.append(ahead)
            ahead.state = _FINISHED
        connection.ahead.clear()
        lost.reverse()
        return lost

    def _connection_lost(self, connection: TaskClientProtocol, reason: Failure) -> None:
        if connection not in self._connections:
            # Never handed to us (lost while connecting), or already forgotten.
            return
        self._forget(connection)
        if connection.worker is not None and not self._closed:
            # A lost connection most likely means a dead worker: its other, idle
            # connections are gone too, their loss not yet seen.  Drop them before
            # a waiting call is sent out on one.
            for same in [
                c
                for c in self._idle
                if c.target is connection.target and c.worker == connection.worker
            ]:
                self._retire(same)
        lost_ahead = self._drop_ahead(connection, reason.getErrorMessage())
        call = connection.call
        lost: _Call | None = None
        if call is not None:
            connection.call = None
            connection.target.busy -= 1
            call.connection = None
            if call.state == _SENT and self._may_retry(call, connection.target):
                # Ahead of the waiting calls; the dispatch below sends it on.
                self._retry(call, connection, reason.getErrorMessage())
            else:
                if call.state == _SENT:
                    lost = call
                call.state = _FINISHED
        if self._closed:
            self._check_closed()
        else:
            self._dispatch()
        for dropped in (lost, *lost_ahead):
            if dropped is not None:
                message = (
                    f"lost the connection to {connection.target} with the request in "
                    f"flight: {reason.getErrorMessage()}"
                )
                self._answer(dropped, TaskError(wire.WORKER_LOST, message))
