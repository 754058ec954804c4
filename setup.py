"""Build ``prh_fast._C`` with CMake (pybind11, C++17, OpenMP; CUDA when a compiler is found).

Environment: ``PRH_FAST_CUDA=auto|0|1`` (default auto), ``PRH_FAST_CUDA_ARCHS`` (default
"80;90"), ``PRH_FAST_BUILD_TYPE`` (default Release), ``CMAKE_BUILD_PARALLEL_LEVEL``,
``CMAKE_GENERATOR`` (default Ninja when a ``ninja`` is on PATH, else Unix Makefiles).
Works for ``pip install .``, ``pip wheel .``, ``pip install -e .`` and ``--no-build-isolation``,
in any order from the same checkout: a CMake build folder left by an earlier build whose tools
(pip's isolated build environment is deleted after each build), Python, pybind11, generator or
source folder differ from this build's is started afresh (``stale_cmake_cache``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# Cache entries holding a program that CMake runs again on a later configure or build.
_PROGRAMS = ("CMAKE_COMMAND", "CMAKE_MAKE_PROGRAM", "CMAKE_CXX_COMPILER", "CMAKE_CUDA_COMPILER")


def _version() -> str:
    text = (ROOT / "prh_fast" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def cmake_generator() -> tuple[str, str | None]:
    """(generator, make program) for this build. The make program is passed to CMake explicitly
    (an absolute path, or None where the generator's program is not known here)."""
    gen = os.environ.get("CMAKE_GENERATOR") or ("Ninja" if shutil.which("ninja") else
                                                "Unix Makefiles")
    prog = {"Ninja": "ninja", "Unix Makefiles": "make"}.get(gen)
    found = shutil.which(prog) if prog else None
    return gen, (os.path.abspath(found) if found else None)


def read_cmake_cache(path: Path) -> dict[str, str]:
    """``NAME:TYPE=VALUE`` lines of a CMakeCache.txt as {NAME: VALUE}."""
    entries = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if not line or line.startswith(("#", "//")):
            continue
        key, sep, value = line.partition("=")
        if sep:
            entries[key.split(":", 1)[0]] = value
    return entries


def _same(a: str, b: str) -> bool:
    if os.path.isabs(a) and os.path.isabs(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def stale_cmake_cache(build_dir: Path, expected: dict[str, str | None]) -> str | None:
    """Why the CMake cache in ``build_dir`` cannot serve this build, or None (no cache, or one
    this build can reuse). ``expected`` maps cache entries to the values this build sets (None:
    not checked); a cache entry naming a program that no longer exists makes it stale too."""
    cache = Path(build_dir) / "CMakeCache.txt"
    if not cache.is_file():
        return None
    entries = read_cmake_cache(cache)
    for name, want in expected.items():
        have = entries.get(name)
        if want is not None and (have is None or not _same(have, want)):
            return f"{name} was {have!r}, this build uses {want!r}"
    for name in _PROGRAMS:
        path = entries.get(name, "")
        if os.path.isabs(path) and not os.path.exists(path):
            return f"{name} {path} no longer exists"
    return None


def fresh_build_dir(build_dir: Path, expected: dict[str, str | None]) -> str | None:
    """Create ``build_dir``; empty it first when its CMake cache is stale. Returns the reason it
    was emptied, or None."""
    build_dir = Path(build_dir)
    reason = stale_cmake_cache(build_dir, expected)
    if reason is not None:
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    return reason


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        generator, make_program = cmake_generator()
        python, pybind11_dir = sys.executable, pybind11.get_cmake_dir()
        reason = fresh_build_dir(build_dir, {
            "CMAKE_HOME_DIRECTORY": str(ROOT), "CMAKE_GENERATOR": generator,
            "CMAKE_MAKE_PROGRAM": make_program, "Python_EXECUTABLE": python,
            "pybind11_DIR": pybind11_dir})
        if reason is not None:
            print(f"prh_fast: CMake build folder {build_dir} started afresh ({reason})",
                  file=sys.stderr)
        cfg = os.environ.get("PRH_FAST_BUILD_TYPE", "Release")
        args = [
            "-G", generator,
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={out_dir}",
            f"-DPython_EXECUTABLE={python}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPRH_FAST_CUDA={os.environ.get('PRH_FAST_CUDA', 'auto')}",
            f"-DPRH_FAST_CUDA_ARCHS={os.environ.get('PRH_FAST_CUDA_ARCHS', '80;90')}",
            f"-DPRH_FAST_VERSION={_version()}",
        ]
        if make_program:
            args.append(f"-DCMAKE_MAKE_PROGRAM={make_program}")
        if "CUDACXX" not in os.environ and not shutil.which("nvcc"):
            for cand in ("/usr/local/cuda/bin/nvcc",):
                if os.path.exists(cand):
                    os.environ["CUDACXX"] = cand
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir,
                       check=True)


if __name__ == "__main__":  # pip's backend (setuptools.build_meta) runs this file as __main__
    setup(
        ext_modules=[CMakeExtension("prh_fast._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
