"""
Unit tests for ``--gateway-processes N``: the configuration line a gateway
process is started with (:mod:`taskoffload._gateway_child`), the counts the
processes share (:mod:`taskoffload.shared_metrics`), the tap's option, and
:class:`~taskoffload.gateway_processes.GatewayProcesses` on a memory reactor.

Nothing is spawned: the reactor records what ``spawnProcess`` is asked and
hands back a stand-in transport.  The tests of :class:`GatewayProcesses` bind
a real loopback socket (the memory reactor's fake port has no fd to pass on),
driven by the memory reactor as ``tests/test_lanes.py``'s supervisor test is.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from prometheus_client import values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet import tcp, unix
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure

from taskoffload import gateway_processes, tap
from taskoffload._gateway_child import LISTEN_FD, child_config, service_from_config
from taskoffload.gateway_processes import POOL_STATUS_INTERVAL, GatewayProcesses
from taskoffload.service import GatewayService, SharedPort
from taskoffload.session import GatewayLimits
from taskoffload.shared_metrics import (
    MULTIPROCESS_DIRECTORY,
    POOL_STATUS_FILE,
    SharedGatewayMetrics,
    _bucket_percentiles,
    read_pool_status,
    shared_gateway_status,
    write_pool_status,
)
from taskoffload.signals import ExitZeroOnSigterm
from taskoffload.stats import LATENCY_BUCKETS, GatewayStats
from taskoffload.supervisor import WorkerPoolService
from tests._trial_bridge import pytest_module
from tests.fake_processes import ProcessStringTransport
from tests.socket_reactor import SocketReactor

# The configuration line


def config_line(**overrides: Any) -> bytes:
    """A configuration line with every field set to something not a default."""
    given: dict[str, Any] = {
        "index": 1,
        "family": socket.AF_INET,
        "directory": "/run/taskoffload-gateway-x",
        "pool_in_parent": False,
        "pool_addresses": ["tcp:127.0.0.1:1234", "unix:/run/p.sock"],
        "limits": {"max_inflight_per_client": 7, "max_pending": 70, "max_message": 4096},
        "auto_ping": 12.0,
        "stop_timeout": 3.5,
        "token": "s3cret-token",
        "allowed_origins": ["https://app.example.org"],
        "secret": b"k" * 32,
        "prefetch": 2,
    }
    given.update(overrides)
    return child_config(**given)


def test_configuration_line_is_one_json_line() -> None:
    """The line ends with its only newline (the child reads one line) and is JSON."""
    line = config_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["index"] == 1


def test_configuration_line_makes_the_gateway_service_it_was_given() -> None:
    """child_config → JSON → service_from_config: a GatewayService serving the
    inherited fd 3 with the family, directory, limits, access, secret, prefetch
    and pool addresses given."""
    reactor = MemoryReactorClock()
    service = service_from_config(json.loads(config_line()), reactor)
    assert isinstance(service, GatewayService)
    assert service.shared == SharedPort(
        fd=LISTEN_FD, family=socket.AF_INET, directory="/run/taskoffload-gateway-x"
    )
    assert LISTEN_FD == 3
    assert service.listen == "fd:3"
    assert service.reactor is reactor
    limits = service.limits
    assert isinstance(limits, GatewayLimits)
    assert (limits.max_inflight_per_client, limits.max_pending, limits.max_message) == (7, 70, 4096)
    assert service.pool_addresses == ["tcp:127.0.0.1:1234", "unix:/run/p.sock"]
    assert service.pool_service is None
    assert service.auto_ping == 12.0
    assert service.stop_timeout == 3.5
    assert service.secret == b"k" * 32
    assert service.prefetch == 2
    access = service.access
    assert access.token_required
    assert access.presents_token(b"Bearer s3cret-token", [])
    assert access.presents_token(None, [b"s3cret-token"])
    assert not access.presents_token(b"Bearer other", [b"other"])
    assert access.origin_allowed("https://app.example.org")
    assert not access.origin_allowed("https://evil.example.org")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6, socket.AF_UNIX])
def test_configuration_line_keeps_the_address_family(family: int) -> None:
    """The socket's family reaches the child (adoptStreamPort needs it)."""
    service = service_from_config(json.loads(config_line(family=family)), MemoryReactorClock())
    assert service.shared.family == family


