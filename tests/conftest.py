"""
Hooks for the whole suite under pytest.

Integration tests are ``twisted.trial.unittest.TestCase`` classes, so that trial
runs them too.  Trial spins the reactor itself for each test, which it cannot do
once pytest-twisted's greenlet has started the same reactor for a
``@pytest_twisted.ensureDeferred`` test.  So trial test cases run first, then
everything else, in whatever subset pytest was asked for.

The harness (``harness/`` beside ``tests/``: the load drivers, the fault suite
and the process-tree wrapper) is not installed, and the repository root is not
on ``sys.path`` (it would put the checkout's ``taskoffload`` before the installed
one).  So the ``harness`` package is loaded here from its files, before any test
module imports it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from twisted.trial import unittest

_HARNESS = Path(__file__).resolve().parent.parent / "harness"


def _load_harness() -> None:
    """Register the checkout's ``harness`` package in ``sys.modules``, sys.path untouched."""
    init = _HARNESS / "__init__.py"
    # Already loaded, or not there (a copy of tests/ without it, as mutmut
    # makes): nothing to do.
    if "harness" in sys.modules or not init.exists():
        return
    spec = importlib.util.spec_from_file_location(
        "harness", init, submodule_search_locations=[str(_HARNESS)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["harness"] = module
    spec.loader.exec_module(module)


_load_harness()


def _is_trial(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    return cls is not None and issubclass(cls, unittest.TestCase)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run trial test cases before the pytest-twisted tests (a stable sort)."""
    items.sort(key=lambda item: not _is_trial(item))
