"""Packaging: setup.py's reuse of a CMake build folder, what the sdist ships, and the one Python
floor (pyproject's requires-python, the README, and the syntax and standard library the code
uses). Nothing here builds: setup.py's helpers run on fake CMake caches, MANIFEST.in is read by
setuptools' own ``FileList`` (what ``sdist`` uses), the floor is checked statically."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module (its ``setup()`` call only runs as ``__main__``)."""
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location("prh_fast_setup_py", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write_cache(build_dir: Path, entries: dict[str, str]) -> None:
    build_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# This is the CMakeCache file.", "", "//Path to a program.",
             "CMAKE_LINKER:FILEPATH=/usr/bin/ld"]
    lines += [f"{k}:{'INTERNAL' if k == 'CMAKE_GENERATOR' else 'FILEPATH'}={v}"
              for k, v in entries.items()]
    (build_dir / "CMakeCache.txt").write_text("\n".join(lines) + "\n")
    (build_dir / "build.ninja").write_text("# generated\n")


@pytest.fixture
def tools(tmp_path):
    """A fake cache in tmp_path/b whose every program exists, and the entries a build expects."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("cmake", "ninja", "c++"):
        (bin_dir / name).write_text("")
    pybind = tmp_path / "pybind11" / "share" / "cmake" / "pybind11"
    pybind.mkdir(parents=True)
    expected = {"CMAKE_HOME_DIRECTORY": str(ROOT), "CMAKE_GENERATOR": "Ninja",
                "CMAKE_MAKE_PROGRAM": str(bin_dir / "ninja"), "Python_EXECUTABLE": sys.executable,
                "pybind11_DIR": str(pybind)}
    cache = dict(expected, CMAKE_COMMAND=str(bin_dir / "cmake"),
                 CMAKE_CXX_COMPILER=str(bin_dir / "c++"))
    return tmp_path / "b", expected, cache


def test_cmake_cache_of_the_same_environment_is_reused(setup_py, tools):
    build_dir, expected, cache = tools
    assert setup_py.stale_cmake_cache(build_dir, expected) is None  # no cache yet
    _write_cache(build_dir, cache)
    assert setup_py.read_cmake_cache(build_dir / "CMakeCache.txt")["CMAKE_GENERATOR"] == "Ninja"
    assert setup_py.stale_cmake_cache(build_dir, expected) is None
    assert setup_py.fresh_build_dir(build_dir, expected) is None
    assert (build_dir / "build.ninja").exists()  # kept: an incremental build


def test_cmake_cache_naming_a_deleted_build_environment_is_started_afresh(setup_py, tools):
    """The issue: ``pip install .`` then ``pip wheel .`` failed because the cache kept the ninja
    of pip's first (deleted) isolated build environment."""
    build_dir, expected, cache = tools
    gone = "/tmp/pip-build-env-gone/overlay"
    _write_cache(build_dir, dict(cache, CMAKE_MAKE_PROGRAM=f"{gone}/bin/ninja",
                                 pybind11_DIR=f"{gone}/lib/pybind11/share/cmake/pybind11"))
    reason = setup_py.stale_cmake_cache(build_dir, expected)
    assert reason is not None and "CMAKE_MAKE_PROGRAM" in reason and gone in reason
    sibling = build_dir.parent / "keep.txt"
    sibling.write_text("x")
    assert setup_py.fresh_build_dir(build_dir, expected) == reason
    assert build_dir.is_dir() and not any(build_dir.iterdir())
    assert sibling.exists()
    assert setup_py.fresh_build_dir(build_dir, expected) is None  # empty folder: nothing to do


@pytest.mark.parametrize("name, value", [
    ("CMAKE_GENERATOR", "Unix Makefiles"),
    ("CMAKE_MAKE_PROGRAM", "/usr/bin/make"),
    ("Python_EXECUTABLE", "/opt/other/bin/python3"),
    ("pybind11_DIR", "/opt/other/pybind11/share/cmake/pybind11"),
    ("CMAKE_HOME_DIRECTORY", "/elsewhere/prh_fast"),  # a build folder copied from another checkout
    ("CMAKE_COMMAND", "/tmp/pip-build-env-gone/overlay/bin/cmake"),  # a program that is gone
    ("CMAKE_CXX_COMPILER", "/tmp/gone/bin/c++"),
])
def test_cmake_cache_from_another_environment_is_stale(setup_py, tools, name, value):
    build_dir, expected, cache = tools
    _write_cache(build_dir, dict(cache, **{name: value}))
    reason = setup_py.stale_cmake_cache(build_dir, expected)
    assert reason is not None and name in reason