def test_configuration_line_without_token_secret_or_origins() -> None:
    """No token, no secret, no origins: the child's gateway is open, without a secret."""
    line = config_line(token=None, secret=None, allowed_origins=[], pool_in_parent=True)
    service = service_from_config(json.loads(line), MemoryReactorClock())
    assert service.secret is None
    assert not service.access.token_required
    assert service.access.origin_allowed("https://anywhere.example.org")
    assert service.shared.pool_in_parent is True


def test_child_reads_its_pool_status_from_the_directory(tmp_path: Path) -> None:
    """With the pool in the parent (role all), a child's ``pool`` is the parent's
    file; otherwise it is the pool addresses."""
    write_pool_status(str(tmp_path), {"serving": 3, "restarts": 1})
    in_parent = service_from_config(
        json.loads(config_line(directory=str(tmp_path), pool_in_parent=True)), MemoryReactorClock()
    )
    alone = service_from_config(json.loads(config_line(directory=str(tmp_path))), None)
    in_parent.stats = alone.stats = GatewayStats()
    assert in_parent.status()["pool"] == {"serving": 3, "restarts": 1}
    assert alone.status()["pool"] == {"addresses": ["tcp:127.0.0.1:1234", "unix:/run/p.sock"]}


# The shared counts


def test_bucket_percentiles_are_bucket_upper_bounds_in_ms() -> None:
    """p50/p90/p99/max: the upper bound (ms) of the first cumulative bucket holding that share."""
    buckets = [(0.001, 10.0), (0.01, 50.0), (0.1, 95.0), (1.0, 100.0), (float("inf"), 100.0)]
    assert _bucket_percentiles(buckets) == {"p50": 10.0, "p90": 100.0, "p99": 1000.0, "max": 1000.0}


def test_bucket_percentiles_beyond_the_last_bound_are_unknown() -> None:
    """A share reached only in the +Inf bucket has no bound: None."""
    buckets = [(0.005, 60.0), (30.0, 98.0), (float("inf"), 100.0)]
    assert _bucket_percentiles(buckets) == {"p50": 5.0, "p90": 30000.0, "p99": None, "max": None}


@pytest.mark.parametrize("buckets", [[], [(0.1, 0.0), (float("inf"), 0.0)]])
def test_bucket_percentiles_without_requests(buckets: list[tuple[float, float]]) -> None:
    """No request counted: every percentile is None."""
    assert _bucket_percentiles(buckets) == {"p50": None, "p90": None, "p99": None, "max": None}


class MergedCounts:
    """What a MultiProcessCollector yields once it has merged every process's files."""

    def __init__(
        self,
        requests: dict[tuple[str, str], float],
        clients: float,
        inflight: float,
        buckets: list[tuple[str, float]],
    ) -> None:
        self.requests, self.clients, self.inflight, self.buckets = (
            requests,
            clients,
            inflight,
            buckets,
        )

    def collect(self) -> Iterator[Any]:
        counter = CounterMetricFamily(
            "taskoffload_requests", "replies", labels=["function", "outcome"]
        )
        for (function, outcome), value in self.requests.items():
            counter.add_metric([function, outcome], value)
        yield counter
        yield GaugeMetricFamily("taskoffload_clients", "clients", value=self.clients)
        yield GaugeMetricFamily("taskoffload_inflight", "in flight", value=self.inflight)
        histogram = HistogramMetricFamily("taskoffload_request_seconds", "seconds")
        histogram.add_metric([], self.buckets, sum_value=1.0)
        yield histogram
        yield GaugeMetricFamily("taskoffload_detached", "held", value=2)
        yield CounterMetricFamily("taskoffload_resumed", "resumed", value=3)
        yield CounterMetricFamily("taskoffload_detached_expired", "expired", value=1)
        yield GaugeMetricFamily("taskoffload_poison_quarantined", "quarantined", value=1)
        yield CounterMetricFamily("taskoffload_poisoned", "refused", value=4)
        yield CounterMetricFamily("taskoffload_poison_kills", "kills", value=5)


