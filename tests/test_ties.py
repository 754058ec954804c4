"""Ties at the boundary of the neighbour lists: ``neighbour_ties`` and
``mutual_knn(ties="expected")`` against direct computations on features with known ties.

The oracles build the dense ``N x N`` float64 score matrix where its ties are exact by
construction: small-integer features (every product and sum exact in any order) or repeated
rows whose scores are read from one Gram matrix of the distinct rows. For tiny cases the
expectation is also enumerated over every tie break.
"""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest
import torch

from prh_fast import metrics
from prh_fast.errors import InputError
from prh_fast.metrics import neighbour_ties
from prh_fast.metrics._ties import expected_mutual
from prh_fast.testing import integer_features, paired_features, with_duplicates


def _dense(X: torch.Tensor) -> np.ndarray:
    """Exact float64 scores of integer-valued rows, diagonal excluded (``-inf``)."""
    S = X.double().numpy() @ X.double().numpy().T
    np.fill_diagonal(S, -np.inf)
    return S


def _grouped(U: torch.Tensor, groups: torch.Tensor) -> np.ndarray:
    """Scores of rows ``U[groups]``: one Gram matrix of the distinct rows, so duplicates tie
    exactly."""
    G = U.double().numpy() @ U.double().numpy().T
    g = groups.numpy()
    S = G[np.ix_(g, g)]
    np.fill_diagonal(S, -np.inf)
    return S


def _oracle(S: np.ndarray, k: int):
    """Per row: (G set, T set, p dict) from dense exact scores."""
    out = []
    for i in range(S.shape[0]):
        row = S[i]
        sk = np.sort(row)[::-1][k - 1]
        G = set(np.flatnonzero(row > sk).tolist())
        T = set(np.flatnonzero(row == sk).tolist())
        p = {j: 1.0 for j in G}
        p.update({j: (k - len(G)) / len(T) for j in T})
        out.append((G, T, p))
    return out


def _oracle_mutual(SA, SB, k):
    a, b = _oracle(SA, k), _oracle(SB, k)
    total = sum(sum(pa[j] * pb.get(j, 0.0) for j in pa) for (_, _, pa), (_, _, pb) in zip(a, b))
    return total / (SA.shape[0] * k)


def _check_structure(t, S, k):
    ref = _oracle(S, k)
    assert t.n == S.shape[0] and t.k == k
    for i, (G, T, _) in enumerate(ref):
        keys = t.keys[t.indptr[i]:t.indptr[i + 1]].tolist()
        tied = t.tied[t.indptr[i]:t.indptr[i + 1]].tolist()
        assert keys == sorted(G | T), i
        assert {j for j, x in zip(keys, tied) if x} == T, i
        assert int(t.n_greater[i]) == len(G) and int(t.n_tied[i]) == len(T)
    frac = np.mean([len(G) + len(T) > k for G, T, _ in ref])
    assert t.tied_fraction == pytest.approx(frac, abs=0)


@pytest.mark.parametrize("n,k", [(17, 1), (17, 4), (17, 16), (40, 7), (9, 8)])
def test_structure_matches_dense_oracle_integer_features(n, k):
    X = integer_features(n, 3, seed=n + k, low=-1, high=2)
    t = neighbour_ties(X, k)
    _check_structure(t, _dense(X), k)
    assert t.distinct_rows == len({tuple(r) for r in X.tolist()})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_repeated_gaussian_rows_tie_exactly(dtype):
    # 8 distinct non-integer rows repeated 128 times: products differ by BLAS rounding, the
    # fixed-order scores do not
    g = torch.Generator().manual_seed(3)
    U = torch.randn(8, 96, generator=g, dtype=torch.float64).to(dtype)
    groups = torch.randperm(1024, generator=g) % 8
    X = U[groups]
    t = neighbour_ties(X, 10)
    assert t.distinct_rows == 8
    S = _grouped(U, groups)
    ref = _oracle(S, 10)
    assert [len(T) for _, T, _ in ref] == t.n_tied.tolist()
    assert [len(G) for G, _, _ in ref] == t.n_greater.tolist()
    assert t.tied_fraction == 1.0
    # every row's tie set is its duplicate group, or a whole other group
    assert set(t.n_tied.tolist()) <= {127, 128}
    # the same layer on both sides: the rule gives 1, the expectation sum_T p^2 / k
    assert metrics.mutual_knn(X, X, 10) == 1.0
    exp = _oracle_mutual(S, S, 10)
    assert metrics.mutual_knn(X, X, 10, ties="expected") == pytest.approx(exp, rel=1e-12)


