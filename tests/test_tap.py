"""
Unit tests for :mod:`taskoffload.tap`: the ``twistd taskoffload`` options, parsed
from argument lists, and the service they wire.
"""

from __future__ import annotations

import pytest
from twisted.application.service import MultiService
from twisted.python import usage

from taskoffload import option_values, tap, wire
from taskoffload.signals import ExitZeroOnSigterm
from taskoffload.supervisor import PoolConfig, WorkerPoolService
from tests._trial_bridge import pytest_module


def parse(*args: str) -> tap.Options:
    """Options parsed from ``args``, as twistd would."""
    options = tap.Options()
    options.parseOptions(list(args))
    return options


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults: role all, 4 workers per CPU, concurrency 1, default addresses, examples."""
    monkeypatch.setattr(option_values.os, "cpu_count", lambda: 3)
    options = parse()
    assert options["role"] == "all"
    assert options["count"] == 12
    assert options["concurrency"] == 1
    assert options["listen"] == "tcp:8080:interface=127.0.0.1"
    assert options["pool-listen"] == "tcp:12345:interface=127.0.0.1"
    assert options["tasks"] == ["taskoffload.examples"]
    assert options["max-message"] == wire.DEFAULT_MAX_MESSAGE
    assert options["stop-timeout"] == 30.0


def test_unknown_cpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the CPU count is unknown, the default is four workers."""
    monkeypatch.setattr(option_values.os, "cpu_count", lambda: None)
    assert parse()["count"] == 4


def test_options_coerced() -> None:
    """Numeric options are read as numbers."""
    options = parse("--count=8", "--concurrency", "3", "--max-message=4096", "--stop-timeout=2.5")
    assert (options["count"], options["concurrency"]) == (8, 3)
    assert options["max-message"] == 4096
    assert options["stop-timeout"] == 2.5


def test_tasks_repeatable() -> None:
    """``--tasks`` may be given several times; the modules replace the examples, in order."""
    options = parse("--tasks", "string", "--tasks=json")
    assert options["tasks"] == ["string", "json"]


def test_tasks_not_shared() -> None:
    """Task modules named on one command line do not leak into the next."""
    parse("--tasks", "json")
    assert parse()["tasks"] == ["taskoffload.examples"]


@pytest.mark.parametrize(
    "args",
    [
        ["--count=0"],
        ["--count=-1"],
        ["--count=many"],
        ["--concurrency=0"],
        ["--max-message=0"],
        ["--stop-timeout=0"],
        ["--stop-timeout=-5"],
        ["--smtp-port=0"],
        ["--auto-ping=0"],
        ["--auto-ping=0.5"],
        ["--auto-ping=1.5"],
    ],
)
def test_out_of_range_rejected(args: list[str]) -> None:
    """Counts, sizes and timeouts below their minimum are rejected."""
    with pytest.raises(usage.UsageError):
        parse(*args)


def test_unknown_role_rejected() -> None:
    """An unknown role is rejected with a message naming the valid ones."""
    with pytest.raises(usage.UsageError, match="worker, gateway, all"):
        parse("--role=butler")


def test_worker_role_listen_default() -> None:
    """The worker role listens on the pool's default address."""
    assert parse("--role=worker")["listen"] == "tcp:12345:interface=127.0.0.1"


def test_gateway_role_pool_default() -> None:
    """The gateway role sends to the default pool address unless told otherwise."""
    assert parse("--role=gateway")["pool"] == ["tcp:127.0.0.1:12345"]
    given = parse("--role=gateway", "--pool=tcp:127.0.0.1:1", "--pool=unix:/p.sock")
    assert given["pool"] == ["tcp:127.0.0.1:1", "unix:/p.sock"]


def test_bad_pool_rejected() -> None:
    """A --pool that is not an address is rejected naming it."""
    with pytest.raises(usage.UsageError, match="--pool 'nonsense'"):
        parse("--role=gateway", "--pool=nonsense")


def test_pool_only_for_gateway() -> None:
    """--pool with role all is refused: that role runs its own pool."""
    with pytest.raises(usage.UsageError, match="--pool is for --role=gateway"):
        parse("--pool=tcp:127.0.0.1:1")


def test_ssl_not_for_workers() -> None:
    """Workers refuse an ssl: endpoint (they serve plain TCP)."""
    with pytest.raises(usage.UsageError, match="workers listen on a tcp:"):
        parse("--role=worker", "--listen=ssl:9000")


@pytest.mark.parametrize(
    "listen", ["12345", "localhost:12345", "http://127.0.0.1:12345", "udp:12345"]
)
def test_bad_listen_rejected(listen: str) -> None:
    """A listen address that is not a server endpoint string is rejected, with an example."""
    with pytest.raises(usage.UsageError, match="tcp:"):
        parse("--role=worker", f"--listen={listen}")
    with pytest.raises(usage.UsageError, match="expected an endpoint such as tcp:8080"):
        parse(f"--listen={listen}")


def test_bad_pool_listen_rejected() -> None:
    """A bad --pool-listen is rejected the same way."""
    with pytest.raises(usage.UsageError, match="--pool-listen"):
        parse("--pool-listen=12345")


@pytest.mark.parametrize("listen", ["tcp:9000", "tcp6:9000", "unix:/run/taskoffload.sock"])
def test_endpoint_kinds_accepted(listen: str) -> None:
    """tcp, tcp6 and unix listen addresses are accepted as given."""
    assert parse("--role=worker", "--insecure", f"--listen={listen}")["listen"] == listen


def test_unknown_option_rejected() -> None:
    """An option that does not exist is rejected."""
    with pytest.raises(usage.UsageError):
        parse("--workers=4")


