"""
Detach and resume: a request with ``"detach": SECONDS`` is answered at once
with ``{"id": ID, "resume": TOKEN}``, and outlives its WebSocket by up to
SECONDS.  ``{"resume": TOKEN}`` on any connection of the same gateway process
picks it up again: the progress kept, then what comes next, then its final
reply under its original id.

Each detachable call's progress messages carry a ``seq`` (0, 1, 2, ...), and
the latest of them, up to :data:`KEPT_PROGRESS_BYTES` per call, are kept
whether or not a connection holds the call, so that a resume replays what
the client missed, even what was sent as the connection went (``"after":
SEQ`` skips what it saw).  Past that bound the oldest are dropped; the replay
starts with ``{"id": ID, "resumed": TOKEN, "dropped": N}``, N the number of
dropped messages after ``after``.  The final reply is always kept.

A detached call counts against ``--max-pending`` until its final reply is
delivered or it expires: while it runs it is in flight as any other, and once
it has ended, its reply waiting, in :attr:`DetachedCalls.waiting`.  When no
connection has held it for SECONDS, it is cancelled (if still running) and
forgotten: its token then gets ``unknown_resume``, as a wrong one does.

Tokens are 144 random bits (``secrets.token_urlsafe``).  One of several
gateway processes prefixes its tokens with its process id and a dot: a resume
that lands in another process is answered ``unknown_resume`` saying which
process holds the call, and that a new connection may reach it.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from taskoffload import wire
from taskoffload.defaults import MAX_DETACH

__all__ = [
    "DEFAULT_MAX_DETACH",
    "KEPT_PROGRESS_BYTES",
    "DetachedCall",
    "DetachedCalls",
    "detach_problem",
]

#: The default ``--max-detach``: seconds a call may outlive its WebSocket.
DEFAULT_MAX_DETACH: Final = MAX_DETACH

#: Bytes of progress messages kept for each detachable call (the newest).
KEPT_PROGRESS_BYTES: Final = 64 * 1024

#: Sends one reply line (newline-terminated) to the connection holding a call.
Send = Callable[[bytes], object]


def detach_problem(request: wire.Request, max_detach: float) -> str | None:
    """:return: why ``request`` cannot be detached, or ``None`` if it can (or asks not to)."""
    if request.detach is None:
        return None
    if request.id is None:
        return 'a request with "detach" needs an id, which its replies carry after a resume'
    if request.detach > max_detach:
        return f'"detach" is at most {max_detach:g} seconds on this gateway (--max-detach)'
    return None


class DetachedCall:
    """
    One detachable call: its kept progress, its final reply once it has one,
    and the connection holding it, if any.

    :ivar cancel: cancels the call (set by its session); called when it expires.
    """

    def __init__(
        self,
        calls: DetachedCalls,
        token: str,
        request_id: wire.RequestId,
        seconds: float,
        items: int,
    ) -> None:
        self._calls = calls
        self.token = token
        self.id = request_id
        self.seconds = seconds
        self.items = items
        self.cancel: Callable[[], object] = lambda: None
        self.owner: object | None = None
        self.send: Send | None = None
        self.final: bytes | None = None
        self.timer: IDelayedCall | None = None
        self.kept: deque[tuple[int, bytes]] = deque()
        self.kept_bytes = 0
        #: Progress messages dropped from :attr:`kept`, the oldest first.
        self.dropped = 0
        self.next_seq = 0
        self.gone = False

    def progress(self, value: Any) -> None:
        """Number, keep and (if a connection holds the call) send one progress value."""
        if self.gone:
            return
        line = wire.encode_reply(wire.Progress(self.id, value))
        line = line[:-2] + b',"seq":%d}\n' % self.next_seq
        self.kept.append((self.next_seq, line))
        self.next_seq += 1
        self.kept_bytes += len(line)
        while self.kept_bytes > self._calls.kept_bytes and len(self.kept) > 1:
            _, old = self.kept.popleft()
            self.kept_bytes -= len(old)
            self.dropped += 1
        if self.send is not None:
            self.send(line)

    def finished(self, reply: bytes) -> None:
        """The final reply: sent (and the token spent) if a connection holds the call, else kept."""
        if self.gone:
            return
        self.final = reply
        if self.send is not None:
            self.send(reply)
            self._calls.forget(self)
        else:
            self._calls.waiting += self.items

    def replay(self, after: int | None) -> list[bytes]:
        """:return: the lines a resume sends: the ``resumed`` line, the kept progress after
        ``after``, and the final reply if there is one."""
        seen = -1 if after is None else after
        dropped = max(0, self.dropped - (seen + 1))
        lines = [wire.dumps({"id": self.id, "resumed": self.token, "dropped": dropped}) + b"\n"]
        lines.extend(line for seq, line in self.kept if seq > seen)
        if self.final is not None:
            lines.append(self.final)
        return lines


class DetachedCalls:
    """
    The detachable calls of one gateway process, by token, and who holds each.

    :param clock: for the expiry of calls no connection holds.
    :param process: names this process among several gateway processes (its
        tokens start with it and a dot); ``None`` for a lone gateway.
    :param kept_bytes: bytes of progress kept for each call.
    """

    def __init__(
        self,
        clock: IReactorTime,
        process: str | None = None,
        kept_bytes: int = KEPT_PROGRESS_BYTES,
    ) -> None:
        self._clock = clock
        self._process = process
        self.kept_bytes = kept_bytes
        self._calls: dict[str, DetachedCall] = {}
        self._by_owner: dict[object, dict[str, DetachedCall]] = {}
        #: Items of calls that have ended and whose final reply waits for a resume.
        self.waiting = 0
        #: Resumes that found their call; calls that expired unresumed.
        self.resumed = 0
        self.expired = 0

    @property
    def held(self) -> int:
        """Calls that no connection holds (kept for a resume)."""
        return sum(1 for call in self._calls.values() if call.owner is None)

    def status(self) -> dict[str, int]:
        """``/status``'s ``gateway.detached``."""
        return {"held": self.held, "resumed": self.resumed, "expired": self.expired}

    def hold(
        self, request_id: wire.RequestId, seconds: float, items: int, owner: object, send: Send
    ) -> DetachedCall:
        """
        A new detachable call, held by ``owner`` (its session), which is sent
        ``{"id": ID, "resume": TOKEN}`` at once.
        """
        token = secrets.token_urlsafe(18)
        if self._process is not None:
            token = f"{self._process}.{token}"
        call = DetachedCall(self, token, request_id, seconds, items)
        self._calls[token] = call
        self._attach(call, owner, send)
        send(wire.dumps({"id": request_id, "resume": token}) + b"\n")
        return call

    def resume(self, resume: wire.Resume, owner: object, send: Send) -> wire.ErrorReply | None:
        """
        Attach the call ``resume.token`` names to ``owner`` (taking it from the
        connection that held it, if one does) and send it the replay.

        :return: the ``unknown_resume`` error to answer instead, if none.
        """
        call = self._calls.get(resume.token)
        if call is None:
            return wire.ErrorReply(None, wire.UNKNOWN_RESUME, self._unknown(resume.token))
        self._detach(call)
        self.resumed += 1
        for line in call.replay(resume.after):
            send(line)
        if call.final is not None:
            self.forget(call)
        else:
            self._attach(call, owner, send)
        return None

    def cancel(self, owner: object, request_id: wire.RequestId) -> bool:
        """Cancel the call with ``request_id`` that ``owner`` holds after a resume.

        :return: whether there was one."""
        for call in list(self._by_owner.get(owner, {}).values()):
            if call.id == request_id:
                call.cancel()
                return True
        return False

    def release(self, owner: object) -> None:
        """``owner``'s connection has gone: its calls wait for a resume, each up to its seconds."""
        for call in list(self._by_owner.get(owner, {}).values()):
            self._detach(call)
            call.timer = self._clock.callLater(call.seconds, self._expire, call)

    def forget(self, call: DetachedCall) -> None:
        """``call``'s final reply is delivered, or it expired: its token is spent."""
        if call.gone:
            return
        if call.final is not None and call.owner is None:
            self.waiting -= call.items  # it waited for this resume, or expired waiting
        self._detach(call)
        call.gone = True
        del self._calls[call.token]

    def _attach(self, call: DetachedCall, owner: object, send: Send) -> None:
        call.owner, call.send = owner, send
        self._by_owner.setdefault(owner, {})[call.token] = call

    def _detach(self, call: DetachedCall) -> None:
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        call.timer = None
        if call.owner is not None:
            held = self._by_owner.get(call.owner, {})
            held.pop(call.token, None)
            if not held:
                self._by_owner.pop(call.owner, None)
        call.owner = call.send = None

    def _expire(self, call: DetachedCall) -> None:
        call.timer = None
        self.expired += 1
        running = call.final is None
        self.forget(call)
        if running:
            call.cancel()

    def _unknown(self, token: str) -> str:
        process, dot, _ = token.partition(".")
        if dot and process != self._process:
            return (
                f"no such detached call in this gateway process: gateway process {process} "
                "holds it (if it still runs); connect again, and a new connection may reach it"
            )
        return "no such detached call: the token is wrong, spent or expired"
