"""Reading what a fired Deferred holds, for tests that drive code without a reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from taskoffload.client import TaskError


def outcome(d: Deferred[Any]) -> Any:
    """The result a fired Deferred holds, or its ``Failure``; fails if unfired."""
    seen: list[Any] = []
    d.addBoth(seen.append)
    assert seen, "the Deferred has not fired"
    return seen[0]


def error_of(d: Deferred[Any]) -> TaskError:
    """The :class:`TaskError` a fired Deferred failed with."""
    failure = outcome(d)
    assert isinstance(failure, Failure), f"expected a TaskError, got result {failure!r}"
    assert isinstance(failure.value, TaskError), failure
    return failure.value
