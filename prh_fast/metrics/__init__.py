"""The eight alignment metrics of *The Platonic Representation Hypothesis*.

Drop-in for the reference's ``metrics.py``: same names, same signatures, same numbers (quirks
included, docs/metrics.md), Python floats out. ``from prh_fast.metrics import AlignmentMetrics``
replaces the reference's import.

Inputs are paired feature matrices ``feats_A [N, Da]`` and ``feats_B [N, Db]`` (torch tensors on
any device, any float dtype -- tensors that require grad are detached: no metric here is
differentiable -- or NumPy arrays, any strides). Computation is float64 for float64 input and
float32 otherwise; scalars are combined in float64. Nothing builds an ``N x N`` matrix.
Features of any finite scale work: products are formed from power-of-two-scaled features.
"""
from __future__ import annotations

import torch

from prh_fast._validate import (as_pair, check_memory_budget, check_positive_float,
                                check_positive_int, check_topk, compute_dtype)
from prh_fast.knn import DEFAULT_MEMORY_BUDGET, knn
from prh_fast.metrics._cknna import (cknna_excludes_self, cknna_lists, cknna_terms,
                                     cknna_values)
from prh_fast.metrics._kernel import cka_ratio, hsic_from_sums, linear_cka, rbf_cka
from prh_fast.metrics._neighbours import neighbour_scores
from prh_fast.metrics._svcca import svcca as _svcca

__all__ = [
    "SUPPORTED_METRICS",
    "AlignmentMetrics",
    "measure",
    "cycle_knn",
    "mutual_knn",
    "lcs_knn",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "edit_distance_knn",
]

SUPPORTED_METRICS = [
    "cycle_knn",
    "mutual_knn",
    "lcs_knn",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "edit_distance_knn",
]


def _lists(feats_A, feats_B, topk, backend):
    A, B = as_pair(feats_A, feats_B)
    k = check_topk(topk, A.shape[0])
    return knn(A, k, backend=backend), knn(B, k, backend=backend), k


def mutual_knn(feats_A, feats_B, topk, *, backend=None) -> float:
    """Mean over samples of ``|knn_A(i) ∩ knn_B(i)| / topk``."""
    a, b, k = _lists(feats_A, feats_B, topk, backend)
    return float(neighbour_scores("mutual", a, b)[0, 0]) / k


def cycle_knn(feats_A, feats_B, topk, *, backend=None) -> float:
    """Share of samples ``i`` found among the A-neighbours of one of their B-neighbours."""
    a, b, _ = _lists(feats_A, feats_B, topk, backend)
    return float(neighbour_scores("cycle", a, b)[0, 0])


def lcs_knn(feats_A, feats_B, topk, *, normalize=False, backend=None) -> float:
    """Mean length of the longest common subsequence of the ordered neighbour lists.

    As the reference, the raw mean length (0..topk) by default; ``normalize=True`` divides by
    ``topk`` (the paper's table calls the metric normalised).
    """
    a, b, k = _lists(feats_A, feats_B, topk, backend)
    v = float(neighbour_scores("lcs", a, b)[0, 0])
    return v / k if normalize else v


def edit_distance_knn(feats_A, feats_B, topk, *, backend=None) -> float:
    """``1 - mean_i(levenshtein(knn_A(i), knn_B(i))) / topk``."""
    a, b, k = _lists(feats_A, feats_B, topk, backend)
    return 1.0 - float(neighbour_scores("edit", a, b)[0, 0]) / k


def cka(feats_A, feats_B, kernel_metric="ip", rbf_sigma=1.0, unbiased=False, *,
        memory_budget=None) -> float:
    """Centred kernel alignment ``hsic(K,L) / (sqrt(hsic(K,K) hsic(L,L)) + 1e-6)``.

    ``kernel_metric='ip'`` (linear, computed in feature space) or ``'rbf'``
    (``exp(-||a_i - a_j||² / (2 rbf_sigma²))``, streamed in row blocks). ``unbiased`` selects the
    unbiased HSIC estimator (needs N >= 4). Features of any scale: products are formed from
    features scaled by a power of two, which is undone exactly.
    """
    A, B = as_pair(feats_A, feats_B)
    n = A.shape[0]
    if kernel_metric not in ("ip", "rbf"):
        raise ValueError(f"kernel_metric: expected 'ip' or 'rbf', got {kernel_metric!r}")
    if unbiased and n < 4:
        raise ValueError(f"unbiased HSIC needs N >= 4 samples, got N = {n} (feats_A/feats_B)")
    if n < 2:
        raise ValueError(f"cka needs at least 2 samples, got N = {n} (feats_A/feats_B)")
    dtype = torch.promote_types(compute_dtype(A), compute_dtype(B))
    budget = check_memory_budget(memory_budget, DEFAULT_MEMORY_BUDGET)
    if kernel_metric == "ip":
        return linear_cka(A, B, dtype, bool(unbiased))
    sigma = check_positive_float(rbf_sigma, "rbf_sigma")
    return rbf_cka(A, B, dtype, sigma, bool(unbiased), budget)