def test_make_service() -> None:
    """The service is a worker pool configured from the options, and starts nothing yet."""
    options = parse(
        "--role=worker",
        "--listen=unix:/run/t.sock",
        "--count=2",
        "--concurrency=3",
        "--tasks=json",
        "--max-message=4096",
        "--stop-timeout=5",
        "--smtp-host=mail.example.org",
        "--smtp-port=2525",
    )
    top = tap.makeService(options)
    assert isinstance(top, MultiService)
    stop, pool = list(top)
    assert isinstance(stop, ExitZeroOnSigterm)
    assert isinstance(pool, WorkerPoolService)
    assert pool.config == PoolConfig(
        listen="unix:/run/t.sock",
        count=2,
        concurrency=3,
        tasks=("json",),
        max_message=4096,
        stop_timeout=5.0,
        env={"TASKOFFLOAD_SMTP_HOST": "mail.example.org", "TASKOFFLOAD_SMTP_PORT": "2525"},
    )
    assert not pool.running


def test_make_service_all() -> None:
    """Role all runs a worker pool and a gateway that uses it."""
    from taskoffload.service import GatewayService

    top = tap.makeService(parse("--count=2"))
    stop, pool, gateway = list(top)
    assert isinstance(stop, ExitZeroOnSigterm)
    assert isinstance(pool, WorkerPoolService)
    assert pool.config.listen == "tcp:12345:interface=127.0.0.1"
    assert isinstance(gateway, GatewayService)
    assert gateway.pool_service is pool
    assert gateway.listen == "tcp:8080:interface=127.0.0.1"


def test_make_service_gateway() -> None:
    """Role gateway runs only a gateway, sending to the given pools."""
    from taskoffload.service import GatewayService

    top = tap.makeService(parse("--role=gateway", "--pool=tcp:127.0.0.1:1", "--pool=tcp:h:2"))
    stop, gateway = list(top)
    assert isinstance(stop, ExitZeroOnSigterm)
    assert isinstance(gateway, GatewayService)
    assert gateway.pool_addresses == ["tcp:127.0.0.1:1", "tcp:h:2"]
    assert gateway.pool_service is None


def test_prefetch_option_reaches_the_gateway() -> None:
    """--prefetch N makes the gateway's TaskClient prefetch; it is off by default."""
    from taskoffload.service import GatewayService

    for flags, expected in [((), 0), (("--prefetch=2",), 2)]:
        top = tap.makeService(parse("--role=gateway", *flags))
        [gateway] = [s for s in top if isinstance(s, GatewayService)]
        assert isinstance(gateway, GatewayService)
        assert gateway.prefetch is expected


def test_open_files_limit_raised() -> None:
    """At start the soft open-files limit is raised to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert tap.raise_open_files_limit() == (hard, hard)
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_recycling_options() -> None:
    """Recycling and idle options reach the pool configuration."""
    options = parse(
        "--role=worker",
        "--max-tasks-per-child=50",
        "--max-memory-per-child=300",
        "--idle-timeout=7",
    )
    config = options.pool_config(options["listen"])
    assert (config.max_tasks_per_child, config.max_memory_per_child, config.idle_timeout) == (
        50,
        300,
        7.0,
    )


@pytest.mark.parametrize(
    "listen",
    ["tcp:9000", "tcp:9000:interface=0.0.0.0", "tcp6:9000", "tcp:9000:interface=192.0.2.1"],
)
def test_worker_port_beyond_loopback_needs_secret_or_insecure(listen: str, tmp_path) -> None:
    """Workers refuse a non-loopback interface without --secret-file or --insecure."""
    with pytest.raises(usage.UsageError, match="--secret-file"):
        parse("--role=worker", f"--listen={listen}")
    assert parse("--role=worker", "--insecure", f"--listen={listen}")["listen"] == listen
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef0123\n")
    options = parse("--role=worker", f"--secret-file={secret}", f"--listen={listen}")
    assert options.pool_config(listen).secret == b"0123456789abcdef0123"


@pytest.mark.parametrize(
    "listen", ["tcp:9000:interface=127.0.0.1", "tcp6:9000:interface=\\:\\:1", "unix:/p.sock"]
)
def test_loopback_worker_port_needs_no_secret(listen: str) -> None:
    """Loopback and UNIX-socket worker ports need no secret."""
    assert parse("--role=worker", f"--listen={listen}")["listen"] == listen


def test_short_secret_refused(tmp_path) -> None:
    """A secret shorter than 16 bytes is refused with a way to make one."""
    secret = tmp_path / "secret"
    secret.write_text("short")
    with pytest.raises(usage.UsageError, match="at least 16"):
        parse("--role=worker", f"--secret-file={secret}")


def test_missing_tasks_module_refused() -> None:
    """A --tasks module that cannot be found is a usage error naming it."""
    with pytest.raises(usage.UsageError, match="--tasks 'no_such_tasks_module': no such module"):
        parse("--role=worker", "--tasks=no_such_tasks_module")
    with pytest.raises(usage.UsageError, match="no such module"):
        parse("--role=worker", "--tasks=no_such_package.tasks")


# trial finds no TestCase here: it runs this module through pytest instead.
def test_auto_ping_takes_whole_seconds() -> None:
    """--auto-ping takes whole seconds, the unit the ping timers run in."""
    assert parse("--auto-ping=2")["auto-ping"] == 2.0
    with pytest.raises(usage.UsageError, match="whole number of seconds"):
        parse("--auto-ping=0.5")


testSuite = pytest_module(__file__)