def test_shared_gateway_status_sums_every_sample() -> None:
    """requests, by_function and by_outcome sum every ``taskoffload_requests_total``
    sample; clients and inflight are the gauges; latency is read from the buckets
    (given in the collector's order, le as strings, +Inf last)."""
    registry = CollectorRegistry()
    registry.register(
        MergedCounts(
            {
                ("echo", "ok"): 5,
                ("echo", "overloaded"): 2,
                ("noop", "ok"): 3,
                ("cpu", "timeout"): 1,
            },
            clients=4,
            inflight=6,
            buckets=[("0.001", 2.0), ("0.01", 5.0), ("0.1", 8.0), ("1.0", 9.0), ("+Inf", 9.0)],
        )
    )
    figures = shared_gateway_status(registry)
    assert figures == {
        "clients": 4,
        "inflight": 6,
        "requests": 11,
        "by_function": {"echo": 7, "noop": 3, "cpu": 1},
        "by_outcome": {"ok": 8, "overloaded": 2, "timeout": 1},
        "latency_from": "histogram",
        "latency": {"p50": 10.0, "p90": 1000.0, "p99": 1000.0, "max": 1000.0},
        "detached": {"held": 2, "resumed": 3, "expired": 1},
        "poison": {"quarantined": 1, "refused": 4, "kills": 5},
    }


def test_shared_gateway_status_with_nothing_counted() -> None:
    """No sample yet: zeros, and no latency."""
    figures = shared_gateway_status(CollectorRegistry())
    assert figures["requests"] == figures["clients"] == figures["inflight"] == 0
    assert figures["by_function"] == figures["by_outcome"] == {}
    assert figures["latency"] == {"p50": None, "p90": None, "p99": None, "max": None}


@attrs.define
class FakeProcesses:
    """prometheus_client in multiprocess mode for several made-up process ids, in
    this one process: each id writes its own files, as each gateway process does."""

    directory: Path
    classes: dict[int, Any] = attrs.field(factory=dict)

    @contextlib.contextmanager
    def process(self, pid: int) -> Iterator[None]:
        """Within: metrics (and label children) made or written count as process ``pid``'s."""
        value_class = self.classes.get(pid)
        if value_class is None:
            value_class = self.classes[pid] = values.MultiProcessValue(lambda: pid)
        saved = values.ValueClass
        values.ValueClass = value_class
        try:
            yield
        finally:
            values.ValueClass = saved


@pytest.fixture
def multiprocess(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeProcesses]:
    monkeypatch.setenv(MULTIPROCESS_DIRECTORY, str(tmp_path))
    yield FakeProcesses(tmp_path)
    values.close_all_multiprocess_files()


def shared_metrics_of(processes: FakeProcesses, pid: int) -> SharedGatewayMetrics:
    with processes.process(pid):
        return SharedGatewayMetrics(lambda: {"gateway": {}, "pool": None})


def test_status_sums_the_counts_of_every_process(multiprocess: FakeProcesses) -> None:
    """Two processes count in their own files; each one's ``/status`` figures are the sums."""
    # The latencies below fall in the buckets ending at 1, 5 and 250 ms.
    assert {0.001, 0.005, 0.25} <= set(LATENCY_BUCKETS)
    first, second = shared_metrics_of(multiprocess, 101), shared_metrics_of(multiprocess, 102)
    with multiprocess.process(101):
        first.finished("echo", "ok", 0.0004)
        first.finished("echo", "ok", 0.003)
        first.sample(GatewayStats())
    with multiprocess.process(102):
        second.finished("echo", "ok", 0.2)
        second.finished("noop", "overloaded", 9.0)  # not a latency
        stats = GatewayStats()
        stats.clients, stats.inflight = 3, 2
        second.sample(stats)
    with multiprocess.process(101):
        stats = GatewayStats()
        stats.clients = 2
        first.sample(stats)
    for metrics in (first, second):
        figures = shared_gateway_status(metrics.counts)
        assert figures["requests"] == 4
        assert figures["by_function"] == {"echo": 3, "noop": 1}
        assert figures["by_outcome"] == {"ok": 3, "overloaded": 1}
        assert (figures["clients"], figures["inflight"]) == (5, 2)
        assert figures["latency"] == {"p50": 5.0, "p90": 250.0, "p99": 250.0, "max": 250.0}
    assert sorted(p.name for p in multiprocess.directory.glob("counter_*.db")) == [
        "counter_101.db",
        "counter_102.db",
    ]


# The pool's state


