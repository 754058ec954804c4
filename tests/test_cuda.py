"""The GPU engine on a GPU: the compiled Triton neighbour search and the CUDA neighbour-set /
CKNNA kernels, against the oracles (float64 lists, the native CPU kernels).

Tests that need a GPU are marked ``cuda`` and skipped without one; ``benchmarks/gpu_suite.sh``
runs this file on the lent GPU machine. The rest run everywhere: argument checks, and the CUDA
sources compiled with ``nvcc`` for sm_90 (skipped without nvcc) with every runtime call and
launch checked (``csrc/common/cuda_check.h``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from _data import assert_knn_lists_match, integer_features, with_duplicates

from prh_fast import _log, _native
from prh_fast.knn import _backends as _backend
from prh_fast.knn import knn
from prh_fast.metrics import _cknna, _neighbours

ROOT = Path(__file__).resolve().parents[1]
CU_SOURCES = sorted((ROOT / "csrc").glob("*/*.cu"))
needs_cuda_kernels = pytest.mark.skipif(not _native.HAS_CUDA_KERNELS,
                                        reason="prh_fast._C built without CUDA kernels")


def _features(n, d, seed=0, dtype=torch.float32, device="cpu"):
    """Clustered Gaussian rows with norms spread over 0.3..3 (self is often not the best
    match, inner product is not cosine)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, d, generator=g, dtype=torch.float64)
    X = centres[torch.randint(0, 16, (n,), generator=g)] + 0.7 * torch.randn(
        n, d, generator=g, dtype=torch.float64)
    scale = torch.logspace(-0.5, 0.5, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    X = X * scale[:, None]
    return X.to(dtype).to(device)


def oracle_lists(Q, K, k, self_rows=None, block=2048):
    """float64 top-k of queries ``Q`` against keys ``K`` on their device (stable descending
    sort: ties to the lower index); ``self_rows[i]`` is excluded from query ``i``'s list."""
    K64 = K.double()
    out = []
    for r0 in range(0, Q.shape[0], block):
        s = Q[r0:r0 + block].double() @ K64.T
        if self_rows is not None:
            s[torch.arange(s.shape[0], device=s.device), self_rows[r0:r0 + block]] = float("-inf")
        out.append(torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k])
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# the compiled Triton search


def _triton_reason():
    from prh_fast.knn._triton import unavailable_reason

    return unavailable_reason(torch.device("cuda"))


@pytest.fixture(autouse=True)
def _skip_triton_tests_when_it_cannot_run(request):
    if request.node.name.startswith("test_triton_") and torch.cuda.is_available():
        reason = _triton_reason()
        if reason is not None:
            pytest.skip(f"triton cannot run here: {reason} (test_gpu_can_run_triton fails)")


@pytest.mark.cuda
def test_gpu_can_run_triton():
    assert _triton_reason() is None


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("n,d,k", [(7, 5, 6), (781, 96, 16), (1000, 33, 1), (2000, 128, 100),
                                   (1500, 64, 300)], ids=str)
def test_triton_exact_equals_oracle(n, d, k, dtype):
    X = _features(n, d, seed=n + k, dtype=dtype)
    idx, vals = knn(X.cuda(), k, backend="triton", return_scores=True)
    assert idx.device.type == "cuda"
    assert_knn_lists_match(idx.cpu(), X.double(), exact=True, what=f"triton {dtype}")
    X64 = X.double()
    want = (X64.unsqueeze(1) * X64[idx.cpu()]).sum(-1)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    torch.testing.assert_close(vals.cpu(), want.to(cd))


