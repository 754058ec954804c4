"""The fused Triton neighbour search under Triton's CPU interpreter, against the oracles.

Exact mode must return the exact lists of the given values: identical to the float64 oracle
(``prh_fast.reference.knn``) on every dtype, and to the float32 ``torch`` backend except where
two scores lie within float32 rounding of each other (checked row by row). Fast mode may only
swap neighbours whose scores are within the bf16 error. Data with many near-ties (duplicates,
duplicates plus tiny perturbations, low rank, quantised values) exercise the certified margin,
the retry with a larger buffer, and the exact fallback.

``TRITON_INTERPRET=1`` must be set before triton is imported, so it is set here at collection
when no GPU is present (nothing imports triton earlier; other tests never use it). On a GPU
machine these interpreter tests are skipped: ``tests/test_cuda.py`` runs the compiled kernels.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys

import pytest
import torch

if (not torch.cuda.is_available() and "triton" not in sys.modules
        and importlib.util.find_spec("triton") is not None):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from _data import assert_knn_lists_match, integer_features, with_duplicates  # noqa: E402

from prh_fast import _log  # noqa: E402
from prh_fast import reference as R  # noqa: E402
from prh_fast.knn import _backends as _backend  # noqa: E402
from prh_fast.knn import _triton as T  # noqa: E402
from prh_fast.knn import knn  # noqa: E402

_REASON = T.unavailable_reason(torch.device("cpu"))
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"triton interpreter: {_REASON}")

BUDGET = 1 << 26
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _features(n, d, seed=0, dtype=torch.float32, spread=True):
    """Gaussian rows around a few shared directions, norms spread over 0.3..3 (so inner
    product is not cosine and self is often not the best match)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(6, d, generator=g, dtype=torch.float64)
    X = centres[torch.randint(0, 6, (n,), generator=g)] + 0.7 * torch.randn(
        n, d, generator=g, dtype=torch.float64)
    if spread:
        scale = torch.logspace(-0.5, 0.5, n, dtype=torch.float64)
        X = X * scale[torch.randperm(n, generator=g)][:, None]
    return X.to(dtype)


def _cross_oracle(Q, K, k):
    s = Q.double() @ K.double().T
    return torch.argsort(s, dim=1, descending=True, stable=True)[:, :k]


def _check_exact(idx, vals, X, k, what):
    """Exact lists of the values: equal to the float64 oracle; float32 backend differs only at
    float32 near-ties; the scores are the float64 scores rounded to the compute dtype."""
    assert idx.dtype == torch.int64 and idx.shape == (X.shape[0], k)
    assert_knn_lists_match(idx, X.double(), exact=True, what=what)
    ti = knn(X, k, backend="torch")
    assert_knn_lists_match(ti, X.double(), exact=False, tol=1e-6, what=what + " (torch)")
    X64 = X.double()
    want = (X64.unsqueeze(1) * X64[idx]).sum(-1)
    cd = torch.float64 if X.dtype == torch.float64 else torch.float32
    assert vals.dtype == cd
    torch.testing.assert_close(vals, want.to(cd), rtol=1e-6 if cd == torch.float32 else 1e-12,
                               atol=1e-6 if cd == torch.float32 else 1e-12)


# --------------------------------------------------------------------------------------------
# exact mode against the oracles: dtypes, odd shapes, k in one pass and in the second stage

CASES = [  # (N, D, k)
    (2, 3, 1), (7, 5, 6), (150, 33, 1), (150, 33, 5), (211, 64, 17), (181, 20, 64),
]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", CASES, ids=str)
@pytest.mark.slow
def test_exact_equals_oracle(n, d, k, dtype):
    X = _features(n, d, seed=n + d + k, dtype=dtype)
    idx, vals, stats = T.knn_triton(X, k, BUDGET, return_stats=True)
    _check_exact(idx, vals, X, k, f"triton exact N={n} D={d} k={k} {dtype}")
    assert stats.exact and stats.G == 1


