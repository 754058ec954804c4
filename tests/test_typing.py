"""The typed public API: every public callable is annotated, ``py.typed`` ships, and mypy
accepts ``tests/typing/use_api.py`` (the API used as a user would) while rejecting wrong uses.

mypy runs as a subprocess (``python -m mypy``, configured by ``[tool.mypy]`` in pyproject.toml)
with a fresh cache folder, so each run is a cold one: it reads torch's sources, which takes most
of its time.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import prh_fast

ROOT = Path(__file__).resolve().parent.parent
USE_API = ROOT / "tests" / "typing" / "use_api.py"

#: Public modules whose ``__all__`` is the API (besides ``prh_fast`` and its lazy names).
PUBLIC_MODULES = ("prh_fast.knn", "prh_fast.metrics", "prh_fast.store", "prh_fast.grid",
                  "prh_fast.prepare", "prh_fast.probe", "prh_fast.torchmetrics",
                  "prh_fast.distributed", "prh_fast.extract", "prh_fast.reference",
                  "prh_fast.testing", "prh_fast.errors")

#: Public names whose hints are still missing, as ``"module:name"``; they live in files other
#: work is changing at the moment. This list is meant to be empty.
PENDING_HINTS: set[str] = set()  # public names still without hints (none)


def _public_objects() -> list:
    """``(module, name, object)`` for every public function or class."""
    out = []
    names = {"prh_fast": sorted(set(prh_fast.__all__) | set(prh_fast._LAZY))}
    for modname in PUBLIC_MODULES:
        try:
            module = importlib.import_module(modname)
        except ImportError as err:  # an optional extra (torchmetrics) that is not installed
            pytest.skip(f"{modname}: {err}")
        names[modname] = list(module.__all__)
    for modname, public in names.items():
        module = importlib.import_module(modname)
        for name in public:
            obj = getattr(module, name)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                out.append((modname, name, obj))
    return out


def _callables(obj) -> list:
    """``(qualified name, function)``: the function itself, or a class's ``__init__`` and the
    public methods, properties, class and static methods it defines."""
    if not inspect.isclass(obj):
        return [(obj.__qualname__, obj)]
    out = []
    for attr, value in vars(obj).items():
        if attr.startswith("_") and attr != "__init__":
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        elif isinstance(value, property):
            value = value.fget
        if inspect.isfunction(value):
            out.append((f"{obj.__qualname__}.{attr}", value))
    return out


def _missing_hints(fn) -> list:
    sig = inspect.signature(fn)  # follows functools.wraps to the decorated function
    missing = [p.name for p in sig.parameters.values()
               if p.annotation is inspect.Parameter.empty and p.name not in ("self", "cls")]
    if sig.return_annotation is inspect.Signature.empty and fn.__name__ != "__init__":
        missing.append("return")
    return missing


def _params():
    params = []
    for modname, name, obj in _public_objects():
        key = f"{modname}:{name}"
        marks = ([pytest.mark.xfail(reason="hints pending", strict=False)]
                 if key in PENDING_HINTS else [])
        params.append(pytest.param(obj, id=key, marks=marks))
    return params


@pytest.mark.parametrize("obj", _params())
def test_public_callable_is_annotated(obj):
    missing = {q: m for q, fn in _callables(obj) if (m := _missing_hints(fn))}
    assert not missing, f"parameters or returns without a type hint: {missing}"


def test_pending_list_names_real_api():
    known = {f"{m}:{n}" for m, n, _ in _public_objects()}
    assert PENDING_HINTS <= known, sorted(PENDING_HINTS - known)


def test_py_typed_ships_with_the_package():
    pkg = Path(prh_fast.__file__).resolve().parent
    assert (pkg / "py.typed").is_file()
    # package data of the wheel, and the sdist's manifest (read as text: tomllib is 3.11+)
    conf = (ROOT / "pyproject.toml").read_text()
    section = conf.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^prh_fast = \[[^\]]*"py\.typed"', section, re.MULTILINE), section
    assert "include prh_fast/py.typed" in (ROOT / "MANIFEST.in").read_text().splitlines()


# The wrong uses: each line marked "# wrong" must be reported by mypy, and nothing else.
_WRONG = textwrap.dedent('''
    import torch

    import prh_fast
    from prh_fast.store import load_features

    x = torch.randn(10, 4)
    score: str = prh_fast.metrics.cka(x, x)  # wrong
    idx: tuple[torch.Tensor, torch.Tensor] = prh_fast.knn.knn(x, 3)  # wrong
    best: int = prh_fast.align(x, x).best_score  # wrong
    record: list[int] = load_features("a.pt")  # wrong
    prh_fast.metrics.mutual_knn(x, x, topk="ten")  # wrong
    probe = prh_fast.Probe(x)
    out: list[float] = probe.score(x)  # wrong
    ok: float = prh_fast.metrics.svcca(x, x, cca_dim=2)
''')


@pytest.mark.slow
def test_mypy_accepts_the_user_file_and_rejects_wrong_uses(tmp_path):
    pytest.importorskip("mypy", reason="mypy is in the [test] extra")
    wrong = tmp_path / "wrong_use.py"
    wrong.write_text(_WRONG)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
           "--cache-dir", str(tmp_path / "cache"), "--no-error-summary",
           "--show-error-codes", str(USE_API), str(wrong)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "MYPY_FORCE_COLOR": "0"})
    out = res.stdout + res.stderr
    errors = [line for line in out.splitlines() if ": error:" in line]
    assert not [e for e in errors if "use_api.py" in e], out
    lines = _WRONG.splitlines()
    want = {i + 1 for i, line in enumerate(lines) if line.endswith("# wrong")}
    got = {int(m.group(1)) for e in errors if (m := re.search(r"wrong_use\.py:(\d+):", e))}
    assert got == want, out
    assert res.returncode == 1, out


@pytest.mark.slow
def test_user_file_runs():
    """The typing file is real usage: it runs, and the annotated values are what it gets."""
    sys.path.insert(0, str(USE_API.parent))
    try:
        import use_api
    finally:
        sys.path.remove(str(USE_API.parent))
    use_api.main()
