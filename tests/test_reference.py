"""The oracle (prh_fast.reference) checked against hand-worked cases and independent formulas.

The rest of the suite trusts prh_fast.reference, so it is tested here on its own: small inputs,
alternative derivations of each quantity (set formulas, U-statistics, feature-space forms,
principal angles), and the reference repository's quirks.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from _data import independent_features, paired_features, with_duplicates

from prh_fast import reference as R


# ------------------------------------------------------------------------------------ kNN
def test_knn_ties_go_to_lower_index():
    X = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # Row 0: rows 1 and 3 tie at 1 -> 1 first; row 2: rows 0, 1, 3 tie at 0 -> ascending.
    assert R.knn(X, 1).tolist() == [[1], [0], [0], [0]]
    assert R.knn(X, 3).tolist() == [[1, 3, 2], [0, 3, 2], [0, 1, 3], [0, 1, 2]]


def test_knn_excludes_self_even_when_self_is_not_the_best():
    X = torch.tensor([[1.0], [2.0], [3.0]])  # <x0, x2> = 3 > <x0, x0> = 1
    assert R.knn(X, 1).tolist() == [[2], [2], [1]]
    assert R.knn(X, 2).tolist() == [[2, 1], [2, 0], [1, 0]]


def test_knn_duplicates_lower_index_first():
    X, groups = with_duplicates(30, 4, n_unique=6, dtype=torch.float64)
    lists = R.knn(X, 29)
    G = X @ X.T
    for i in range(30):
        scores = G[i, lists[i]]
        assert bool((scores[:-1] >= scores[1:]).all())
        # within a block of equal scores the indices ascend
        for p in range(28):
            if scores[p] == scores[p + 1]:
                assert lists[i, p] < lists[i, p + 1]


def test_knn_accepts_numpy_and_low_precision():
    A, _ = paired_features(40, 8, 8, dtype=torch.bfloat16)
    assert torch.equal(R.knn(A, 5), R.knn(A.double().numpy(), 5))


# ---------------------------------------------------------------- combinatorial primitives
@pytest.mark.parametrize(
    "a,b,lcs,lev",
    [
        ("ABCBDAB", "BDCABA", 4, 5),
        ("kitten", "sitting", 4, 3),
        ("", "abc", 0, 3),
        ("abc", "abc", 3, 0),
        ("abc", "cba", 1, 2),
        ([1, 2, 3, 4], [4, 3, 2, 1], 1, 4),
    ],
)
def test_lcs_and_levenshtein_textbook_cases(a, b, lcs, lev):
    assert R.longest_common_subsequence(a, b) == lcs
    assert R.levenshtein(a, b) == lev
    assert R.levenshtein(b, a) == lev


def _set_formulas(A, B, k):
    """Neighbour metrics written from the contract's set formulas (docs/metrics.md) with Python
    loops."""
    a, b = R.knn(A, k).tolist(), R.knn(B, k).tolist()
    n = len(a)
    mutual = sum(len(set(a[i]) & set(b[i])) / k for i in range(n)) / n
    cycle = sum(any(i in a[j] for j in b[i]) for i in range(n)) / n
    return mutual, cycle, a, b


@pytest.mark.parametrize("k", [1, 3, 8])
def test_neighbour_metrics_match_set_formulas(k):
    A, B = paired_features(60, 16, 24, dtype=torch.float64, seed=3)
    mutual, cycle, a, b = _set_formulas(A, B, k)
    assert R.mutual_knn(A, B, k) == pytest.approx(mutual, abs=1e-15)
    assert R.cycle_knn(A, B, k) == pytest.approx(cycle, abs=1e-15)
    lcs = np.mean([R.longest_common_subsequence(x, y) for x, y in zip(a, b)])
    assert R.lcs_knn(A, B, k) == pytest.approx(lcs, abs=1e-15)
    assert R.lcs_knn(A, B, k, normalize=True) == pytest.approx(lcs / k, abs=1e-15)
    lev = np.mean([R.levenshtein(x, y) for x, y in zip(a, b)])
    assert R.edit_distance_knn(A, B, k) == pytest.approx(1 - lev / k, abs=1e-15)


def test_cycle_knn_hand_example():
    # 1-D points: A orders them 0 < 1 < 2 < 3; B maps sample i to a different position.
    A = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.1, 0.9], [0.0, 1.0]])
    B = A[[0, 2, 1, 3]]  # samples 1 and 2 swapped in B
    ka, kb = R.knn(A, 1).tolist(), R.knn(B, 1).tolist()
    assert ka == [[1], [0], [3], [2]]
    assert kb == [[2], [3], [0], [1]]
    # i=0: b -> 2, a_2 = 3 != 0 -> miss; i=1: b -> 3, a_3 = 2 -> miss; i=2: b -> 0, a_0 = 1 miss
    assert R.cycle_knn(A, B, 1) == 0.0
    assert R.cycle_knn(A, A, 1) == 1.0
    assert R.mutual_knn(A, B, 1) == 0.0


# -------------------------------------------------------------------------------------- HSIC
def _u_statistic_hsic(K, L):
    """Unbiased HSIC as the U-statistic E[k l] + E[k] E[l] - 2 E[k_ij l_iq] over distinct
    indices (Song et al. 2012, Theorem 2), by brute force; symmetric K, L only."""
    n = K.shape[0]
    idx = range(n)
    t1 = np.mean([K[i, j] * L[i, j] for i, j in itertools.permutations(idx, 2)])
    t2 = np.mean([K[i, j] * L[q, r] for i, j, q, r in itertools.permutations(idx, 4)])
    t3 = np.mean([K[i, j] * L[i, q] for i, j, q in itertools.permutations(idx, 3)])
    return t1 + t2 - 2 * t3


@pytest.mark.parametrize("n", [4, 5, 7])
def test_hsic_unbiased_is_the_u_statistic(n):
    A, B = paired_features(n, 5, 3, dtype=torch.float64, seed=n)
    K, L = (A @ A.T).numpy(), (B @ B.T).numpy()
    got = float(R.hsic_unbiased(torch.from_numpy(K), torch.from_numpy(L)))
    assert got == pytest.approx(_u_statistic_hsic(K, L), rel=1e-10, abs=1e-14)


def test_hsic_unbiased_transposes_the_second_kernel():
    g = torch.Generator().manual_seed(0)
    K = torch.randn(6, 6, generator=g, dtype=torch.float64)
    L = torch.randn(6, 6, generator=g, dtype=torch.float64)
    n = 6
    Kt, Lt = K.clone().fill_diagonal_(0), L.clone().fill_diagonal_(0)
    first = sum(Kt[i, j] * Lt[j, i] for i in range(n) for j in range(n))
    ones = torch.ones(n, dtype=torch.float64)
    want = (first + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (ones @ Kt @ Lt @ ones)) / (n * (n - 3))
    assert float(R.hsic_unbiased(K, L)) == pytest.approx(float(want), rel=1e-12)
    # ... and that the transpose matters for non-symmetric kernels
    no_t = (float((Kt * Lt).sum()) - float(first)) / (n * (n - 3))
    assert abs(no_t) > 1e-3


def test_hsic_biased_feature_space_form():
    A, B = paired_features(50, 7, 9, dtype=torch.float64)
    Ac, Bc = A - A.mean(0), B - B.mean(0)
    want = float(((Ac.T @ Bc) ** 2).sum())  # trace(K H L H) = ||A_cᵀ B_c||_F²
    assert float(R.hsic_biased(A @ A.T, B @ B.T)) == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------------------- CKA
def test_cka_linear_feature_space_form():
    A, B = paired_features(80, 12, 20, dtype=torch.float64, seed=2)
    Ac, Bc = A - A.mean(0), B - B.mean(0)
    kl = ((Ac.T @ Bc) ** 2).sum()
    kk = ((Ac.T @ Ac) ** 2).sum()
    ll = ((Bc.T @ Bc) ** 2).sum()
    want = float(kl / (torch.sqrt(kk * ll) + 1e-6))
    assert R.cka(A, B) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 3.0])
def test_cka_rbf_kernel_matches_cdist(sigma):
    A, B = paired_features(40, 6, 10, dtype=torch.float64, seed=4)
    K = torch.exp(-torch.cdist(A, A) ** 2 / (2 * sigma**2))
    L = torch.exp(-torch.cdist(B, B) ** 2 / (2 * sigma**2))
    for unbiased, h in ((False, R.hsic_biased), (True, R.hsic_unbiased)):
        want = float(h(K, L) / (torch.sqrt(h(K, K) * h(L, L)) + 1e-6))
        got = R.cka(A, B, kernel_metric="rbf", rbf_sigma=sigma, unbiased=unbiased)
        assert got == pytest.approx(want, rel=1e-10)


def test_cka_self_and_scaling():
    A, _ = paired_features(50, 10, 10, dtype=torch.float64)
    assert R.cka(A, A) == pytest.approx(1.0, abs=1e-5)
    assert R.unbiased_cka(A, A) == pytest.approx(1.0, abs=1e-4)
    assert R.cka(A, 3.7 * A) == pytest.approx(1.0, abs=1e-5)
    assert R.unbiased_cka(A, A, kernel_metric="rbf") == R.cka(A, A, "rbf", 1.0, True)


# ------------------------------------------------------------------------------------- CKNNA
def test_cknna_full_neighbourhood_is_unbiased_cka():
    # topk = N-1: M = 11ᵀ - I, and hsic_unbiased zeroes the diagonal anyway.
    A, B = paired_features(30, 6, 9, dtype=torch.float64, seed=5)
    assert R.cknna(A, B, topk=29) == pytest.approx(R.unbiased_cka(A, B), rel=1e-12)
    assert R.cknna(A, B) == R.cknna(A, B, topk=29)


def test_cknna_masks_exclude_self_and_break_ties_low():
    P = torch.tensor([[9.0, 1.0, 1.0, 0.0], [1.0, 9.0, 2.0, 2.0],
                      [5.0, 5.0, 9.0, 5.0], [0.0, 3.0, 3.0, 9.0]], dtype=torch.float64)
    M = R._topk_mask(P, 2, exclude_self=True)
    assert M.tolist() == [[0, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 1, 0]]
    # the reference's biased variant: the whole row competes, so the diagonal (9) wins here
    M = R._topk_mask(P, 2, exclude_self=False)
    assert M.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1]]


def test_cknna_hand_formula_small():
    A, B = paired_features(12, 4, 5, dtype=torch.float64, seed=6)
    k = 4
    K, L = A @ A.T, B @ B.T

    def mask(P, self_ok):
        # the reference: the diagonal is masked out only for the unbiased estimator
        M = torch.zeros_like(P)
        for i in range(P.shape[0]):
            order = sorted((j for j in range(P.shape[0]) if self_ok or j != i),
                           key=lambda j: (-P[i, j], j))
            M[i, order[:k]] = 1
        return M

    def sim(P, Q, h, self_ok):
        M = mask(P, self_ok) * mask(Q, self_ok)
        return h(M * P, M * Q)

    for unbiased, h in ((True, R.hsic_unbiased), (False, R.hsic_biased)):
        for excl in (None, True, False):
            self_ok = (not unbiased) if excl is None else not excl
            kl, kk, ll = sim(K, L, h, self_ok), sim(K, K, h, self_ok), sim(L, L, h, self_ok)
            want = float(kl / (torch.sqrt(kk * ll) + 1e-6))
            got = R.cknna(A, B, topk=k, unbiased=unbiased, exclude_self=excl)
            assert got == pytest.approx(want, rel=1e-12)
            M = mask(K, self_ok) * mask(L, self_ok)
            MK, ML = mask(K, self_ok), mask(L, self_ok)
            want_da = float(h(M, M) / (torch.sqrt(h(MK, MK) * h(ML, ML)) + 1e-6))
            got_da = R.cknna(A, B, topk=k, distance_agnostic=True, unbiased=unbiased,
                             exclude_self=excl)
            assert got_da == pytest.approx(want_da, rel=1e-12)
    # the biased variant with self eligible differs from the self-excluded one here
    assert R.cknna(A, B, topk=k, unbiased=False) != pytest.approx(
        R.cknna(A, B, topk=k, unbiased=False, exclude_self=True), rel=1e-3)


@pytest.mark.parametrize("topk", [0, 1])
def test_cknna_topk_below_two_raises(topk):
    A, B = paired_features(10, 4, 4)
    with pytest.raises(ValueError, match="topk"):
        R.cknna(A, B, topk=topk)


# ------------------------------------------------------------------------------------- SVCCA
def _svcca_principal_angles(A, B, r):
    """SVCCA as the cosines of the principal angles between the centred top-r subspaces."""

    def basis(X):
        X = X - X.mean(0)
        X = X / (X.std(0) + 1e-8)
        U = torch.linalg.svd(X, full_matrices=False)[0][:, :r]
        return torch.linalg.qr(U - U.mean(0))[0]

    return float(torch.linalg.svdvals(basis(A).T @ basis(B)).mean())


@pytest.mark.parametrize("r", [1, 3, 10])
def test_svcca_equals_principal_angles(r):
    A, B = paired_features(90, 16, 24, dtype=torch.float64, seed=7)
    assert R.svcca(A, B, cca_dim=r) == pytest.approx(_svcca_principal_angles(A, B, r), rel=1e-10)


def test_svcca_invariant_to_column_scaling_and_order():
    A, _ = paired_features(70, 12, 12, dtype=torch.float64)
    scales = torch.linspace(0.5, 4.0, 12, dtype=torch.float64)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert R.svcca(A, (A * scales)[:, perm], cca_dim=5) == pytest.approx(1.0, abs=1e-10)


# ---------------------------------------------------------------------- structure and dispatch
def test_structured_data_beats_chance():
    A, B = paired_features(300, 32, 48)
    I, J = independent_features(300, 32, 48)
    k = 10
    assert R.mutual_knn(A, B, k) > 5 * R.mutual_knn(I, J, k)
    assert R.mutual_knn(A, B, k) > 0.2
    assert R.cycle_knn(A, B, k) > 0.8
    assert R.cka(A, B) > R.cka(I, J) + 0.2
    assert R.unbiased_cka(A, B) > 0.3 > abs(R.unbiased_cka(I, J))


def test_measure_dispatch_and_types():
    A, B = paired_features(20, 4, 6)
    for m in R.SUPPORTED_METRICS:
        kw = {"topk": 3} if ("knn" in m or m == "cknna") else {}
        kw.update({"cca_dim": 3} if m == "svcca" else {})
        v = R.measure(m, A, B, **kw)
        assert type(v) is float
        assert v == getattr(R, m)(A, B, **kw)
    with pytest.raises(ValueError, match="metric"):
        R.measure("no_such_metric", A, B)


@pytest.mark.parametrize(
    "call,arg",
    [
        (lambda A, B: R.mutual_knn(A.long(), B, 2), "feats_A"),
        (lambda A, B: R.cka(A, B[:-1]), "samples"),
        (lambda A, B: R.mutual_knn(A, B, 0), "topk"),
        (lambda A, B: R.mutual_knn(A, B, 10), "topk"),
        (lambda A, B: R.mutual_knn(A, B, 2.0), "topk"),
        (lambda A, B: R.cka(A, B, kernel_metric="poly"), "kernel_metric"),
        (lambda A, B: R.svcca(A, B, cca_dim=0), "cca_dim"),
        (lambda A, B: R.unbiased_cka(A[:3], B[:3]), "N >= 4"),
        (lambda A, B: R.cka(A.unsqueeze(0), B), "feats_A"),
        (lambda A, B: R.cka(A, B * math.nan), "feats_B"),
    ],
)
def test_oracle_validates(call, arg):
    A, B = paired_features(10, 4, 4)
    with pytest.raises(ValueError, match=arg):
        call(A, B)
