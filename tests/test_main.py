"""
Unit tests for :mod:`taskoffload.__main__`: argument parsing, reply printing and
the ``call`` command over a fake pool or a memory reactor; no network.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from taskoffload import wire
from taskoffload.__main__ import (
    _call,
    build_parser,
    format_reply,
    parse_task_arguments,
    run_call,
)
from taskoffload.client import DEFAULT_POOL, ITaskPool, TaskError


def parse(*argv: str) -> argparse.Namespace:
    """Parse a command line."""
    return build_parser().parse_args(list(argv))


@implementer(ITaskPool)
class FakePool:
    """A pool that answers every task with a fixed outcome after some progress."""

    def __init__(self, outcome: Any, progress: Sequence[Any] = ()) -> None:
        self.outcome = outcome
        self.progress = progress
        self.sent: list[tuple[str, tuple[Any, ...], dict[str, Any], float | None]] = []

    def call(self, function: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return self.send_task(function, args, kwargs)

    def send_task(
        self,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Any], object] | None = None,
    ) -> Deferred[Any]:
        self.sent.append((function, tuple(args), dict(kwargs or {}), timeout))
        for value in self.progress:
            assert on_progress is not None
            on_progress(value)
        if isinstance(self.outcome, TaskError):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome)


def run(pool: ITaskPool, *argv: str) -> tuple[int, list[dict[str, Any]]]:
    """Run ``call`` on ``pool``; return the status and the printed lines, decoded."""
    out = io.StringIO()
    done: list[Any] = []
    defer.ensureDeferred(run_call(pool, parse("call", *argv), out)).addBoth(done.append)
    assert len(done) == 1
    assert isinstance(done[0], int), done
    return done[0], [orjson.loads(line) for line in out.getvalue().splitlines()]


# Parsing


def test_call_defaults() -> None:
    """``call FUNCTION`` alone has no arguments, no timeout, and the default pool."""
    options = parse("call", "noop")
    assert options.function == "noop"
    assert options.arguments == ((), {})
    assert options.timeout is None
    assert options.pool is None  # the command then uses DEFAULT_POOL
    assert DEFAULT_POOL == "tcp:127.0.0.1:12345"


def test_args_object_is_keywords() -> None:
    """``--args`` with a JSON object gives keyword arguments."""
    assert parse("call", "f", "--args", '{"to": "a@example.org"}').arguments == (
        (),
        {"to": "a@example.org"},
    )


def test_args_array_is_positional() -> None:
    """``--args`` with a JSON array gives positional arguments."""
    assert parse("call", "f", "--args", "[1, 2]").arguments == ((1, 2), {})


@pytest.mark.parametrize("text", ["3", '"x"', "null", "{oops"])
def test_bad_args(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--args`` that is not a JSON object or array is a usage error (status 2)."""
    with pytest.raises(SystemExit) as exited:
        parse("call", "f", "--args", text)
    assert exited.value.code == 2
    assert "--args" in capsys.readouterr().err


def test_parse_task_arguments_errors() -> None:
    """parse_task_arguments says what it wants."""
    with pytest.raises(argparse.ArgumentTypeError, match="object"):
        parse_task_arguments("1")
    with pytest.raises(argparse.ArgumentTypeError, match="JSON"):
        parse_task_arguments("[")


def test_pool_repeated() -> None:
    """``--pool`` may be given several times."""
    options = parse("call", "f", "--pool", "tcp:a:1", "--pool", "unix:/run/p.sock")
    assert options.pool == ["tcp:a:1", "unix:/run/p.sock"]