def test_cmake_cache_without_an_expected_entry_is_stale(setup_py, tools):
    build_dir, expected, cache = tools
    del cache["pybind11_DIR"]  # e.g. a configure that stopped early
    _write_cache(build_dir, cache)
    assert "pybind11_DIR" in setup_py.stale_cmake_cache(build_dir, expected)
    # an entry this build does not set (None) is not compared
    assert setup_py.stale_cmake_cache(build_dir, dict(expected, pybind11_DIR=None)) is None


def test_generator_and_make_program_are_explicit(setup_py, monkeypatch, tmp_path):
    for name in ("ninja", "make"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CMAKE_GENERATOR", raising=False)
    assert setup_py.cmake_generator() == ("Ninja", str(tmp_path / "ninja"))
    monkeypatch.setenv("CMAKE_GENERATOR", "Unix Makefiles")
    assert setup_py.cmake_generator() == ("Unix Makefiles", str(tmp_path / "make"))
    (tmp_path / "ninja").unlink()
    monkeypatch.delenv("CMAKE_GENERATOR")
    assert setup_py.cmake_generator() == ("Unix Makefiles", str(tmp_path / "make"))


# ---- what the sdist ships ------------------------------------------------------------------------

def _manifest_files(monkeypatch) -> set[str]:
    """Files MANIFEST.in adds to the sdist, by setuptools' own reading of it."""
    pytest.importorskip("setuptools")
    from setuptools.command.egg_info import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            files.process_template_line(line)
    return {Path(f).as_posix() for f in files.files}


def _sdist_files(monkeypatch) -> set[str]:
    """MANIFEST.in's files and setuptools' defaults (the package's modules, setup.py,
    pyproject.toml, README.md)."""
    package = {f for f in _tree(ROOT / "prh_fast") if f.endswith(".py")}
    return _manifest_files(monkeypatch) | package | {"setup.py", "pyproject.toml", "README.md"}


def _tree(folder: Path) -> set[str]:
    """Files under folder that belong to the source tree (no caches or build outputs)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__" and not d.startswith(".")]
        for name in filenames:
            if not name.endswith((".pyc", ".pyo", ".so", ".tmp")):
                out.add((Path(dirpath) / name).relative_to(ROOT).as_posix())
    return out


def _folders_tests_reach() -> set[str]:
    """Top-level folders of the checkout that test modules open (``parents[1] / "x"``,
    ``ROOT / "x"``)."""
    found = set()
    for path in TESTS.glob("*.py"):
        found |= set(re.findall(r"""(?:parents\[1\]|\bROOT)\s*/\s*["']([\w.-]+)["']""",
                                path.read_text()))
    return {name for name in found if (ROOT / name).is_dir()}


def test_sdist_ships_a_runnable_test_tree(monkeypatch):
    shipped = _sdist_files(monkeypatch)
    reached = _folders_tests_reach()
    assert {"benchmarks", "csrc"} <= reached  # the scan above still finds what tests open
    needed = _tree(TESTS)
    for name in reached:
        needed |= _tree(ROOT / name)
    assert {"tests/conftest.py", "tests/_data.py", "tests/golden/demo.json"} <= needed
    missing = sorted(needed - shipped)
    assert not missing, f"MANIFEST.in leaves out files the tests need: {missing}"


def test_sdist_stays_small_and_text_only(monkeypatch):
    shipped = _manifest_files(monkeypatch)
    sizes = {f: (ROOT / f).stat().st_size for f in shipped}
    big = {f: s for f, s in sizes.items() if s > 256 * 1024}
    assert not big, f"large files in the sdist: {big}"
    assert sum(sizes.values()) < 2 * 1024 * 1024
    for f in shipped:
        assert b"\0" not in (ROOT / f).read_bytes()[:4096], f"binary file in the sdist: {f}"
    assert not [f for f in shipped if "__pycache__" in f or f.endswith((".pyc", ".so"))]


# ---- one Python floor ----------------------------------------------------------------------------

def _requires_python() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^requires-python\s*=\s*">=\s*(\d+)\.(\d+)"\s*$', text, re.M)
    assert m, "pyproject.toml: requires-python should read \">=X.Y\""
    return int(m.group(1)), int(m.group(2))


def test_readme_states_the_python_floor_of_pyproject():
    floor = "%d.%d" % _requires_python()
    readme = (ROOT / "README.md").read_text()
    stated = set(re.findall(r"Python\s*>=\s*(\d+\.\d+)", readme))
    assert stated == {floor}, f"README says Python >= {sorted(stated)}, pyproject >= {floor}"


def test_code_needs_no_python_newer_than_the_floor():
    """The syntax and standard library of the package, tests, benchmarks and setup.py against
    requires-python (vermin: a static check; annotations counted as evaluated)."""
    pytest.importorskip("vermin")
    major, minor = _requires_python()
    done = subprocess.run(
        [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())", "-q", "--no-tips",
         "--violations", "--eval-annotations", "--backport", "dataclasses",
         f"-t={major}.{minor}-", "prh_fast", "tests", "benchmarks", "setup.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
