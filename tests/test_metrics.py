"""Every metric of prh_fast.metrics against the float64 oracle (prh_fast.reference).

Parametrised over N (5, 17, 123, 1000), feature dims (3, 32, 96), topk, input dtypes, kNN
backends, non-contiguous views and NumPy inputs. The oracle always receives the *same values* as
the fast path (``A.double()`` of a low-precision tensor), so only the arithmetic differs:

- neighbour metrics: float64 input -> identical lists, identical values. Lower precisions are
  computed in float32, where near-ties may flip (checked row by row by
  ``assert_knn_lists_match``); the value must then equal the oracle's metric evaluated on the
  fast path's own lists, and stay within the share of flipped rows of the float64 value.
- kernel metrics: float64 rtol 1e-8 / atol 1e-10; lower precisions rtol 1e-4 / atol 1e-5.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from _data import (
    DTYPES,
    KNN_BACKENDS,
    TIE_EXACT_BACKENDS,
    assert_knn_lists_match,
    paired_features,
    with_duplicates,
)

from prh_fast import metrics
from prh_fast import reference as R
from prh_fast.knn import knn

NEIGHBOUR_METRICS = ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"]

# (n, da, db) and the topk values tried at that size (every one <= n - 1)
SHAPES = {
    (5, 3, 32): (1, 2, 4),
    (17, 32, 3): (2, 5),
    (123, 32, 96): (1, 5, 10),
    (1000, 96, 32): (10,),
}
NEIGHBOUR_CASES = [(shape, k) for shape, ks in SHAPES.items() for k in ks]


def _case_id(case):
    (n, da, db), k = case
    return f"N{n}-{da}x{db}-k{k}"


@functools.lru_cache(maxsize=None)
def features(n, da, db, dtype):
    """Paired structured features cast to ``dtype`` (cached: reused across many tests)."""
    return paired_features(n, da, db, seed=n + da, dtype=dtype)


def _kw_key(kwargs):
    return tuple(sorted(kwargs.items()))


@functools.lru_cache(maxsize=None)
def oracle(metric, n, da, db, dtype, kw_key):
    """The oracle's value on the float64 copy of the ``dtype`` features (cached)."""
    A, B = features(n, da, db, dtype)
    return R.measure(metric, A.double(), B.double(), **dict(kw_key))


def _exact_lists(dtype, backend):
    # float64 input is computed in float64 by the exact backends; FAISS searches in float32.
    return dtype == torch.float64 and backend != "faiss"


def check_neighbour_metric(metric, A, B, k, backend, exact, want64, what):
    """Assert a neighbour metric's value against the oracle, allowing only near-tie flips."""
    got = metrics.measure(metric, A, B, topk=k, backend=backend)
    assert type(got) is float
    la = knn(A, k, backend=backend)
    lb = knn(B, k, backend=backend)
    A64 = torch.as_tensor(np.asarray(A) if isinstance(A, np.ndarray) else A).double()
    B64 = torch.as_tensor(np.asarray(B) if isinstance(B, np.ndarray) else B).double()
    flips_a = assert_knn_lists_match(la, A64, exact=exact, what=f"{what} knn(feats_A)")
    flips_b = assert_knn_lists_match(lb, B64, exact=exact, what=f"{what} knn(feats_B)")
    if flips_a == 0 and flips_b == 0:
        assert got == pytest.approx(want64, abs=1e-12), f"{what}: {got} vs oracle {want64}"
        return
    # Near-ties flipped: the combinatorial part must still be exact on the lists it used ...
    on_lists = R.FROM_LISTS[metric](la.cpu(), lb.cpu())
    assert got == pytest.approx(on_lists, abs=1e-12), f"{what}: {got} vs oracle-on-lists {on_lists}"
    # ... and, for the per-row metrics, the value moves by at most the share of flipped rows
    # times the per-row range (cycle_knn couples rows through b_i's A-lists: no such bound).
    if metric != "cycle_knn":
        n = A64.shape[0]
        span = k if metric == "lcs_knn" else 1.0
        assert abs(got - want64) <= span * (flips_a + flips_b) / n + 1e-12, what


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", NEIGHBOUR_CASES, ids=_case_id)
@pytest.mark.parametrize("metric", NEIGHBOUR_METRICS)
def test_neighbour_metric_matches_oracle(metric, case, dtype, backend):
    (n, da, db), k = case
    A, B = features(n, da, db, dtype)
    want = oracle(metric, n, da, db, dtype, _kw_key({"topk": k}))
    check_neighbour_metric(metric, A, B, k, backend, _exact_lists(dtype, backend), want,
                           f"{metric}[N={n}, k={k}, {dtype}, {backend}]")


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_lcs_knn_normalize_matches_oracle(normalize, backend):
    A, B = features(123, 32, 96, torch.float64)
    got = metrics.lcs_knn(A, B, 5, normalize=normalize, backend=backend)
    want = R.lcs_knn(A, B, 5, normalize=normalize)
    assert got == pytest.approx(want, abs=1e-12)


