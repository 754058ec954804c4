"""The eight alignment metrics of *The Platonic Representation Hypothesis*.

Drop-in for the reference's ``metrics.py``: same names, same signatures, same numbers (quirks
included, docs/metrics.md), Python floats out. ``from prh_fast.metrics import AlignmentMetrics``
replaces the reference's import.

Inputs are paired feature matrices ``feats_A [N, Da]`` and ``feats_B [N, Db]`` (torch tensors on
any device, any float dtype -- tensors that require grad are detached: no metric here is
differentiable -- or NumPy arrays, any strides). Computation is float64 for float64 input and
float32 otherwise; scalars are combined in float64. Nothing builds an ``N x N`` matrix.
Features of any finite scale work: products are formed from power-of-two-scaled features.

Each metric has one scorer, shared with the layer grids of ``prh_fast.align``: the neighbour
metrics score lists with ``neighbour_scores`` (values from :func:`knn_value`), CKA with
``prh_fast.metrics._kernel.cka_scores`` and SVCCA with ``prh_fast.metrics._svcca.svcca_scores``;
a metric here is the ``1 x 1`` case of its grid.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import torch

from prh_fast._names import SUPPORTED_METRICS
from prh_fast._threads import with_threads
from prh_fast._validate import as_pair, check_positive_int, check_topk, compute_dtype
from prh_fast.errors import InputError
from prh_fast.knn import DEFAULT_MEMORY_BUDGET, knn
from prh_fast.metrics._cknna import cknna_excludes_self, cknna_lists, cknna_sim, cknna_values
from prh_fast.metrics._kernel import check_cka_options, cka_ratio, cka_scores
from prh_fast.metrics._neighbours import neighbour_scores
from prh_fast.metrics._svcca import svcca_scores
from prh_fast.metrics._ties import NeighbourTies, check_ties, expected_mutual, neighbour_ties

if TYPE_CHECKING:
    from prh_fast._validate import Features
    from prh_fast.knn import AnnParams

    #: A neighbour backend: a name or spec string, an ``AnnParams``, or None (the setting).
    BackendSpec: TypeAlias = "str | AnnParams | None"

T = TypeVar("T")

__all__ = [
    "SUPPORTED_METRICS",
    "KNN_KINDS",
    "knn_value",
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
    "neighbour_ties",
    "NeighbourTies",
]

#: The neighbour metrics and the kind of ``neighbour_scores`` that gives their raw row mean.
KNN_KINDS = {"mutual_knn": "mutual", "cycle_knn": "cycle", "lcs_knn": "lcs",
             "edit_distance_knn": "edit"}



def knn_value(metric: str, raw: T, topk: int, normalize_lcs: bool = False) -> T:
    """A neighbour metric's value from ``neighbour_scores``' raw per-row mean (a float or a
    tensor of them): ``mutual_knn`` divides by ``topk``, ``edit_distance_knn`` is
    ``1 - raw / topk``, ``lcs_knn`` divides by ``topk`` only with ``normalize_lcs``.

    Example:
        >>> knn_value("edit_distance_knn", 2.0, 8)
        0.75
    """
    if metric == "mutual_knn":
        return raw / topk
    if metric == "edit_distance_knn":
        return 1.0 - raw / topk
    if metric == "lcs_knn" and normalize_lcs:
        return raw / topk
    return raw


def _lists(feats_A, feats_B, topk, backend):
    A, B = as_pair(feats_A, feats_B)
    k = check_topk(topk, A.shape[0])
    return knn(A, k, backend=backend), knn(B, k, backend=backend), k


def _knn_metric(metric, feats_A, feats_B, topk, backend, normalize_lcs=False) -> float:
    a, b, k = _lists(feats_A, feats_B, topk, backend)
    raw = float(neighbour_scores(KNN_KINDS[metric], a, b, backend=backend)[0, 0])
    return knn_value(metric, raw, k, normalize_lcs)


@with_threads
def mutual_knn(feats_A: Features, feats_B: Features, topk: int, *, ties: str = "rule",
               backend: BackendSpec = None) -> float:
    """Mean over samples of ``|knn_A(i) ∩ knn_B(i)| / topk``.

    ``ties="rule"`` (default, the reference's number): each list breaks exact ties by the lower
    index. ``ties="expected"``: the exact expectation of the score when every tie at a list's
    boundary is broken uniformly at random, independently in A and B -- row ``j`` is in row
    ``i``'s list with probability 1 above the ``topk``-th score, ``r / |T|`` among the ``|T|``
    rows tied with it (``r`` places left), and the value is
    ``mean_i sum_j p_A(i, j) p_B(i, j) / topk`` (see :func:`neighbour_ties`). Without ties the
    two are equal.

    Args:
        feats_A, feats_B: paired ``[N, Da]`` and ``[N, Db]`` features (tensors or arrays).
        topk: neighbours per sample, ``1 <= topk <= N - 1``.
        ties: ``"rule"`` or ``"expected"``.
        backend: neighbour-search backend (see ``prh_fast.knn``); ``None``: the default. The
            expected value does not depend on the search: :func:`neighbour_ties` scores the
            features on their own device and ``backend`` is not used.

    Returns:
        The score in ``[0, 1]``.

    Raises:
        InputError: naming the argument (shapes, ``topk``, ``ties``, NaN/Inf values).

    Example:
        >>> import torch
        >>> from prh_fast.metrics import mutual_knn
        >>> A = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> mutual_knn(A, 2 * A, topk=5)
        1.0
        >>> C = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
        >>> mutual_knn(C, C, topk=1), round(mutual_knn(C, C, topk=1, ties="expected"), 4)
        (1.0, 0.4583)
    """
    if check_ties(ties) == "expected":
        A, B = as_pair(feats_A, feats_B)
        k = check_topk(topk, A.shape[0])
        return expected_mutual(neighbour_ties(A, k), neighbour_ties(B, k))
    return _knn_metric("mutual_knn", feats_A, feats_B, topk, backend)


@with_threads
def cycle_knn(feats_A: Features, feats_B: Features, topk: int, *,
              backend: BackendSpec = None) -> float:
    """Share of samples ``i`` found among the A-neighbours of one of their B-neighbours.

    Args:
        feats_A, feats_B: paired ``[N, Da]`` and ``[N, Db]`` features (tensors or arrays).
        topk: neighbours per sample, ``1 <= topk <= N - 1``.
        backend: neighbour-search backend (see ``prh_fast.knn``).

    Returns:
        The score in ``[0, 1]``.

    Raises:
        InputError: naming the argument.

    Example:
        >>> import torch
        >>> from prh_fast.metrics import cycle_knn
        >>> A = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> round(cycle_knn(A, A, topk=5), 3)
        0.967
    """
    return _knn_metric("cycle_knn", feats_A, feats_B, topk, backend)


@with_threads
def lcs_knn(feats_A: Features, feats_B: Features, topk: int, *, normalize: bool = False,
            backend: BackendSpec = None) -> float:
    """Mean length of the longest common subsequence of the ordered neighbour lists.

    As the reference, the raw mean length (0..topk) by default; ``normalize=True`` divides by
    ``topk`` (the paper's table calls the metric normalised).

    Args:
        feats_A, feats_B: paired ``[N, Da]`` and ``[N, Db]`` features (tensors or arrays).
        topk: neighbours per sample, ``1 <= topk <= N - 1``.
        normalize: divide by ``topk``.
        backend: neighbour-search backend (see ``prh_fast.knn``).

    Returns:
        The mean length (in ``[0, topk]``, or ``[0, 1]`` normalised).

    Raises:
        InputError: naming the argument.

    Example:
        >>> import torch
        >>> from prh_fast.metrics import lcs_knn
        >>> A = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> lcs_knn(A, A, topk=5), lcs_knn(A, A, topk=5, normalize=True)
        (5.0, 1.0)
    """
    return _knn_metric("lcs_knn", feats_A, feats_B, topk, backend, bool(normalize))


@with_threads
def edit_distance_knn(feats_A: Features, feats_B: Features, topk: int, *,
                      backend: BackendSpec = None) -> float:
    """``1 - mean_i(levenshtein(knn_A(i), knn_B(i))) / topk``.

    Args:
        feats_A, feats_B: paired ``[N, Da]`` and ``[N, Db]`` features (tensors or arrays).
        topk: neighbours per sample, ``1 <= topk <= N - 1``.
        backend: neighbour-search backend (see ``prh_fast.knn``).

    Returns:
        The score in ``[0, 1]`` (1: identical ordered lists).

    Raises:
        InputError: naming the argument.

    Example:
        >>> import torch
        >>> from prh_fast.metrics import edit_distance_knn
        >>> A = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> edit_distance_knn(A, A, topk=5)
        1.0
    """
    return _knn_metric("edit_distance_knn", feats_A, feats_B, topk, backend)


@with_threads
def cka(feats_A: Features, feats_B: Features, kernel_metric: str = "ip",
        rbf_sigma: float = 1.0, unbiased: bool = False, *,
        memory_budget: int | None = None) -> float:
    """Centred kernel alignment ``hsic(K,L) / (sqrt(hsic(K,K) hsic(L,L)) + 1e-6)``.

    The ``1 x 1`` case of ``prh_fast.metrics._kernel.cka_scores`` (the scorer of
    ``prh_fast.align``'s layer grids). A linear kernel is scored in feature space (no
    ``N x N`` product: the exact formula for any ``N``); an RBF kernel streams row blocks.

    Args:
        feats_A, feats_B: paired ``[N, Da]`` and ``[N, Db]`` features (tensors or arrays).
        kernel_metric: ``'ip'`` (linear) or ``'rbf'``
            (``exp(-||a_i - a_j||² / (2 rbf_sigma²))``).
        rbf_sigma: the RBF width (positive, finite).
        unbiased: the unbiased HSIC estimator (needs ``N >= 4``).
        memory_budget: bytes of scratch memory for the RBF kernel's row blocks (default
            256 MiB), the same meaning as everywhere else in prh_fast.

    Returns:
        The CKA score (about ``[0, 1]``; the unbiased estimator may be slightly negative).

    Raises:
        InputError: naming the argument (shapes, ``kernel_metric``, ``rbf_sigma``,
            ``memory_budget``, too few samples).

    Example:
        >>> import torch
        >>> from prh_fast.metrics import cka
        >>> A = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
        >>> round(cka(A, 3 * A), 3), round(cka(A, A, kernel_metric="rbf"), 3)
        (1.0, 1.0)
    """
    A, B = as_pair(feats_A, feats_B)
    sigma, budget = check_cka_options(A.shape[0], kernel_metric, rbf_sigma, unbiased,
                                      memory_budget, DEFAULT_MEMORY_BUDGET,
                                      " (feats_A/feats_B)")
    dtype = torch.promote_types(compute_dtype(A), compute_dtype(B))
    scores, _ = cka_scores([A], [B], dtype, kernel_metric=kernel_metric, sigma=sigma,
                           unbiased=bool(unbiased), budget=budget, space="feature")
    return float(scores[0, 0])


@with_threads
def unbiased_cka(*args: Any, **kwargs: Any) -> float:
    """``cka(..., unbiased=True)``: CKA with the unbiased HSIC estimator (needs ``N >= 4``).

    Args:
        *args, **kwargs: as :func:`cka` (``unbiased`` is set to ``True``).

    Returns:
        The unbiased CKA score.

    Example:
        >>> import torch
        >>> from prh_fast.metrics import unbiased_cka
        >>> A = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
        >>> round(unbiased_cka(A, A), 3)
        1.0
    """
    kwargs["unbiased"] = True
    return cka(*args, **kwargs)


@with_threads
def cknna(feats_A: Features, feats_B: Features, topk: int | None = None,
          distance_agnostic: bool = False, unbiased: bool = True, *,
          backend: BackendSpec = None, exclude_self: bool | None = None) -> float:
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

    Args:
        feats_A, feats_B: paired ``[N, Da]`` and ``[N, Db]`` features (tensors or arrays).
        topk: neighbours per sample, ``2 <= topk <= N - 1``; ``None``: ``N - 1``.
        distance_agnostic: score the 0/1 masks instead of the masked kernels.
        unbiased: the unbiased HSIC estimator (needs ``N >= 4``).
        backend: neighbour-search backend (see ``prh_fast.knn``).
        exclude_self: whether a row's own entry competes for its top-k (see above).

    Returns:
        The CKNNA score.

    Raises:
        InputError: naming the argument.

    Example:
        >>> import torch
        >>> from prh_fast.metrics import cknna
        >>> A = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
        >>> round(cknna(A, A, topk=10), 3)
        1.0
    """
    A, B = as_pair(feats_A, feats_B)
    n = A.shape[0]
    if unbiased and n < 4:
        raise InputError(f"unbiased HSIC needs N >= 4 samples, got N = {n} (feats_A/feats_B)")
    k = check_topk(n - 1 if topk is None else topk, n, "topk", minimum=2)
    excl = cknna_excludes_self(unbiased, exclude_self)
    ia, sa = cknna_lists(A, k, backend, excl)
    ib, sb = cknna_lists(B, k, backend, excl)
    sa = cknna_values(ia, sa, bool(unbiased), bool(distance_agnostic))
    sb = cknna_values(ib, sb, bool(unbiased), bool(distance_agnostic))

    a, b = (ia, sa), (ib, sb)
    return cka_ratio(cknna_sim(n, a, b, unbiased, backend), cknna_sim(n, a, a, unbiased, backend),
                     cknna_sim(n, b, b, unbiased, backend))


@with_threads
def svcca(feats_A: Features, feats_B: Features, cca_dim: int = 10) -> float:
    """Mean of the ``cca_dim`` canonical correlations between the top-``cca_dim`` singular
    subspaces of the standardised features.

    Exact and deterministic (the reference's randomised SVD wobbles); the ``1 x 1`` case of
    ``prh_fast.metrics._svcca.svcca_scores``, the scorer of ``prh_fast.align``'s grids.

    Args:
        feats_A, feats_B: paired ``[N, Da]`` and ``[N, Db]`` features (tensors or arrays).
        cca_dim: the subspaces' dimension, ``1 <= cca_dim <= min(N - 1, Da, Db)`` and within
            both features' numerical rank.

    Returns:
        The score in ``[0, 1]``.

    Raises:
        InputError: naming the argument.

    Example:
        >>> import torch
        >>> from prh_fast.metrics import svcca
        >>> A = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
        >>> round(svcca(A, A[:, [1, 0, 2, 3, 4, 5]], cca_dim=3), 3)
        1.0
    """
    A, B = as_pair(feats_A, feats_B)
    n = A.shape[0]
    r = check_positive_int(cca_dim, "cca_dim", minimum=1,
                           maximum=max(1, min(n - 1, A.shape[1], B.shape[1])))
    dtype = torch.promote_types(compute_dtype(A), compute_dtype(B))
    return float(svcca_scores([A], [B], r, dtype, x_names=["feats_A"], y_names=["feats_B"])[0, 0])


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


@with_threads
def measure(metric: str, *args: Any, **kwargs: Any) -> float:
    """One metric by name: ``measure('mutual_knn', A, B, topk=10)`` is
    ``mutual_knn(A, B, topk=10)``.

    Args:
        metric: one of ``SUPPORTED_METRICS``.
        *args, **kwargs: the metric's arguments.

    Returns:
        The metric's value.

    Raises:
        InputError: an unknown ``metric`` (or the metric's own errors).

    Example:
        >>> import torch
        >>> from prh_fast.metrics import measure
        >>> A = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> measure("mutual_knn", A, A, topk=5)
        1.0
    """
    if metric not in _FUNCS:
        raise InputError(f"metric: unknown metric {metric!r}; supported: {SUPPORTED_METRICS}")
    return _FUNCS[metric](*args, **kwargs)


class AlignmentMetrics:
    """The reference's class of static methods, for ``from prh_fast.metrics import
    AlignmentMetrics``: every metric and ``measure`` as a static method.

    Example:
        >>> import torch
        >>> from prh_fast.metrics import AlignmentMetrics
        >>> A = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
        >>> AlignmentMetrics.measure("edit_distance_knn", A, A, topk=5)
        1.0
    """

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
