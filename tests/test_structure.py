"""
The shipped package's shape: small modules, classes and functions, and imports
that form no cycle.  Read from the installed package's source, as the wheel has it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import taskoffload
from tests._trial_bridge import pytest_module

PACKAGE = Path(taskoffload.__file__).parent

#: The largest module, class and function (in lines) the package may hold.
MAX_MODULE_LINES = 550
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, ast.Module]:
    """Every module of the package, by dotted name, parsed."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def lines_of(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1  # type: ignore[attr-defined, operator]  # statements carry both


def definitions(
    tree: ast.Module,
) -> Iterator[ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def imported_modules(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """
    The package's modules that module ``name`` imports, anywhere in it (an import
    inside a function counts: it is still a dependency).
    """
    found = set()
    package = name if name == "taskoffload" else name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                )
                base = base.rstrip(".")
            # ``from package import module`` depends on the module, not on the
            # package's ``__init__``; ``from module import name`` on the module.
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if t in known] or [base]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


def test_the_package_is_found() -> None:
    """The checks below read a real package: it has its core modules."""
    names = set(modules())
    assert {"taskoffload.client", "taskoffload.wire", "taskoffload.tap"} <= names


def test_no_module_is_over_the_limit() -> None:
    """No module of the package is longer than MAX_MODULE_LINES lines."""
    long = {
        name: len((PACKAGE.parent / (name.replace(".", "/") + ".py")).read_text().splitlines())
        for name in modules()
        if name != "taskoffload"
    }
    assert {name: n for name, n in long.items() if n > MAX_MODULE_LINES} == {}


def test_no_class_or_function_is_over_the_limit() -> None:
    """No class is longer than MAX_CLASS_LINES, no function than MAX_FUNCTION_LINES."""
    over = []
    for name, tree in modules().items():
        for node in definitions(tree):
            limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
            if lines_of(node) > limit:
                over.append(f"{name}.{node.name}: {lines_of(node)} lines")
    assert over == []


def test_the_imports_form_no_cycle() -> None:
    """Following the package's imports of its own modules never leads back to the start."""
    trees = modules()
    graph = {name: imported_modules(name, tree, set(trees)) for name, tree in trees.items()}
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph[name]):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(name)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert cycles == []


@pytest.mark.parametrize(
    "source, cycle",
    [
        ("import taskoffload.b\n", True),
        ("from taskoffload import b\n", True),
        ("def f():\n    from taskoffload.b import x\n", True),
        ("import taskoffload.wire\n", False),
        ("from taskoffload import wire\n", False),
    ],
)
def test_the_cycle_check_sees_an_import_back(source: str, cycle: bool) -> None:
    """An import of a module that imports us back, even one inside a function, is seen."""
    known = {"taskoffload.a", "taskoffload.b", "taskoffload.wire"}
    back = imported_modules("taskoffload.b", ast.parse("import taskoffload.a\n"), known)
    forth = imported_modules("taskoffload.a", ast.parse(source), known)
    assert ("taskoffload.a" in back and "taskoffload.b" in forth) is cycle


testSuite = pytest_module(__file__)
