"""An ``ISyncDeadlines`` for the worker's tests: it records how it is used."""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from taskoffload.worker import ISyncDeadlines


@implementer(ISyncDeadlines)
class RecordingDeadlines:
    """An ``ISyncDeadlines`` that records its use."""

    def __init__(self) -> None:
        self.calls: list[Any] = []

    def arm(self, seconds: float) -> None:
        self.calls.append(("arm", seconds))

    def disarm(self) -> None:
        self.calls.append("disarm")
