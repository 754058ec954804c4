"""Properties every implementation of the contract (docs/metrics.md) must have, checked on the
fast path: self-alignment, symmetry in (A, B) (cycle_knn excepted), invariance to a shared
permutation of the samples, CKA's invariance to isotropic scaling and translation, lcs
normalisation, and real structure scoring well above chance."""
from __future__ import annotations

import functools

import pytest
import torch
from _data import independent_features, paired_features

from prh_fast import metrics
from prh_fast import reference as R

N = 123
K = 10


@functools.lru_cache(maxsize=None)
def data(dtype=torch.float64, n=N):
    return paired_features(n, 32, 48, seed=11, dtype=dtype)


SYMMETRIC = [
    ("mutual_knn", {"topk": K}),
    ("lcs_knn", {"topk": K}),
    ("edit_distance_knn", {"topk": K}),
    ("cka", {}),
    ("cka", {"kernel_metric": "rbf"}),
    ("unbiased_cka", {}),
    ("unbiased_cka", {"kernel_metric": "rbf", "rbf_sigma": 0.5}),
    ("cknna", {"topk": K, "unbiased": False}),
    ("cknna", {"topk": K, "distance_agnostic": True}),
    ("svcca", {"cca_dim": 5}),
]
ALL = SYMMETRIC + [("cycle_knn", {"topk": K}), ("cknna", {"topk": K})]


def _ids(v):
    return v if isinstance(v, str) else "-".join(f"{a}={b}" for a, b in v.items()) or "default"


# ------------------------------------------------------------------------------ self-alignment
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_self_alignment(dtype):
    A, _ = data(dtype)
    assert metrics.mutual_knn(A, A, K) == 1.0
    assert metrics.lcs_knn(A, A, K) == float(K)
    assert metrics.lcs_knn(A, A, K, normalize=True) == 1.0
    assert metrics.edit_distance_knn(A, A, K) == 1.0
    assert metrics.cka(A, A) == pytest.approx(1.0, abs=1e-5)
    assert metrics.cka(A, A, kernel_metric="rbf") == pytest.approx(1.0, abs=1e-4)
    # unbiased HSIC of unit-norm rows is small, so the +1e-6 in the denominator shows: compare
    # with hsic / (hsic + 1e-6) from the oracle, and with 1 loosely
    assert metrics.unbiased_cka(A, A) == pytest.approx(R.unbiased_cka(A, A), rel=1e-4)
    assert metrics.unbiased_cka(A, A) == pytest.approx(1.0, abs=1e-3)
    assert metrics.cknna(A, A, topk=K) == pytest.approx(1.0, abs=1e-3)
    assert metrics.svcca(A, A, cca_dim=10) == pytest.approx(1.0, abs=1e-6)
    # cycle_knn(A, A) is the share of points that are in some neighbour's list: high, not 1
    assert 0.9 < metrics.cycle_knn(A, A, K) <= 1.0


# ----------------------------------------------------------------------------------- symmetry
@pytest.mark.parametrize("metric,kwargs", SYMMETRIC, ids=_ids)
def test_symmetric_in_A_and_B(metric, kwargs):
    A, B = data()
    ab = metrics.measure(metric, A, B, **kwargs)
    ba = metrics.measure(metric, B, A, **kwargs)
    if metric.endswith("knn"):
        assert ab == ba
    else:
        assert ab == pytest.approx(ba, rel=1e-10, abs=1e-12)


def test_unbiased_cknna_is_not_symmetric():
    # The unbiased estimator's 1ᵀ P Q 1 term is not symmetric for the non-symmetric masked
    # kernels P = M∘K, Q = M∘L (the biased trace(P H Q H) is, by cyclicity); the contract keeps the
    # reference's formula, so swapping A and B moves the score slightly, as in the oracle.
    A, B = data()
    ab, ba = metrics.cknna(A, B, topk=K), metrics.cknna(B, A, topk=K)
    assert ab == pytest.approx(R.cknna(A, B, topk=K), rel=1e-10)
    assert ba == pytest.approx(R.cknna(B, A, topk=K), rel=1e-10)
    assert ab != pytest.approx(ba, rel=1e-6)
    assert ab == pytest.approx(ba, rel=1e-2)


def test_cycle_knn_is_not_symmetric():
    A, B = data()
    ab, ba = metrics.cycle_knn(A, B, 3), metrics.cycle_knn(B, A, 3)
    assert ab == R.cycle_knn(A, B, 3) and ba == R.cycle_knn(B, A, 3)
    assert ab != ba


