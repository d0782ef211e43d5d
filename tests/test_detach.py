"""
Unit tests for :mod:`taskoffload.detach` and detach and resume in the gateway:
clients of one :class:`~taskoffload.gateway.GatewayFactory` below the
WebSocket layer, over a :class:`~taskoffload.testing.FakeTaskPool`, with the
gateway's ``Clock`` for expiry (see :mod:`tests.test_gateway`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock

from taskoffload import wire
from taskoffload.detach import KEPT_PROGRESS_BYTES, DetachedCalls, detach_problem
from taskoffload.testing import FakeTaskPool
from tests._trial_bridge import pytest_module
from tests.test_gateway import Gateway, Peer, error, errors


def detached(peer: Peer, request_id: Any = "d", seconds: float = 60, **fields: Any) -> str:
    """Send a detachable call of ``f``; :return: its token, from the reply at once."""
    peer.send({"id": request_id, "function": "f", "detach": seconds, **fields})
    [answer] = peer.take()
    assert answer["id"] == request_id and set(answer) == {"id", "resume"}
    token: str = answer["resume"]
    return token


def test_answered_at_once_with_an_unguessable_token() -> None:
    """A detachable request gets {"id", "resume"} at once; tokens differ and carry
    at least 128 random bits."""
    gateway = Gateway()
    tokens = {detached(gateway.connect(), n) for n in range(10)}
    assert len(tokens) == 10
    assert all(len(token) >= 22 for token in tokens)  # base64: 6 bits a character


def test_progress_carries_seq_and_the_result_the_id() -> None:
    """While its connection is open, a detachable call is answered as usual,
    its progress numbered from 0."""
    gateway = Gateway()
    peer = gateway.connect()
    detached(peer)
    call = gateway.pool.calls[0]
    call.progress("a")
    call.progress("b")
    call.succeed("r")
    assert peer.take() == [
        {"id": "d", "progress": "a", "seq": 0},
        {"id": "d", "progress": "b", "seq": 1},
        {"id": "d", "result": "r"},
    ]


def test_ordinary_progress_has_no_seq() -> None:
    """Only detachable calls' progress is numbered."""
    gateway = Gateway()
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f"})
    gateway.pool.calls[0].progress("a")
    assert peer.take() == [{"id": 1, "progress": "a"}]


def test_close_and_resume_on_another_connection() -> None:
    """The call outlives its connection; a resume elsewhere replays its
    progress, then what comes next, then the result under the original id."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first, "orig")
    call = gateway.pool.calls[0]
    call.progress(0)
    call.progress(1)
    first.take()
    first.close()
    assert not call.cancelled
    call.progress(2)
    second = gateway.connect()
    second.send({"resume": token, "after": 1})
    call.progress(3)
    call.succeed("end")
    assert second.take() == [
        {"id": "orig", "resumed": token, "dropped": 0},
        {"id": "orig", "progress": 2, "seq": 2},
        {"id": "orig", "progress": 3, "seq": 3},
        {"id": "orig", "result": "end"},
    ]
    assert gateway.factory.detached.status() == {"held": 0, "resumed": 1, "expired": 0}


def test_resume_without_after_replays_every_kept_message() -> None:
    """Without "after", every kept progress message is replayed."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first)
    gateway.pool.calls[0].progress("p")
    first.close()
    second = gateway.connect()
    second.send({"resume": token})
    assert second.take()[1:] == [{"id": "d", "progress": "p", "seq": 0}]


def test_a_call_that_ended_while_detached_is_replayed_whole_and_spent() -> None:
    """The final reply of a call that ended with no connection is kept for the
    resume; after it is delivered, the token is spent."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first)
    first.close()
    gateway.pool.calls[0].succeed("late")
    second = gateway.connect()
    second.send({"resume": token})
    assert second.take()[-1] == {"id": "d", "result": "late"}
    second.send({"resume": token})
    assert errors(second.take()) == [error(None, wire.UNKNOWN_RESUME)]


def test_a_wrong_token_gets_unknown_resume() -> None:
    """A token the gateway never gave is answered unknown_resume, id null."""
    peer = Gateway().connect()
    peer.send({"resume": "not-a-token"})
    [reply] = peer.take()
    assert reply["id"] is None and reply["error"]["code"] == wire.UNKNOWN_RESUME


def test_expiry_cancels_the_call_and_forgets_the_token() -> None:
    """A call no connection has held for its seconds is cancelled and forgotten."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first, seconds=5)
    first.close()
    gateway.clock.advance(4.9)
    assert not gateway.pool.calls[0].cancelled
    gateway.clock.advance(0.2)
    assert gateway.pool.calls[0].cancelled
    second = gateway.connect()
    second.send({"resume": token})
    assert errors(second.take()) == [error(None, wire.UNKNOWN_RESUME)]
    assert gateway.factory.detached.status()["expired"] == 1