def test_pool_status_round_trip(tmp_path: Path) -> None:
    """What the parent writes the children read back, the last write winning."""
    write_pool_status(str(tmp_path), {"serving": 2, "count": 4})
    assert read_pool_status(str(tmp_path)) == {"serving": 2, "count": 4}
    write_pool_status(str(tmp_path), {"serving": 4, "count": 4, "lanes": {"default": {}}})
    assert read_pool_status(str(tmp_path)) == {"serving": 4, "count": 4, "lanes": {"default": {}}}


def test_pool_status_missing_is_none(tmp_path: Path) -> None:
    """Before the parent's first write (or with no directory): None."""
    assert read_pool_status(str(tmp_path)) is None
    assert read_pool_status(str(tmp_path / "gone")) is None


def test_pool_status_half_written_is_none(tmp_path: Path) -> None:
    """A file cut short reads as None, not an error."""
    (tmp_path / POOL_STATUS_FILE).write_text('{"serving": 2, "cou')
    assert read_pool_status(str(tmp_path)) is None


def test_pool_status_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    """A write that fails half-way leaves the previous state readable: the file is
    written beside and renamed over, never written in place."""
    write_pool_status(str(tmp_path), {"serving": 2})
    with pytest.raises(TypeError):
        # json.dump writes the first fields, then fails on the object.
        write_pool_status(str(tmp_path), {"serving": 3, "padding": "x" * 10000, "bad": object()})
    assert read_pool_status(str(tmp_path)) == {"serving": 2}


# The tap


