"""The one dispatch point (``prh_fast.knn._backends``): explicit backends raise listing their
reasons, auto falls back with one log line, the configuration is honoured, and ``"cuda"``
reaches the CUDA neighbour-set and CKNNA launches through the public API."""
import ctypes
import logging

import numpy as np
import pytest
import torch

import prh_fast
from prh_fast import _log, _native, metrics
from prh_fast.errors import BackendUnavailableError, InputError
from prh_fast.knn import _backends as _backend
from prh_fast.knn import knn
from prh_fast.metrics import _neighbours

needs_native = pytest.mark.skipif(not _native.HAS_NATIVE, reason="native module not built")


def test_auto_on_cpu_prefers_native():
    expected = "cpu" if _native.HAS_NATIVE else "torch"
    assert _backend.resolve_knn_backend(None, torch.device("cpu")) == expected
    assert _backend.resolve_knn_backend("auto", torch.device("cpu")) == expected


def test_auto_on_cuda_is_triton_when_it_can_run_else_torch():
    can = _backend.triton_unavailable(torch.device("cuda")) is None
    want = "triton" if can else "torch"
    assert _backend.resolve_knn_backend("auto", torch.device("cuda")) == want


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


# ------------------------------------------------------------------------------ the registry
def test_every_name_is_declared_once():
    assert set(_backend.BACKENDS) == set(_backend.KNN_BACKENDS) - {"auto"}
    for name, b in _backend.BACKENDS.items():
        assert b.name == name
        assert b.setops is None or b.setops in _backend.SETOPS
    assert not _backend.BACKENDS["faiss-ivf"].exact and _backend.BACKENDS["cpu"].exact
    assert {n for n, b in _backend.BACKENDS.items() if b.streams} == {
        "cpu", "torch", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw"}  # prh_fast.store._ann
    assert _backend.BACKENDS["cuda"].setops == "cuda"
    assert _backend.BACKENDS["cuda"].search == "triton"


def test_cuda_max_k_comes_from_the_native_module():
    if _native.HAS_NATIVE:
        assert _backend.CUDA_MAX_K == _native.native().CUDA_MAX_K == 256
    assert _backend.SETOPS["cuda"].max_k == _backend.CUDA_MAX_K


def test_not_supported_reasons_say_why():
    cpu = torch.device("cpu")
    req = _backend.Request(device=torch.device("cuda"), cross=True, stream=True)
    reasons = [t for _, t in _backend.BACKENDS["cpu"].not_supported_reasons(req)]
    assert any("features are on cuda" in t for t in reasons)
    assert any("against itself" in t for t in reasons)
    assert not _backend.BACKENDS["torch"].not_supported_reasons(_backend.Request(device=cpu))
    kinds = dict(_backend.BACKENDS["faiss"].not_supported_reasons(
        _backend.Request(device=cpu, distributed=True)))
    assert "unsupported" in kinds
    big = _backend.Request(device=torch.device("cuda"), op="setops", k=_backend.CUDA_MAX_K + 1)
    assert any("k <= 256" in t for _, t in _backend.SETOPS["cuda"].not_supported_reasons(big))


def test_explicit_backend_lists_every_reason():
    with pytest.raises(InputError) as err:
        _backend.resolve("cpu", torch.device("cuda"), cross=True)
    msg = str(err.value)
    assert "backend='cpu'" in msg and "features are on cuda" in msg and "keys=" in msg


def test_wrong_request_is_input_error_missing_module_is_unavailable(monkeypatch):
    monkeypatch.setattr(_native, "HAS_NATIVE", False)
    with pytest.raises(BackendUnavailableError, match="native module"):
        _backend.resolve("cpu", torch.device("cpu"))
    with pytest.raises(InputError, match="streaming"):
        _backend.resolve("faiss", torch.device("cpu"), stream=True)


def test_streamed_and_distributed_requests_use_the_registry():
    from prh_fast.distributed._knn import _local_backend
    from prh_fast.store._stream import _resolve_backend

    cpu = torch.device("cpu")
    assert _resolve_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="backend='triton'"):
        _resolve_backend("triton", cpu)
    with pytest.raises(ValueError, match="distributed"):
        _local_backend("faiss", cpu)
    assert _local_backend("torch", cpu) == "torch"


