"""
Task registration: the ``@task`` decorator, loading ``--tasks`` modules, and
binding a request's arguments to a task's signature.

Only registered names can run.  Nothing named on the wire is ever imported.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar, overload

import attrs

from taskoffload.catalogue import PROGRESS_PARAMETER
from taskoffload.lanes import DEFAULT_LANE, check_lane_name
from taskoffload.wire import BAD_ARGUMENTS, UNKNOWN_FUNCTION, BadMessage

__all__ = ["PROGRESS_PARAMETER", "TaskRegistry", "TaskSpec", "load_tasks", "task"]

#: The attribute ``@task`` sets on a function it registers.
SPEC_ATTRIBUTE = "__taskoffload_task__"

F = TypeVar("F", bound=Callable[..., Any])


@attrs.frozen
class TaskSpec:
    """
    One callable task.

    :ivar name: the name callers use.
    :ivar function: the function run.
    :ivar timeout: default deadline in seconds, or ``None``.
    :ivar retry: the task is idempotent: it may be sent again if its worker is lost.
    :ivar wants_progress: the function declares a ``progress`` parameter.
    :ivar lane: the lane whose workers run it.
    """

    name: str
    function: Callable[..., Any]
    timeout: float | None = None
    retry: bool = False
    wants_progress: bool = False
    signature: inspect.Signature | None = attrs.field(default=None, eq=False, repr=False)
    lane: str = DEFAULT_LANE

    def bind(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> inspect.BoundArguments:
        """
        Bind a request's arguments, leaving out ``progress``, which the worker supplies.

        :raises BadMessage: with code ``bad_arguments`` if they do not fit.
        """
        if self.wants_progress and PROGRESS_PARAMETER in kwargs:
            raise BadMessage(
                f"{self.name}: 'progress' is supplied by the worker, not the caller",
                code=BAD_ARGUMENTS,
            )
        signature = self.signature or inspect.signature(self.function)
        try:
            if self.wants_progress:
                return signature.bind(*args, progress=None, **kwargs)
            return signature.bind(*args, **kwargs)
        except TypeError as e:
            raise BadMessage(
                f"{self.name}{_describe(signature)}: {e}", code=BAD_ARGUMENTS
            ) from None


def _describe(signature: inspect.Signature) -> str:
    shown = [
        p.replace(annotation=inspect.Parameter.empty)
        for p in signature.parameters.values()
        if p.name != PROGRESS_PARAMETER
    ]
    return str(signature.replace(parameters=shown, return_annotation=inspect.Signature.empty))


def _make_spec(
    function: Callable[..., Any],
    name: str | None,
    timeout: float | None,
    retry: bool,
    lane: str = DEFAULT_LANE,
) -> TaskSpec:
    signature = inspect.signature(function)
    return TaskSpec(
        name=name or function.__name__,
        function=function,
        timeout=timeout,
        retry=retry,
        wants_progress=PROGRESS_PARAMETER in signature.parameters,
        signature=signature,
        lane=check_lane_name(lane),
    )


@overload
def task(function: F) -> F: ...


@overload
def task(
    *,
    name: str | None = None,
    timeout: float | None = None,
    retry: bool = False,
    lane: str = DEFAULT_LANE,
) -> Callable[[F], F]: ...


def task(
    function: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    timeout: float | None = None,
    retry: bool = False,
    lane: str = DEFAULT_LANE,
) -> Any:
    """
    Mark a function as a task, callable by ``name`` (default: its own name).

    Use bare (``@task``) or with options (``@task(name="mail", timeout=30)``).
    The function may be synchronous, return a Deferred, or be ``async def``; if it
    declares a ``progress`` parameter, it receives a callable that sends progress
    messages to the caller.

    :param timeout: default deadline in seconds for calls that give none.
    :param retry: the task is idempotent and may be re-sent once to another
        worker if the worker running it dies before replying.
    :param lane: the lane whose workers run it; the pool must reserve workers
        for a lane other than ``"default"`` (``--lane NAME=COUNT``).
    :raises ValueError: if ``lane`` is not a lane name.
    """
    check_lane_name(lane)

    def mark(f: F) -> F:
        setattr(f, SPEC_ATTRIBUTE, _make_spec(f, name, timeout, retry, lane))
        return f

    if function is not None:
        return mark(function)  # type: ignore[type-var]  # bare @task on any callable
    return mark


@attrs.frozen
class TaskRegistry:
    """The tasks a worker may run, by name."""

    tasks: Mapping[str, TaskSpec]

    def lookup(self, name: str) -> TaskSpec:
        """
        :raises BadMessage: with code ``unknown_function`` for a name not registered.
        """
        try:
            return self.tasks[name]
        except KeyError:
            raise BadMessage(f"no task named {name!r}", code=UNKNOWN_FUNCTION) from None

    def names(self) -> list[str]:
        """:return: the registered names, sorted."""
        return sorted(self.tasks)

    def routes(self) -> dict[str, str]:
        """:return: the lane of each task not on the default lane, by name."""
        return {name: spec.lane for name, spec in self.tasks.items() if spec.lane != DEFAULT_LANE}

    def check_lanes(self, lanes: Iterable[str]) -> None:
        """
        :param lanes: the lanes the pool reserves workers for.
        :raises ValueError: naming each task on a lane that is not among them.
        """
        served = {DEFAULT_LANE, *lanes}
        stray = sorted(
            (spec.lane, name) for name, spec in self.tasks.items() if spec.lane not in served
        )
        if stray:
            missing = sorted({lane for lane, _ in stray})
            named = ", ".join(f"{name} (lane {lane!r})" for lane, name in stray)
            raise ValueError(
                f"the pool has no workers for the lane of {named}: start it with "
                + " ".join(f"--lane {lane}=COUNT" for lane in missing)
            )

    @classmethod
    def from_functions(cls, functions: Iterable[Callable[..., Any]]) -> TaskRegistry:
        """
        Build a registry from functions, using the ``@task`` options of those that
        have them and the function name for the others.

        :raises ValueError: if two functions claim the same name.
        """
        tasks: dict[str, TaskSpec] = {}
        for f in functions:
            spec = getattr(f, SPEC_ATTRIBUTE, None) or _make_spec(f, None, None, False)
            _add(tasks, spec, repr(f))
        return cls(tasks)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Callable[..., Any]]) -> TaskRegistry:
        """
        Build a registry from a ``TASKS`` mapping, as :func:`load_tasks` reads one:
        each function is registered under its key, with its ``@task`` options if it
        has them.

        :param mapping: task names to the functions they run.
        """
        tasks: dict[str, TaskSpec] = {}
        for task_name, f in mapping.items():
            spec = getattr(f, SPEC_ATTRIBUTE, None)
            if not isinstance(spec, TaskSpec) or spec.name != task_name:
                spec = _make_spec(
                    f,
                    task_name,
                    getattr(spec, "timeout", None),
                    getattr(spec, "retry", False),
                    getattr(spec, "lane", DEFAULT_LANE),
                )
            tasks[task_name] = spec
        return cls(tasks)


def _add(tasks: dict[str, TaskSpec], spec: TaskSpec, where: str) -> None:
    existing = tasks.get(spec.name)
    if existing is not None and existing.function is not spec.function:
        raise ValueError(f"task name {spec.name!r} is registered twice (again in {where})")
    tasks[spec.name] = spec


def load_tasks(module_names: Iterable[str], fresh: bool = False) -> TaskRegistry:
    """
    Import the named modules and register their tasks: every ``@task`` function
    in the module's namespace (defined there, or imported into it, so a package's
    ``__init__`` can gather tasks from its modules), and the entries of a module-level ``TASKS`` mapping
    (name to function), if the module has one.

    :param fresh: import the modules anew even if already imported.
    :raises ImportError: if a module cannot be imported.
    :raises ValueError: if a name is registered twice, or a module has no task.
    """
    tasks: dict[str, TaskSpec] = {}
    for module_name in module_names:
        if fresh and module_name in sys.modules:
            module = importlib.reload(sys.modules[module_name])
        else:
            module = importlib.import_module(module_name)
        found = 0
        for value in vars(module).values():
            spec = getattr(value, SPEC_ATTRIBUTE, None)
            if isinstance(spec, TaskSpec):
                _add(tasks, spec, module_name)
                found += 1
        mapping = getattr(module, "TASKS", None)
        if isinstance(mapping, Mapping):
            for spec in TaskRegistry.from_mapping(mapping).tasks.values():
                _add(tasks, spec, module_name)
                found += 1
        if not found:
            raise ValueError(
                f"module {module_name!r} defines no @task function and no TASKS mapping"
            )
    return TaskRegistry(tasks)
