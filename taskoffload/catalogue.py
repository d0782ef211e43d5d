"""
What a pool can run, described for its callers: the ``tasks`` of a worker's
session acknowledgement, which the gateway serves as ``GET /tasks`` and
:meth:`taskoffload.client.TaskClient.catalogue` returns.

Each task is described once, by the worker, from the ``@task`` functions it
loaded: the pool is the one that knows, and a gateway need not import the task
modules (nor have their dependencies) to list them.
"""

from __future__ import annotations

import inspect
import itertools
import reprlib
from collections.abc import Callable, Mapping
from typing import Any, Final, Protocol

import orjson

__all__ = ["MAX_TASKS", "MAX_TEXT", "PROGRESS_PARAMETER", "catalogue", "describe", "read_catalogue"]

#: The parameter name through which a task receives its progress callable
#: (supplied by the worker, so never described as the caller's).
PROGRESS_PARAMETER: Final = "progress"

#: The longest text (a docstring's first line, an annotation, a default's
#: ``repr``) a description carries; longer ones are cut, ending in ``…``.
MAX_TEXT: Final = 200
#: The most tasks a client takes from one acknowledgement.
MAX_TASKS: Final = 1000

#: ``inspect.Parameter`` kinds, as the description names them.
_KINDS: Final = {
    inspect.Parameter.POSITIONAL_ONLY: "positional_only",
    inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional_or_keyword",
    inspect.Parameter.VAR_POSITIONAL: "var_positional",
    inspect.Parameter.KEYWORD_ONLY: "keyword_only",
    inspect.Parameter.VAR_KEYWORD: "var_keyword",
}


class Describable(Protocol):
    """What a description reads of a task (a :class:`~taskoffload.registry.TaskSpec`)."""

    @property
    def name(self) -> str: ...
    @property
    def function(self) -> Callable[..., Any]: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def retry(self) -> bool: ...
    @property
    def lane(self) -> str: ...
    @property
    def wants_progress(self) -> bool: ...
    @property
    def signature(self) -> inspect.Signature | None: ...


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _first_line(doc: str | None) -> str | None:
    for line in inspect.cleandoc(doc or "").splitlines():
        if line.strip():
            return _cut(line.strip())
    return None


def _annotation(annotation: Any) -> str | None:
    if annotation is inspect.Parameter.empty:
        return None
    # Under ``from __future__ import annotations`` it is already the source text.
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return _cut(text)


def _parameter(parameter: inspect.Parameter) -> dict[str, Any]:
    described: dict[str, Any] = {
        "name": parameter.name,
        "kind": _KINDS[parameter.kind],
        "annotation": _annotation(parameter.annotation),
    }
    if parameter.default is not inspect.Parameter.empty:
        try:
            orjson.dumps(parameter.default)
            described["default"] = parameter.default
        except TypeError:
            # Not a JSON value: its repr, so a person still sees what it is.
            described["default"] = _cut(reprlib.repr(parameter.default))
            described["default_is_repr"] = True
    return described


def describe(spec: Describable) -> dict[str, Any]:
    """
    :return: ``spec`` as JSON: its ``name``, the first line of its docstring
        (``doc``), ``timeout``, ``retry``, ``lane``, whether it reports
        ``progress``, and its ``parameters`` (``progress``, which the worker
        supplies, left out).
    """
    signature = spec.signature or inspect.signature(spec.function)
    return {
        "name": spec.name,
        "doc": _first_line(spec.function.__doc__),
        "timeout": spec.timeout,
        "retry": spec.retry,
        "lane": spec.lane,
        "progress": spec.wants_progress,
        "parameters": [
            _parameter(p)
            for p in signature.parameters.values()
            if not (spec.wants_progress and p.name == PROGRESS_PARAMETER)
        ],
    }


def catalogue(tasks: Mapping[str, Describable]) -> list[dict[str, Any]]:
    """:return: every task of ``tasks`` (a registry's) described, sorted by name."""
    return [describe(tasks[name]) for name in sorted(tasks)]


def read_catalogue(value: object) -> tuple[dict[str, Any], ...] | None:
    """
    :param value: the ``tasks`` of a session acknowledgement.
    :return: its descriptions that name a task (at most :data:`MAX_TASKS`),
        or ``None`` if it is not a list (a pool that does not describe its tasks).
    """
    if not isinstance(value, list):
        return None
    named = (t for t in value if isinstance(t, dict) and isinstance(t.get("name"), str))
    return tuple(itertools.islice(named, MAX_TASKS))
