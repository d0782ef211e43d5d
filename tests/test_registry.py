"""Tests for taskoffload.registry: which functions may run, and with what arguments."""

from __future__ import annotations

import importlib
import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from taskoffload import task, wire
from taskoffload.registry import TaskRegistry, TaskSpec, load_tasks
from taskoffload.worker import TaskServerFactory, TaskServerProtocol
from tests._trial_bridge import pytest_module

_module_numbers = itertools.count()

#: Writes a module into a directory on sys.path and returns its name.
WriteModule = Callable[..., str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[WriteModule]:
    """Write task modules under unique names; forget them after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    # Rewrites within one second would otherwise be served from stale bytecode.
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    written: list[str] = []

    def write(source: str, name: str | None = None) -> str:
        name = name or f"tasks_under_test_{next(_module_numbers)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


def spec_of(function: Callable[..., Any]) -> TaskSpec:
    """The registration ``@task`` gave ``function``."""
    return TaskRegistry.from_functions([function]).tasks[getattr(function, "__name__", "")]


# -- @task ---------------------------------------------------------------------------


def test_bare_task_registers_under_function_name() -> None:
    """Bare @task registers the function under its own name, with no timeout or retry."""

    @task
    def resize(width: int) -> int:
        return width * 2

    registry = TaskRegistry.from_functions([resize])
    assert registry.names() == ["resize"]
    spec = registry.lookup("resize")
    assert (spec.function, spec.timeout, spec.retry, spec.wants_progress) == (
        resize,
        None,
        False,
        False,
    )
    assert resize(2) == 4


def test_task_with_options() -> None:
    """@task(name=, timeout=, retry=) registers under that name with those options."""

    @task(name="mail", timeout=30, retry=True)
    def send(to: str) -> str:
        return to

    registry = TaskRegistry.from_functions([send])
    assert registry.names() == ["mail"]
    spec = registry.lookup("mail")
    assert (spec.name, spec.function, spec.timeout, spec.retry) == ("mail", send, 30, True)
    assert send("a") == "a"


def test_plain_functions_register_under_their_names() -> None:
    """from_functions accepts undecorated functions, registered under their names."""

    def plain() -> None: ...

    registry = TaskRegistry.from_functions([plain])
    assert registry.lookup("plain") == TaskSpec(name="plain", function=plain)


def test_from_functions_rejects_duplicate_names() -> None:
    """Two different functions claiming one name are refused."""

    @task(name="same")
    def one() -> None: ...

    @task(name="same")
    def two() -> None: ...

    with pytest.raises(ValueError, match="'same' is registered twice"):
        TaskRegistry.from_functions([one, two])


def test_duplicate_names_say_which_function_clashes() -> None:
    """The refusal of a duplicate name names the function that claimed it again."""

    @task(name="same")
    def first() -> None: ...

    @task(name="same")
    def second() -> None: ...

    with pytest.raises(ValueError) as info:
        TaskRegistry.from_functions([first, second])
    assert str(info.value) == f"task name 'same' is registered twice (again in {second!r})"


def test_from_mapping_registers_under_the_keys_with_task_options() -> None:
    """from_mapping registers each function under its key, keeping its @task options."""

    def add(a: int, b: int) -> int:
        return a + b

    @task(name="slow", timeout=9, retry=True)
    def slow_one() -> int:
        return 1

    registry = TaskRegistry.from_mapping({"sum": add, "careful": slow_one, "slow": slow_one})
    assert registry.names() == ["careful", "slow", "sum"]
    assert registry.lookup("sum") == TaskSpec(name="sum", function=add)
    careful = registry.lookup("careful")
    assert (careful.name, careful.function, careful.timeout, careful.retry) == (
        "careful",
        slow_one,
        9,
        True,
    )
    assert registry.lookup("slow") == TaskRegistry.from_functions([slow_one]).lookup("slow")


def test_spec_without_signature_binds() -> None:
    """A TaskSpec built by hand, without a signature, binds and rejects like a registered one."""

    def add(a: int, b: int) -> int:
        return a + b

    spec = TaskSpec(name="add", function=add)
    assert spec.bind((1,), {"b": 2}).arguments == {"a": 1, "b": 2}
    with pytest.raises(wire.BadMessage) as info:
        spec.bind((1, 2, 3), {})
    assert info.value.code == wire.BAD_ARGUMENTS


def test_names_are_sorted() -> None:
    """names() lists the registered names in order."""

    def b() -> None: ...

    def a() -> None: ...

    assert TaskRegistry.from_functions([b, a]).names() == ["a", "b"]


def test_unknown_name_is_unknown_function() -> None:
    """Looking up a name nobody registered fails with unknown_function."""
    registry = TaskRegistry({})
    with pytest.raises(wire.BadMessage) as info:
        registry.lookup("os.system")
    assert info.value.code == wire.UNKNOWN_FUNCTION
    assert "os.system" in info.value.message


# -- load_tasks ----------------------------------------------------------------------


def test_load_tasks_finds_decorated_functions(write_module: WriteModule) -> None:
    """load_tasks registers every @task function of a module, and nothing else."""
    name = write_module(
        """
        from taskoffload import task

        @task
        def add(a, b):
            return a + b

        @task(name="mail", timeout=5, retry=True)
        def send_mail(to):
            return to

        def helper():
            return "not a task"
        """
    )
    registry = load_tasks([name])
    assert registry.names() == ["add", "mail"]
    assert registry.lookup("add").function(1, 2) == 3
    mail = registry.lookup("mail")
    assert (mail.timeout, mail.retry) == (5, True)
    with pytest.raises(wire.BadMessage):
        registry.lookup("helper")


def test_load_tasks_reads_tasks_mapping(write_module: WriteModule) -> None:
    """A module-level TASKS mapping registers its functions under its keys."""
    name = write_module(
        """
        from taskoffload import task

        def add(a, b):
            return a + b

        @task(name="slow", timeout=9, retry=True)
        def slow_one():
            return 1

        TASKS = {"sum": add, "careful": slow_one}
        """
    )
    registry = load_tasks([name])
    assert registry.names() == ["careful", "slow", "sum"]
    assert registry.lookup("sum").function is not None
    assert registry.lookup("sum").function(2, 3) == 5
    careful = registry.lookup("careful")
    assert (careful.name, careful.timeout, careful.retry) == ("careful", 9, True)


def test_tasks_mapping_plain_function_is_not_idempotent(write_module: WriteModule) -> None:
    """A plain function in TASKS is not retried: the worker's session ack names no retry task."""
    name = write_module("def add(a, b):\n    return a + b\n\nTASKS = {'sum': add}\n")
    registry = load_tasks([name])
    protocol = TaskServerFactory(registry, Clock(), worker_id=1).buildProtocol(None)
    assert isinstance(protocol, TaskServerProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b'{"session": {"reject_when_busy": true}}\n')
    ack = orjson.loads(transport.value())["session"]
    assert [t["name"] for t in ack.pop("tasks")] == ["sum"]
    assert ack == {"worker": 1, "concurrency": 1}


def test_tasks_mapping_duplicate_names_the_module(write_module: WriteModule) -> None:
    """A TASKS entry clashing with a task of another module is refused naming its module."""
    first = write_module("from taskoffload import task\n@task\ndef echo(): return 1\n")
    second = write_module("def other(): return 2\n\nTASKS = {'echo': other}\n")
    with pytest.raises(ValueError, match=rf"'echo' is registered twice \(again in {second}\)$"):
        load_tasks([first, second])


def test_load_tasks_merges_modules(write_module: WriteModule) -> None:
    """Several modules' tasks form one registry."""
    first = write_module("from taskoffload import task\n@task\ndef one(): return 1\n")
    second = write_module("from taskoffload import task\n@task\ndef two(): return 2\n")
    assert load_tasks([first, second]).names() == ["one", "two"]


def test_load_tasks_accepts_a_task_imported_twice(write_module: WriteModule) -> None:
    """A task imported into a second loaded module is the same task, not a clash."""
    first = write_module("from taskoffload import task\n@task\ndef one(): return 1\n")
    second = write_module(f"from {first} import one\n")
    assert load_tasks([first, second]).names() == ["one"]


def test_load_tasks_rejects_duplicate_names(write_module: WriteModule) -> None:
    """Two modules registering different functions under one name are refused."""
    first = write_module("from taskoffload import task\n@task\ndef echo(): return 1\n")
    second = write_module("from taskoffload import task\n@task\ndef echo(): return 2\n")
    with pytest.raises(ValueError, match=rf"'echo' is registered twice \(again in {second}\)"):
        load_tasks([first, second])


def test_load_tasks_rejects_duplicate_names_in_one_module(write_module: WriteModule) -> None:
    """One module registering two functions under one name is refused."""
    name = write_module(
        """
        from taskoffload import task

        @task(name="x")
        def one(): return 1

        @task(name="x")
        def two(): return 2
        """
    )
    with pytest.raises(ValueError, match="'x' is registered twice"):
        load_tasks([name])


def test_load_tasks_rejects_module_without_tasks(write_module: WriteModule) -> None:
    """A module with no @task function and no TASKS mapping is refused by name."""
    name = write_module("def helper(): return 1\n")
    with pytest.raises(ValueError, match=f"module '{name}' defines no @task function"):
        load_tasks([name])


def test_load_tasks_missing_module() -> None:
    """A module that does not exist raises ImportError."""
    with pytest.raises(ImportError):
        load_tasks(["taskoffload_no_such_module"])


def test_load_tasks_fresh_reimports(write_module: WriteModule) -> None:
    """fresh=True imports a module anew, picking up changed code."""
    name = write_module("from taskoffload import task\n@task\ndef v(): return 1\n")
    assert load_tasks([name]).lookup("v").function() == 1
    write_module("from taskoffload import task\n@task\ndef v(): return 'two'\n", name)
    assert load_tasks([name]).lookup("v").function() == 1
    assert load_tasks([name], fresh=True).lookup("v").function() == "two"


def test_load_tasks_of_examples() -> None:
    """The built-in examples load as the default task set."""
    assert load_tasks(["taskoffload.examples"]).names() == [
        "cpu",
        "echo",
        "fail",
        "noop",
        "send_mail",
        "sleep",
        "whoami",
    ]


def reply_to(registry: TaskRegistry, request: dict[str, Any]) -> dict[str, Any]:
    """The reply a worker serving ``registry`` sends to one request."""
    protocol = TaskServerFactory(registry, Clock()).buildProtocol(None)
    assert isinstance(protocol, TaskServerProtocol)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(orjson.dumps(request) + b"\n")
    [line] = transport.value().splitlines()
    reply: dict[str, Any] = orjson.loads(line)
    return reply


@pytest.mark.parametrize(
    "function",
    [
        "helper",
        "{module}.helper",
        "{module}.registered",
        "os",
        "{module}.os.system",
        "registered.__globals__",
        "_private",
        "CONSTANT",
    ],
)
def test_unregistered_names_of_a_tasks_module_are_unknown_function(
    write_module: WriteModule, function: str
) -> None:
    """A --tasks module's plain functions, imports and attributes are not tasks: a request
    for one gets unknown_function and does not run it."""
    name = write_module(
        """
        import os

        from taskoffload import task

        RAN = []
        CONSTANT = 1

        @task
        def registered():
            RAN.append("registered")
            return "ok"

        def helper():
            RAN.append("helper")
            return "helper ran"

        def _private():
            RAN.append("_private")
        """
    )
    registry = load_tasks([name])
    function = function.format(module=name)
    reply = reply_to(registry, {"id": 1, "function": function})
    assert reply == {
        "id": 1,
        "error": {"code": "unknown_function", "message": f"no task named {function!r}"},
    }
    assert sys.modules[name].RAN == []
    assert reply_to(registry, {"id": 2, "function": "registered"}) == {"id": 2, "result": "ok"}


# -- binding arguments ---------------------------------------------------------------


@task
def resize(path: str, width: int, height: int = 100, *, quality: int = 90) -> None:
    """A task with positional, defaulted and keyword-only parameters."""


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("a.png", 10), {}, {"path": "a.png", "width": 10}),
        ((), {"path": "a.png", "width": 10}, {"path": "a.png", "width": 10}),
        (("a.png",), {"width": 10, "quality": 5}, {"path": "a.png", "width": 10, "quality": 5}),
        (("a.png", 10, 20), {}, {"path": "a.png", "width": 10, "height": 20}),
    ],
)
def test_bind_accepts_fitting_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    """Arguments that fit the signature bind to its parameters."""
    assert spec_of(resize).bind(args, kwargs).arguments == expected


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        pytest.param(("a.png",), {}, "missing a required argument: 'width'", id="missing"),
        pytest.param(("a", 1, 2, 3), {}, "too many positional arguments", id="too-many"),
        pytest.param(("a", 1), {"colour": "red"}, "unexpected keyword", id="unexpected"),
        pytest.param(("a", 1), {"path": "b"}, "multiple values", id="twice"),
        pytest.param(("a", 1, 2, 3), {"quality": 1}, "too many positional", id="kw-only"),
    ],
)
def test_bind_rejects_misfitting_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], problem: str
) -> None:
    """Arguments that do not fit fail with bad_arguments, naming the task and signature."""
    with pytest.raises(wire.BadMessage) as info:
        spec_of(resize).bind(args, kwargs)
    assert info.value.code == wire.BAD_ARGUMENTS
    assert info.value.message.startswith("resize(path, width, height=100, *, quality=90): "), (
        info.value.message
    )
    assert problem in info.value.message