@pytest.mark.parametrize("k,dtype", [(256, torch.float32), (280, torch.bfloat16)], ids=str)
@pytest.mark.slow
def test_exact_second_stage_large_k(k, dtype):
    X = _features(300, 24, seed=k, dtype=dtype)
    idx, vals, stats = T.knn_triton(X, k, BUDGET, return_stats=True)
    assert stats.G > 1  # shards merged
    _check_exact(idx, vals, X, k, f"triton exact k={k}")


@pytest.mark.slow
def test_precisions_give_the_same_exact_lists():
    X = _features(170, 40, seed=3)
    want = R.knn(X.double(), 9)
    for p in ("tf32", "bf16", "fp32"):
        idx, _, stats = T.knn_triton(X, 9, BUDGET, precision=p, return_stats=True)
        assert torch.equal(idx, want), p
        assert stats.precision == p


def test_non_contiguous_and_numpy_like_inputs_through_knn():
    base = _features(120, 50, seed=5)
    X = base[:, ::2]  # non-contiguous view
    idx, vals = knn(X, 7, backend="triton", return_scores=True)
    _check_exact(idx, vals, X.contiguous(), 7, "non-contiguous")


@pytest.mark.slow
def test_dense_and_sparse_merges_agree():
    # DENSE_AT=0: every tile merged by tl.topk; DENSE_AT=BLOCK_N: only the sparse path.
    # (fast mode with fp32 products: the kernel's own lists, no re-score)
    X = _features(40, 16, seed=11)
    want = R.knn(X.double(), 5)
    for tune in ({"DENSE_AT": 0, "BLOCK_M": 16, "BLOCK_N": 16}, {"DENSE_AT": 2, "BLOCK_N": 16},
                 {"DENSE_AT": 64}):
        for exact in (True, False):
            idx, _ = T.knn_triton(X, 5, BUDGET, exact=exact, tune=tune, precision="fp32")
            assert torch.equal(idx, want), (tune, exact)


# --------------------------------------------------------------------------------------------
# near-ties: the certificate must never let a wrong list through


def _near_tie_sets():
    g = torch.Generator().manual_seed(7)
    dup, _ = with_duplicates(160, 12, n_unique=20, seed=1)  # exact ties everywhere
    pert = dup + 1e-3 * torch.randn(dup.shape, generator=g, dtype=torch.float64).to(dup.dtype)
    lowrank = (torch.randn(200, 3, generator=g) @ torch.randn(3, 48, generator=g))
    quant = torch.round(torch.randn(190, 20, generator=g) * 2) / 4  # values in 0.25 steps
    return {"duplicates": dup, "perturbed": pert, "lowrank": lowrank, "quantised": quant,
            "integers": integer_features(150, 6, seed=2)}


