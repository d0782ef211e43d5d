"""
Hooks for the whole suite under pytest.

Integration tests are ``twisted.trial.unittest.TestCase`` classes, so that trial
runs them too.  Trial spins the reactor itself for each test, which it cannot do
once pytest-twisted's greenlet has started the same reactor for a
``@pytest_twisted.ensureDeferred`` test.  So trial test cases run first, then
everything else, in whatever subset pytest was asked for.
"""

from __future__ import annotations

import pytest
from twisted.trial import unittest


def _is_trial(item: pytest.Item) -> bool:
    cls = getattr(item, "cls", None)
    return cls is not None and issubclass(cls, unittest.TestCase)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run trial test cases before the pytest-twisted tests (a stable sort)."""
    items.sort(key=lambda item: not _is_trial(item))