# ------------------------------------------------------------------------------ kernel metrics
KERNEL_CASES = [
    ("cka", {}),
    ("cka", {"unbiased": True}),
    ("cka", {"kernel_metric": "rbf"}),
    ("cka", {"kernel_metric": "rbf", "rbf_sigma": 0.5, "unbiased": True}),
    ("unbiased_cka", {}),
    ("unbiased_cka", {"kernel_metric": "rbf", "rbf_sigma": 2.0}),
    ("cknna", {"topk": 2}),
    ("cknna", {"topk": 5}),
    ("cknna", {"topk": 10}),
    ("cknna", {}),
    ("cknna", {"topk": 5, "unbiased": False}),
    ("cknna", {"topk": 5, "distance_agnostic": True}),
    ("cknna", {"topk": 5, "distance_agnostic": True, "unbiased": False}),
    ("svcca", {"cca_dim": 1}),
    ("svcca", {"cca_dim": 3}),
    ("svcca", {}),
]


def _kernel_valid(metric, kwargs, n, da, db):
    if metric == "cknna" and kwargs.get("topk", 2) > n - 1:
        return False
    if metric == "cknna" and "topk" not in kwargs and n > 200:
        # topk=None means N-1: the oracle is cheap, but the torch fallback's list intersection
        # is O(N·k²) (7 s at N=1000); N <= 123 covers the semantics.
        return False
    if metric == "svcca" and kwargs.get("cca_dim", 10) > min(n - 1, da, db):
        return False
    return True


KERNEL_PARAMS = [
    pytest.param(m, kw, shape, id=f"{m}-{'-'.join(f'{a}={b}' for a, b in kw.items()) or 'default'}"
                 f"-N{shape[0]}-{shape[1]}x{shape[2]}")
    for m, kw in KERNEL_CASES
    for shape in SHAPES
    if _kernel_valid(m, kw, *shape)
]


def kernel_tolerance(metric, kwargs, dtype, n):
    """(rtol, atol) of a kernel metric computed from ``dtype`` input vs the float64 oracle."""
    if dtype == torch.float64:
        return 1e-8, 1e-10
    # Measured worst cases on this data are ~2e-7 relative (svcca, cka) and ~5e-8 (cknna, no
    # near-tie flips at these sizes), so the brief's float32 budget holds for every metric.
    return 1e-4, 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric,kwargs,shape", KERNEL_PARAMS)
def test_kernel_metric_matches_oracle(metric, kwargs, shape, dtype):
    n, da, db = shape
    A, B = features(n, da, db, dtype)
    want = oracle(metric, n, da, db, dtype, _kw_key(kwargs))
    got = metrics.measure(metric, A, B, **kwargs)
    assert type(got) is float
    rtol, atol = kernel_tolerance(metric, kwargs, dtype, n)
    assert got == pytest.approx(want, rel=rtol, abs=atol), (
        f"{metric}{kwargs} N={n} {dtype}: got {got!r}, oracle {want!r}"
    )


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("kwargs", [{"topk": 3}, {"topk": 10, "unbiased": False},
                                    {"topk": 7, "distance_agnostic": True}])
def test_cknna_backends_match_oracle(kwargs, dtype, backend):
    A, B = features(123, 32, 96, dtype)
    want = oracle("cknna", 123, 32, 96, dtype, _kw_key(kwargs))
    got = metrics.cknna(A, B, backend=backend, **kwargs)
    tol_dtype = torch.float32 if backend == "faiss" else dtype
    rtol, atol = kernel_tolerance("cknna", kwargs, tol_dtype, 123)
    assert got == pytest.approx(want, rel=rtol, abs=atol)