@pytest.mark.parametrize("name", ["duplicates", "perturbed", "lowrank", "quantised", "integers"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.slow
def test_near_ties_exact(name, precision):
    X = _near_tie_sets()[name]
    k = 10
    idx, vals = T.knn_triton(X, k, BUDGET, precision=precision)
    _check_exact(idx, vals, X, k, f"near-ties {name} {precision}")
    if name in ("duplicates", "integers", "quantised"):
        # exact ties: float32 is exact here too, so the float32 lists must be identical
        assert torch.equal(idx, knn(X, k, backend="torch"))


@pytest.mark.slow
def test_buffer_overflow_falls_back_to_the_exact_path(caplog):
    # 294 identical rows: their scores all tie, more than the largest buffer (256) holds, so
    # no row can be certified; the exact path must produce the lower-index lists.
    X = torch.ones(300, 4)
    X[::50] = 0.5
    with caplog.at_level(logging.INFO, logger="prh_fast"):
        idx, vals, stats = T.knn_triton(X, 5, BUDGET, return_stats=True)
    assert stats.retried == 300 and stats.fallback == 300
    assert any("exact float64 path" in r.getMessage() for r in caplog.records)
    _check_exact(idx, vals, X, 5, "all ties")
    assert torch.equal(idx, knn(X, 5, backend="torch"))


@pytest.mark.slow
def test_retry_with_a_larger_buffer():
    # Scores crowded within the bf16 margin: the first buffer (32) cannot certify, 256 can.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 16, generator=g, dtype=torch.float64)
    X = (base + 2e-3 * torch.randn(260, 16, generator=g, dtype=torch.float64)).float()
    idx, vals, stats = T.knn_triton(X, 3, BUDGET, precision="bf16", return_stats=True)
    assert stats.retried > 0
    _check_exact(idx, vals, X, 3, "retry")


def test_margin_bound_holds_for_emulated_bf16_products():
    # The bound's input-rounding and accumulation terms against an emulation of the candidate
    # pass (bf16 inputs, float32 products and sums), adversarial rows included.
    g = torch.Generator().manual_seed(1)
    for d in (1, 7, 256, 1000):
        X = torch.randn(64, d, generator=g) * torch.logspace(-3, 3, 64)[:, None]
        X[0] = 1 + 2.0**-9  # rounds badly in bf16
        X[1] = -(1 + 2.0**-9)
        _, _, u = T.product_format(torch.float32, "bf16", True)
        c = T.margin_coefficient(u, d, torch.float64)
        Xb = X.bfloat16().float()
        a = Xb @ Xb.T
        r = X.double() @ X.double().T
        n = X.double().norm(dim=1)
        assert bool(((a.double() - r).abs() <= c * n[:, None] * n[None, :]).all()), d


# --------------------------------------------------------------------------------------------
# fast mode and cross search


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("k", [5, 40])
@pytest.mark.slow
def test_fast_mode_is_close_and_logged(k, dtype, caplog):
    X = _features(150, 30, seed=k, dtype=dtype, spread=False)
    monkey_logged = set(_log._logged)
    _log._logged.clear()
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        idx, vals, stats = T.knn_triton(X, k, BUDGET, exact=False, return_stats=True)
    _log._logged.update(monkey_logged)
    assert any("approximate" in r.getMessage() for r in caplog.records)
    assert not stats.exact
    scale = float(X.double().norm(dim=1).max() ** 2)
    # bf16 products: score errors up to ~2^-7 of |q||k|; only such near-ties may swap
    assert_knn_lists_match(idx, X.double(), exact=False, tol=2e-2, what=f"fast {dtype}")
    X64 = X.double()
    want = (X64.unsqueeze(1) * X64[idx]).sum(-1)
    assert float((vals.double() - want).abs().max()) <= 2e-2 * scale


@pytest.mark.slow
def test_fast_mode_second_stage():
    X = _features(300, 16, seed=2, spread=False)
    idx, _, stats = T.knn_triton(X, 270, BUDGET, exact=False, return_stats=True)
    assert stats.G > 1
    assert_knn_lists_match(idx, X.double(), exact=False, tol=2e-2, what="fast k=270")


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.slow
def test_cross_search(exact, dtype):
    Q = _features(77, 24, seed=1, dtype=dtype)
    K = _features(230, 24, seed=2, dtype=dtype)
    idx, vals = knn(Q, 12, keys=K, backend="triton", exact=exact, return_scores=True)
    want = _cross_oracle(Q, K, 12)
    s = Q.double() @ K.double().T
    if exact:
        assert torch.equal(idx, want)
        torch.testing.assert_close(vals, s.gather(1, want).float(), rtol=1e-6, atol=1e-6)
    else:
        dev = (s.gather(1, idx) - s.gather(1, want)).abs().max()
        assert float(dev) <= 2e-2 * float(s.abs().max())
    # the same queries as rows of one set: cross search does not exclude anything
    i2 = knn(K[:50], 3, keys=K, backend="triton")
    assert torch.equal(i2, _cross_oracle(K[:50], K, 3))


def test_cross_search_torch_backend_matches():
    Q = _features(40, 10, seed=4)
    K = _features(90, 10, seed=5)
    a = knn(Q, 6, keys=K, backend="triton")
    b = knn(Q, 6, keys=K)  # auto on CPU: torch
    assert torch.equal(a, _cross_oracle(Q, K, 6)) and torch.equal(b, a)


# --------------------------------------------------------------------------------------------
# the GPU code path, compiled ahead of time for sm_80 and sm_90 (no GPU needed)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.slow
def test_kernels_compile_for_gpu_targets(arch):
    import json
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "prh_fast.knn._triton_compile", "--arch",
                          str(arch)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    names = {r["name"] for r in rows}
    assert {"topk_bf16_ieee_kp32_margin_self", "topk_fp32_tf32_kp128_margin_cross",
            "topk_fp16_ieee_kp256_fast_self", "rescore_bf16", "rescore_fp32"} <= names
    assert all(r["arch"] == arch and r["shared_bytes"] < 228 * 1024 for r in rows)
    # The default tiles keep the running lists in registers: little or no spill (stack) in
    # ptxas's report, when Triton ships cuobjdump to read it (sm_90 is the tuned target).
    spills = {r["name"]: r["stack_bytes"] for r in rows if "stack_bytes" in r}
    assert all(v <= (64 if arch == 90 else 256) for v in spills.values()), spills


# --------------------------------------------------------------------------------------------
# dispatch and argument checks


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    X = _features(20, 4)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton.*CUDA device"):
        knn(X, 3, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        knn(X, 3, backend="cuda")


def test_explicit_triton_without_triton_raises(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(RuntimeError, match="triton is not installed"):
        knn(_features(20, 4), 3, backend="triton")


def test_auto_on_cuda_falls_back_to_torch_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(_log, "_logged", set())
    monkeypatch.setattr(_backend, "triton_unavailable", lambda device: "no triton here")
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        for _ in range(3):
            assert _backend.resolve_knn_backend("auto", torch.device("cuda")) == "torch"
    assert sum("no triton here" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(_backend, "triton_unavailable", lambda device: None)
    assert _backend.resolve_knn_backend("auto", torch.device("cuda")) == "triton"
    assert _backend.resolve_knn_backend("cuda", torch.device("cuda")) == "triton"


def test_auto_on_cpu_stays_native_and_env_selects_triton(monkeypatch, caplog):
    assert _backend.resolve_knn_backend("auto", torch.device("cpu")) in ("cpu", "torch")
    monkeypatch.setenv("PRH_FAST_BACKEND", "triton")
    X = _features(30, 6)
    with caplog.at_level(logging.DEBUG, logger=T.__name__):
        assert torch.equal(knn(X, 4), R.knn(X.double(), 4))
    # the search ran on the triton backend: its statistics record
    assert [r.triton_stats["rows"] for r in caplog.records if hasattr(r, "triton_stats")] == [30]


def test_bad_arguments_name_themselves():
    X = _features(30, 6)
    with pytest.raises(ValueError, match="precision"):
        knn(X, 3, backend="triton", precision="fp8")
    with pytest.raises(ValueError, match="precision"):
        knn(X, 3, backend="triton", precision="fp16")  # float32 features
    with pytest.raises(ValueError, match="precision"):
        knn(X, 3, backend="torch", precision="int4")
    with pytest.raises(ValueError, match="exact"):
        knn(X, 3, backend="triton", exact="yes")
    with pytest.raises(ValueError, match="keys"):
        knn(X, 3, backend="triton", keys=torch.randn(5, 7))
    with pytest.raises(ValueError, match="k"):
        knn(X, 6, backend="triton", keys=torch.randn(5, 6))
    with pytest.raises(ValueError, match="backend='cpu'"):
        knn(X, 3, backend="cpu", keys=X)
    with pytest.raises(ValueError, match="k"):
        T.knn_triton(X, 30, BUDGET)


@pytest.mark.slow
def test_small_memory_budget_chunks_rows():
    X = _features(130, 12, seed=9)
    idx, _ = T.knn_triton(X, 4, 20_000)  # a few rows per chunk
    assert torch.equal(idx, R.knn(X.double(), 4))
