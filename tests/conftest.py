"""Shared pytest setup: markers, GPU skipping, and the tests folder on sys.path (so test modules
can ``from _data import ...`` whether or not ``tests`` is a package)."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# As a user's script would: ask for sleeping idle OpenMP threads before torch loads the runtime
# (prh_fast._threads), so the suite shares this machine's cores politely.
import prh_fast  # noqa: E402

prh_fast.prefer_passive_wait()

# Triton's CPU interpreter must be switched on before anything imports triton (transformers,
# timm and torch._dynamo may import it while other test modules are collected), so that
# tests/test_triton.py runs the kernels on a machine without a GPU. Only the "triton" backend
# reads it; "auto" on CPU tensors never picks Triton.
if "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_SESSION_CACHE = None


def pytest_configure(config):
    # Converted model weights (the packaged SmolLM2's GGUF -> safetensors, ~18 s) are shared by
    # every test module of a session through one cache folder; a PRH_FAST_CACHE set by the
    # caller (CI may keep it between runs) is used as is. Tests never write to ~/.cache.
    global _SESSION_CACHE
    if not os.environ.get("PRH_FAST_CACHE"):
        import tempfile

        _SESSION_CACHE = tempfile.mkdtemp(prefix="prh_fast_test_cache_")
        os.environ["PRH_FAST_CACHE"] = _SESSION_CACHE
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: heavy (Triton interpreter, subprocesses, real "
                            "models, large oracles); -m 'not slow' skips them")


@pytest.fixture(autouse=True)
def _fresh_prh_fast_config():
    """Every test starts from the environment alone: no ``set_config`` left over from another
    test, and the environment parsed afresh (tests set variables with ``monkeypatch``)."""
    from prh_fast import _config

    _config.reset_config()
    _config.reload_environment()
    yield
    _config.reset_config()
    _config.reload_environment()


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_unconfigure(config):
    if _SESSION_CACHE is not None:
        import shutil

        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)
        os.environ.pop("PRH_FAST_CACHE", None)
