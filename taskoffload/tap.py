"""
``twistd taskoffload``: command-line options and the service for each role.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.application.service import IService, MultiService
from twisted.python import usage

from taskoffload import wire
from taskoffload.agent import AgentService
from taskoffload.defaults import (
    AUTO_PING,
    DEFAULT_GATEWAY_LISTEN,
    DEFAULT_POOL,
    DEFAULT_POOL_LISTEN,
    IDLE_TIMEOUT,
    MAX_DETACH,
    STOP_TIMEOUT,
)
from taskoffload.lanes import Lane
from taskoffload.option_values import _module_exists as _module_exists
from taskoffload.option_values import (
    _non_negative_float,
    _non_negative_int,
    _positive_float,
    _positive_int,
    _whole_seconds,
    check_access,
    check_gateway_processes,
    check_lanes,
    check_on_loopback,
    check_pool_addresses,
    default_count,
    read_secret,
    read_token,
)
from taskoffload.signals import ExitZeroOnSigterm
from taskoffload.supervisor import PoolConfig, WorkerPoolService

if TYPE_CHECKING:
    from taskoffload.gateway import GatewayAccess, GatewayLimits
    from taskoffload.outbox import Outbox

__all__ = ["Options", "makeService"]

ROLES = ("worker", "gateway", "all")


_positive_int.coerceDoc = "A whole number, at least 1."  # type: ignore[attr-defined]  # read by usage.Options
_non_negative_float.coerceDoc = "Seconds, 0 or more."  # type: ignore[attr-defined]  # read by usage.Options
_positive_float.coerceDoc = "Seconds, above 0."  # type: ignore[attr-defined]  # read by usage.Options
_whole_seconds.coerceDoc = "Whole seconds, at least 1."  # type: ignore[attr-defined]  # read by usage.Options


#: twistd's option table (usage.Options.optParameters), kept out of the class body.
OPT_PARAMETERS: list[list[Any]] = [
    ["role", None, "all", "worker, gateway or all."],
    [
        "status-listen",
        None,
        None,
        "Role worker: server endpoint for the pool's own /status and /metrics "
        "(guarded by --token-file if given), e.g. tcp:9090:interface=127.0.0.1.",
    ],
    [
        "agent-listen",
        None,
        None,
        "Roles worker and all: TCP endpoint answering HAProxy's agent check with the "
        "pool's free task slots (drain while it stops), e.g. tcp:9091:interface=10.0.0.11.",
    ],
    [
        "listen",
        None,
        None,
        "Server endpoint to listen on (worker default: "
        f"{DEFAULT_POOL_LISTEN}; gateway and all: {DEFAULT_GATEWAY_LISTEN}).",
    ],
    [
        "pool-listen",
        None,
        DEFAULT_POOL_LISTEN,
        "Role all: server endpoint the workers listen on.",
    ],
    ["count", None, None, "Worker processes (default: 4 x CPUs).", _positive_int],
    ["concurrency", None, 1, "Tasks one worker runs at once.", _positive_int],
    [
        "max-message",
        None,
        wire.DEFAULT_MAX_MESSAGE,
        "Longest accepted message, in bytes.",
        _positive_int,
    ],
    [
        "stop-timeout",
        None,
        STOP_TIMEOUT,
        "Seconds a stopping worker may spend finishing its tasks.",
        _positive_float,
    ],
    [
        "task-timeout",
        None,
        None,
        "Seconds a task may run when neither its call nor its @task gives a timeout; "
        "a worker still running it a second later is killed.",
        _positive_float,
    ],
    [
        "idle-timeout",
        None,
        IDLE_TIMEOUT,
        "Seconds within which a started request line must be finished.",
        _positive_float,
    ],
    [
        "max-tasks-per-child",
        None,
        None,
        "Replace a worker after it has run this many tasks.",
        _positive_int,
    ],
    [
        "max-memory-per-child",
        None,
        None,
        "Replace a worker once its resident memory passes this many MiB.",
        _positive_int,
    ],
    [
        "smtp-host",
        None,
        None,
        "SMTP server for the send_mail example task (default: localhost; role all, "
        "without it or --smtp-port: an embedded outbox, shown at /outbox).",
    ],
    ["smtp-port", None, None, "Its port (default: 25).", _positive_int],
    [
        "max-inflight-per-client",
        None,
        1000,
        "Gateway: requests (batch items included) one client may have in flight.",
        _positive_int,
    ],
    [
        "max-pending",
        None,
        100_000,
        "Gateway: requests all clients together may have in flight.",
        _positive_int,
    ],
    [
        "max-detach",
        None,
        MAX_DETACH,
        "Gateway: the most seconds a request may ask to outlive its WebSocket "
        '(its "detach"), waiting for a resume.',
        _positive_float,
    ],
    [
        "poison-window",
        None,
        60.0,
        "Gateway: seconds within which a call (function and arguments) that killed "
        "two workers is quarantined; 0: never (docs/reliability.rst).",
        _non_negative_float,
    ],
    [
        "poison-cooldown",
        None,
        300.0,
        "Gateway: seconds a quarantined call is answered poisoned instead of sent.",
        _non_negative_float,
    ],
    [
        "gateway-processes",
        None,
        1,
        "Gateway: processes serving its port (one shared socket); more than 1 pays "
        "with more cores than one process can use (docs/performance.rst).",
        _positive_int,
    ],
    [
        "prefetch",
        None,
        0,
        "Gateway: while tasks wait for a free worker, send up to this many ahead "
        "to each busy worker, which starts each as soon as the task before it "
        "ends. Faster bursts; a prefetched task waits behind a long one, and "
        "fails with worker_lost if that worker is lost (docs/gateway.rst).",
        _non_negative_int,
    ],
    [
        "auto-ping",
        None,
        AUTO_PING,
        "Gateway: seconds between WebSocket pings; a peer silent as long again is dropped.",
        _whole_seconds,
    ],
    [
        "secret-file",
        None,
        None,
        "A file holding the worker port's shared secret: every connection must answer "
        "an HMAC challenge with it (workers), and the gateway answers with it.",
    ],
    [
        "token-file",
        None,
        None,
        "Gateway: a file holding the token WebSocket clients and /status, /metrics "
        "readers must present (Authorization: Bearer TOKEN, or ?token=TOKEN).",
    ],
]


class Options(usage.Options):
    """Options for every role; each role reads the ones it needs."""

    synopsis = "[--role=worker|gateway|all] [options]"
    longdesc = (
        "Run taskoffload. --role=worker runs a supervised pool of worker processes that "
        "share one listening port; --role=gateway a WebSocket gateway to such pools; "
        "--role=all (the default) both in one process tree."
    )

    optFlags: list[list[Any]] = [
        [
            "insecure",
            None,
            "Let workers listen beyond loopback without --secret-file: anyone who can "
            "reach the port can run every registered task.",
        ],
    ]

    optParameters: list[list[Any]] = OPT_PARAMETERS

    def __init__(self) -> None:
        super().__init__()
        self["tasks"] = []
        self["pool"] = []
        self["allowed-origin"] = []
        self["lane"] = []
        #: The token read from --token-file, if given.
        self["token"] = None

    def opt_tasks(self, module: str) -> None:
        """Python module whose @task functions may run (repeatable; default: the examples)."""
        self["tasks"].append(module)

    def opt_pool(self, address: str) -> None:
        """
        Gateway: a worker pool's address, e.g. tcp:127.0.0.1:12345, or LANE=ADDRESS
        for where one lane's workers listen (repeatable).
        """
        self["pool"].append(address)

    def opt_lane(self, lane: str) -> None:
        """
        Pool: NAME=COUNT reserves COUNT of the --count workers for the tasks of
        @task(lane="NAME"), on a port beside the pool's; NAME=COUNT:ENDPOINT on
        that endpoint (repeatable).
        """
        try:
            self["lane"].append(Lane.parse(lane))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None

    def opt_allowed_origin(self, origin: str) -> None:
        """
        Gateway: a browser origin allowed to open the WebSocket, e.g.
        https://example.com (repeatable; default: any).
        """
        self["allowed-origin"].append(origin)

    def postOptions(self) -> None:
        if self["role"] not in ROLES:
            raise usage.UsageError(
                f"--role must be one of {', '.join(ROLES)}, not {self['role']!r}"
            )
        if self["count"] is None:
            self["count"] = default_count()
        if not self["tasks"]:
            self["tasks"] = ["taskoffload.examples"]
        for module in self["tasks"]:
            if not _module_exists(module):
                raise usage.UsageError(
                    f"--tasks {module!r}: no such module on the Python path "
                    "(install it, or add its directory to PYTHONPATH)"
                )
        if self["listen"] is None:
            self["listen"] = (
                DEFAULT_POOL_LISTEN if self["role"] == "worker" else DEFAULT_GATEWAY_LISTEN
            )
        worker_listen = self["listen"] if self["role"] == "worker" else self["pool-listen"]
        kind = worker_listen.split(":", 1)[0]
        if kind not in ("tcp", "tcp6", "unix"):
            name = "listen" if self["role"] == "worker" else "pool-listen"
            raise usage.UsageError(
                f"--{name} {worker_listen!r}: workers listen on a tcp:, tcp6: or unix: "
                f"endpoint such as {DEFAULT_POOL_LISTEN} or unix:/path/to/socket"
            )
        if self["role"] != "worker":
            kind = self["listen"].split(":", 1)[0]
            if kind not in ("tcp", "tcp6", "unix", "ssl"):
                raise usage.UsageError(
                    f"--listen {self['listen']!r}: expected an endpoint such as "
                    f"{DEFAULT_GATEWAY_LISTEN} or ssl:8443:privateKey=key.pem:certKey=cert.pem"
                )
        if self["role"] == "gateway":
            if not self["pool"]:
                self["pool"] = [DEFAULT_POOL]
            check_pool_addresses(self["pool"])
        elif self["pool"]:
            raise usage.UsageError("--pool is for --role=gateway; role all uses its own pool")
        listen = self["listen"] if self["role"] == "worker" else self["pool-listen"]
        check_lanes(self["lane"], self["role"], self["count"], listen)
        check_gateway_processes(self["gateway-processes"], self["role"], self["listen"])
        check_access(self)
        if self["token-file"] is not None:
            self["token"] = read_token(self["token-file"])
        self["secret"] = None
        if self["secret-file"] is not None:
            self["secret"] = read_secret(self["secret-file"])
        if self["role"] != "gateway" and self["secret"] is None and not self["insecure"]:
            name = "listen" if self["role"] == "worker" else "pool-listen"
            check_on_loopback(
                [(f"--{name}", worker_listen)]
                + [(f"--lane {lane.name}", lane.listen) for lane in self["lane"] if lane.listen]
            )
        for origin in self["allowed-origin"]:
            if "://" not in origin:
                raise usage.UsageError(
                    f"--allowed-origin {origin!r}: expected an origin such as "
                    "https://example.com or http://localhost:8080"
                )

    def pool_config(self, listen: str) -> PoolConfig:
        """:return: the worker pool's configuration from these options."""
        return PoolConfig(
            listen=listen,
            count=self["count"],
            concurrency=self["concurrency"],
            tasks=tuple(self["tasks"]),
            max_message=self["max-message"],
            stop_timeout=self["stop-timeout"],
            idle_timeout=self["idle-timeout"],
            task_timeout=self["task-timeout"],
            max_tasks_per_child=self["max-tasks-per-child"],
            max_memory_per_child=self["max-memory-per-child"],
            secret=self["secret"],
            lanes=tuple(self["lane"]),
            env={
                "TASKOFFLOAD_SMTP_HOST": self["smtp-host"] or "localhost",
                "TASKOFFLOAD_SMTP_PORT": str(self["smtp-port"] or 25),
            },
        )

    def gateway_limits(self) -> GatewayLimits:
        """:return: the gateway's bounds from these options."""
        from taskoffload.gateway import GatewayLimits

        return GatewayLimits(
            max_inflight_per_client=self["max-inflight-per-client"],
            max_pending=self["max-pending"],
            max_message=self["max-message"],
            max_detach=self["max-detach"],
        )

    def gateway_access(self) -> GatewayAccess:
        """:return: who may use the gateway, from these options."""
        from taskoffload.gateway import GatewayAccess

        return GatewayAccess(token=self["token"], allowed_origins=self["allowed-origin"])


