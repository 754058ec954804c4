"""Same numbers as the reference, everywhere (numerics of the shared mechanisms).

- CKNNA's masks follow the reference: the diagonal competes for the top-k unless unbiased, in
  ``prh_fast.metrics``, ``align``, the streamed grid path and the package oracle, checked
  against a float64 oracle written here from the wording of docs/metrics.md; ``exclude_self``
  overrides.
- Scale: features times 1e20 or 1e-30 (float32) give the unscaled answer through the pipeline
  (row normalisation is scale-free), raw kNN lists are the unscaled ones, kernel metrics are
  the formula's value (never NaN, never a silent 0 or 1), or a ValueError says why not.
- Autograd tensors and negative-stride arrays are accepted; ``memory_budget`` and
  ``rbf_sigma`` are checked by one validator each, naming the argument.
- Exact duplicates tie exactly: lists equal a brute-force oracle (one fixed summation order
  per pair, ties to the lower index) on duplicate-heavy float64 and float32 data.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _data import HAS_NATIVE, TIE_EXACT_BACKENDS

import prh_fast
from prh_fast import metrics
from prh_fast import reference as R
from prh_fast.knn import knn
from prh_fast.prepare import prepare_features

needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="native prh_fast._C not built")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def latent_pair(n=201, da=40, db=28, rank=5, noise=0.3, seed=0, dtype=torch.float32,
                normalize=True):
    """Two views of one low-rank latent plus independent noise (real shared structure)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    A = torch.tanh(Z @ torch.randn(rank, da, generator=g, dtype=torch.float64))
    B = torch.relu(Z @ torch.randn(rank, db, generator=g, dtype=torch.float64))
    A = A + noise * torch.randn(n, da, generator=g, dtype=torch.float64)
    B = B + noise * torch.randn(n, db, generator=g, dtype=torch.float64)
    if normalize:
        A, B = F.normalize(A, dim=1), F.normalize(B, dim=1)
    return A.to(dtype), B.to(dtype)


def duplicate_heavy(n=1000, d=64, n_unique=250, seed=0, dtype=torch.float64):
    """Gaussian unit rows (not integers: products round), each repeated ~n/n_unique times at
    random positions."""
    g = torch.Generator().manual_seed(seed)
    U = F.normalize(torch.randn(n_unique, d, generator=g, dtype=torch.float64), dim=1)
    return U[torch.randperm(n, generator=g) % n_unique].to(dtype)


def write_store(path, layers, dtype="float32"):
    """A store folder of ``layers`` (list of ``[N, D]``), written in odd-sized shards."""
    from prh_fast.store import StoreWriter, open_store

    w = StoreWriter(str(path), dtype=dtype, shard_rows=97)
    n = layers[0].shape[0]
    for a in range(0, n, 113):
        w.append([x[a:a + 113] for x in layers])
    return open_store(w.finish()).path


# --------------------------------------------------------------------------------------------
# an oracle from the contract's wording, in float64 with dense N x N matrices
# --------------------------------------------------------------------------------------------
def spec_hsic(K, L, unbiased):
    n = K.shape[0]
    if not unbiased:  # trace(K H L H), H = I - 11ᵀ/N
        H = torch.eye(n, dtype=K.dtype) - 1.0 / n
        return torch.trace(K @ H @ L @ H)
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    one = torch.ones(n, dtype=K.dtype)
    return ((Kt * Lt.T).sum() + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ Kt @ Lt @ one)) / (n * (n - 3))


def spec_cknna(A, B, topk, unbiased=True, distance_agnostic=False, self_eligible=None):
    """docs/metrics.md, "cknna": the diagonal is set to -inf only when unbiased;
    ``self_eligible`` overrides. Ties to the lower index."""
    A, B = A.double(), B.double()
    n = A.shape[0]
    K, L = A @ A.T, B @ B.T
    if self_eligible is None:
        self_eligible = not unbiased

    def mask(P):
        Ph = P.clone()
        if not self_eligible:
            Ph.fill_diagonal_(float("-inf"))
        M = torch.zeros_like(P)
        for i in range(n):
            order = sorted(range(n), key=lambda j: (-float(Ph[i, j]), j))[:topk]
            M[i, order] = 1.0
        return M

    mk, ml = mask(K), mask(L)

    def sim(P, Q, MP, MQ):
        M = MP * MQ
        if distance_agnostic:
            return spec_hsic(M, M, unbiased)
        return spec_hsic(M * P, M * Q, unbiased)

    kl, kk, ll = sim(K, L, mk, ml), sim(K, K, mk, mk), sim(L, L, ml, ml)
    return float(kl / (torch.sqrt(kk * ll) + 1e-6))


