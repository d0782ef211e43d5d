"""
The process trees of a fault scenario: started on loopback and free ports, each
in its own session (process group), and every one stopped when the scenario
ends.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from harness.processes import TwistdTree, free_ports

__all__ = ["START_TIMEOUT", "FaultSetupError", "Trees", "scenario_trees", "wait_for_log"]

#: Seconds to wait for a started tree to serve.
START_TIMEOUT = 60.0


class FaultSetupError(RuntimeError):
    """A scenario could not set up what it needs (not a finding about the product)."""


def wait_for_log(tree: TwistdTree, text: str, timeout: float = START_TIMEOUT) -> None:
    """Wait until ``text`` is in ``tree``'s log; :raises FaultSetupError: if it never comes."""
    try:
        tree.wait_for_log(text, timeout)
    except RuntimeError as e:
        raise FaultSetupError(str(e)) from None


class Trees:
    """The trees a scenario started, every one stopped when it ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[TwistdTree] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> TwistdTree:
        """Start a tree with ``args`` and ``env`` (by default this process's environment)."""
        tree = TwistdTree(args, self.directory, env=env, name=f"{name}-{len(self.started)}")
        self.started.append(tree)
        return tree.start()

    def all(
        self, count: int, *extra: str, env: dict[str, str] | None = None
    ) -> tuple[TwistdTree, int, int]:
        """Role all; wait until it serves. :return: the tree, its gateway and pool ports."""
        gateway, pool = free_ports(2)
        tree = self.start(
            "all",
            f"--count={count}",
            "--listen",
            f"tcp:{gateway}:interface=127.0.0.1",
            "--pool-listen",
            f"tcp:{pool}:interface=127.0.0.1",
            *extra,
            env=env,
        )
        wait_for_log(tree, "Gateway listening on")
        wait_for_log(tree, f"All {count} workers serving")
        return tree, gateway, pool

    def pool(self, port: int, count: int, *extra: str) -> TwistdTree:
        """Role worker on ``port``; wait until every worker serves."""
        tree = self.start(
            "pool",
            "--role=worker",
            f"--count={count}",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            *extra,
        )
        wait_for_log(tree, f"All {count} workers serving")
        return tree

    def gateway(self, pool_port: int, *extra: str) -> tuple[TwistdTree, int]:
        """Role gateway to the pool on ``pool_port``. :return: the tree and its port."""
        (port,) = free_ports(1)
        tree = self.start(
            "gateway",
            "--role=gateway",
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--pool",
            f"tcp:127.0.0.1:{pool_port}",
            *extra,
        )
        wait_for_log(tree, "Gateway listening on")
        return tree, port

    def stop(self) -> None:
        """Stop every started tree, the last started first."""
        for tree in reversed(self.started):
            tree.stop()


@contextlib.contextmanager
def scenario_trees(directory: str | Path | None, scenario: str) -> Iterator[Trees]:
    """A place for a scenario's trees and logs (a temporary one unless given)."""
    with contextlib.ExitStack() as stack:
        if directory is None:
            base = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="taskoffload-faults-"))
            )
        else:
            base = Path(directory)
        place = base / scenario
        place.mkdir(parents=True, exist_ok=True)
        found = Trees(place)
        try:
            yield found
        finally:
            found.stop()