def raise_open_files_limit() -> tuple[int, int]:
    """
    Raise the soft limit on open files to the hard one: every client connection
    is a descriptor, and 1024 is a common soft default.

    :return: the (soft, hard) limits now in force.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass  # some systems cap it below an infinite hard limit; keep the soft one
    return soft, hard


def makeService(options: Options) -> IService:
    """Wire the services for the chosen role."""
    raise_open_files_limit()
    top = MultiService()
    ExitZeroOnSigterm().setServiceParent(top)
    role = options["role"]
    if role == "worker":
        workers = WorkerPoolService(options.pool_config(options["listen"]))
        workers.setServiceParent(top)
        if options["agent-listen"] is not None:
            AgentService(options["agent-listen"], workers).setServiceParent(top)
        if options["status-listen"] is not None:
            # Imported here: prometheus_client costs a pool without it its start time.
            from taskoffload.access import GatewayAccess
            from taskoffload.pool_status import PoolStatusService

            PoolStatusService(
                options["status-listen"], workers.status, GatewayAccess(token=options["token"])
            ).setServiceParent(top)
        return top
    # Imported here: Autobahn and prometheus_client cost the worker role's start
    # a tenth of a second for nothing.
    from taskoffload.service import GatewayService

    pool: WorkerPoolService | None = None
    outbox: Outbox | None = None
    if role == "all":
        pool, outbox = role_all_pool(options)
        pool.setServiceParent(top)
        if options["agent-listen"] is not None:
            AgentService(options["agent-listen"], pool).setServiceParent(top)
    if options["gateway-processes"] > 1:
        gateway_processes(options, pool).setServiceParent(top)
        return top
    GatewayService(
        listen=options["listen"],
        pool_addresses=options["pool"],
        pool_service=pool,
        limits=options.gateway_limits(),
        auto_ping=options["auto-ping"],
        stop_timeout=options["stop-timeout"],
        access=options.gateway_access(),
        secret=options["secret"],
        prefetch=options["prefetch"],
        poison=(options["poison-window"], options["poison-cooldown"]),
        outbox=outbox,
    ).setServiceParent(top)
    return top


def role_all_pool(options: Options) -> tuple[WorkerPoolService, Outbox | None]:
    """
    :return: role all's worker pool and, with neither ``--smtp-host`` nor
        ``--smtp-port`` given, the embedded outbox its ``send_mail`` mails go to
        (the pool is then a :class:`~taskoffload.outbox.PoolWithOutbox`, which
        tells its workers the outbox's port once bound).
    """
    config = options.pool_config(options["pool-listen"])
    if options["smtp-host"] is not None or options["smtp-port"] is not None:
        return WorkerPoolService(config), None
    from taskoffload.outbox import PoolWithOutbox

    # Several gateway processes do not serve /outbox: the outbox lives in this one.
    shown_at = "/outbox" if options["gateway-processes"] == 1 else None
    pool = PoolWithOutbox(config, shown_at=shown_at)
    return pool, pool.outbox


def gateway_processes(options: Options, pool: WorkerPoolService | None) -> IService:
    """:return: ``--gateway-processes`` gateway processes on ``--listen``."""
    from taskoffload._gateway_child import child_config
    from taskoffload.gateway_processes import GatewayProcesses
    from taskoffload.service import pool_address

    limits = options.gateway_limits()

    def config(index: int, directory: str, family: int) -> bytes:
        addresses = options["pool"]
        if pool is not None and pool.port is not None:
            addresses = [pool_address(pool.port)]
        return child_config(
            index=index,
            family=family,
            directory=directory,
            pool_in_parent=pool is not None,
            pool_addresses=addresses,
            limits=dict(vars(limits)),  # GatewayLimits' own fields, made again by the child
            auto_ping=options["auto-ping"],
            stop_timeout=options["stop-timeout"],
            token=options["token"],
            allowed_origins=options["allowed-origin"],
            secret=options["secret"],
            prefetch=options["prefetch"],
            poison=(options["poison-window"], options["poison-cooldown"]),
        )

    return GatewayProcesses(
        options["listen"],
        options["gateway-processes"],
        config,
        pool_status=pool.status if pool is not None else None,
        stop_timeout=options["stop-timeout"],
    )
