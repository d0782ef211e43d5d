"""Tests of the distribution: what the wheel holds, and that twistd finds the plugin."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import taskoffload
from tests._trial_bridge import pytest_module

REPO = Path(__file__).resolve().parents[1]
PLUGIN = "twisted/plugins/taskoffload_plugin.py"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """A wheel built from a copy of the source tree, so the repo gets no build/ litter."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.rst", "CHANGELOG.rst", "MANIFEST.in"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    # harness/ too, so that the wheel is seen to leave it out.
    for name in ("taskoffload", "twisted", "harness"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    # Files Twisted and the web page leave or add beside the code: the cache must
    # stay out of the wheel, static files must go in.
    (source / "twisted" / "plugins" / "dropin.cache").write_bytes(b"stale cache")
    (source / "taskoffload" / "static" / "js").mkdir(parents=True, exist_ok=True)
    (source / "taskoffload" / "static" / "probe.html").write_text("<p>probe</p>\n")
    (source / "taskoffload" / "static" / "js" / "probe.js").write_text("// probe\n")
    out = work / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("taskoffload-*.whl")
    return zipfile.ZipFile(built)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_wheel_ships_plugin_without_twisted_package(wheel: zipfile.ZipFile) -> None:
    """The wheel holds the twistd plugin file but no __init__.py that would shadow Twisted."""
    names = set(wheel.namelist())
    assert PLUGIN in names
    assert {n for n in names if n.startswith("twisted/")} == {PLUGIN}
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "twisted/plugins/dropin.cache" not in names


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_wheel_ships_package_and_static_files(wheel: zipfile.ZipFile) -> None:
    """The wheel holds the taskoffload package and its static files, and no tests."""
    names = set(wheel.namelist())
    assert {"taskoffload/__init__.py", "taskoffload/wire.py", "taskoffload/registry.py"} <= names
    assert "taskoffload/static/probe.html" in names
    assert "taskoffload/static/js/probe.js" in names
    assert not any(n.startswith("tests/") for n in names)
    assert not any("__pycache__" in n for n in names)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_wheel_ships_no_harness(wheel: zipfile.ZipFile) -> None:
    """The wheel holds neither the harness nor the old bench and fault modules."""
    names = set(wheel.namelist())
    assert "taskoffload/bench.py" not in names
    assert "taskoffload/faults.py" not in names
    assert not any(n.startswith("harness/") for n in names)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_wheel_metadata(wheel: zipfile.ZipFile) -> None:
    """The wheel's metadata carries the package version and the runtime requirements."""
    (metadata_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    metadata = wheel.read(metadata_name).decode("utf-8")
    assert f"\nVersion: {taskoffload.__version__}\n" in metadata
    assert "Requires-Python: >=3.10" in metadata
    for requirement in ("twisted", "autobahn", "attrs", "orjson", "prometheus", "zope"):
        assert f"Requires-Dist: {requirement}".lower() in metadata.lower()


def test_package_is_installed() -> None:
    """The package under test is installed, with the version its code declares."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("taskoffload")
    except PackageNotFoundError:  # pragma: no cover - the message is the point
        pytest.fail("taskoffload is not installed: pip install '.[test]' (see README.rst)")
    assert installed == taskoffload.__version__


def test_twisted_is_the_real_package() -> None:
    """The repo's twisted/ directory does not shadow the installed Twisted."""
    import twisted

    assert Path(twisted.__file__).parent != REPO / "twisted"
    assert (Path(twisted.__file__).parent / "internet").is_dir()


def test_plugin_is_discovered() -> None:
    """twisted.plugin finds exactly one service maker named taskoffload, with its Options."""
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins
    from twisted.python import usage

    found = [p for p in getPlugins(IServiceMaker) if p.tapname == "taskoffload"]
    assert len(found) == 1, "is taskoffload installed? pip install '.[test]' (see README.rst)"
    (maker,) = found
    assert issubclass(maker.options, usage.Options)


@pytest.mark.integration
def test_twistd_lists_plugin(tmp_path: Path) -> None:
    """`twistd --help`, run away from the repo, lists the taskoffload command."""
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        pytest.skip(f"no twistd script beside {sys.executable}")
    output = subprocess.run(
        [str(twistd), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert any(line.split()[:1] == ["taskoffload"] for line in output.splitlines()), output


# trial finds no TestCase here: it runs this module through pytest instead.
testSuite = pytest_module(__file__)
