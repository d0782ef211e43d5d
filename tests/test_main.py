"""
Unit tests for :mod:`taskoffload.__main__`: argument parsing, reply printing and
the ``call`` command over a fake pool or a memory reactor; no network.
"""

from __future__ import annotations

import argparse
import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

import taskoffload.__main__ as main_module
from taskoffload import wire
from taskoffload.__main__ import (
    CLEAR_SCREEN,
    DEFAULT_GATEWAY,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    TOKEN_VARIABLE,
    GatewayUnreachable,
    TokenUnavailable,
    _call,
    _status,
    build_parser,
    format_duration,
    format_reply,
    format_status,
    parse_task_arguments,
    run_call,
    run_status,
    status_token,
)
from taskoffload.access import GatewayAccess
from taskoffload.client import DEFAULT_POOL, ITaskPool, TaskError
from taskoffload.option_values import read_token
from taskoffload.service import GatewayService
from tests._trial_bridge import pytest_module


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
        # Progress reaches the output only if the command asked for it.
        if on_progress is not None:
            for value in self.progress:
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


# The status command

SAMPLE_STATUS: dict[str, Any] = {
    "gateway": {
        "clients": 3,
        "inflight": 1,
        "requests": 1234,
        "by_function": {f"f{n:02d}": n for n in range(1, 13)} | {"echo": 1000},
        "by_outcome": {"ok": 1220, "timeout": 10, "task_failed": 4},
        "latency": {"p50_ms": 1.234, "p90_ms": 3.0, "p99_ms": 12.5, "max_ms": 40.0},
    },
    "pool": {
        "count": 2,
        "alive": 2,
        "serving": 1,
        "restarts": 3,
        "recycled": 1,
        "reloads": 4,
        "reloading": False,
        "killed_past_deadline": 0,
        "workers": [
            {
                "index": 0,
                "pid": 41234,
                "state": "serving",
                "uptime": 3725.2,
                "restarts": 2,
                "recycled": 1,
            },
            {
                "index": 1,
                "pid": 41240,
                "state": "starting",
                "uptime": 35.9,
                "restarts": 1,
                "recycled": 0,
            },
        ],
    },
}


def status_options(*argv: str) -> argparse.Namespace:
    """Parse a ``status`` command line."""
    return parse("status", *argv)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (35.9, "35s"),
        (60, "1m00s"),
        (245, "4m05s"),
        (3725.2, "1h02m"),
        (86399, "23h59m"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
    ],
)
def test_format_duration(seconds: float | None, text: str) -> None:
    """Uptimes read as a person says them, in the two largest units."""
    assert format_duration(seconds) == text


def test_status_defaults() -> None:
    """``status`` alone asks the default gateway once, without a token."""
    options = status_options()
    assert options.gateway == DEFAULT_GATEWAY == "http://127.0.0.1:8080"
    assert options.watch is None
    assert options.token is None
    assert options.count is None


def test_status_watch_option() -> None:
    """``--watch`` alone means every second; with a value, that many seconds."""
    assert status_options("--watch").watch == 1.0
    assert status_options("--watch", "2.5").watch == 2.5
    with pytest.raises(SystemExit):
        status_options("--watch", "0")


def test_status_count_is_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    """The test-only ``--count`` works but is not advertised in ``--help``."""
    assert status_options("--watch", "--count", "2").count == 2
    with pytest.raises(SystemExit):
        status_options("--help")
    assert "--count" not in capsys.readouterr().out


def test_format_status_header() -> None:
    """The header block shows the gateway's counters and the pool's totals."""
    text = format_status(SAMPLE_STATUS, "http://gw:8080")
    lines = text.splitlines()
    assert lines[0] == "taskoffload status - http://gw:8080"
    gateway = next(line for line in lines if line.startswith("Gateway"))
    for part in ["clients 3", "in flight 1", "requests 1234", "p50 1.2 ms", "p99 12.5 ms"]:
        assert part in gateway
    pool = next(line for line in lines if line.startswith("Pool"))
    for part in ["serving 1/2", "restarts 3", "recycled 1", "reloads 4"]:
        assert part in pool
    assert text.endswith("\n")