def unbiased_cka(*args, **kwargs) -> float:
    """``cka(..., unbiased=True)``."""
    kwargs["unbiased"] = True
    return cka(*args, **kwargs)


def cknna(feats_A, feats_B, topk=None, distance_agnostic=False, unbiased=True, *,
          backend=None, exclude_self=None) -> float:
    """CKA restricted to mutual k-nearest neighbours (CKNNA).

    ``M = M_K ∘ M_L`` with ``M_P[i, j] = 1`` for ``j`` among the ``topk`` largest entries of
    row ``i`` of ``P``; ``sim(P, Q) = hsic(M∘P, M∘Q)`` (unbiased by default), the score is
    ``sim(K,L) / (sqrt(sim(K,K) sim(L,L)) + 1e-6)`` where ``sim(K,K)`` uses ``M_K`` alone.

    Which entries compete for the top-k, as the reference: with ``unbiased=True`` the diagonal
    is excluded (a point is not its own neighbour); with ``unbiased=False`` the whole row
    competes, so row ``i``'s own entry ``K_ii`` is eligible (on normalised features it usually
    wins: self-similarity 1). ``exclude_self`` overrides that: ``True`` always excludes the
    diagonal (the corrected biased variant), ``False`` never does; ``None`` (default) follows
    the reference.

    ``topk=None`` means ``N - 1`` (the reference crashes there). With ``distance_agnostic`` the
    masked kernels are replaced by the 0/1 mask itself: ``sim = hsic(M, M)`` (the reference's
    version of that branch does not run; this is our documented reading of it).
    """
    A, B = as_pair(feats_A, feats_B)
    n = A.shape[0]
    if unbiased and n < 4:
        raise ValueError(f"unbiased HSIC needs N >= 4 samples, got N = {n} (feats_A/feats_B)")
    k = check_topk(n - 1 if topk is None else topk, n, "topk", minimum=2)
    excl = cknna_excludes_self(unbiased, exclude_self)
    ia, sa = cknna_lists(A, k, backend, excl)
    ib, sb = cknna_lists(B, k, backend, excl)
    sa = cknna_values(ia, sa, bool(unbiased), bool(distance_agnostic))
    sb = cknna_values(ib, sb, bool(unbiased), bool(distance_agnostic))

    def sim(i1, s1, i2, s2):
        t, p, q, pq, qp = cknna_terms(i1, s1, i2, s2)
        return hsic_from_sums(n, t, p, q, pq, unbiased=bool(unbiased), dot_rows_t=qp)

    return cka_ratio(sim(ia, sa, ib, sb), sim(ia, sa, ia, sa), sim(ib, sb, ib, sb))


def svcca(feats_A, feats_B, cca_dim=10) -> float:
    """Mean of the ``cca_dim`` canonical correlations between the top-``cca_dim`` singular
    subspaces of the standardised features. Exact and deterministic (the reference's randomised
    SVD wobbles); see ``prh_fast.metrics._svcca``."""
    A, B = as_pair(feats_A, feats_B)
    n = A.shape[0]
    r = check_positive_int(cca_dim, "cca_dim", minimum=1,
                           maximum=max(1, min(n - 1, A.shape[1], B.shape[1])))
    dtype = torch.promote_types(compute_dtype(A), compute_dtype(B))
    return _svcca(A, B, r, dtype)


_FUNCS = {
    "cycle_knn": cycle_knn,
    "mutual_knn": mutual_knn,
    "lcs_knn": lcs_knn,
    "cka": cka,
    "unbiased_cka": unbiased_cka,
    "cknna": cknna,
    "svcca": svcca,
    "edit_distance_knn": edit_distance_knn,
}


def measure(metric, *args, **kwargs) -> float:
    """``measure('mutual_knn', A, B, topk=10)`` = ``mutual_knn(A, B, topk=10)``."""
    if metric not in _FUNCS:
        raise ValueError(f"metric: unknown metric {metric!r}; supported: {SUPPORTED_METRICS}")
    return _FUNCS[metric](*args, **kwargs)


class AlignmentMetrics:
    """The reference's class of static methods, for ``from prh_fast.metrics import
    AlignmentMetrics``."""

    SUPPORTED_METRICS = SUPPORTED_METRICS
    measure = staticmethod(measure)
    cycle_knn = staticmethod(cycle_knn)
    mutual_knn = staticmethod(mutual_knn)
    lcs_knn = staticmethod(lcs_knn)
    cka = staticmethod(cka)
    unbiased_cka = staticmethod(unbiased_cka)
    cknna = staticmethod(cknna)
    svcca = staticmethod(svcca)
    edit_distance_knn = staticmethod(edit_distance_knn)
