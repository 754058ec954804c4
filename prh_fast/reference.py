"""Readable float64 oracle of the alignment metrics (docs/metrics.md), for tests only.

Every function here is a literal, slow transcription of the contract: it builds the ``N x N`` Gram
matrices, dense 0/1 neighbour masks and centring matrices that the fast paths avoid, and runs the
combinatorial parts (LCS, Levenshtein) as plain Python dynamic programmes. It is the spec the test
suite compares the fast metrics against ("one op, one place"), so clarity wins over speed: use it
with small ``N`` (a few hundred; ``N = 1000`` costs about a second per kernel metric).

Computation is always float64 on the CPU, whatever the input dtype or device; a caller that wants
to compare with a low-precision fast path passes the *same values* (e.g. ``A.double()`` of a
float16 tensor) so that only the arithmetic differs.

This module imports nothing else from ``prh_fast``; its only helper is the input converter below.
Names and signatures follow the reference repository's ``AlignmentMetrics``.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from prh_fast._names import SUPPORTED_METRICS

if TYPE_CHECKING:
    from prh_fast._validate import Features

__all__ = [
    "SUPPORTED_METRICS",
    "knn",
    "mutual_knn",
    "cycle_knn",
    "lcs_knn",
    "edit_distance_knn",
    "hsic_biased",
    "hsic_unbiased",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "measure",
    "longest_common_subsequence",
    "levenshtein",
    "FROM_LISTS",
]



# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------
def _as_float64(x, name: str) -> torch.Tensor:
    """Torch tensor or NumPy array ``[N, D]`` of any float dtype -> float64 CPU torch tensor."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name}: must be floating point, got dtype {x.dtype}")
        x = torch.from_numpy(np.array(x, dtype=np.float64))
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise ValueError(f"{name}: must be floating point, got dtype {x.dtype}")
        x = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        raise ValueError(f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x)}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [N, D] array, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] array, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf")
    return x


def _pair(feats_A, feats_B):
    A = _as_float64(feats_A, "feats_A")
    B = _as_float64(feats_B, "feats_B")
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"feats_A and feats_B must have the same number of samples, got {A.shape[0]} and "
            f"{B.shape[0]}"
        )
    return A, B


def _check_int(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}: expected {lo} <= {name} <= {hi}, got {value}")
    return value


def _check_topk(topk, n: int, lo: int = 1) -> int:
    """``lo <= topk <= N - 1``: a point is never its own neighbour."""
    return _check_int(topk, "topk", lo, n - 1)


# --------------------------------------------------------------------------------------------
# nearest neighbours and the neighbour-set metrics
# --------------------------------------------------------------------------------------------
def knn(feats: Features, topk: int) -> torch.Tensor:
    """Neighbour lists: row i lists the ``topk`` rows j != i by decreasing <x_i, x_j>.

    As the reference: Gram matrix, diagonal set to -1e8, sort each row descending. The sort is
    stable so equal scores keep ascending column order: ties go to the lower index.

    Args:
        feats: ``[N, D]`` float tensor or array.
        topk: Neighbours per row, ``1 <= topk <= N - 1``.

    Returns:
        ``[N, topk]`` int64 tensor.

    Raises:
        ValueError: A non-float, non-2-D, empty or non-finite input, or a bad ``topk``.

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> reference.knn(A, 3)[:2].tolist()
        [[24, 18, 12], [26, 0, 23]]
    """
    X = _as_float64(feats, "feats")
    topk = _check_topk(topk, X.shape[0])
    G = X @ X.T
    G.fill_diagonal_(-1e8)
    return torch.argsort(G, dim=1, descending=True, stable=True)[:, :topk]


def _knn_pair(feats_A: Features, feats_B: Features, topk):
    A, B = _pair(feats_A, feats_B)
    topk = _check_topk(topk, A.shape[0])
    return knn(A, topk), knn(B, topk), topk


