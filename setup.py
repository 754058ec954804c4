"""Build ``prh_fast._C`` with CMake (pybind11, C++17, OpenMP; CUDA when a compiler is found).

Environment: ``PRH_FAST_CUDA=auto|0|1`` (default auto), ``PRH_FAST_CUDA_ARCHS`` (default
"80;90"), ``PRH_FAST_BUILD_TYPE`` (default Release), ``CMAKE_BUILD_PARALLEL_LEVEL``.
Works for ``pip install .``, ``pip install -e .`` and ``--no-build-isolation``.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "prh_fast" / "__init__.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = os.environ.get("PRH_FAST_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{cfg.upper()}={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPRH_FAST_CUDA={os.environ.get('PRH_FAST_CUDA', 'auto')}",
            f"-DPRH_FAST_CUDA_ARCHS={os.environ.get('PRH_FAST_CUDA_ARCHS', '80;90')}",
            f"-DPRH_FAST_VERSION={_version()}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if "CUDACXX" not in os.environ and not shutil.which("nvcc"):
            for cand in ("/usr/local/cuda/bin/nvcc",):
                if os.path.exists(cand):
                    os.environ["CUDACXX"] = cand
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_dir,
                       check=True)


setup(
    ext_modules=[CMakeExtension("prh_fast._C")],
    cmdclass={"build_ext": CMakeBuild},
)