@pytest.mark.cuda
@pytest.mark.parametrize("k", [10, 100])
def test_triton_moderate_size_equals_cpu_backend_and_oracle(k):
    """N = 20,000, D = 768: exact lists equal the float64 oracle row for row, and the native
    CPU backend's float32 lists except at float32 near-ties."""
    n = 20000
    X = _features(n, 768, seed=k)
    Xg = X.cuda()
    got = knn(Xg, k, backend="triton")
    want = oracle_lists(Xg, Xg, k, self_rows=torch.arange(n, device="cuda"))
    bad = (got != want).any(dim=1).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} rows differ from the float64 oracle: {bad[:10]}"
    cpu = knn(X, k, backend="cpu" if _native.HAS_NATIVE else "torch")
    differ = (cpu != got.cpu()).any(dim=1).nonzero().flatten()
    if differ.numel():  # only near-ties may differ between float32 and exact lists
        G = X[differ].double() @ X.double().T
        dev = (G.gather(1, cpu[differ]) - G.gather(1, got.cpu()[differ])).abs().max()
        assert float(dev) <= 1e-5 * float((X.double() ** 2).sum(1).max())
    assert differ.numel() <= n // 5  # a gross error would touch most rows


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_triton_near_ties_on_gpu(precision):
    Xd, _ = with_duplicates(900, 24, n_unique=150, seed=3, dtype=torch.float32)
    Xi = integer_features(700, 9, seed=4, dtype=torch.float32)
    for X in (Xd, Xi):
        got = knn(X.cuda(), 12, backend="triton", precision=precision)
        assert_knn_lists_match(got.cpu(), X.double(), exact=True, what=precision)


@pytest.mark.cuda
def test_triton_fast_mode_is_close_and_logged(caplog, monkeypatch):
    monkeypatch.setattr(_log, "_logged", set())
    X = _features(3000, 256, seed=7)
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        got = knn(X.cuda(), 10, backend="triton", exact=False)
    assert "fast mode" in caplog.text
    want = oracle_lists(X, X, 10, self_rows=torch.arange(3000))
    recall = sum(len(set(a) & set(b)) for a, b in zip(got.cpu().tolist(), want.tolist())) / 30000
    assert recall >= 0.9


@pytest.mark.cuda
@pytest.mark.parametrize("exact", [True, False])
def test_triton_cross_search(exact):
    Q = _features(333, 80, seed=1)
    K = _features(1234, 80, seed=2)
    idx = knn(Q.cuda(), 9, keys=K.cuda(), backend="triton", exact=exact)
    want = oracle_lists(Q, K, 9)
    if exact:
        assert torch.equal(idx.cpu(), want)
    else:
        recall = sum(len(set(a) & set(b)) for a, b in zip(idx.cpu().tolist(), want.tolist()))
        assert recall / (333 * 9) >= 0.9


@pytest.mark.cuda
def test_triton_auto_backend_and_chunked_rows(caplog):
    from prh_fast.knn import _triton as T

    X = _features(2500, 64, seed=9)
    with caplog.at_level(logging.DEBUG, logger=T.__name__):
        a = knn(X.cuda(), 20)  # auto on CUDA: the fused search
    assert [r.triton_stats["rows"] for r in caplog.records if hasattr(r, "triton_stats")] == [2500]
    b = knn(X.cuda(), 20, backend="triton", memory_budget=200 * 1024)  # many row chunks
    assert torch.equal(a, b)
    assert_knn_lists_match(a.cpu(), X.double(), exact=True)


@pytest.mark.cuda
def test_triton_overflowing_buffers_retry_then_fall_back(caplog):
    from prh_fast.knn import _triton as T

    # 294 identical rows: more ties than the largest buffer (256) holds: retry, then exact path
    X = torch.ones(300, 4)
    X[::50] = 0.5
    with caplog.at_level(logging.DEBUG, logger=T.__name__):
        got = knn(X.cuda(), 5, backend="triton")
    stats = [r.triton_stats for r in caplog.records if hasattr(r, "triton_stats")][-1]
    assert stats["retried"] == 300 and stats["fallback"] == 300
    assert_knn_lists_match(got.cpu(), X.double(), exact=True)
    # scores crowded within the bf16 margin: the first buffer (32) cannot certify, the retry can
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, generator=g, dtype=torch.float64)
    X = (base + 2e-3 * torch.randn(260, 16, generator=g, dtype=torch.float64)).float()
    with caplog.at_level(logging.DEBUG, logger=T.__name__):
        got = knn(X.cuda(), 3, backend="triton", precision="bf16")
    stats = [r.triton_stats for r in caplog.records if hasattr(r, "triton_stats")][-1]
    assert stats["retried"] > 0
    assert_knn_lists_match(got.cpu(), X.double(), exact=True)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="needs two GPUs")
def test_triton_runs_on_the_tensors_device():
    X = _features(500, 32)
    got = knn(X.to("cuda:1"), 5, backend="triton")
    assert got.device == torch.device("cuda:1")
    assert_knn_lists_match(got.cpu(), X.double(), exact=True)


# --------------------------------------------------------------------------------------------
# CUDA neighbour-set and CKNNA kernels against the native CPU kernels