def parse(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_gateway_processes_default_is_one() -> None:
    """One gateway process unless told otherwise, in every role."""
    assert parse()["gateway-processes"] == 1
    assert parse("--role=gateway")["gateway-processes"] == 1
    assert parse("--role=worker")["gateway-processes"] == 1


@pytest.mark.parametrize("role", ["gateway", "all"])
@pytest.mark.parametrize(
    "listen", ["tcp:8080:interface=127.0.0.1", "tcp6:8080:interface=\\:\\:1", "unix:/run/g.sock"]
)
def test_gateway_processes_accepted_for_a_gateway(role: str, listen: str) -> None:
    """Roles gateway and all take it, on a tcp:, tcp6: or unix: port."""
    options = parse(f"--role={role}", "--gateway-processes=2", f"--listen={listen}")
    assert options["gateway-processes"] == 2


def test_gateway_processes_refused_for_a_worker() -> None:
    """A pool alone has no gateway to multiply."""
    with pytest.raises(usage.UsageError, match="--gateway-processes is for a gateway"):
        parse("--role=worker", "--gateway-processes=2")


@pytest.mark.parametrize("role", ["gateway", "all"])
def test_gateway_processes_refused_on_ssl(role: str) -> None:
    """More than one process on an ssl: port is refused, saying to terminate TLS in front."""
    listen = "--listen=ssl:8443:privateKey=key.pem:certKey=cert.pem"
    with pytest.raises(usage.UsageError, match="terminate TLS in front"):
        parse(f"--role={role}", "--gateway-processes=2", listen)
    assert parse(f"--role={role}", listen)["gateway-processes"] == 1


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_gateway_processes_must_be_a_positive_number(count: str) -> None:
    with pytest.raises(usage.UsageError):
        parse("--role=gateway", f"--gateway-processes={count}")


def test_make_service_gateway_processes() -> None:
    """Role gateway with --gateway-processes 2: a GatewayProcesses on --listen, and
    each process's configuration line says what the options say."""
    top = tap.makeService(
        parse(
            "--role=gateway",
            "--gateway-processes=2",
            "--listen=tcp:0:interface=127.0.0.1",
            "--pool=tcp:127.0.0.1:1",
            "--pool=tcp:h:2",
            "--stop-timeout=4",
            "--prefetch=3",
            "--max-pending=50",
            "--allowed-origin=https://a.example.org",
        )
    )
    assert isinstance(top, MultiService)
    stop, gateway = list(top)
    assert isinstance(stop, ExitZeroOnSigterm)
    assert isinstance(gateway, GatewayProcesses)
    assert (gateway.listen, gateway.count, gateway.stop_timeout) == (
        "tcp:0:interface=127.0.0.1",
        2,
        4.0,
    )
    assert gateway._pool_status is None
    assert not gateway.running and gateway.port is None
    line = json.loads(gateway._config(1, "/d", socket.AF_INET6))
    assert (line["index"], line["family"], line["directory"]) == (1, "AF_INET6", "/d")
    assert line["pool_addresses"] == ["tcp:127.0.0.1:1", "tcp:h:2"]
    assert line["pool_in_parent"] is False
    assert line["prefetch"] == 3 and line["stop_timeout"] == 4.0
    assert line["limits"]["max_pending"] == 50
    assert line["allowed_origins"] == ["https://a.example.org"]


def test_make_service_all_gateway_processes() -> None:
    """Role all: the pool, then a GatewayProcesses writing the pool's state and
    telling its processes the pool's address once bound."""
    top = tap.makeService(parse("--count=2", "--gateway-processes=3"))
    _, pool, gateway = list(top)
    assert isinstance(pool, WorkerPoolService)
    assert isinstance(gateway, GatewayProcesses)
    assert gateway.count == 3
    assert gateway._pool_status == pool.status

    class BoundPort:
        def getHost(self) -> IPv4Address:
            return IPv4Address("TCP", "0.0.0.0", 4321)

    pool._sockets.port = BoundPort()  # type: ignore[assignment]
    line = json.loads(gateway._config(0, "/d", socket.AF_INET))
    assert line["pool_in_parent"] is True
    assert line["pool_addresses"] == ["tcp:127.0.0.1:4321"]


@pytest.mark.parametrize("role", ["gateway", "all"])
def test_make_service_one_gateway_process(role: str) -> None:
    """With the default of one, the gateway runs in the twistd process itself."""
    services = list(tap.makeService(parse(f"--role={role}")))
    assert isinstance(services[-1], GatewayService)
    assert not any(isinstance(s, GatewayProcesses) for s in services)


# GatewayProcesses


class FakeProcessTransport(ProcessStringTransport):
    """A spawned process's transport: stdin recorded, signals recorded, a pid."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid: int | None = pid


@attrs.frozen
class Spawned:
    """What one ``spawnProcess`` call was given."""

    protocol: IProcessProtocol
    executable: str
    args: list[str]
    env: dict[str, str]
    child_fds: dict[int, Any]
    transport: FakeProcessTransport

    def end(self, reason: Failure | None = None) -> None:
        """The process ends (by default killed by SIGKILL), as the reactor tells it."""
        self.transport.pid = None
        self.protocol.processEnded(reason or Failure(ProcessTerminated(signal=signal.SIGKILL)))


class ProcessReactor(SocketReactor):
    """A memory reactor that binds real loopback (or UNIX) sockets, driven by it,
    and records the processes it is asked to spawn."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []
        self._pids = itertools.count(4_000_001)

    def listenUNIX(  # type: ignore[override]
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> unix.Port:
        listening = unix.Port(address, factory, backlog, mode, self, wantPID)
        listening.startListening()
        return listening

    def spawnProcess(  # type: ignore[override]
        self,
        processProtocol: IProcessProtocol,
        executable: str,
        args: Any = (),
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeProcessTransport:
        transport = FakeProcessTransport(next(self._pids))
        processProtocol.makeConnection(transport)
        self.spawned.append(
            Spawned(processProtocol, executable, list(args), dict(env), dict(childFDs), transport)
        )
        return transport


def configuration(index: int, directory: str, family: int) -> bytes:
    return json.dumps({"index": index, "directory": directory, "family": family}).encode() + b"\n"


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


@pytest.fixture
def kills(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The ``os.kill`` calls of GatewayProcesses, recorded instead of made (the pids are made up)."""
    made: list[tuple[int, int]] = []
    monkeypatch.setattr(
        gateway_processes.os, "kill", lambda pid, signum: made.append((pid, signum))
    )
    return made


@contextlib.contextmanager
def started(
    count: int = 2, listen: str = "tcp:0:interface=127.0.0.1", **kwargs: Any
) -> Iterator[tuple[GatewayProcesses, ProcessReactor]]:
    """A started GatewayProcesses of ``count`` processes; stopped (each process
    ending when told) afterwards, whatever the test did."""
    reactor = ProcessReactor()
    service = GatewayProcesses(listen, count, configuration, reactor=reactor, **kwargs)
    service.privilegedStartService()
    service.startService()
    directory = service.directory
    try:
        yield service, reactor
    finally:
        try:
            if service.running:
                stopping = fired(service.stopService())
                for spawned in list(reactor.spawned):
                    if spawned.transport.pid is not None and spawned.transport.signals:
                        spawned.end(Failure(ProcessDone(0)))
                for _ in range(20):
                    if stopping:
                        break
                    reactor.advance(service.stop_timeout / 10 + 0.5)
            if service.port is not None:
                service.port.stopListening()
                reactor.advance(0)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)


def advance_until(
    reactor: MemoryReactorClock, done: Any, within: float, step: float = 0.01
) -> float:
    """Advance the clock by ``step`` until ``done()``, at most ``within`` s; :return: the time taken."""
    taken = 0.0
    while not done() and taken < within:
        reactor.advance(step)
        taken += step
    return taken


def fired(d: Deferred[Any]) -> list[Any]:
    seen: list[Any] = []
    d.addBoth(seen.append)
    return seen


def listening_port(fd: int) -> tuple[str, int]:
    with socket.socket(fileno=socket.dup(fd)) as bound:
        assert bound.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        address: tuple[str, int] = bound.getsockname()
    return address


def test_spawns_each_process_with_the_socket_as_fd_3_and_the_shared_directory() -> None:
    """N processes of ``python -m taskoffload._gateway_child``, and a spare, each
    given the listening socket as fd 3, stdin to write, stdout and stderr to read,
    and the private directory as PROMETHEUS_MULTIPROC_DIR; the parent never
    accepts."""
    with started(3) as (service, reactor):
        assert len(reactor.spawned) == 4
        port = service.port
        assert isinstance(port, tcp.Port) and port.connected  # bound here, in the parent
        assert listening_port(port.fileno())[0] == "127.0.0.1"
        assert port not in reactor.getReaders()  # bound, never accepting here
        directory = service.directory
        assert directory is not None and os.path.isdir(directory)
        assert os.path.basename(directory).startswith("taskoffload-gateway-")
        for spawned in reactor.spawned:
            assert spawned.executable == sys.executable
            assert spawned.args == [sys.executable, "-m", "taskoffload._gateway_child"]
            assert spawned.child_fds == {0: "w", 1: "r", 2: "r", 3: port.fileno()}
            assert spawned.env[MULTIPROCESS_DIRECTORY] == directory
            assert spawned.env["PYTHONUNBUFFERED"] == "1"
        serving = reactor.spawned[:3]
        assert sorted(service.pids()) == sorted(s.transport.pid for s in serving)
        assert sorted(service.children) == [0, 1, 2]


def written_configuration(transport: Any) -> dict[str, Any]:
    """The configuration line a process was written (the first line of its stdin)."""
    result: dict[str, Any] = json.loads(transport.value().split(b"\n")[0])
    return result


def test_the_processes_are_told_to_serve_and_the_spare_waits() -> None:
    """Each of the N processes is written its configuration line, then ``serve``;
    the spare (the N+1th) only its configuration: it waits, started."""
    with started(2) as (service, reactor):
        assert [s.transport.value().split(b"\n")[1:] for s in reactor.spawned] == [
            [b"serve", b""],
            [b"serve", b""],
            [b""],
        ]
        assert len(service.pids()) == 2


def test_each_process_gets_its_configuration_line() -> None:
    """Process i is written configuration(i, directory, the socket's family), once."""
    with started(2) as (service, reactor):
        assert [written_configuration(s.transport) for s in reactor.spawned] == [
            {"index": i, "directory": service.directory, "family": socket.AF_INET}
            for i in (0, 1, 2)
        ]


def test_a_unix_port_is_shared_with_its_family(tmp_path: Path) -> None:
    """On a UNIX socket the processes are told AF_UNIX."""
    with started(2, f"unix:{tmp_path / 'g.sock'}") as (_, reactor):
        assert [written_configuration(s.transport)["family"] for s in reactor.spawned] == [
            socket.AF_UNIX
        ] * 3


def test_a_process_that_ends_unasked_is_replaced_at_once(logged: list[dict[str, Any]]) -> None:
    """A process killed (or exiting) while serving is replaced at once by the
    spare, told to serve in its place (same socket and directory), counted in
    ``replaced``; a new spare is started at once."""
    with started(3) as (service, reactor):
        reactor.advance(2)  # they have lived: no crash-loop pause
        first, spare = reactor.spawned[1], reactor.spawned[3]
        first.end()  # SIGKILL: no clock advance, no other event
        assert spare.transport.value().endswith(b"\nserve\n")
        assert service.children[1] is spare.protocol
        assert spare.child_fds == first.child_fds
        assert spare.env[MULTIPROCESS_DIRECTORY] == service.directory
        assert len(reactor.spawned) == 5  # the new spare
        assert not reactor.spawned[4].transport.value().endswith(b"serve\n")
        assert service.replaced == 1
        assert sorted(service.children) == [0, 1, 2]
        assert first.transport.pid not in service.pids()
        warnings = [e for e in logged if "replacing it" in e.get("log_format", "")]
        assert [(w["index"], "signal 9" in w["how"]) for w in warnings] == [(1, True)]
        reactor.advance(2)
        reactor.spawned[0].end(Failure(ProcessDone(0)))
        assert service.children[0] is reactor.spawned[4].protocol
        assert service.replaced == 2
        assert [w["how"] for w in logged if "replacing it" in w.get("log_format", "")][-1] == (
            "exited"
        )


def test_processes_that_die_young_are_started_again_after_a_doubling_pause() -> None:
    """A process that dies within a second of its start (a broken start: say, an
    import that fails) is not started again at once, in a loop: after 0.5 s, then
    1 s, doubling; one that has lived is replaced at once again."""
    with started(1) as (_service, reactor):
        reactor.spawned[1].end()  # the spare dies young
        assert len(reactor.spawned) == 2
        reactor.advance(0.49)
        assert len(reactor.spawned) == 2
        reactor.advance(0.02)
        assert len(reactor.spawned) == 3
        reactor.spawned[2].end()  # and again: twice the pause
        reactor.advance(0.9)
        assert len(reactor.spawned) == 3
        reactor.advance(0.2)
        assert len(reactor.spawned) == 4
        reactor.advance(2)
        reactor.spawned[3].end()  # it had lived: at once
        assert len(reactor.spawned) == 5


def test_stop_terms_each_process_waits_for_them_and_replaces_none() -> None:
    """Stopping: each process gets SIGTERM; those that end are not replaced; the
    stop waits until every one has ended, then closes the port and removes the
    directory."""
    with started(2) as (service, reactor):
        directory, port = service.directory, service.port
        assert directory is not None and port is not None
        stopped = fired(service.stopService())
        assert [s.transport.signals for s in reactor.spawned] == [["TERM"]] * 3
        reactor.spawned[0].end(Failure(ProcessDone(0)))
        reactor.spawned[2].end(Failure(ProcessTerminated(signal=signal.SIGTERM)))  # the spare
        reactor.advance(1)
        assert stopped == []  # one is still draining
        assert os.path.isdir(directory)
        reactor.advance(20)
        assert stopped == []
        reactor.spawned[1].end(Failure(ProcessDone(0)))
        advance_until(reactor, lambda: stopped, 1.0)  # at once, or a poll later
        assert stopped == [None]
        assert len(reactor.spawned) == 3 and service.replaced == 0
        assert service.port is None and port.fileno() == -1  # closed
        assert not os.path.exists(directory) and service.directory is None


def test_stop_kills_the_processes_left_after_the_stop_timeout(
    kills: list[tuple[int, int]],
) -> None:
    """A process still running stop_timeout + 2 s after its SIGTERM is SIGKILLed
    (by ``os.kill`` or its transport, either will do); the stop then ends, the
    port closed and the directory removed.

    Failed at dd0105d (fixed in 9d1bf89): ``_stop`` waited on
    ``gatherResults(...).addTimeout(...)`` and caught ``defer.TimeoutError``,
    but a ``gatherResults`` the timeout cancels fails with
    ``FirstError(CancelledError)``: nobody was killed, the stop failed with that
    error, the port stayed open and the directory stayed."""
    with started(3, stop_timeout=5.0) as (service, reactor):
        directory = service.directory
        assert directory is not None and os.path.isdir(directory)  # until the stop ends
        stopped = fired(service.stopService())
        reactor.spawned[1].end(Failure(ProcessDone(0)))
        reactor.spawned[3].end(Failure(ProcessTerminated(signal=signal.SIGTERM)))  # the spare
        stuck = sorted(
            p for p in (reactor.spawned[0].transport.pid, reactor.spawned[2].transport.pid)
        )

        def killed() -> list[int]:
            by_transport = [
                s.transport.pid for s in reactor.spawned if "KILL" in s.transport.signals
            ]
            return sorted([pid for pid, n in kills if n == signal.SIGKILL] + by_transport)

        reactor.advance(6.9)
        assert stopped == [] and killed() == []
        advance_until(reactor, lambda: killed() or stopped, 0.5)
        assert killed() == stuck
        assert "KILL" not in reactor.spawned[1].transport.signals  # it had ended
        advance_until(reactor, lambda: stopped, 1.0)
        assert stopped == [None]
        assert service.port is None
        assert not os.path.exists(directory)
        # They end, killed, after the stop: still not replaced.
        reactor.spawned[0].end()
        reactor.spawned[2].end()
        assert len(reactor.spawned) == 4 and service.replaced == 0


def test_the_pool_state_is_written_before_each_start_and_twice_a_second() -> None:
    """Role all: the parent writes its pool's state to the directory before it
    starts a process (so the first read finds it) and every 0.5 s."""
    states = iter(itertools.count())

    def pool_status() -> dict[str, Any]:
        return {"serving": next(states)}

    with started(2, pool_status=pool_status) as (service, reactor):
        directory = service.directory
        assert directory is not None and os.path.isdir(directory)
        # Written when the writer started (0), then before each of the 3
        # processes started (the 2 and the spare): the 4th state.
        assert read_pool_status(directory) == {"serving": 3}
        first = {"serving": 3}
        reactor.advance(POOL_STATUS_INTERVAL)
        later = read_pool_status(directory)
        assert later is not None and later["serving"] > first["serving"]
        assert POOL_STATUS_INTERVAL == 0.5
        for _ in range(4):  # 2 s, so the processes have lived: a spare replaces at once
            reactor.advance(POOL_STATUS_INTERVAL)
        later = read_pool_status(directory)
        assert later == {"serving": 8}  # one write each half second
        reactor.spawned[0].end()
        after_replacing = read_pool_status(directory)
        assert after_replacing is not None and after_replacing["serving"] > later["serving"]


def test_no_pool_state_without_a_pool_in_the_tree() -> None:
    """Role gateway: no pool state file (the children show the addresses)."""
    with started(2) as (service, reactor):
        reactor.advance(2)
        assert service.directory is not None
        assert not os.path.exists(os.path.join(service.directory, POOL_STATUS_FILE))


def test_a_dead_process_leaves_its_counters_but_not_its_live_gauges(
    multiprocess: FakeProcesses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that dies leaves its counts (counters never fall) but its clients
    and requests in flight are gone with it: ``clients``/``inflight`` (livesum
    gauges) must stop counting them.

    Failed at dd0105d (fixed in 9d1bf89): GatewayProcesses never called
    ``prometheus_client.multiprocess.mark_process_dead`` for an ended process,
    so its ``gauge_livesum_PID.db`` stays and ``/status`` and ``/metrics`` keep
    counting its clients and requests in flight for ever."""
    with started(2) as (service, reactor):
        directory = service.directory
        assert directory is not None and os.path.isdir(directory)  # the processes' counters
        processes = FakeProcesses(Path(directory))
        monkeypatch.setenv(MULTIPROCESS_DIRECTORY, directory)  # what the processes were given
        victim, survivor = (s.transport.pid for s in reactor.spawned[:2])  # not the spare
        assert victim is not None and survivor is not None
        for pid, clients in ((victim, 4), (survivor, 3)):
            metrics = shared_metrics_of(processes, pid)
            with processes.process(pid):
                metrics.finished("echo", "ok", 0.001)
                stats = GatewayStats()
                stats.clients = clients
                metrics.sample(stats)
        assert shared_gateway_status(metrics.counts)["clients"] == 7
        reactor.spawned[0].end()
        figures = shared_gateway_status(metrics.counts)
        assert figures["requests"] == 2  # the dead one's counts stay
        assert figures["clients"] == 3, "the dead process's 4 clients are still counted"


testSuite = pytest_module(__file__)