def mutual_knn(feats_A: Features, feats_B: Features, topk: int) -> float:
    """Mutual kNN: mean_i |set(a_i) ∩ set(b_i)| / topk, via dense N x N 0/1 masks.

    Args:
        feats_A: ``[N, D_A]`` float tensor or array (any dtype; computed in float64).
        feats_B: ``[N, D_B]`` float tensor or array, the same ``N`` samples.
        topk: Neighbours per row.

    Returns:
        The score in [0, 1].

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.mutual_knn(A, B, topk=5), 4)
        0.5312
    """
    knn_A, knn_B, _ = _knn_pair(feats_A, feats_B, topk)
    return mutual_knn_from_lists(knn_A, knn_B)


def mutual_knn_from_lists(knn_A: torch.Tensor, knn_B: torch.Tensor) -> float:
    """Mutual kNN given the two ``[N, topk]`` neighbour lists.

    Args:
        knn_A: ``[N, topk]`` int64 neighbour lists of the first model.
        knn_B: The second model's lists, same shape.

    Returns:
        The score in [0, 1].

    Example:
        >>> import torch
        >>> from prh_fast.reference import mutual_knn_from_lists
        >>> a = torch.tensor([[1, 2], [0, 2], [0, 1]])
        >>> mutual_knn_from_lists(a, a.flip(1))  # the order does not matter
        1.0
    """
    n, topk = knn_A.shape
    rows = torch.arange(n).unsqueeze(1)
    mask_A = torch.zeros(n, n, dtype=torch.float64)
    mask_B = torch.zeros(n, n, dtype=torch.float64)
    mask_A[rows, knn_A] = 1.0
    mask_B[rows, knn_B] = 1.0
    acc = (mask_A * mask_B).sum(dim=1) / topk
    return float(acc.mean())


def cycle_knn(feats_A: Features, feats_B: Features, topk: int) -> float:
    """Cycle kNN: mean_i [ i ∈ ∪_{j ∈ b_i} a_j ].

    Does A's neighbourhood of one of i's B-neighbours lead back to i?

    Args:
        feats_A: ``[N, D_A]`` float tensor or array (any dtype; computed in float64).
        feats_B: ``[N, D_B]`` float tensor or array, the same ``N`` samples.
        topk: Neighbours per row.

    Returns:
        The score in [0, 1].

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.cycle_knn(A, B, topk=5), 4)
        0.9375
    """
    knn_A, knn_B, _ = _knn_pair(feats_A, feats_B, topk)
    return cycle_knn_from_lists(knn_A, knn_B)


def cycle_knn_from_lists(knn_A: torch.Tensor, knn_B: torch.Tensor) -> float:
    """Cycle kNN given the lists.

    As the reference: ``knn_A[knn_B]`` is ``[N, topk, topk]``; row i is a hit if it contains i.

    Args:
        knn_A: ``[N, topk]`` int64 neighbour lists of the first model.
        knn_B: The second model's lists, same shape.

    Returns:
        The score in [0, 1].

    Example:
        >>> import torch
        >>> from prh_fast.reference import cycle_knn_from_lists
        >>> lists = torch.tensor([[1], [0], [1]])
        >>> round(cycle_knn_from_lists(lists, lists), 4)
        0.6667
    """
    n = knn_A.shape[0]
    cycles = knn_A[knn_B]
    hit = (cycles == torch.arange(n).view(-1, 1, 1)).reshape(n, -1).any(dim=1)
    return float(hit.double().mean())