def _lists(layers, n, k, seed):
    """``[layers, n, k]`` neighbour lists with real overlap between layers (kNN of correlated
    features) and, in the last layer, random lists (no structure)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    out = []
    for _ in range(layers - 1):
        X = torch.tanh(z @ torch.randn(8, 24, generator=g)) + 0.3 * torch.randn(n, 24, generator=g)
        out.append(knn(X, k, backend="torch"))
    out.append(torch.rand(n, n, generator=g).argsort(dim=1)[:, :k])
    return torch.stack(out)


def _cheap_lists(layers, n, k, seed):
    """Lists for large ``n`` without a search: each row draws ``k`` of ``2k`` distinct shared
    candidates ``(i + offset) mod n``, so layers overlap by about half."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.rand(n, 4 * k, generator=g).argsort(dim=1)[:, :2 * k] + 1
    base = (torch.arange(n).unsqueeze(1) + offsets) % n
    return torch.stack([base.gather(1, torch.rand(n, 2 * k, generator=g).argsort(dim=1)[:, :k])
                        for _ in range(layers)])


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("metric", _neighbours.METRICS)
@pytest.mark.parametrize("k", [1, 10, 64, 65, 150, 256])
def test_cuda_neighbour_scores_equal_cpu(metric, k):
    n = 517
    a, b = _lists(3, n, k, seed=k), _lists(2, n, k, seed=k + 1)
    want = _neighbours.neighbour_scores(metric, a, b)
    got = _neighbours.neighbour_scores_cuda(metric, a.cuda(), b.cuda())
    assert got.device.type == "cuda" and got.dtype == torch.float64
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=1e-12)
    via = _neighbours.neighbour_scores(metric, a.cuda(), b.cuda(), backend="cuda")
    torch.testing.assert_close(via, want, rtol=0, atol=1e-12)


@pytest.mark.cuda
@needs_cuda_kernels
def test_cuda_neighbour_scores_large_n_and_many_pairs():
    a, b = _cheap_lists(4, 200_000, 10, seed=1), _cheap_lists(3, 200_000, 10, seed=2)
    for metric in _neighbours.METRICS:
        got = _neighbours.neighbour_scores_cuda(metric, a.cuda(), b.cuda()).cpu()
        torch.testing.assert_close(got, _neighbours.neighbour_scores(metric, a, b), rtol=0,
                                   atol=1e-12)
    # more than 65,535 layer pairs: split over several launches
    a = torch.randint(0, 3, (300, 3, 1))
    b = torch.randint(0, 3, (300, 3, 1))
    got = _neighbours.neighbour_scores_cuda("mutual", a.cuda(), b.cuda()).cpu()
    torch.testing.assert_close(got,
                               _neighbours.neighbour_scores("mutual", a, b), rtol=0, atol=1e-12)


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("ka,kb", [(1, 1), (10, 10), (7, 33), (256, 200)])
def test_cuda_cknna_terms_equal_cpu(ka, kb):
    n = 700
    A, B = _features(n, 40, seed=ka), _features(n, 30, seed=kb + 100)
    ia, sa = knn(A, ka, backend="torch", return_scores=True)
    ib, sb = knn(B, kb, backend="torch", return_scores=True)
    sa, sb = sa.double(), sb.double()
    want = _cknna.cknna_terms(ia, sa, ib, sb)
    got = _cknna.cknna_terms_cuda(ia.cuda(), sa.cuda(), ib.cuda(), sb.cuda())
    for g, w in zip(got, want):  # atomic float64 adds: order differs from the CPU's
        assert g == pytest.approx(w, rel=1e-10, abs=1e-10)


@pytest.mark.cuda
@needs_cuda_kernels
def test_cuda_kernels_check_their_inputs_on_the_device():
    a = torch.zeros(1, 5, 2, dtype=torch.int64, device="cuda")
    a[0, 2, 0] = 5
    with pytest.raises(ValueError, match="out of range"):
        _neighbours.neighbour_scores_cuda("cycle", a, a.clamp_max(4))
    with pytest.raises(ValueError, match="k"):
        _neighbours.neighbour_scores_cuda("mutual", torch.zeros(1, 5, 257, dtype=torch.int64,
                                                                device="cuda"),
                                          torch.zeros(1, 5, 257, dtype=torch.int64, device="cuda"))
    torch.cuda.synchronize()  # nothing was launched with bad inputs: the context is healthy