def test_bad_pool(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed ``--pool`` is a usage error."""
    with pytest.raises(SystemExit) as exited:
        parse("call", "f", "--pool", "nowhere")
    assert exited.value.code == 2
    assert "pool address" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["0", "-1", "soon", "inf", "nan"])
def test_bad_timeout(text: str) -> None:
    """``--timeout`` must be a positive, finite number."""
    with pytest.raises(SystemExit):
        parse("call", "f", "--timeout", text)


def test_timeout() -> None:
    """``--timeout`` is read as seconds."""
    assert parse("call", "f", "--timeout", "2.5").timeout == 2.5


def test_command_required() -> None:
    """No subcommand is a usage error."""
    with pytest.raises(SystemExit) as exited:
        parse()
    assert exited.value.code == 2


# Printing


def test_format_result() -> None:
    """A result prints as its wire-format line."""
    assert orjson.loads(format_reply(wire.Result(id=1, result={"sent": True}))) == {
        "id": 1,
        "result": {"sent": True},
    }


def test_format_error() -> None:
    """An error prints as its wire-format line, type included when known."""
    line = format_reply(TaskError("task_failed", "boom", "ValueError").to_reply(1))
    assert orjson.loads(line) == {
        "id": 1,
        "error": {"code": "task_failed", "message": "boom", "type": "ValueError"},
    }
    assert "\n" not in line


def test_format_progress() -> None:
    """A progress message prints as its wire-format line."""
    assert orjson.loads(format_reply(wire.Progress(id=1, progress=50))) == {
        "id": 1,
        "progress": 50,
    }


# The call command


def test_call_result() -> None:
    """A result prints one reply line and exits 0."""
    pool = FakePool({"sent": True})
    status, lines = run(pool, "send_mail", "--args", '{"to": "a"}', "--timeout", "3")
    assert status == 0
    assert lines == [{"id": 1, "result": {"sent": True}}]
    assert pool.sent == [("send_mail", (), {"to": "a"}, 3.0)]


def test_call_error() -> None:
    """An error prints one error line and exits 1."""
    status, lines = run(FakePool(TaskError("unknown_function", "no such task")), "nope")
    assert status == 1
    assert lines == [{"id": 1, "error": {"code": "unknown_function", "message": "no such task"}}]


def test_call_progress() -> None:
    """Progress lines print as they come, before the final reply."""
    status, lines = run(FakePool("done", progress=[1, 2]), "count", "--args", "[2]")
    assert status == 0
    assert lines == [
        {"id": 1, "progress": 1},
        {"id": 1, "progress": 2},
        {"id": 1, "result": "done"},
    ]


def _serve_one(reactor: MemoryReactorClock, reply: dict[str, Any]) -> StringTransport:
    """Accept the client's connection, answer its request with ``reply``, then close."""
    host, port, factory, *_ = reactor.tcpClients[-1]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    assert protocol is not None
    transport = StringTransport()
    protocol.makeConnection(transport)
    reactor.advance(0)
    protocol.dataReceived(b'{"session": {"worker": 1}}\n')
    session, request = (orjson.loads(line) for line in transport.value().splitlines())
    assert session == {"session": {"reject_when_busy": True}}
    protocol.dataReceived(orjson.dumps({"id": request["id"], **reply}) + b"\n")
    assert transport.disconnecting, "the command closes its client when done"
    protocol.connectionLost(Failure(ConnectionDone()))
    return transport


def test_command_over_client() -> None:
    """The command connects to the pool, prints the reply with the id it sent, and exits 0."""
    reactor = MemoryReactorClock()
    out = io.StringIO()
    done: list[Any] = []
    options = parse("call", "echo", "--args", '{"a": 1}', "--pool", "tcp:h:7")
    defer.ensureDeferred(_call(reactor, options, out)).addBoth(done.append)
    assert [(host, port) for host, port, *_ in reactor.tcpClients] == [("h", 7)]
    _serve_one(reactor, {"result": {"a": 1}})
    assert done == [None]
    assert [orjson.loads(line) for line in out.getvalue().splitlines()] == [
        {"id": 1, "result": {"a": 1}}
    ]


def test_command_error_exit_status() -> None:
    """An error reply makes the command end with SystemExit(1), for react to exit with."""
    reactor = MemoryReactorClock()
    out = io.StringIO()
    done: list[Any] = []
    defer.ensureDeferred(_call(reactor, parse("call", "fail"), out)).addBoth(done.append)
    _serve_one(reactor, {"error": {"code": "task_failed", "message": "boom"}})
    assert isinstance(done[0], Failure)
    exited = done[0].value
    assert isinstance(exited, SystemExit)
    assert exited.code == 1
    assert orjson.loads(out.getvalue())["error"]["code"] == "task_failed"
