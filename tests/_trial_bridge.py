"""
Let trial run a test module written as pytest functions, instead of finding
nothing in it and printing a green ``PASSED``.

A module of pytest tests ends with ``testSuite = pytest_module(__file__)``.
trial's loader calls ``testSuite()`` for the module's tests, and gets one trial
test that runs the module under pytest in a subprocess: it passes when pytest
passes, and fails, with pytest's report, when pytest fails or collects nothing.
pytest itself ignores ``testSuite`` (``python_functions`` is ``test_*``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.trial import unittest
from twisted.trial.runner import TestSuite

#: pytest's exit status when it collected no test.
NO_TESTS_COLLECTED = 5

#: Seconds one module's pytest run may take.
MODULE_TIMEOUT = 900

_REPO = Path(__file__).resolve().parent.parent


class PytestModule(unittest.TestCase):
    """One pytest-style test module, run by pytest in a subprocess."""

    path: Path

    def test_module_passes_under_pytest(self) -> None:
        """pytest runs at least one test of the module and they all pass."""
        # The pytest script, not ``python -m pytest``: -m would put the repository
        # first on sys.path, and the tests would import its copy of taskoffload
        # instead of the installed one.
        done = subprocess.run(
            [_pytest_command(), "-q", "-p", "no:cacheprovider", str(self.path)],
            cwd=_REPO,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=MODULE_TIMEOUT,
        )
        report = (done.stdout + done.stderr)[-20000:]
        if done.returncode == NO_TESTS_COLLECTED:
            self.fail(f"pytest collected no test in {self.path}:\n{report}")
        if done.returncode != 0:
            self.fail(f"pytest {self.path} exited {done.returncode}:\n{report}")


def _pytest_command() -> str:
    """The ``pytest`` script installed beside this interpreter."""
    script = Path(sys.executable).with_name("pytest")
    if not script.exists():
        raise FileNotFoundError(f"no pytest beside {sys.executable}: pip install '.[test]'")
    return str(script)


def pytest_module(path: str) -> Callable[[], TestSuite]:
    """:return: a ``testSuite`` function for the pytest test module at ``path``."""
    module = Path(path).resolve()

    def testSuite() -> TestSuite:
        name = ".".join(module.relative_to(_REPO).with_suffix("").parts)
        case = type("PytestModule", (PytestModule,), {"path": module, "__module__": name})
        return TestSuite([case("test_module_passes_under_pytest")])

    return testSuite