# --------------------------------------------------------------------------------------------
# everywhere: argument checks, dispatch, and the CUDA sources compiled for sm_90


def test_cuda_launchers_refuse_cpu_lists():
    a = torch.zeros(1, 4, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="CUDA device"):
        _neighbours.neighbour_scores_cuda("mutual", a, a)
    with pytest.raises(ValueError, match="metric"):
        _neighbours.neighbour_scores_cuda("jaccard", a, a)
    with pytest.raises(ValueError, match="CUDA device"):
        _cknna.cknna_terms_cuda(a[0], a[0].double(), a[0], a[0].double())
    with pytest.raises(ValueError, match="on a CUDA|lists are on cpu"):
        _neighbours.neighbour_scores("mutual", a, a, backend="cuda")
    with pytest.raises(ValueError, match="out of range"):
        _neighbours.check_lists_in_range(torch.tensor([[0, 4]]), 4, "knn_a")


def test_setops_auto_stays_on_torch_for_cuda_lists_until_verified(monkeypatch):
    dev = torch.device("cuda")
    verified = _backend.SETOPS["cuda"].verified_on_hardware
    assert _backend.resolve_setops_backend(None, dev, 10) == (
        "cuda" if verified and _native.HAS_CUDA_KERNELS else "torch")
    monkeypatch.setitem(_backend.SETOPS, "cuda", dataclasses.replace(
        _backend.SETOPS["cuda"], verified_on_hardware=False))
    assert _backend.resolve_setops_backend("auto", dev, 10) == "torch"
    if _native.HAS_CUDA_KERNELS:
        assert _backend.resolve_setops_backend("cuda", dev, 10) == "cuda"
        monkeypatch.setitem(_backend.SETOPS, "cuda", dataclasses.replace(
            _backend.SETOPS["cuda"], verified_on_hardware=True))
        assert _backend.resolve_setops_backend("auto", dev, 10) == "cuda"
        assert _backend.resolve_setops_backend("auto", dev, 300) == "torch"


def _strip_comments(src: str) -> str:
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


@pytest.mark.parametrize("path", CU_SOURCES, ids=lambda p: p.name)
def test_every_cuda_call_and_launch_is_checked(path):
    """Runtime calls sit inside ``PRH_CUDA_CHECK(...)``; each ``<<<...>>>`` launch statement is
    followed by ``PRH_CUDA_CHECK_LAUNCH();``."""
    src = _strip_comments(path.read_text())
    assert '#include "../common/cuda_check.h"' in src
    unchecked = []
    for m in re.finditer(r"\bcuda[A-Z]\w*\s*\(", src):
        start = max(src.rfind(";", 0, m.start()), src.rfind("{", 0, m.start()),
                    src.rfind("}", 0, m.start()))
        if "PRH_CUDA_CHECK(" not in src[start + 1:m.start()]:
            unchecked.append(src[start + 1:m.end()].strip())
    assert not unchecked, f"{path.name}: unchecked CUDA calls: {unchecked}"
    launches = list(re.finditer(r">>>\s*\(", src))
    assert launches, f"{path.name}: no kernel launch found"
    for m in launches:
        end = src.index(";", m.end())
        after = src[end + 1:].lstrip()
        assert after.startswith("PRH_CUDA_CHECK_LAUNCH();"), \
            f"{path.name}: launch at offset {m.start()} is not followed by PRH_CUDA_CHECK_LAUNCH()"


def _nvcc():
    found = shutil.which("nvcc") or os.environ.get("CUDACXX")
    if not found and os.path.exists("/usr/local/cuda/bin/nvcc"):
        found = "/usr/local/cuda/bin/nvcc"
    return found


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
@pytest.mark.parametrize("path", CU_SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles_for_sm90(path, tmp_path):
    """The .cu sources compile for sm_90 with the build's flags, and ptxas reports no register
    spills (the per-thread scratch arrays are stack frames, not spills)."""
    cmd = [_nvcc(), "-std=c++17", "-O3", "--expt-relaxed-constexpr",
           "-gencode=arch=compute_90,code=sm_90", "--resource-usage", "-c", str(path),
           "-o", str(tmp_path / "k.o")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    report = out.stdout + out.stderr
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", report)]
    assert spills and max(spills) == 0, report[-3000:]