def test_configured_backend_that_cannot_stream_falls_back(monkeypatch, caplog):
    from prh_fast.store._stream import _resolve_backend

    monkeypatch.setattr(_log, "_logged", set())
    expected = "cpu" if _native.HAS_NATIVE else "torch"
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        with prh_fast.config_context(backend="faiss"):
            assert _resolve_backend(None, torch.device("cpu")) == expected
    assert any("cannot stream" in r.getMessage() for r in caplog.records)


def test_config_context_selects_the_backend():
    with prh_fast.config_context(backend="torch"):
        assert _backend.resolve(None, "cpu").search == "torch"
        assert _backend.resolve("auto", "cpu", op="setops", k=3).setops in ("cpu", "torch")
        assert _backend.resolve(None, "cpu", op="setops", k=3).setops == "torch"
    with prh_fast.config_context(backend="bogus"):
        with pytest.raises(InputError, match="from config_context"):
            _backend.resolve(None, "cpu")


def test_spec_string_carries_its_parameters():
    choice = _backend.resolve("faiss-ivf:nprobe=4,nlist=16", "cpu") \
        if _backend.faiss_available() else None
    if choice is None:
        with pytest.raises(BackendUnavailableError, match="pip install faiss-cpu"):
            _backend.resolve("faiss-ivf:nprobe=4,nlist=16", "cpu")
        return
    assert choice.search == "faiss-ivf" and choice.params.nprobe == 4


def test_setops_auto_on_cuda_lists_is_torch_unless_verified(monkeypatch):
    dev = torch.device("cuda")
    assert not _backend.SETOPS["cuda"].verified_on_hardware
    assert _backend.resolve_setops_backend("auto", dev, 10) == "torch"
    assert _backend.resolve_setops_backend("triton", dev, 10) == "torch"
    monkeypatch.setattr(_native, "HAS_CUDA_KERNELS", True)
    assert _backend.resolve_setops_backend("cuda", dev, 10) == "cuda"
    with pytest.raises(InputError, match="k <= 256"):
        _backend.resolve_setops_backend("cuda", dev, 300)
    monkeypatch.setattr(_native, "HAS_CUDA_KERNELS", False)
    with pytest.raises(BackendUnavailableError, match="without CUDA kernels"):
        _backend.resolve_setops_backend("cuda", dev, 10)


# ------------------------------------------------------------------------------ up to the launch
class _FakeKernels:
    """Stands in for the CUDA launchers of ``prh_fast._C``: reads the device pointers (CPU
    memory here) as the kernels would, computes with the native CPU kernels, writes ``out``,
    and records every call."""

    def __init__(self, real):
        self.real = real
        self.calls = []

    def __getattr__(self, name):  # the CPU entry points stay the real ones
        return getattr(self.real, name)

    @staticmethod
    def _array(ptr, ctype, shape):
        n = int(np.prod(shape))
        dtype = np.int64 if ctype is ctypes.c_int64 else np.float64
        return np.frombuffer((ctype * n).from_address(ptr), dtype=dtype).reshape(shape)

    def cuda_neighbour_scores(self, metric, a, b, La, Lb, N, k, out, stream):
        self.calls.append(("neighbour_scores", metric, La, Lb, N, k, stream))
        A = self._array(a, ctypes.c_int64, (La, N, k)).copy()
        B = self._array(b, ctypes.c_int64, (Lb, N, k)).copy()
        self._array(out, ctypes.c_double, (La, Lb))[:] = self.real.neighbour_scores(metric, A, B)

    def cuda_cknna_workspace_bytes(self, n):
        return 8

    def cuda_cknna_terms(self, ia, sa, ib, sb, n, ka, kb, out, ws, stream):
        self.calls.append(("cknna_terms", n, ka, kb, stream))
        t = self.real.cknna_terms(self._array(ia, ctypes.c_int64, (n, ka)).copy(),
                                  self._array(sa, ctypes.c_double, (n, ka)).copy(),
                                  self._array(ib, ctypes.c_int64, (n, kb)).copy(),
                                  self._array(sb, ctypes.c_double, (n, kb)).copy())
        self._array(out, ctypes.c_double, (5,))[:] = t