def test_eight_groups_normalised_value():
    # self-duplicates score highest after normalisation: T_i = the 127 copies, p = 10/127
    X, _ = with_duplicates(1024, 16, n_unique=8, seed=5)
    X = X / X.norm(dim=1, keepdim=True)
    t = neighbour_ties(X, 10)
    assert t.distinct_rows == 8 and t.n_tied.tolist() == [127] * 1024
    assert int(t.n_greater.max()) == 0
    assert metrics.mutual_knn(X, X, 10, ties="expected") == pytest.approx(10 / 127, rel=1e-12)


@pytest.mark.parametrize("n,k", [(101, 5), (64, 1), (33, 32)])
def test_expected_mutual_against_dense_oracle(n, k):
    # A: duplicates plus unique rows, integer-valued; B: quantised paired features
    XA, _ = with_duplicates(n, 4, n_unique=max(2, n // 5), seed=n)
    XA[: n // 4] = integer_features(n // 4, 4, seed=n + 1, low=-4, high=5)
    A, B = paired_features(n, 4, 6, seed=n)
    XB = torch.round(B * 2)
    got = metrics.mutual_knn(XA, XB, k, ties="expected")
    assert got == pytest.approx(_oracle_mutual(_dense(XA), _dense(XB), k), rel=1e-12, abs=1e-15)
    _check_structure(neighbour_ties(XA, k), _dense(XA), k)
    _check_structure(neighbour_ties(XB, k), _dense(XB), k)
    if k == n - 1:
        assert got == pytest.approx(1.0, rel=1e-12)


def _enumerated(SA, SB, k) -> Fraction:
    """Exact expectation of mutual_knn over every equally likely tie break of both sides."""
    total = Fraction(0)
    for (GA, TA, _), (GB, TB, _) in zip(_oracle(SA, k), _oracle(SB, k)):
        ca = list(itertools.combinations(sorted(TA), k - len(GA)))
        cb = list(itertools.combinations(sorted(TB), k - len(GB)))
        s = sum(len((GA | set(x)) & (GB | set(y))) for x in ca for y in cb)
        total += Fraction(s, len(ca) * len(cb))
    return total / (SA.shape[0] * k)


@pytest.mark.parametrize("seed,k", [(0, 2), (1, 3), (2, 1), (3, 5)])
def test_expected_mutual_equals_enumeration(seed, k):
    XA = integer_features(9, 2, seed=seed, low=-1, high=2)
    XB = integer_features(9, 3, seed=seed + 50, low=0, high=2)
    exact = _enumerated(_dense(XA), _dense(XB), k)
    assert metrics.mutual_knn(XA, XB, k, ties="expected") == pytest.approx(float(exact),
                                                                          rel=1e-12)
    # and a random tie break, averaged, comes close (independent tie breaks per side)
    rng = np.random.default_rng(seed)
    SA, SB = _dense(XA), _dense(XB)
    vals = []
    for _ in range(400):
        la = np.lexsort((rng.random(SA.shape), -SA), axis=1)[:, :k]
        lb = np.lexsort((rng.random(SB.shape), -SB), axis=1)[:, :k]
        vals.append(np.mean([len(set(a) & set(b)) for a, b in zip(la, lb)]) / k)
    assert abs(np.mean(vals) - float(exact)) < 5 * np.std(vals) / np.sqrt(len(vals)) + 1e-9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,k", [(123, 10), (31, 1), (31, 30)])
def test_no_ties_expected_equals_rule(dtype, n, k):
    A, B = paired_features(n, 12, 20, seed=n + k)
    A, B = A.to(dtype), B.to(dtype)
    t = neighbour_ties(A, k)
    assert t.tied_fraction == 0.0 and t.distinct_rows == n
    assert t.n_greater.tolist() == [k - 1] * n and t.n_tied.tolist() == [1] * n
    rule = metrics.mutual_knn(A, B, k)
    assert metrics.mutual_knn(A, B, k, ties="expected") == pytest.approx(rule, rel=1e-12)


def test_blocks_do_not_change_the_result():
    X, _ = with_duplicates(57, 5, n_unique=6, seed=2)
    a = neighbour_ties(X, 4)
    b = neighbour_ties(X, 4, memory_budget=2000)  # one row per block
    for f in ("kth", "n_greater", "n_tied", "indptr", "keys", "tied"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_diagnostics_on_constructed_data():
    # 3 copies of e1, 2 of e2 and one unique row: k = 1
    X = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 2 + [[0.6, 0.8]])
    t = neighbour_ties(X, 1)
    assert t.distinct_rows == 3
    # e1 rows: two copies tie (tied); e2 rows: one copy (not tied); the unique row: e2's 0.8
    # twice (tied)
    assert t.n_tied.tolist() == [2, 2, 2, 1, 1, 2]
    assert t.is_tied.tolist() == [True, True, True, False, False, True]
    assert t.tied_fraction == pytest.approx(4 / 6)
    assert t.summary()["tied_rows"] == 4 and t.summary()["max_tie"] == 2
    p = t.probabilities()
    assert p.sum().item() == pytest.approx(6.0)  # each row's probabilities sum to k
    # large scale: float features far outside float32's product range still work
    assert neighbour_ties(X * 1e25, 1).n_tied.tolist() == t.n_tied.tolist()


def test_probabilities_sum_to_k():
    X, _ = with_duplicates(75, 3, n_unique=9, seed=4)
    t = neighbour_ties(X, 6)
    rows = torch.repeat_interleave(torch.arange(75), t.indptr.diff())
    sums = torch.zeros(75, dtype=torch.float64).index_add_(0, rows, t.probabilities())
    assert torch.allclose(sums, torch.full_like(sums, 6.0), rtol=1e-12, atol=0)


def test_bad_arguments():
    A, B = paired_features(20, 4, 4, seed=0)
    with pytest.raises(InputError, match="ties"):
        metrics.mutual_knn(A, B, 3, ties="random")
    with pytest.raises(InputError, match="ties"):
        metrics.mutual_knn(A, B, 3, ties=None)
    with pytest.raises(InputError, match="k"):
        neighbour_ties(A, 20)
    with pytest.raises(InputError, match="memory_budget"):
        neighbour_ties(A, 3, memory_budget=0)
    with pytest.raises(InputError, match="X"):
        neighbour_ties(torch.full((5, 2), float("nan")), 1)
    with pytest.raises(InputError, match="ties_A"):
        expected_mutual(neighbour_ties(A, 3), neighbour_ties(A, 4))


def test_lookup_table_and_direct_scores_agree(monkeypatch):
    # few distinct rows are scored once in a table; the direct path must give the same ties
    from prh_fast.metrics import _ties

    X, groups = with_duplicates(90, 7, n_unique=5, seed=8)
    X = X + 0.1 * torch.randn(5, 7, generator=torch.Generator().manual_seed(1))[groups]
    a = neighbour_ties(X, 20)
    monkeypatch.setattr(_ties, "_pair_table", lambda U, n, k: None)
    b = neighbour_ties(X, 20)
    assert a.distinct_rows == 5 and a.tied_fraction == 1.0
    for f in ("kth", "n_greater", "n_tied", "indptr", "keys", "tied"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