# ------------------------------------------------------------------ layouts and input types
def _column_major(X):
    return X.T.contiguous().T


def _strided(X):
    n, d = X.shape
    big = torch.zeros(2 * n, 3 * d, dtype=X.dtype)
    big[::2, ::3] = X
    return big[::2, ::3]


LAYOUTS = {"column_major": _column_major, "strided": _strided}
ALL_CASES = [
    ("mutual_knn", {"topk": 5}),
    ("cycle_knn", {"topk": 5}),
    ("lcs_knn", {"topk": 5}),
    ("edit_distance_knn", {"topk": 5}),
    ("cka", {}),
    ("cka", {"kernel_metric": "rbf"}),
    ("unbiased_cka", {}),
    ("cknna", {"topk": 5}),
    ("svcca", {"cca_dim": 5}),
]


def _assert_close_to_oracle(metric, got, want, dtype):
    if metric.endswith("knn"):
        # the shared data has no near-ties at this size, so even float32 lists are exact
        assert got == pytest.approx(want, abs=1e-12)
    else:
        rtol, atol = kernel_tolerance(metric, {}, dtype, 123)
        assert got == pytest.approx(want, rel=rtol, abs=atol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("metric,kwargs", ALL_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_non_contiguous_inputs(metric, kwargs, dtype, layout):
    A, B = features(123, 32, 96, dtype)
    Av, Bv = LAYOUTS[layout](A), LAYOUTS[layout](B)
    assert not Av.is_contiguous() and torch.equal(Av, A)
    got = metrics.measure(metric, Av, Bv, **kwargs)
    _assert_close_to_oracle(metric, got, oracle(metric, 123, 32, 96, dtype, _kw_key(kwargs)),
                            dtype)
    # same values, another memory layout: BLAS may sum in another order, nothing more
    same = metrics.measure(metric, A, B, **kwargs)
    assert got == pytest.approx(same, rel=1e-6 if dtype == torch.float32 else 1e-12, abs=1e-12)


@pytest.mark.parametrize("np_dtype", [np.float16, np.float32, np.float64], ids=str)
@pytest.mark.parametrize("metric,kwargs", ALL_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_numpy_inputs(metric, kwargs, np_dtype):
    A, B = features(123, 32, 96, torch.float64)
    An, Bn = A.numpy().astype(np_dtype), B.numpy().astype(np_dtype)
    got = metrics.measure(metric, An, Bn, **kwargs)
    assert type(got) is float
    want = R.measure(metric, An.astype(np.float64), Bn.astype(np.float64), **kwargs)
    tol_dtype = torch.float64 if np_dtype == np.float64 else torch.float32
    _assert_close_to_oracle(metric, got, want, tol_dtype)
    # a Fortran-ordered (non-contiguous) array gives the same number (up to summation order)
    fortran = metrics.measure(metric, np.asfortranarray(An), np.asfortranarray(Bn), **kwargs)
    assert fortran == pytest.approx(got, rel=1e-6 if np_dtype != np.float64 else 1e-12, abs=1e-12)


def test_mixed_dtypes_compute_in_the_wider():
    A, B = features(123, 32, 96, torch.float64)
    got = metrics.cka(A, B.float())
    want = R.cka(A, B.float().double())
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


# -------------------------------------------------------------------------------- dispatch
def test_supported_metrics_in_reference_order():
    assert metrics.SUPPORTED_METRICS == R.SUPPORTED_METRICS
    assert metrics.AlignmentMetrics.SUPPORTED_METRICS == R.SUPPORTED_METRICS


@pytest.mark.parametrize("metric,kwargs", ALL_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_measure_dispatch_equals_direct_calls(metric, kwargs):
    A, B = features(17, 32, 3, torch.float32)
    kwargs = dict(kwargs)
    if metric == "svcca":
        kwargs["cca_dim"] = 3
    direct = getattr(metrics, metric)(A, B, **kwargs)
    assert type(direct) is float
    assert metrics.measure(metric, A, B, **kwargs) == direct
    AM = metrics.AlignmentMetrics
    assert AM.measure(metric, A, B, **kwargs) == direct
    assert getattr(AM, metric)(A, B, **kwargs) == direct
    assert AM().measure(metric, A, B, **kwargs) == direct  # usable from an instance too


def test_positional_arguments_as_reference():
    A, B = features(17, 32, 3, torch.float64)
    assert metrics.mutual_knn(A, B, 3) == R.mutual_knn(A, B, 3)
    assert metrics.cka(A, B, "rbf", 0.7, True) == pytest.approx(R.cka(A, B, "rbf", 0.7, True),
                                                               rel=1e-8, abs=1e-10)
    assert metrics.cknna(A, B, 4, False, False) == pytest.approx(R.cknna(A, B, 4, False, False),
                                                                 rel=1e-8, abs=1e-10)
    assert metrics.svcca(A, B, 2) == pytest.approx(R.svcca(A, B, 2), rel=1e-8, abs=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("metric,kwargs", ALL_CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_cuda_inputs_match_oracle(metric, kwargs):
    A, B = features(123, 32, 96, torch.float32)
    got = metrics.measure(metric, A.cuda(), B.cuda(), **kwargs)
    assert type(got) is float
    want = oracle(metric, 123, 32, 96, torch.float32, _kw_key(kwargs))
    _assert_close_to_oracle(metric, got, want, torch.float32)


# ------------------------------------------------------------------------------------- ties
@pytest.mark.parametrize("backend", TIE_EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric,kwargs", [(m, {"topk": 7}) for m in NEIGHBOUR_METRICS]
                         + [("cknna", {"topk": 7}), ("cknna", {"topk": 4, "unbiased": False})],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_exact_ties_follow_the_lower_index_rule(metric, kwargs, dtype, backend):
    # integer-valued rows repeated many times: all inner products are exact in every dtype, so
    # the fast path sees the same ties as the oracle and must break them the same way
    A, _ = with_duplicates(150, 5, n_unique=30, seed=1, dtype=dtype)
    B, _ = with_duplicates(150, 3, n_unique=20, seed=2, dtype=dtype)
    got = metrics.measure(metric, A, B, backend=backend, **kwargs)
    want = R.measure(metric, A.double(), B.double(), **kwargs)
    if metric == "cknna":
        assert got == pytest.approx(want, rel=1e-8, abs=1e-10)
    else:
        assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_svcca_with_constant_columns(dtype):
    # a constant column standardises to 0 (std + 1e-8 guards the division): the rank drops by one
    A, B = features(123, 32, 96, dtype)
    A = A.clone()
    A[:, 5] = 0.25
    got = metrics.svcca(A, B, cca_dim=10)
    want = R.svcca(A.double(), B.double(), cca_dim=10)
    rtol, atol = kernel_tolerance("svcca", {}, dtype, 123)
    assert got == pytest.approx(want, rel=rtol, abs=atol)


@pytest.mark.parametrize("metric,kwargs", [
    ("cka", {}), ("unbiased_cka", {}), ("cka", {"kernel_metric": "rbf"}),
    ("unbiased_cka", {"kernel_metric": "rbf", "rbf_sigma": 0.7}), ("svcca", {"cca_dim": 4}),
    ("mutual_knn", {"topk": 5}), ("lcs_knn", {"topk": 5}), ("edit_distance_knn", {"topk": 5}),
    ("cycle_knn", {"topk": 5}), ("cknna", {"topk": 6}),
])
def test_single_pair_metric_is_the_1x1_case_of_align(metric, kwargs):
    """One scorer per metric: ``prh_fast.metrics`` and ``prh_fast.align`` run the same code,
    so a metric equals align's 1 x 1 grid exactly (feature-space linear CKA at these sizes)."""
    import prh_fast

    g = torch.Generator().manual_seed(3)
    A = torch.randn(50, 8, generator=g, dtype=torch.float64)
    B = A[:, :6] + 0.5 * torch.randn(50, 6, generator=g, dtype=torch.float64)
    kwargs = dict(kwargs)
    topk = kwargs.pop("topk", 10)
    got = metrics.measure(metric, A, B, **({"topk": topk} if "knn" in metric else {}),
                          **kwargs)
    res = prh_fast.align([A], [B], metric, topk=topk, normalize=False, **kwargs)
    assert got == float(res.scores[0, 0])
