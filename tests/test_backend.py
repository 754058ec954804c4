"""The one dispatch point: explicit backends raise, auto falls back, the env var is honoured."""
import logging

import pytest
import torch

from prh_fast import _backend, _log, _native
from prh_fast.knn import knn


def test_auto_on_cpu_prefers_native():
    expected = "cpu" if _native.HAS_NATIVE else "torch"
    assert _backend.resolve_knn_backend(None, torch.device("cpu")) == expected
    assert _backend.resolve_knn_backend("auto", torch.device("cpu")) == expected


def test_auto_on_cuda_is_triton_when_it_can_run_else_torch():
    can = _backend.triton_unavailable(torch.device("cuda")) is None
    assert _backend.resolve_knn_backend("auto", torch.device("cuda")) == ("triton" if can else "torch")


def test_unknown_backend_names_argument():
    with pytest.raises(ValueError, match="backend"):
        _backend.resolve_knn_backend("tpu", torch.device("cpu"))


def test_env_var_selects_backend(monkeypatch):
    monkeypatch.setenv("PRH_FAST_BACKEND", "torch")
    assert _backend.resolve_knn_backend(None, torch.device("cpu")) == "torch"
    monkeypatch.setenv("PRH_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        knn(torch.randn(10, 3), 2)


def test_explicit_cpu_on_cuda_tensor_raises():
    with pytest.raises(ValueError, match="backend='cpu'"):
        _backend.resolve_knn_backend("cpu", torch.device("cuda"))


def test_explicit_faiss_missing_raises(monkeypatch):
    monkeypatch.setattr(_backend, "faiss_available", lambda: False)
    with pytest.raises(RuntimeError, match="faiss"):
        _backend.resolve_knn_backend("faiss", torch.device("cpu"))


def test_auto_fallback_logs_once(monkeypatch, caplog):
    monkeypatch.setattr(_native, "HAS_NATIVE", False)
    monkeypatch.setattr(_log, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        for _ in range(3):
            assert _backend.resolve_knn_backend(None, torch.device("cpu")) == "torch"
    assert sum("torch backend" in r.getMessage() for r in caplog.records) == 1