def test_progress_parameter_is_detected() -> None:
    """A task declaring a progress parameter is marked as wanting progress."""

    @task
    def crunch(n: int, progress: Callable[[Any], None]) -> int:
        return n

    assert spec_of(crunch).wants_progress


def test_progress_is_left_for_the_worker() -> None:
    """Binding leaves a placeholder for progress and hides it from the described signature."""

    @task
    def crunch(n: int, progress: Callable[[Any], None]) -> int:
        return n

    spec = spec_of(crunch)
    assert spec.bind((5,), {}).arguments == {"n": 5, "progress": None}
    with pytest.raises(wire.BadMessage) as info:
        spec.bind((), {})
    assert info.value.message.startswith("crunch(n): ")


def test_progress_from_the_caller_is_rejected() -> None:
    """A caller cannot supply progress, by keyword or by position."""

    @task
    def crunch(n: int, progress: Callable[[Any], None]) -> int:
        return n

    spec = spec_of(crunch)
    with pytest.raises(wire.BadMessage) as by_keyword:
        spec.bind((1,), {"progress": "x"})
    assert by_keyword.value.code == wire.BAD_ARGUMENTS
    assert "'progress' is supplied by the worker" in by_keyword.value.message
    with pytest.raises(wire.BadMessage) as by_position:
        spec.bind((1, "x"), {})
    assert by_position.value.code == wire.BAD_ARGUMENTS


def test_progress_is_an_ordinary_keyword_for_other_tasks() -> None:
    """A task without a progress parameter takes a 'progress' keyword like any other."""

    @task
    def collect(**kwargs: Any) -> dict[str, Any]:
        return kwargs

    spec = spec_of(collect)
    assert not spec.wants_progress
    assert spec.bind((), {"progress": 1}).kwargs == {"progress": 1}


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