# --------------------------------------------------------------------------------------------
# 1. CKNNA masks
# --------------------------------------------------------------------------------------------
CKNNA_CASES = [
    dict(unbiased=False), dict(unbiased=True), dict(unbiased=False, exclude_self=True),
    dict(unbiased=True, exclude_self=False), dict(unbiased=False, distance_agnostic=True),
]


@pytest.mark.parametrize("kw", CKNNA_CASES, ids=lambda kw: "-".join(f"{a}={b}" for a, b in
                                                                     kw.items()))
@pytest.mark.parametrize("backend", TIE_EXACT_BACKENDS)
@pytest.mark.slow
def test_cknna_equals_spec_oracle(kw, backend):
    A, B = latent_pair()
    kw = dict(kw)
    excl = kw.pop("exclude_self", None)
    for k in (5, 10):
        want = spec_cknna(A, B, k, self_eligible=None if excl is None else not excl, **kw)
        got = metrics.cknna(A, B, topk=k, backend=backend, exclude_self=excl, **kw)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (k, got, want)
        assert R.cknna(A, B, topk=k, exclude_self=excl, **kw) == pytest.approx(want, rel=1e-12)


def test_cknna_biased_default_is_not_the_self_excluded_value():
    # the finding: the reference's biased CKNNA lets the diagonal win; on these features the
    # two readings differ by far more than rounding
    A, B = latent_pair()
    ref = metrics.cknna(A, B, topk=10, unbiased=False)
    corrected = metrics.cknna(A, B, topk=10, unbiased=False, exclude_self=True)
    assert abs(ref - corrected) > 0.05
    assert ref == pytest.approx(spec_cknna(A, B, 10, unbiased=False), rel=1e-9)


def test_cknna_align_and_grid_follow_the_reference_masks(tmp_path, caplog):
    A, B = latent_pair(n=151)
    X = torch.stack([A, A * 0.5 + 0.1], dim=1)  # [N, 2, D] (layer 1: not normalised)
    for kw in (dict(unbiased=False), dict(unbiased=False, exclude_self=True)):
        res = prh_fast.align(X, [B], "cknna", topk=7, **kw)
        for i in range(2):
            a = F.normalize(X[:, i].double(), dim=1)
            want = spec_cknna(a, F.normalize(B.double(), dim=1), 7, unbiased=False,
                              self_eligible=not kw.get("exclude_self", False))
            assert float(res.scores[i, 0]) == pytest.approx(want, rel=1e-6), (kw, i)
    # the grid from stores: lists streamed from the store (and cached), same values
    caplog.set_level("DEBUG", logger="prh_fast.store._stream")

    def streamed():  # searches and cache hits, from the stream's DEBUG records
        return sum(r.stream_count for r in caplog.records
                   if getattr(r, "stream_event", None) in ("knn_searches", "knn_cache_hits"))

    px = write_store(tmp_path / "x", [X[:, 0], X[:, 1]])
    py = write_store(tmp_path / "y", [B])
    for kw in (dict(unbiased=False), dict(unbiased=True, exclude_self=False)):
        mem = prh_fast.align(X, [B], "cknna", topk=7, **kw)
        seen = streamed()
        got = prh_fast.align(px, py, "cknna", topk=7, stream=True, **kw)
        # streamed (or read from the store's cache), not loaded
        assert streamed() > seen
        torch.testing.assert_close(got.scores, mem.scores, rtol=1e-12, atol=1e-12)