@pytest.fixture
def fake_cuda(monkeypatch):
    """CPU tensors count as CUDA ones, the Triton search is the torch search, and the native
    CUDA launchers are :class:`_FakeKernels`."""
    from prh_fast.knn import _torch, _triton

    real = _native.native()
    fake = _FakeKernels(real)
    monkeypatch.setattr(_backend, "device_type", lambda device: "cuda")
    monkeypatch.setattr(_backend, "triton_unavailable", lambda device: None)
    monkeypatch.setattr(_triton, "knn_triton",
                        lambda X, k, budget, keys=None, exact=True, precision=None:
                        _torch.knn_torch(X, k, budget, keys=keys))
    monkeypatch.setattr(_native, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(_native, "native", lambda: fake)

    class _Stream:
        def __init__(self, device):
            fake.calls.append(("stream", str(device)))

        def __enter__(self):
            return 1234

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_neighbours, "cuda_stream", _Stream)
    return fake


def _features(n=60, d=12, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@needs_native
@pytest.mark.parametrize("metric, kind", [("mutual_knn", "mutual"), ("cycle_knn", "cycle"),
                                          ("lcs_knn", "lcs"), ("edit_distance_knn", "edit")])
def test_cuda_backend_reaches_the_set_op_kernel_through_align(fake_cuda, metric, kind):
    X = torch.stack([_features(seed=1), _features(seed=2)], dim=1)
    Y = torch.stack([_features(seed=3), _features(seed=4), _features(seed=5)], dim=1)
    want = prh_fast.align(X, Y, metric, topk=5, backend="torch").scores
    got = prh_fast.align(X, Y, metric, topk=5, backend="cuda").scores
    launches = [c for c in fake_cuda.calls if c[0] == "neighbour_scores"]
    assert launches == [("neighbour_scores", kind, 2, 3, 60, 5, 1234)]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@needs_native
def test_cuda_backend_reaches_the_set_op_kernel_through_metrics(fake_cuda):
    A, B = _features(seed=1), _features(seed=2)
    want = metrics.mutual_knn(A, B, 7, backend="torch")
    assert metrics.mutual_knn(A, B, 7, backend="cuda") == want
    assert [c for c in fake_cuda.calls if c[0] == "neighbour_scores"] == [
        ("neighbour_scores", "mutual", 1, 1, 60, 7, 1234)]


@needs_native
@pytest.mark.parametrize("unbiased", [True, False])
def test_cuda_backend_reaches_the_cknna_kernel(fake_cuda, unbiased):
    A, B = _features(seed=1), _features(seed=2)
    want = metrics.cknna(A, B, topk=6, unbiased=unbiased, backend="torch")
    got = metrics.cknna(A, B, topk=6, unbiased=unbiased, backend="cuda")
    calls = [c for c in fake_cuda.calls if c[0] == "cknna_terms"]
    # sim(K, L), sim(K, K), sim(L, L): three launches of [N, k] lists on the stream
    assert calls == [("cknna_terms", 60, 6, 6, 1234)] * 3
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@needs_native
def test_cuda_backend_reaches_the_cknna_kernel_through_align(fake_cuda):
    X = torch.stack([_features(seed=1), _features(seed=2)], dim=1)
    want = prh_fast.align(X, X, "cknna", topk=5, backend="torch").scores
    got = prh_fast.align(X, X, "cknna", topk=5, backend="cuda").scores
    # two self terms per side, then one per layer pair
    assert sum(c[0] == "cknna_terms" for c in fake_cuda.calls) == 2 + 2 + 4
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_native
def test_auto_and_triton_stay_off_the_cuda_set_op_kernels(fake_cuda):
    A, B = _features(seed=1), _features(seed=2)
    metrics.mutual_knn(A, B, 5, backend="auto")
    metrics.cknna(A, B, topk=5, backend="triton")
    assert not [c for c in fake_cuda.calls if c[0] != "stream"]


@needs_native
def test_cuda_backend_reaches_the_kernels_through_align_models(fake_cuda):
    X = torch.stack([_features(seed=1), _features(seed=2)], dim=1)
    Y = torch.stack([_features(seed=3)], dim=1)
    kw = dict(topk=4, progress=False)
    want = prh_fast.align_models({"x": X}, {"y": Y}, "mutual_knn", backend="torch", **kw)
    got = prh_fast.align_models({"x": X}, {"y": Y}, "mutual_knn", backend="cuda", **kw)
    launches = [c for c in fake_cuda.calls if c[0] == "neighbour_scores"]
    # one launch for the model pair: its 2 x 1 layer pairs (in the grid's reference order)
    assert len(launches) == 1 and sorted(launches[0][2:4]) == [1, 2]
    assert launches[0][:2] == ("neighbour_scores", "mutual") and launches[0][4:] == (60, 4, 1234)
    assert got.to_dict()["pair_scores"] == want.to_dict()["pair_scores"]