# --------------------------------------------------------------------------------- permutation
@pytest.mark.parametrize("metric,kwargs", ALL, ids=_ids)
def test_invariant_to_a_shared_permutation_of_the_samples(metric, kwargs):
    A, B = data()  # continuous float64 data: no ties, so relabelling cannot reorder anything
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(1))
    base = metrics.measure(metric, A, B, **kwargs)
    moved = metrics.measure(metric, A[perm], B[perm], **kwargs)
    if metric.endswith("knn"):
        assert moved == pytest.approx(base, abs=1e-12)
    else:
        assert moved == pytest.approx(base, rel=1e-9, abs=1e-12)


def test_different_permutations_destroy_the_alignment():
    A, B = data()
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(2))
    assert metrics.mutual_knn(A, B[perm], K) < 0.5 * metrics.mutual_knn(A, B, K)


# ------------------------------------------------------------------------- scaling / shifting
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cka_invariant_to_isotropic_scaling(dtype, unbiased):
    A, B = data(dtype)
    base = metrics.cka(A, B, unbiased=unbiased)
    # only the +1e-6 in the denominator breaks exact invariance: relative effect <~ 1e-4 here
    assert metrics.cka(A * 3.7, B, unbiased=unbiased) == pytest.approx(base, rel=2e-4)
    assert metrics.cka(A, B * 0.25, unbiased=unbiased) == pytest.approx(base, rel=2e-4)


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
@pytest.mark.parametrize("kernel_metric", ["ip", "rbf"])
def test_cka_invariant_to_translation(metric, kernel_metric):
    A, B = data()
    shift = torch.linspace(-5.0, 5.0, A.shape[1], dtype=torch.float64)
    base = metrics.measure(metric, A, B, kernel_metric=kernel_metric)
    moved = metrics.measure(metric, A + shift, B - 2.0, kernel_metric=kernel_metric)
    assert moved == pytest.approx(base, rel=1e-8, abs=1e-10)
    want = R.measure(metric, A + shift, B - 2.0, kernel_metric=kernel_metric)
    assert moved == pytest.approx(want, rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("metric", ["mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn"])
def test_neighbour_metrics_invariant_to_positive_scaling(metric):
    A, B = data()
    # scaling by a power of two is exact, so not even a near-tie can move
    assert metrics.measure(metric, A * 4.0, B * 0.125, topk=K) == metrics.measure(metric, A, B,
                                                                                   topk=K)


def test_svcca_invariant_to_column_scaling():
    A, B = data()
    scales = torch.logspace(-1, 1, A.shape[1], dtype=torch.float64)
    # exact up to the +1e-8 added to each column's std (~1e-6 relative for the 0.1-scaled ones)
    assert metrics.svcca(A * scales, B, 5) == pytest.approx(metrics.svcca(A, B, 5), rel=1e-5)


# ---------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("k", [1, 5, K])
def test_lcs_normalize_is_raw_over_topk(k):
    A, B = data(torch.float32)
    raw = metrics.lcs_knn(A, B, k)
    assert 0.0 <= raw <= k
    assert metrics.lcs_knn(A, B, k, normalize=True) == pytest.approx(raw / k, abs=1e-15)


def test_cknna_none_is_n_minus_1_and_equals_unbiased_cka():
    A, B = data(n=40)
    assert metrics.cknna(A, B) == metrics.cknna(A, B, topk=39)
    assert metrics.cknna(A, B) == pytest.approx(metrics.unbiased_cka(A, B), rel=1e-9)


# ------------------------------------------------------------------------- ranges and chance
# The reference's biased CKNNA lets each row's own entry (self-similarity 1) into its top-k;
# those diagonal entries swamp the structure (independent features score as high), so the
# above-chance property is checked on the corrected variant (exclude_self=True) there.
CHANCE = [(m, {**kw, "exclude_self": True}) if m == "cknna" and kw.get("unbiased") is False
          else (m, kw) for m, kw in ALL]


@pytest.mark.parametrize("metric,kwargs", CHANCE, ids=_ids)
def test_structure_scores_above_chance(metric, kwargs):
    A, B = paired_features(300, 32, 48, seed=5)
    I, J = independent_features(300, 32, 48, seed=5)
    aligned = metrics.measure(metric, A, B, **kwargs)
    chance = metrics.measure(metric, I, J, **kwargs)
    hi = K if metric == "lcs_knn" else 1.0
    for v in (aligned, chance):
        assert -1.0 <= v <= hi + 1e-9
    assert aligned > chance + 0.04 * hi, (metric, aligned, chance)


def test_mutual_knn_structure_far_above_chance():
    A, B = paired_features(300, 32, 48, seed=5)
    I, J = independent_features(300, 32, 48, seed=5)
    aligned, chance = metrics.mutual_knn(A, B, K), metrics.mutual_knn(I, J, K)
    assert chance < 0.1 and aligned > 5 * chance
