"""
The supervisor crash: SIGKILL of a worker pool's supervisor under load, through
a separate gateway or from raw worker-port clients, then a new pool on the same
port.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

from harness.faults.clients import Caller, DirectCaller
from harness.faults.trees import FaultSetupError, Trees, scenario_trees
from harness.processes import TwistdTree, free_ports, group_pids

__all__ = ["supervisor_crash"]


def supervisor_crash(
    duration: float = 2.0,
    *,
    via: str = "gateway",
    clients: int = 5,
    count: int = 4,
    wait: float = 10.0,
    orphan_limit: float = 5.0,
    directory: str | Path | None = None,
) -> dict[str, Any]:
    """
    A ``--role=worker`` pool under load; after ``duration`` s its supervisor
    (the twistd process alone) gets SIGKILL; ``duration`` s later a new pool
    starts on the same port, and the load goes on until it has served for
    ``duration`` s.

    :param via: ``"gateway"``: ``clients`` WebSocket clients of a separate
        ``--role=gateway`` (so the pool's clients are its ``TaskClient``);
        ``"direct"``: ``clients`` raw worker-port clients, each on one connection
        at a time, reconnecting after an error.  Each sends ``sleep(0.05)`` and
        ``noop`` one at a time, waiting at most ``wait`` s for each reply, and
        pauses 50 ms after a failure.
    :return: ``sent``; ``results_before``; between the kill and the restart,
        ``results_after_kill`` and ``errors_after_kill`` (by error code, or
        ``connection`` for a refused, reset or closed connection); ``hangs``
        (no reply within ``wait`` s); ``dropped`` (WebSockets the gateway
        closed); ``pool_gone_s`` (the killed pool's process
        group empty) and ``orphans`` (its processes alive ``orphan_limit`` s
        after the kill); ``restart_error`` (why the new pool did not start);
        ``restart_first_result_s`` (from the new pool serving to the first
        result); ``results_after_restart`` and ``errors_after_restart`` over the
        last ``duration`` s; ``gateway_alive``.
    """
    if via not in ("gateway", "direct"):
        raise ValueError(f"via is gateway or direct, not {via!r}")
    with scenario_trees(directory, f"supervisor_crash_{via}") as trees:
        (pool_port,) = free_ports(1)
        pool = trees.pool(pool_port, count)
        gateway: TwistdTree | None = None
        if via == "gateway":
            gateway, gateway_port = trees.gateway(pool_port)
            target = gateway_port
        else:
            target = pool_port
        return asyncio.run(
            _supervisor_crash(
                trees,
                pool,
                pool_port,
                gateway,
                target,
                duration,
                clients,
                count,
                wait,
                orphan_limit,
            )
        )


class _Load:
    """
    The callers' load: each sends ``sleep(0.05)`` or ``noop`` one at a time until
    stopped, and every request's (time sent, time answered, outcome) is logged.
    """

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self.log: list[tuple[float, float, str]] = []
        self.stopped = False
        self.dropped: list[Caller] = []
        self._rng = random.Random(0)

    async def client(self, caller: Caller | DirectCaller) -> None:
        """Call on ``caller`` until :attr:`stopped` (or its WebSocket is dropped)."""
        for request_id in range(1_000_000):  # bounded; the phases end it
            if self.stopped:
                return
            if self._rng.random() < 0.5:
                request = {"id": request_id, "function": "sleep", "args": [0.05]}
            else:
                request = {"id": request_id, "function": "noop"}
            sent = time.monotonic()
            try:
                reply = await caller.call(request, self.wait)
                outcome = "result" if "result" in reply else reply.get("error", {}).get("code", "?")
            except asyncio.TimeoutError:
                outcome = "hang"
            except ConnectionError:
                outcome = "connection"
                if isinstance(caller, Caller):
                    # The gateway dropped the WebSocket: nothing more to send on.
                    self.log.append((sent, time.monotonic(), outcome))
                    self.dropped.append(caller)
                    return
            self.log.append((sent, time.monotonic(), outcome))
            if outcome != "result":
                await asyncio.sleep(0.05)  # no tight loop of failures while the pool is down

    async def first_result(self, since: float) -> float | None:
        """Seconds from ``since`` to the first result answered after it (``None`` after 15 s)."""
        for _ in range(int(15 / 0.02)):
            answered = [a for _, a, o in self.log if a >= since and o == "result"]
            if answered:
                return round(min(answered) - since, 3)
            await asyncio.sleep(0.02)
        return None


async def _kill_supervisor(
    pool: TwistdTree, orphan_limit: float
) -> tuple[float, float | None, int]:
    """
    SIGKILL ``pool``'s supervisor and watch its process group.

    :return: when it was killed; the seconds until the group was empty (``None``
        if it was not within ``orphan_limit`` s); the processes left then.
    """
    pool_pgid = pool.pid
    killed_at = time.monotonic()
    os.kill(pool.pid, signal.SIGKILL)
    await asyncio.to_thread(pool.process.wait, 10)
    # More rounds than orphan_limit takes: the loop ends with the group empty
    # (pool_gone) or with its survivors counted (orphans), never with neither.
    for _ in range(int((orphan_limit + 1) / 0.05)):
        remaining = group_pids(pool_pgid)
        elapsed = time.monotonic() - killed_at
        if not remaining:
            return killed_at, round(elapsed, 3), 0
        if elapsed > orphan_limit:
            return killed_at, None, len(remaining)
        await asyncio.sleep(0.05)
    return killed_at, None, 0


async def _supervisor_crash(
    trees: Trees,
    pool: TwistdTree,
    pool_port: int,
    gateway: TwistdTree | None,
    port: int,
    duration: float,
    clients: int,
    count: int,
    wait: float,
    orphan_limit: float,
) -> dict[str, Any]:
    callers: list[Caller | DirectCaller]
    if gateway is not None:
        callers = list(await asyncio.gather(*(Caller.open(port) for _ in range(clients))))
    else:
        callers = [DirectCaller(port) for _ in range(clients)]
    load = _Load(wait)
    running = asyncio.gather(*(load.client(c) for c in callers))
    await asyncio.sleep(duration)
    killed_at, pool_gone, orphans = await _kill_supervisor(pool, orphan_limit)
    await asyncio.sleep(max(duration - (time.monotonic() - killed_at), 0))
    # A new pool on the same port: it cannot bind while an orphan holds the socket.
    restart_began = time.monotonic()
    restart_error: str | None = None
    try:
        await asyncio.to_thread(trees.pool, pool_port, count)
    except FaultSetupError as e:
        restart_error = str(e).splitlines()[-1][:300]
    serving_at = time.monotonic()
    first_result = None if restart_error is not None else await load.first_result(serving_at)
    window_start = time.monotonic()
    await asyncio.sleep(duration)
    load.stopped = True
    await asyncio.wait_for(running, wait + 5)
    await asyncio.gather(*(c.close() for c in callers))
    log = load.log
    after_kill = [o for _, a, o in log if killed_at <= a < serving_at]
    window = [o for s, _, o in log if s >= window_start]
    return {
        "via": "gateway" if gateway is not None else "direct",
        "clients": clients,
        "sent": len(log),
        "results_before": sum(1 for _, a, o in log if a < killed_at and o == "result"),
        "results_after_kill": sum(1 for o in after_kill if o == "result"),
        "errors_after_kill": dict(Counter(o for o in after_kill if o not in ("result", "hang"))),
        "hangs": sum(1 for _, _, o in log if o == "hang"),
        "dropped": len(load.dropped),
        "pool_gone_s": pool_gone,
        "orphans": orphans,
        "restart_s": round(serving_at - restart_began, 3),
        "restart_error": restart_error,
        "restart_first_result_s": first_result,
        "results_after_restart": sum(1 for o in window if o == "result"),
        "errors_after_restart": dict(Counter(o for o in window if o != "result")),
        "gateway_alive": gateway is None or gateway.alive(),
    }