def longest_common_subsequence(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence: the textbook O(len(a) * len(b)) table.

    Args:
        a: A sequence.
        b: Another sequence.

    Returns:
        The length.

    Example:
        >>> from prh_fast.reference import longest_common_subsequence
        >>> longest_common_subsequence([1, 2, 3, 4], [2, 4, 3])
        2
    """
    a, b = list(a), list(b)
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            if a[i - 1] == b[j - 1]:
                table[i][j] = table[i - 1][j - 1] + 1
            else:
                table[i][j] = max(table[i - 1][j], table[i][j - 1])
    return table[len(a)][len(b)]


def levenshtein(a: Sequence[int], b: Sequence[int]) -> int:
    """Edit distance with unit-cost insert, delete and substitute (Wagner-Fischer table).

    Args:
        a: A sequence.
        b: Another sequence.

    Returns:
        The number of edits turning ``a`` into ``b``.

    Example:
        >>> from prh_fast.reference import levenshtein
        >>> levenshtein("kitten", "sitting")
        3
    """
    a, b = list(a), list(b)
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        table[i][0] = i
    for j in range(len(b) + 1):
        table[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            table[i][j] = min(
                table[i - 1][j] + 1,  # delete
                table[i][j - 1] + 1,  # insert
                table[i - 1][j - 1] + cost,  # substitute / match
            )
    return table[len(a)][len(b)]


def lcs_knn(feats_A: Features, feats_B: Features, topk: int, normalize: bool = False) -> float:
    """LCS kNN: mean_i LCS(a_i, b_i), the raw mean length in [0, topk] (the reference's quirk).

    Args:
        feats_A: ``[N, D_A]`` float tensor or array (any dtype; computed in float64).
        feats_B: ``[N, D_B]`` float tensor or array, the same ``N`` samples.
        topk: Neighbours per row.
        normalize: Divide by ``topk`` (the paper's "normalized" reading), range [0, 1].

    Returns:
        The score.

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.lcs_knn(A, B, topk=5), 4)
        1.9062
        >>> round(reference.lcs_knn(A, B, topk=5, normalize=True), 4)
        0.3812
    """
    knn_A, knn_B, _ = _knn_pair(feats_A, feats_B, topk)
    return lcs_knn_from_lists(knn_A, knn_B, normalize=normalize)


def lcs_knn_from_lists(knn_A: torch.Tensor, knn_B: torch.Tensor, normalize: bool = False) -> float:
    """LCS kNN given the lists.

    Args:
        knn_A: ``[N, topk]`` int64 neighbour lists of the first model.
        knn_B: The second model's lists, same shape.
        normalize: Divide by ``topk``.

    Returns:
        The score.

    Example:
        >>> import torch
        >>> from prh_fast.reference import lcs_knn_from_lists
        >>> lcs_knn_from_lists(torch.tensor([[1, 2], [0, 2], [0, 1]]),
        ...                    torch.tensor([[1, 2], [2, 0], [0, 1]]))
        1.6666666666666667
    """
    topk = knn_A.shape[1]
    lengths = [
        longest_common_subsequence(ra, rb) for ra, rb in zip(knn_A.tolist(), knn_B.tolist())
    ]
    score = sum(lengths) / len(lengths)
    return score / topk if normalize else score


def edit_distance_knn(feats_A: Features, feats_B: Features, topk: int) -> float:
    """Edit-distance kNN: 1 - mean_i lev(a_i, b_i) / topk over the ordered lists.

    Args:
        feats_A: ``[N, D_A]`` float tensor or array (any dtype; computed in float64).
        feats_B: ``[N, D_B]`` float tensor or array, the same ``N`` samples.
        topk: Neighbours per row.

    Returns:
        The score in [0, 1].

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.edit_distance_knn(A, B, topk=5), 4)
        0.1875
    """
    knn_A, knn_B, _ = _knn_pair(feats_A, feats_B, topk)
    return edit_distance_knn_from_lists(knn_A, knn_B)


def edit_distance_knn_from_lists(knn_A: torch.Tensor, knn_B: torch.Tensor) -> float:
    """Edit-distance kNN given the lists.

    Args:
        knn_A: ``[N, topk]`` int64 neighbour lists of the first model.
        knn_B: The second model's lists, same shape.

    Returns:
        The score in [0, 1].

    Example:
        >>> import torch
        >>> from prh_fast.reference import edit_distance_knn_from_lists
        >>> edit_distance_knn_from_lists(torch.tensor([[1, 2]]), torch.tensor([[2, 1]]))
        0.0
    """
    topk = knn_A.shape[1]
    dists = [levenshtein(ra, rb) for ra, rb in zip(knn_A.tolist(), knn_B.tolist())]
    return 1.0 - (sum(dists) / len(dists)) / topk


FROM_LISTS = {
    "mutual_knn": mutual_knn_from_lists,
    "cycle_knn": cycle_knn_from_lists,
    "lcs_knn": lcs_knn_from_lists,
    "edit_distance_knn": edit_distance_knn_from_lists,
}


# --------------------------------------------------------------------------------------------
# HSIC and the kernel metrics
# --------------------------------------------------------------------------------------------
def hsic_biased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Biased HSIC: trace(K H L H), H = I - 11ᵀ/N.

    No 1/(N-1)² factor: it cancels in every ratio.

    Args:
        K: ``[N, N]`` float64 kernel matrix.
        L: ``[N, N]`` float64 kernel matrix.

    Returns:
        A 0-d float64 tensor.

    Example:
        >>> import torch
        >>> from prh_fast.reference import hsic_biased
        >>> A = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> K = A @ A.T
        >>> round(float(hsic_biased(K, K)), 1)
        9678.8
    """
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype) - torch.full((n, n), 1.0 / n, dtype=K.dtype)
    return torch.trace(K @ H @ L @ H)


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012) unbiased HSIC, literally (K̃, L̃ = K, L with zeroed diagonals):

    [ Σ_ij K̃_ij L̃_ji + (Σ K̃)(Σ L̃) / ((N-1)(N-2)) - 2/(N-2) · 1ᵀ K̃ L̃ 1 ] / (N (N-3)).

    The first term uses L̃ᵀ; that matters for the non-symmetric masked kernels of CKNNA.

    Args:
        K: ``[N, N]`` float64 kernel matrix.
        L: ``[N, N]`` float64 kernel matrix.

    Returns:
        A 0-d float64 tensor.

    Raises:
        ValueError: ``N < 4``.

    Example:
        >>> import torch
        >>> from prh_fast.reference import hsic_unbiased
        >>> A = torch.randn(32, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> K = A @ A.T
        >>> round(float(hsic_unbiased(K, K)), 3)
        7.651
    """
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs N >= 4 samples, got N = {n}")
    Kt = K.clone().fill_diagonal_(0)
    Lt = L.clone().fill_diagonal_(0)
    value = (
        (Kt * Lt.T).sum()
        + Kt.sum() * Lt.sum() / ((n - 1) * (n - 2))
        - 2.0 * (Kt @ Lt).sum() / (n - 2)
    )
    return value / (n * (n - 3))


def _ratio(kl: torch.Tensor, kk: torch.Tensor, ll: torch.Tensor) -> float:
    """kl / (sqrt(kk * ll) + 1e-6); NaN when kk * ll < 0, as torch.sqrt gives in the reference."""
    return float(kl / (torch.sqrt(kk * ll) + 1e-6))


def _rbf_kernel(X: torch.Tensor, sigma: float) -> torch.Tensor:
    """K_ij = exp(-||x_i - x_j||² / (2 σ²)) from explicit differences (a row block at a time
    so that the [block, N, D] difference tensor stays small)."""
    n = X.shape[0]
    sq = torch.empty(n, n, dtype=X.dtype)
    block = max(1, 2_000_000 // max(1, n * X.shape[1]))
    for s in range(0, n, block):
        diff = X[s : s + block, None, :] - X[None, :, :]
        sq[s : s + block] = (diff * diff).sum(dim=2)
    return torch.exp(-sq / (2.0 * sigma**2))


def cka(feats_A: Features, feats_B: Features, kernel_metric: str = "ip", rbf_sigma: float = 1.0,
        unbiased: bool = False) -> float:
    """CKA: hsic(K, L) / (sqrt(hsic(K, K) · hsic(L, L)) + 1e-6).

    Args:
        feats_A: ``[N, D_A]`` float tensor or array (any dtype; computed in float64).
        feats_B: ``[N, D_B]`` float tensor or array, the same ``N`` samples.
        kernel_metric: ``"ip"``: K = A Aᵀ, L = B Bᵀ; ``"rbf"``:
            K_ij = exp(-||a_i - a_j||² / (2 σ²)).
        rbf_sigma: σ of the RBF kernel.
        unbiased: Use :func:`hsic_unbiased` instead of :func:`hsic_biased`.

    Returns:
        The score (NaN when a self-similarity is negative, as the reference).

    Raises:
        ValueError: A bad ``kernel_metric`` or ``rbf_sigma``, or ``N < 4`` when unbiased.

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.cka(A, B), 4)
        0.743
        >>> round(reference.cka(A, B, kernel_metric="rbf", rbf_sigma=2.0), 4)
        0.8132
    """
    A, B = _pair(feats_A, feats_B)
    n = A.shape[0]
    if kernel_metric == "ip":
        K, L = A @ A.T, B @ B.T
    elif kernel_metric == "rbf":
        if isinstance(rbf_sigma, bool) or not isinstance(rbf_sigma, numbers.Real) or not (
            math.isfinite(rbf_sigma) and rbf_sigma > 0
        ):
            raise ValueError(f"rbf_sigma: expected a positive finite number, got {rbf_sigma!r}")
        K, L = _rbf_kernel(A, rbf_sigma), _rbf_kernel(B, rbf_sigma)
    else:
        raise ValueError(f"kernel_metric: expected 'ip' or 'rbf', got {kernel_metric!r}")
    if unbiased and n < 4:
        raise ValueError(f"unbiased CKA needs N >= 4 samples, got N = {n}")
    hsic = hsic_unbiased if unbiased else hsic_biased
    return _ratio(hsic(K, L), hsic(K, K), hsic(L, L))


def unbiased_cka(*args: Any, **kwargs: Any) -> float:
    """Unbiased CKA: :func:`cka` with ``unbiased=True``.

    Args:
        *args: As :func:`cka`.
        **kwargs: As :func:`cka` (``unbiased`` is forced to True).

    Returns:
        The score.

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.unbiased_cka(A, B), 4)
        0.7032
    """
    kwargs["unbiased"] = True
    return cka(*args, **kwargs)


def _topk_mask(P: torch.Tensor, topk: int, exclude_self: bool) -> torch.Tensor:
    """0/1 N x N mask: M[i, j] = 1 iff j is among the topk largest of row i of P -- with its
    diagonal set to -inf first when ``exclude_self`` (self excluded), else the whole row
    (self eligible); ties go to the lower index (stable sort)."""
    n = P.shape[0]
    Ph = P.clone().fill_diagonal_(float("-inf")) if exclude_self else P
    idx = torch.argsort(Ph, dim=1, descending=True, stable=True)[:, :topk]
    mask = torch.zeros(n, n, dtype=P.dtype)
    mask[torch.arange(n).unsqueeze(1), idx] = 1.0
    return mask


def cknna(feats_A: Features, feats_B: Features, topk: int | None = None,
          distance_agnostic: bool = False,
          unbiased: bool = True, exclude_self: bool | None = None) -> float:
    """Centred kernel nearest-neighbour alignment.

    With K = A Aᵀ, L = B Bᵀ, for a kernel pair (P, Q): M = M_P ∘ M_Q (topk masks),
    sim(P, Q) = hsic(M ∘ P, M ∘ Q), or hsic(M, M) when ``distance_agnostic`` (our reading of
    the contract's "the mask M itself": the 0/1 mask replaces both masked kernels), hsic =
    hsic_unbiased when ``unbiased`` else hsic_biased.
    Score: sim(K, L) / (sqrt(sim(K, K) · sim(L, L)) + 1e-6).
    As the reference, the masks exclude the diagonal only when ``unbiased``: with
    ``unbiased=False`` the top-k is taken over the whole row, self included.
    ``exclude_self`` (True / False) overrides that; None follows the reference.

    Args:
        feats_A: ``[N, D_A]`` float tensor or array (any dtype; computed in float64).
        feats_B: ``[N, D_B]`` float tensor or array, the same ``N`` samples.
        topk: Mask size, ``2 <= topk <= N - 1``; None means ``N - 1``.
        distance_agnostic: Score the masks alone (hsic(M, M)).
        unbiased: Use :func:`hsic_unbiased` (needs ``N >= 4``).
        exclude_self: Whether a row's own entry is kept out of its top-k; None follows the
            reference (excluded only when ``unbiased``).

    Returns:
        The score.

    Raises:
        ValueError: A bad ``topk`` or ``exclude_self``, or too few samples.

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.cknna(A, B, topk=5), 4)
        0.639
    """
    A, B = _pair(feats_A, feats_B)
    n = A.shape[0]
    if topk is None:
        topk = n - 1
    if isinstance(topk, numbers.Integral) and not isinstance(topk, bool) and topk < 2:
        raise ValueError(f"topk: CKNNA requires topk >= 2, got {topk}")
    topk = _check_topk(topk, n, lo=2)
    if unbiased and n < 4:
        raise ValueError(f"unbiased CKNNA needs N >= 4 samples, got N = {n}")
    if exclude_self is None:
        exclude_self = bool(unbiased)
    elif not isinstance(exclude_self, bool):
        raise ValueError(f"exclude_self: expected None, True or False, got {exclude_self!r}")
    hsic = hsic_unbiased if unbiased else hsic_biased
    K, L = A @ A.T, B @ B.T

    def similarity(P, Q):
        M = _topk_mask(P, topk, exclude_self) * _topk_mask(Q, topk, exclude_self)
        if distance_agnostic:
            return hsic(M, M)
        return hsic(M * P, M * Q)

    return _ratio(similarity(K, L), similarity(K, K), similarity(L, L))


def _inv_sqrt(C: torch.Tensor) -> torch.Tensor:
    """C^{-1/2} of a symmetric positive-definite matrix by eigendecomposition."""
    w, V = torch.linalg.eigh(C)
    return V @ torch.diag(w.rsqrt()) @ V.T


def svcca(feats_A: Features, feats_B: Features, cca_dim: int = 10) -> float:
    """SVCCA with an exact SVD.

    1. Standardise each column: (x - mean) / (unbiased std + 1e-8).
    2. U_A, U_B = the top ``cca_dim`` left singular vectors (full float64 SVD).
    3. Textbook CCA between U_A and U_B ([N, cca_dim] each): centre, whiten each by the inverse
       square root of its covariance, take the singular values of the whitened cross-covariance
       C_AA^{-1/2} C_AB C_BB^{-1/2}: these are the canonical correlations.
    4. Score: their mean.

    Args:
        feats_A: ``[N, D_A]`` float tensor or array (any dtype; computed in float64).
        feats_B: ``[N, D_B]`` float tensor or array, the same ``N`` samples.
        cca_dim: Number of components, ``1 <= cca_dim <= min(D_A, D_B, N - 1)``.

    Returns:
        The mean canonical correlation, in [0, 1].

    Raises:
        ValueError: A bad ``cca_dim`` or input.

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.svcca(A, B, cca_dim=4), 4)
        0.6601
    """
    A, B = _pair(feats_A, feats_B)
    n = A.shape[0]
    cca_dim = _check_int(cca_dim, "cca_dim", 1, min(A.shape[1], B.shape[1], n - 1))

    def top_left_singular(X):
        X = X - X.mean(dim=0)
        X = X / (X.std(dim=0, unbiased=True) + 1e-8)
        U, _, _ = torch.linalg.svd(X, full_matrices=False)
        return U[:, :cca_dim]

    UA, UB = top_left_singular(A), top_left_singular(B)
    UA = UA - UA.mean(dim=0)
    UB = UB - UB.mean(dim=0)
    C_AA = UA.T @ UA / (n - 1)
    C_BB = UB.T @ UB / (n - 1)
    C_AB = UA.T @ UB / (n - 1)
    T = _inv_sqrt(C_AA) @ C_AB @ _inv_sqrt(C_BB)
    rho = torch.linalg.svdvals(T)
    return float(rho.mean())


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------
def measure(metric: str, *args: Any, **kwargs: Any) -> float:
    """Call the oracle metric named ``metric`` with the other arguments.

    Args:
        metric: One of :data:`SUPPORTED_METRICS`.
        *args: The metric's positional arguments (``feats_A, feats_B, ...``).
        **kwargs: The metric's keyword arguments.

    Returns:
        The score.

    Raises:
        ValueError: An unknown metric.

    Example:
        >>> import torch
        >>> from prh_fast import reference
        >>> g = torch.Generator().manual_seed(0)
        >>> A = torch.randn(32, 8, generator=g, dtype=torch.float64)
        >>> B = A @ torch.randn(8, 6, generator=g, dtype=torch.float64)
        >>> round(reference.measure("mutual_knn", A, B, topk=5), 4)
        0.5312
    """
    if metric not in SUPPORTED_METRICS:
        raise ValueError(f"metric: unknown metric {metric!r}; expected one of {SUPPORTED_METRICS}")
    return globals()[metric](*args, **kwargs)