def test_a_resume_stops_the_expiry() -> None:
    """A resumed call no longer expires while its new connection holds it."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first, seconds=5)
    first.close()
    second = gateway.connect()
    second.send({"resume": token})
    gateway.clock.advance(10)
    assert not gateway.pool.calls[0].cancelled


def test_resume_moves_the_call_from_a_connection_that_still_holds_it() -> None:
    """Resumed while its first connection is open, the call's replies go to the
    new connection only, and closing the first one does not cancel it."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first)
    second = gateway.connect()
    second.send({"resume": token})
    second.take()
    call = gateway.pool.calls[0]
    call.progress("p")
    first.close()
    assert not call.cancelled
    call.succeed("r")
    assert first.take() == []
    assert second.take() == [{"id": "d", "progress": "p", "seq": 0}, {"id": "d", "result": "r"}]


def test_the_resuming_connection_can_cancel_it() -> None:
    """A cancel of the original id on the connection that resumed it cancels the call."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first)
    first.close()
    second = gateway.connect()
    second.send({"resume": token})
    second.send({"cancel": "d"})
    assert gateway.pool.calls[0].cancelled
    assert errors(second.take()[1:]) == [error("d", wire.CANCELLED)]


def test_a_detached_batch_is_resumed_with_its_progress() -> None:
    """A batch may be detachable: its progress is numbered and kept alike."""
    gateway = Gateway()
    first = gateway.connect()
    token = detached(first, "b", batch=[{}, {}])
    gateway.pool.calls[0].succeed(1)
    first.close()
    gateway.pool.calls[1].succeed(2)
    second = gateway.connect()
    second.send({"resume": token, "after": 0})
    assert second.take() == [
        {"id": "b", "resumed": token, "dropped": 0},
        {"id": "b", "progress": {"done": 2, "failed": 0, "total": 2}, "seq": 1},
        {"id": "b", "result": [{"result": 1}, {"result": 2}]},
    ]


def test_a_detached_batch_keeps_its_clients_share_after_the_client_goes() -> None:
    """A detached batch whose client has gone still counts in that client's share of
    the pool: another client gets half the pool while it runs, and the batch's
    waiting item still reaches the pool for the resume."""
    gateway = Gateway(FakeTaskPool(slots=2))
    first = gateway.connect()
    token = detached(first, "b", batch=[{}, {}, {}])
    assert len(gateway.pool.calls) == 2  # the whole pool: one item waits in the line
    first.close()
    other = gateway.connect()
    other.send({"id": 1, "function": "f"})
    other.send({"id": 2, "function": "f"})
    assert len(gateway.pool.calls) == 3  # half the pool for the other client
    for index in (0, 1, 2):
        gateway.pool.calls[index].succeed(index)
    assert len(gateway.pool.calls) == 5  # the batch's last item, and the other's second
    gateway.pool.calls[3].succeed(3)
    second = gateway.connect()
    second.send({"resume": token, "after": 2})
    [resumed, result] = second.take()
    assert resumed == {"id": "b", "resumed": token, "dropped": 0}
    assert result["id"] == "b" and len(result["result"]) == 3


def test_a_detached_call_counts_against_max_pending_until_delivered() -> None:
    """A detached call that has ended still counts against max-pending until
    its reply is delivered by a resume."""
    gateway = Gateway(max_pending=1)
    first = gateway.connect()
    token = detached(first)
    first.close()
    gateway.pool.calls[0].succeed("r")
    other = gateway.connect()
    other.send({"id": 1, "function": "f"})
    assert errors(other.take()) == [error(1, wire.OVERLOADED)]
    other.send({"resume": token})
    other.take()
    other.send({"id": 2, "function": "f"})
    assert other.take() == []
    assert len(gateway.pool.calls) == 2


def test_an_expired_ended_call_no_longer_counts() -> None:
    """A detached call whose reply waited until it expired frees its place."""
    gateway = Gateway(max_pending=1)
    first = gateway.connect()
    detached(first, seconds=1)
    first.close()
    gateway.pool.calls[0].succeed("r")
    gateway.clock.advance(2)
    other = gateway.connect()
    other.send({"id": 1, "function": "f"})
    assert other.take() == []


def test_detach_bounds() -> None:
    """detach over --max-detach, or without an id, is bad_request naming why."""
    gateway = Gateway(max_detach=10)
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f", "detach": 11})
    peer.send({"function": "f", "detach": 5})
    replies = peer.take()
    assert errors(replies) == [error(1, wire.BAD_REQUEST), error(None, wire.BAD_REQUEST)]
    assert "at most 10 seconds" in replies[0]["error"]["message"]
    assert "needs an id" in replies[1]["error"]["message"]
    assert gateway.pool.calls == []


def test_status_counts_held_calls() -> None:
    """/status's gateway.detached counts the calls no connection holds."""
    gateway = Gateway()
    peer = gateway.connect()
    detached(peer)
    assert gateway.stats.to_json()["detached"] == {"held": 0, "resumed": 0, "expired": 0}
    peer.close()
    assert gateway.stats.to_json()["detached"]["held"] == 1