def test_format_status_lanes_line() -> None:
    """A pool with lanes gets a line of each lane's serving workers, and the calls
    the gateway holds waiting for it; a pool without lanes gets none."""
    document = {
        "gateway": {"lanes": {"default": {"waiting": 3, "at_pool": 4, "slots": 4}}},
        "pool": {
            "count": 6,
            "serving": 6,
            "lanes": {
                "default": {"count": 4, "serving": 4},
                "interactive": {"count": 2, "serving": 1, "port": 40123},
            },
            "workers": [],
        },
    }
    lines = format_status(document).splitlines()
    assert "Lanes    default 4/4 (3 waiting)   interactive 1/2" in lines
    assert not any(line.startswith("Lanes") for line in format_status(SAMPLE_STATUS).splitlines())


def test_format_status_worker_rows() -> None:
    """One row per worker, then totals; columns /status lacks show ``-``."""
    lines = format_status(SAMPLE_STATUS).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("worker"))
    assert lines[header].split() == [
        "worker", "pid", "state", "uptime", "restarts", "recycled", "tasks", "done", "memory"
    ]  # fmt: skip
    assert lines[header + 1].split() == ["0", "41234", "serving", "1h02m", "2", "1", "-", "-"]
    assert lines[header + 2].split() == ["1", "41240", "starting", "35s", "1", "0", "-", "-"]
    assert lines[header + 3].split() == ["total", "2", "up", "1", "serving", "3", "1", "-", "-"]


def test_format_status_tasks_and_memory_when_known() -> None:
    """Per-worker ``tasks_done`` and ``rss_mib``, when /status has them, fill their columns."""
    document = orjson.loads(orjson.dumps(SAMPLE_STATUS))
    for n, worker in enumerate(document["pool"]["workers"]):
        worker.update(tasks_done=10 * (n + 1), rss_mib=20.5)
    lines = format_status(document).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("worker"))
    assert lines[header + 1].split()[-3:] == ["10", "20.5", "MiB"]
    assert lines[header + 3].split()[-3:] == ["30", "41.0", "MiB"]


def test_format_status_counts() -> None:
    """Errors list every outcome but ``ok``; functions list the ten busiest, busiest first."""
    lines = format_status(SAMPLE_STATUS).splitlines()
    errors = lines.index("Errors by outcome:")
    assert [line.split() for line in lines[errors + 1 : errors + 3]] == [
        ["timeout", "10"],
        ["task_failed", "4"],
    ]
    assert not any(line.split()[:1] == ["ok"] for line in lines)
    functions = lines.index("Requests by function (top 10):")
    listed = [line.split()[0] for line in lines[functions + 1 :]]
    assert listed == ["echo", "f12", "f11", "f10", "f09", "f08", "f07", "f06", "f05", "f04"]


def test_format_status_remote_pool_and_fresh_gateway() -> None:
    """A gateway in front of remote pools lists their addresses; no traffic shows ``-``/none."""
    document = {
        "gateway": {
            "clients": 0,
            "inflight": 0,
            "requests": 0,
            "by_function": {},
            "by_outcome": {},
            "latency": {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None},
        },
        "pool": {"addresses": ["tcp:10.0.0.2:12345", "tcp:10.0.0.3:12345"]},
    }
    text = format_status(document)
    assert "Pool     remote: tcp:10.0.0.2:12345, tcp:10.0.0.3:12345" in text
    assert "latency p50 -  p99 -" in text
    assert "worker" not in text
    assert "Errors by outcome: none" in text
    assert "Requests by function (top 10): none" in text


class FakeGateway:
    """Stands in for fetch_status: answers from a list of documents, or fails."""

    def __init__(self, *answers: dict[str, Any] | GatewayUnreachable) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, str | None]] = []

    def __call__(self, url: str, token: str | None) -> dict[str, Any]:
        self.asked.append((url, token))
        answer = self.answers.pop(0)
        if isinstance(answer, GatewayUnreachable):
            raise answer
        return answer


