"""
``python -m taskoffload.bench SCENARIO``: measure taskoffload on this machine.

Each scenario starts what it needs as real ``twistd`` processes on loopback, runs
``--repeat`` times and prints the median with min-max.  The load generator is
asyncio, one coroutine per simulated client, so it stays a small part of the
machine it measures.

Scenarios:

``startup``
    ``--count`` workers (default 100): seconds from launching ``twistd`` until every
    worker has answered a call, the supervisor's own "all serving" figure, and the
    pool's total RSS and PSS (summed over the supervisor, the fork server and the
    workers, from ``/proc/PID/smaps_rollup``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 free at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def twistd_command(*args: str) -> list[str]:
    """The command line running ``twistd -n taskoffload ARGS`` with this interpreter."""
    twistd = Path(sys.executable).with_name("twistd")
    if twistd.exists():
        return [str(twistd), "-n", "--pidfile=", "taskoffload", *args]
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile=",
        "taskoffload",
        *args,
    ]


class Service:
    """A ``twistd`` process tree started for a scenario, ended with its process group."""

    def __init__(self, args: list[str], directory: str) -> None:
        self.log_path = Path(directory) / f"twistd-{os.getpid()}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            twistd_command(*args),
            cwd=directory,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found
            if self.process.poll() is not None:
                raise RuntimeError(f"twistd exited:\n{self.log()[-3000:]}")
            time.sleep(0.01)
        raise RuntimeError(f"timed out waiting for {pattern!r}:\n{self.log()[-3000:]}")

    def pids(self) -> list[int]:
        """Every process in the tree's process group."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getpgid(int(entry)) == self.process.pid:
                        found.append(int(entry))
                except ProcessLookupError:
                    continue
        return found

    def memory_kib(self) -> tuple[int, int]:
        """Total (RSS, PSS) of the tree in KiB."""
        rss = pss = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            for line in text.splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        return rss, pss

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
            deadline = time.monotonic() + wait
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not self.pids():
                break
        self._log.close()


async def call_line(port: int, line: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Open a connection, send one request line, return its decoded reply."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(line)
        reply = await asyncio.wait_for(reader.readline(), timeout)
        result: dict[str, Any] = json.loads(reply)
        return result
    finally:
        writer.close()


async def _all_answer(port: int, count: int, deadline: float) -> float:
    """Seconds (monotonic clock) at which ``count`` distinct workers had answered."""
    # Each call keeps its worker busy for ``hold`` seconds, so ``count`` concurrent
    # calls land on ``count`` different workers once all of them serve.
    hold = 0.3
    line = json.dumps({"function": "whoami", "args": {"delay": hold}}).encode() + b"\n"
    seen: set[int] = set()
    while time.monotonic() < deadline:
        sent = time.monotonic()
        try:
            replies = await asyncio.gather(*(call_line(port, line) for _ in range(count)))
        except OSError:
            await asyncio.sleep(0.01)
            continue
        seen |= {r["result"]["pid"] for r in replies if "result" in r}
        if len(seen) >= count:
            # The calls were answered ``hold`` seconds after the workers took them.
            return sent + (time.monotonic() - sent) - hold
        await asyncio.sleep(0.01)
    raise RuntimeError(f"only {len(seen)} of {count} workers answered in time")


def scenario_startup(options: argparse.Namespace, directory: str) -> dict[str, float]:
    """One run of ``startup``."""
    port = free_port()
    service = Service(
        [
            "--role=worker",
            f"--count={options.count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ],
        directory,
    )
    try:
        answered = asyncio.run(_all_answer(port, options.count, service.started + 60))
        found = service.wait_for_log(r"All \d+ workers serving, ([0-9.]+) s after start", 30)
        rss, pss = service.memory_kib()
        return {
            "launch_to_all_answering_s": answered - service.started,
            "supervisor_start_to_all_serving_s": float(found.group(1)),
            "rss_mib": rss / 1024,
            "pss_mib": pss / 1024,
            "pss_per_worker_mib": pss / 1024 / options.count,
        }
    finally:
        service.stop()


SCENARIOS: dict[str, Callable[[argparse.Namespace, str], dict[str, float]]] = {
    "startup": scenario_startup,
}


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Median, min and max of every figure over the runs."""
    summary = {}
    for key in runs[0]:
        values = [run[key] for run in runs]
        summary[key] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    """Run a scenario and print (and optionally save) its figures."""
    parser = argparse.ArgumentParser(
        prog="python -m taskoffload.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--repeat", type=int, default=3, help="runs (default 3)")
    parser.add_argument("--count", type=int, default=100, help="workers (default 100)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    options = parser.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="taskoffload-bench-") as directory:
        for n in range(options.repeat):
            run = SCENARIOS[options.scenario](options, directory)
            runs.append(run)
            print(f"run {n + 1}: " + ", ".join(f"{k}={v:.3f}" for k, v in run.items()), flush=True)
    summary = summarize(runs)
    print(f"{options.scenario}: median (min-max) over {len(runs)} runs")
    for key, figures in summary.items():
        print(f"  {key:36} {figures['median']:10.3f}  ({figures['min']:.3f}-{figures['max']:.3f})")
    if options.json:
        Path(options.json).write_text(
            json.dumps(
                {
                    "scenario": options.scenario,
                    "options": {k: v for k, v in vars(options).items() if k != "json"},
                    "runs": runs,
                    "summary": summary,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