# The registry alone


class Sent:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def __call__(self, line: bytes) -> None:
        assert line.endswith(b"\n")
        self.lines.append(line)


def test_kept_progress_is_bounded_and_the_replay_says_how_many_were_dropped() -> None:
    """Past the byte bound the oldest progress messages are dropped; a resume
    says how many of those it would have replayed."""
    calls = DetachedCalls(Clock(), kept_bytes=200)
    sent = Sent()
    call = calls.hold("x", 60, 1, owner="a", send=sent)
    for n in range(20):
        call.progress("n" * 20 + str(n))
    calls.release("a")
    kept = [seq for seq, _ in call.kept]
    assert kept == list(range(20 - len(kept), 20)) and 0 < len(kept) < 20
    assert sum(len(line) for _, line in call.kept) <= 200
    resumed = Sent()
    assert calls.resume(wire.Resume(call.token, after=2), "b", resumed) is None
    assert (
        resumed.lines[0]
        == wire.dumps({"id": "x", "resumed": call.token, "dropped": call.dropped - 3}) + b"\n"
    )
    assert len(resumed.lines) == 1 + len(kept)


def test_the_default_bound_is_64_kib() -> None:
    """64 KiB of progress are kept per call."""
    assert KEPT_PROGRESS_BYTES == 64 * 1024


def test_one_process_of_several_names_itself_in_tokens() -> None:
    """With a process name, tokens start with it; a token of another process is
    answered with a message naming that process."""
    calls = DetachedCalls(Clock(), process="4242")
    call = calls.hold(1, 60, 1, owner="a", send=Sent())
    assert call.token.startswith("4242.")
    other = DetachedCalls(Clock(), process="7")
    refused = other.resume(wire.Resume(call.token), "b", Sent())
    assert refused is not None and refused.code == wire.UNKNOWN_RESUME
    assert "gateway process 4242" in refused.message


def test_detach_problem() -> None:
    """No detach: no problem; within the bound with an id: none either."""
    assert detach_problem(wire.Request(1, "f"), 10) is None
    assert detach_problem(wire.Request(1, "f", detach=10), 10) is None
    assert detach_problem(wire.Request(1, "f", detach=10.5), 10) is not None


def test_pool_sees_no_detach() -> None:
    """The pool gets the call as any other: detach is the gateway's."""
    gateway = Gateway(FakeTaskPool(tasks={"f": lambda: "ok"}))
    peer = gateway.connect()
    peer.send({"id": 1, "function": "f", "detach": 1})
    assert peer.take()[-1] == {"id": 1, "result": "ok"}


testSuite = pytest_module(__file__)