def test_run_status_once() -> None:
    """Without ``--watch``, the table prints once, unadorned, and the command exits 0."""
    fetch, out, err, slept = FakeGateway(SAMPLE_STATUS), io.StringIO(), io.StringIO(), []
    options = status_options("--gateway", "http://gw:1", "--token", "s3cret")
    assert run_status(options, out, err, fetch, slept.append) == 0
    assert out.getvalue() == format_status(SAMPLE_STATUS, "http://gw:1")
    assert fetch.asked == [("http://gw:1", "s3cret")]
    assert slept == []
    assert err.getvalue() == ""


def test_run_status_watch_redraws() -> None:
    """``--watch 2 --count 2`` clears and draws twice, sleeping 2 s between, then exits 0."""
    second = orjson.loads(orjson.dumps(SAMPLE_STATUS))
    second["gateway"]["requests"] = 5678
    fetch, out, err, slept = FakeGateway(SAMPLE_STATUS, second), io.StringIO(), io.StringIO(), []
    options = status_options("--watch", "2", "--count", "2")
    assert run_status(options, out, err, fetch, slept.append) == 0
    screens = out.getvalue().split(CLEAR_SCREEN)
    assert screens[0] == ""
    assert len(screens) == 3
    assert "requests 1234" in screens[1]
    assert "requests 5678" in screens[2]
    assert "Every 2 s; Ctrl-C to stop." in screens[2]
    assert slept == [2.0]
    assert len(fetch.asked) == 2


def test_run_status_unreachable() -> None:
    """An unreachable gateway prints why on stderr, nothing on stdout, and exits 2."""
    fetch = FakeGateway(GatewayUnreachable("cannot reach http://gw:1/status: refused"))
    out, err = io.StringIO(), io.StringIO()
    assert run_status(status_options(), out, err, fetch, lambda s: None) == EXIT_UNREACHABLE == 2
    assert out.getvalue() == ""
    assert err.getvalue() == "taskoffload status: cannot reach http://gw:1/status: refused\n"


def test_run_status_watch_stops_when_gateway_goes() -> None:
    """A watch whose gateway stops answering ends with status 2 after the screens it drew."""
    fetch = FakeGateway(SAMPLE_STATUS, GatewayUnreachable("gone"))
    out, err = io.StringIO(), io.StringIO()
    assert run_status(status_options("--watch"), out, err, fetch, lambda s: None) == 2
    assert out.getvalue().count(CLEAR_SCREEN) == 1
    assert "gone" in err.getvalue()


# The status command's token: --token, else --token-file, else $TASKOFFLOAD_TOKEN


def token_file(tmp_path: Path, text: str | bytes) -> str:
    """A token file holding ``text``; :return: its path."""
    path = tmp_path / "token"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def test_token_from_each_source(tmp_path: Path) -> None:
    """Each source alone gives the token: the option, the file's first line stripped
    (blank lines before it skipped), the environment variable; none gives no token."""
    assert status_token(status_options("--token", "opt"), {}) == "opt"
    path = token_file(tmp_path, "\n  from-file \nsecond line\n")
    assert status_token(status_options("--token-file", path), {}) == "from-file"
    assert status_token(status_options(), {TOKEN_VARIABLE: " from-env\n"}) == "from-env"
    assert TOKEN_VARIABLE == "TASKOFFLOAD_TOKEN"
    assert status_token(status_options(), {}) is None
    assert status_token(status_options(), {TOKEN_VARIABLE: ""}) is None