def test_cknna_exclude_self_must_be_a_bool():
    A, B = latent_pair(n=31)
    with pytest.raises(ValueError, match="exclude_self"):
        metrics.cknna(A, B, topk=4, exclude_self="yes")
    with pytest.raises(ValueError, match="exclude_self"):
        prh_fast.align([A], [B], "cknna", topk=4, exclude_self=1)


def test_knn_include_self_is_the_whole_row_top_k():
    A = duplicate_heavy(n=120, d=16, n_unique=40)
    G = A @ A.T
    want = torch.tensor([sorted(range(120), key=lambda j: (-float(G[i, j]), j))[:6]
                         for i in range(120)])
    for backend in ("cpu", "torch") if HAS_NATIVE else ("torch",):
        got = knn(A, 6, include_self=True, backend=backend)
        # rows tie with their duplicates at self-similarity: the lower index comes first
        assert torch.equal(got, want), backend


# --------------------------------------------------------------------------------------------
# 2. scale
# --------------------------------------------------------------------------------------------
SCALES = [2.0**66, 2.0**-100, 1e20, 1e-30]


def test_normalize_rows_is_scale_free_and_reference_compatible():
    from prh_fast.prepare import normalize_rows, row_norms

    x = torch.randn(64, 33)
    assert torch.equal(normalize_rows(x), F.normalize(x, p=2, dim=-1))
    assert torch.equal(normalize_rows(x.double()), F.normalize(x.double(), p=2, dim=-1))
    for s in (2.0**66, 2.0**-100):  # exact scales: bit-equal
        assert torch.equal(normalize_rows(x * s), normalize_rows(x))
    for s in (1e20, 1e-30, 1e36):
        y = normalize_rows(x * s)
        torch.testing.assert_close(y, F.normalize(x, dim=-1), rtol=0, atol=3e-7)
    z = torch.zeros(3, 5)
    z[1] = 1e-44  # subnormal float32 row
    y = normalize_rows(z)
    assert torch.equal(y[0], torch.zeros(5)) and y[1].norm().item() == pytest.approx(1, abs=1e-6)
    big = torch.full((2, 4), 1e300, dtype=torch.float64)
    assert torch.allclose(row_norms(big), torch.full((2,), 2e300, dtype=torch.float64))


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("metric", metrics.SUPPORTED_METRICS)
def test_pipeline_is_scale_free(scale, metric):
    A, B = latent_pair(normalize=False)
    want = prh_fast.compute_score([A], [B], metric, topk=10)
    got = prh_fast.compute_score([A * scale], [B * scale], metric, topk=10)
    assert got[1] == want[1]
    if scale in (2.0**66, 2.0**-100):  # exact scaling: identical after normalisation
        assert got[0] == want[0]
    else:
        assert got[0] == pytest.approx(want[0], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_raw_knn_lists_are_the_unscaled_lists(scale):
    A, B = latent_pair(normalize=False)
    for backend in (["cpu"] if HAS_NATIVE else []) + ["torch"]:
        assert torch.equal(knn(A * scale, 10, backend=backend), knn(A, 10, backend=backend))
    for name in ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"):
        want = metrics.measure(name, A, B, topk=10)
        assert metrics.measure(name, A * scale, B * scale, topk=10) == want, name
    assert metrics.mutual_knn(A * scale, B * scale, 10) < 0.9  # not a silent perfect score


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_raw_kernel_metrics_are_the_formula_value(scale):
    A, B = latent_pair(n=101, normalize=False)
    As, Bs = A * scale, B * scale  # float32, as a user would pass them
    A64, B64 = As.double(), Bs.double()  # the same values: the oracle runs in float64
    # at 1e-30 the RBF kernels are all ones up to ~1e-60: the score is 0 up to the oracle's own
    # rounding of the centring (~1e-20); everything else is compared relatively, however small
    rbf_abs = 1e-15 if scale < 1 else 1e-300
    cases = [("cka", {}, 1e-300), ("unbiased_cka", {}, 1e-300),
             ("cka", {"kernel_metric": "rbf"}, rbf_abs), ("cknna", {"topk": 10}, 1e-300),
             ("cknna", {"topk": 10, "unbiased": False}, 1e-300), ("svcca", {"cca_dim": 5}, 0)]
    for name, kw, atol in cases:
        got = metrics.measure(name, As, Bs, **kw)
        want = R.measure(name, A64, B64, **kw)
        assert np.isfinite(got), (name, kw, got)
        assert got == pytest.approx(want, rel=2e-4, abs=atol), (name, kw, got, want)


def test_float64_features_far_out_of_range():
    A, B = latent_pair(n=61, normalize=False, dtype=torch.float64)
    for s in (1e200, 1e-200):
        assert torch.equal(knn(A * s, 5), knn(A, 5))
        assert metrics.cka(A * s, B * s) == pytest.approx(
            R.cka(A * s, B * s) if s < 1 else metrics.cka(A, B), rel=1e-6)
        assert prh_fast.compute_score([A * s], [B * s], "cknna", topk=5)[0] == pytest.approx(
            prh_fast.compute_score([A], [B], "cknna", topk=5)[0], rel=1e-9)


def test_scores_out_of_the_dtype_range_are_an_error_not_inf():
    from prh_fast.knn import _exact

    A, _ = latent_pair(n=50, normalize=False)
    idx = knn(A * 1e20, 5)  # the lists are fine
    assert torch.equal(idx, knn(A, 5))
    with pytest.raises(ValueError, match="exceed the torch.float32 range"):
        knn(A * 1e20, 5, return_scores=True)
    _, v = knn((A * 1e20).double(), 5, return_scores=True)  # float64 holds them
    assert bool(torch.isfinite(v).all())
    # the search refuses non-finite scores it produced itself
    e = torch.zeros(2, dtype=torch.float64)
    cand = torch.tensor([[1, 2], [0, 2]])
    with pytest.raises(ValueError, match="non-finite inner products"):
        _exact.finish(cand, torch.tensor([[float("inf"), 1.0], [1.0, 0.5]]),
                      torch.ones(2, 2, dtype=torch.float64), 1, e, False)


def test_one_pass_kernel_sums_in_range_or_named():
    from prh_fast.store._moments import TensorSource, kernel_scores

    A, B = latent_pair(n=40, normalize=False, dtype=torch.float64)
    As, Bs = A.float() * 1e20, B.float() * 1e20  # fine in the float64 sums
    for metric, ref in (("cka", R.cka), ("unbiased_cka", R.unbiased_cka)):
        got = float(kernel_scores(TensorSource([As]), TensorSource([Bs]), metric)[0, 0])
        assert got == pytest.approx(ref(As.double(), Bs.double()), rel=1e-6), metric
    with pytest.raises(ValueError, match="overflow"):  # float64 features ~1e200 cannot square
        kernel_scores(TensorSource([A * 1e200]), TensorSource([B]), "cka")


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_stream_search_of_out_of_range_features(tmp_path, scale):
    from prh_fast.store._stream import stream_knn

    A, _ = latent_pair(n=301, normalize=False)
    path = write_store(tmp_path / "s", [A * scale])
    for backend in (["cpu"] if HAS_NATIVE else []) + ["torch"]:
        got = stream_knn(path, 0, 8, normalize=False, backend=backend, cache=False)
        assert torch.equal(got, knn(A * scale, 8)), backend
        assert torch.equal(got, knn(A, 8)), backend


@pytest.mark.parametrize("sigma", [1e-30, 1e-150])
def test_tiny_rbf_sigma_is_computed_stably(sigma):
    A, B = latent_pair(n=60, normalize=False, dtype=torch.float64)
    A[7], B[7] = A[3], B[3]  # an exact duplicate: kernel value 1 for any sigma
    for kw in ({}, {"unbiased": True}):
        want = R.cka(A, B, "rbf", sigma, **kw)
        got = metrics.cka(A, B, kernel_metric="rbf", rbf_sigma=sigma, **kw)
        assert np.isfinite(got) and got == pytest.approx(want, rel=1e-9), (kw, got, want)
        got32 = metrics.cka(A.float(), B.float(), kernel_metric="rbf", rbf_sigma=sigma, **kw)
        assert got32 == pytest.approx(want, rel=1e-6), (kw, got32, want)
    res = prh_fast.align([A], [B], "cka", kernel_metric="rbf", rbf_sigma=sigma, normalize=False)
    assert float(res.scores[0, 0]) == pytest.approx(R.cka(A, B, "rbf", sigma), rel=1e-9)


# --------------------------------------------------------------------------------------------
# 3. autograd tensors, negative strides, one validator per argument
# --------------------------------------------------------------------------------------------
def test_tensors_that_require_grad_are_accepted():
    A, B = latent_pair(n=80)
    Ag, Bg = A.clone().requires_grad_(), B.clone().requires_grad_()
    for name in metrics.SUPPORTED_METRICS:
        kw = {"topk": 5} if "knn" in name or name == "cknna" else {}
        assert metrics.measure(name, Ag, Bg, **kw) == metrics.measure(name, A, B, **kw), name
    for backend in (["cpu"] if HAS_NATIVE else []) + ["torch"]:
        assert torch.equal(knn(Ag, 5, backend=backend), knn(A, 5, backend=backend))
    X = torch.stack([A, A.flip(1)], dim=1).requires_grad_()
    assert prh_fast.compute_score(X, [Bg], "mutual_knn", topk=5) == \
        prh_fast.compute_score(X.detach(), [B], "mutual_knn", topk=5)
    out = prepare_features(X, q=0.9)
    assert torch.equal(out, prepare_features(X.detach(), q=0.9))
    from prh_fast.distributed import knn as dknn

    assert torch.equal(dknn(Ag, 5), knn(A, 5))


def test_negative_stride_arrays_are_accepted():
    A, B = latent_pair(n=70)
    a, b = A.numpy()[::-1], B.numpy()[:, ::-1]
    ac, bc = np.ascontiguousarray(a), np.ascontiguousarray(b)
    assert metrics.mutual_knn(a, b, 5) == metrics.mutual_knn(ac, bc, 5)
    assert metrics.cka(a, b) == metrics.cka(ac, bc)
    assert torch.equal(knn(a, 5), knn(ac, 5))
    x3 = np.stack([ac, ac * 2], axis=1)[::-1]
    assert prh_fast.compute_score(x3, [bc[::-1]], "cknna", topk=5) == prh_fast.compute_score(
        np.ascontiguousarray(x3), [np.ascontiguousarray(bc[::-1])], "cknna", topk=5)
    np.testing.assert_array_equal(prepare_features(x3, q=0.9),
                                  prepare_features(np.ascontiguousarray(x3), q=0.9))


BAD_BUDGETS = ["x", 0, -5, 1.5, True, None.__class__]


@pytest.mark.parametrize("bad", BAD_BUDGETS, ids=repr)
def test_memory_budget_is_checked_by_name_everywhere(tmp_path, bad):
    from prh_fast.distributed import knn as dknn
    from prh_fast.store._moments import TensorSource, kernel_scores
    from prh_fast.store._stream import StreamPrep, stream_knn

    A, B = latent_pair(n=40)
    path = write_store(tmp_path / "s", [A])
    calls = [
        lambda: knn(A, 3, memory_budget=bad),
        lambda: metrics.cka(A, B, memory_budget=bad),
        lambda: metrics.cka(A, B, kernel_metric="rbf", memory_budget=bad),
        lambda: prh_fast.align([A], [B], "cka", memory_budget=bad),
        lambda: stream_knn(path, 0, 3, memory_budget=bad),
        lambda: StreamPrep(path, memory_budget=bad),
        lambda: kernel_scores(TensorSource([A]), TensorSource([B]), "cka", memory_budget=bad),
        lambda: dknn(A, 3, memory_budget=bad),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="memory_budget"):
            call()


@pytest.mark.parametrize("bad", [None, "1", True, 0.0, -1.0, float("nan"), float("inf")],
                         ids=repr)
def test_rbf_sigma_is_checked_by_name(bad):
    A, B = latent_pair(n=30)
    with pytest.raises(ValueError, match="rbf_sigma"):
        metrics.cka(A, B, kernel_metric="rbf", rbf_sigma=bad)
    with pytest.raises(ValueError, match="rbf_sigma"):
        prh_fast.align([A], [B], "cka", kernel_metric="rbf", rbf_sigma=bad)
    assert metrics.cka(A, B, kernel_metric="rbf", rbf_sigma=np.float32(1.0)) == metrics.cka(
        A, B, kernel_metric="rbf", rbf_sigma=1)


# --------------------------------------------------------------------------------------------
# 4. exact duplicates tie exactly
# --------------------------------------------------------------------------------------------
def fixed_order_oracle(X, k, include_self=False):
    """Lists from scores summed in one fixed order per pair (NumPy's extended-precision
    matmul is a plain loop), sorted by (score desc, index asc)."""
    Xl = X.double().numpy().astype(np.longdouble)
    G = Xl @ Xl.T
    n = X.shape[0]
    if not include_self:
        G[np.arange(n), np.arange(n)] = -np.inf
    order = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), -G), axis=1)
    return torch.from_numpy(np.ascontiguousarray(order[:, :k]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", TIE_EXACT_BACKENDS)
@pytest.mark.slow
def test_duplicate_rows_tie_exactly(dtype, backend):
    X = duplicate_heavy(dtype=dtype)
    for k in (3, 10):
        want = fixed_order_oracle(X, k)
        got = knn(X, k, backend=backend)
        assert int((got != want).any(1).sum()) == 0, k
        # a tiny budget: other tiles, other BLAS sums, the same lists
        assert torch.equal(knn(X, k, backend=backend, memory_budget=1 << 12), want)
    assert torch.equal(knn(X, 4, include_self=True, backend=backend),
                       fixed_order_oracle(X, 4, include_self=True))


@needs_native
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_duplicate_rows_tie_exactly_when_streamed(tmp_path, dtype):
    from prh_fast.store._stream import stream_knn

    X = duplicate_heavy(n=600, d=24, n_unique=150, dtype=getattr(torch, dtype))
    path = write_store(tmp_path / "s", [X], dtype)
    want = fixed_order_oracle(X, 7)
    for backend in ("cpu", "torch"):
        for budget in (None, 4 << 20):
            got = stream_knn(path, 0, 7, normalize=False, backend=backend,
                             memory_budget=budget, cache=False)
            assert torch.equal(got, want), (backend, budget)


def test_fixed_order_score_depends_on_the_rows_only():
    from prh_fast.knn import _exact

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        X = torch.randn(50, 37, generator=g).to(dtype)
        X[40] = X[2]
        X[41] = X[2]
        i = torch.tensor([5, 5, 5, 9])
        j = torch.tensor([2, 40, 41, 41])
        for f in (_exact.fixed_dots, lambda X, Y, i, j: _exact._tree_dots(X[i], Y[j])):
            v = f(X, X, i, j)
            assert v[0] == v[1] == v[2], dtype
            # sliced / offset views of the same rows: same bits
            w = f(X[1:], X[2:], i - 1, j - 2)
            assert torch.equal(v, w)
        exact = (X[i].double() * X[j].double()).sum(1)
        torch.testing.assert_close(_exact.fixed_dots(X, X, i, j), exact, rtol=1e-14, atol=1e-14)


def test_align_on_store_folders_in_a_fresh_process(tmp_path):
    # `import prh_fast` loads nothing but the settings; the path runner that align() needs for
    # folders is registered when prh_fast.align is first looked up
    import subprocess
    import sys

    A, B = latent_pair(n=90)
    px, py = write_store(tmp_path / "x", [A]), write_store(tmp_path / "y", [B])
    code = ("import sys, prh_fast\n"
            "r = prh_fast.align(sys.argv[1], sys.argv[2], 'mutual_knn', topk=5)\n"
            "print(float(r.scores[0, 0]))")
    out = subprocess.run([sys.executable, "-c", code, str(px), str(py)], capture_output=True,
                         text=True, check=True)
    want = float(prh_fast.align(A[:, None], B[:, None], "mutual_knn", topk=5).scores[0, 0])
    assert float(out.stdout.strip()) == pytest.approx(want, abs=1e-12)
