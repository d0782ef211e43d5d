"""
Unit tests for :mod:`taskoffload.processes`: what the real process control asks
of the reactor and of :func:`os.kill` (nothing is spawned or signalled).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import pytest
from twisted.internet.protocol import ProcessProtocol
from zope.interface.verify import verifyObject

from taskoffload import processes
from taskoffload.interfaces import IProcessControl
from taskoffload.processes import ProcessControl
from tests._trial_bridge import pytest_module
from tests.fake_processes import FakeProcessControl, ProcessStringTransport


class SpawningReactor:
    """Records ``spawnProcess`` calls, and answers each with a transport."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> Any:
        self.calls.append((protocol, executable, args, kw))
        transport = ProcessStringTransport()
        protocol.makeConnection(transport)
        return transport


@pytest.mark.parametrize("control", [ProcessControl(SpawningReactor()), FakeProcessControl()])
def test_provides_the_interface(control: object) -> None:
    """The real process control and the tests' stand-in both provide IProcessControl."""
    assert verifyObject(IProcessControl, control)


def test_spawn_runs_the_fork_server_with_its_descriptors() -> None:
    """The fork server runs under this interpreter, with the socket on fd 3, lifeline on fd 4."""
    reactor = SpawningReactor()
    protocol = ProcessProtocol()
    transport = ProcessControl(reactor).spawn_fork_server(protocol, 7, 8)
    [(spawned, executable, args, kw)] = reactor.calls
    assert spawned is protocol and transport is protocol.transport
    assert (executable, args) == (sys.executable, [sys.executable, "-m", "taskoffload._forkserver"])
    assert kw["childFDs"] == {0: "w", 1: "r", 2: "r", 3: 7, 4: 8}
    assert kw["env"]["PYTHONUNBUFFERED"] == "1"
    assert kw["env"]["PATH"] == os.environ["PATH"]


def test_kill_signals_the_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """kill() sends the signal asked for to the process asked for."""
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(processes.os, "kill", lambda pid, signum: sent.append((pid, signum)))
    ProcessControl(SpawningReactor()).kill(12345, signal.SIGTERM)
    assert sent == [(12345, signal.SIGTERM)]


def test_kill_of_a_gone_process_is_no_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """kill() of a process that no longer exists returns quietly."""

    def gone(pid: int, signum: int) -> None:
        raise ProcessLookupError(pid)

    monkeypatch.setattr(processes.os, "kill", gone)
    ProcessControl(SpawningReactor()).kill(12345, signal.SIGTERM)


testSuite = pytest_module(__file__)