def test_token_precedence(tmp_path: Path) -> None:
    """--token wins over --token-file (not even read) and the environment; the file
    wins over the environment."""
    environ = {TOKEN_VARIABLE: "from-env"}
    missing = str(tmp_path / "missing")
    assert status_token(status_options("--token", "opt", "--token-file", missing), environ) == (
        "opt"
    )
    path = token_file(tmp_path, "from-file\n")
    assert status_token(status_options("--token-file", path), environ) == "from-file"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read it: No such file or directory"),
        ("directory", "cannot read it: Is a directory"),
        (b"\xff\xfe token", "cannot read it: 'utf-8' codec can't decode"),
        ("", "is empty"),
        (" \n\n\t\n", "is empty"),
    ],
)
def test_token_file_errors(tmp_path: Path, content: str | bytes | None, why: str) -> None:
    """A token file that is missing, unreadable or empty is a clear error: the
    command says so on stderr, asks no gateway, and exits 2."""
    if content is None:
        path = str(tmp_path / "missing")
    elif content == "directory":
        path = str(tmp_path)
    else:
        path = token_file(tmp_path, content)
    with pytest.raises(TokenUnavailable) as raised:
        status_token(status_options("--token-file", path), {TOKEN_VARIABLE: "unused"})
    assert str(raised.value).startswith(f"--token-file {path!r}")
    assert why in str(raised.value)
    fetch, out, err = FakeGateway(SAMPLE_STATUS), io.StringIO(), io.StringIO()
    options = status_options("--token-file", path)
    assert run_status(options, out, err, fetch, lambda s: None) == EXIT_USAGE == 2
    assert err.getvalue() == f"taskoffload status: {raised.value}\n"
    assert fetch.asked == []
    assert out.getvalue() == ""


def test_run_status_reads_the_environment_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_status sends the variable's token from the environment it is handed, and
    reads none without one; the command hands it os.environ."""
    monkeypatch.setenv(TOKEN_VARIABLE, "from-os")
    fetch, out, err = FakeGateway(SAMPLE_STATUS, SAMPLE_STATUS), io.StringIO(), io.StringIO()
    run_status(status_options(), out, err, fetch, lambda s: None, {TOKEN_VARIABLE: "given"})
    run_status(status_options(), out, err, fetch, lambda s: None)
    assert fetch.asked == [(DEFAULT_GATEWAY, "given"), (DEFAULT_GATEWAY, None)]
    command = FakeGateway(SAMPLE_STATUS)
    monkeypatch.setattr(main_module, "fetch_status", command)
    assert _status(status_options()) == 0
    assert command.asked == [(DEFAULT_GATEWAY, "from-os")]


def test_status_with_a_token_file_against_a_gateway_with_that_file(tmp_path: Path) -> None:
    """In memory: a gateway reading its token as ``--token-file`` does, and the
    command given the same file, or the variable, is let in; without it, refused."""
    path = token_file(tmp_path, "s3cret-token\n")
    reactor = MemoryReactorClock()
    gateway = GatewayService(
        "tcp:8080",
        pool_addresses=["tcp:127.0.0.1:1"],
        reactor=reactor,
        access=GatewayAccess(token=read_token(path)),
    )
    gateway.privilegedStartService()
    site = reactor.tcpServers[0][1]

    def fetch(url: str, token: str | None) -> dict[str, Any]:
        # What fetch_status does, over the site in memory.
        request = DummyRequest([b"status"])
        if token is not None:
            request.requestHeaders.addRawHeader(b"authorization", f"Bearer {token}".encode())
        body = getChildForRequest(site.resource, request).render(request)
        if request.responseCode == 401:
            raise GatewayUnreachable(f"{url} answered HTTP 401")
        return dict(orjson.loads(body))

    for argv, environ in [(["--token-file", path], {}), ([], {TOKEN_VARIABLE: "s3cret-token"})]:
        out, err = io.StringIO(), io.StringIO()
        assert run_status(status_options(*argv), out, err, fetch, lambda s: None, environ) == 0
        assert "Pool     remote: tcp:127.0.0.1:1" in out.getvalue(), err.getvalue()
    err = io.StringIO()
    assert run_status(status_options(), io.StringIO(), err, fetch, lambda s: None, {}) == 2
    assert "HTTP 401" in err.getvalue()


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
