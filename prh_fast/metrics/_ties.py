"""Ties at the boundary of the neighbour lists, and the tie-aware ``mutual_knn``.

``knn(X, k)[i]`` breaks exact ties by the lower index (docs/metrics.md). When many rows score
exactly the same against row ``i`` -- duplicated rows, quantised features -- the rule, not the
features, picks which of them enter the list. This module describes those ties and scores the
neighbour overlap as if every tie at a list's boundary were broken uniformly at random.

Definitions, per row ``i`` of one layer ``X [N, D]`` (scores ``fixed(i, j)``, the exact
fixed-order float64 inner products every exact list is ranked by, ``prh_fast.knn._exact``;
``j != i``):

- ``s_k(i)``: the ``k``-th largest score;
- ``G_i``: the rows scoring strictly above ``s_k(i)`` (``|G_i| < k``);
- ``T_i``: the rows scoring exactly ``s_k(i)`` (``|G_i| + |T_i| >= k``);
- with ``r_i = k - |G_i|``, a uniformly random tie break puts ``j`` in the list with
  probability ``p(i, j) = 1`` for ``j`` in ``G_i``, ``r_i / |T_i|`` for ``j`` in ``T_i`` and 0
  otherwise.

The k-th neighbour is *tied* with the (k+1)-th when ``|G_i| + |T_i| > k``: then the rule decides
which of ``T_i`` are kept.

How ``T_i`` is found without an ``N x N`` matrix: row blocks of product scores ``a_ij``
(``torch.mm`` in the compute dtype) obey ``|a_ij - fixed(i, j)| <= e_i``
(:func:`prh_fast.knn._exact.margins`). With ``a_(k)`` the row's ``k``-th largest product
score, ``k`` keys have ``fixed >= a_(k) - e_i``, so ``s_k(i) >= a_(k) - e_i`` and every key in
``G_i`` or ``T_i`` has ``a_ij >= a_(k) - 2 e_i``. Those candidates are re-scored exactly
(:func:`prh_fast.knn._merge.fixed_dots`) and ``s_k``, ``G_i``, ``T_i`` are read off the exact
scores: equality is tested on the fixed-order scores only, never on products. Memory: one row
block of products, plus the candidates (about ``sum_i |G_i| + |T_i|``) kept as CSR arrays.

Which neighbour metrics have a closed expected form under independent uniform tie breaks:

- ``mutual_knn``: yes. ``|a_i ∩ b_i| = sum_j [j in a_i] [j in b_i]`` is linear in each side's
  membership indicators and the two sides are independent, so its expectation is
  ``sum_j p_A(i, j) p_B(i, j)`` (:func:`expected_mutual`).
- ``cycle_knn``: ``[i in union_{j in b_i} a_j]`` is an OR over several rows' lists: not linear.
  Its expectation needs the joint law of the ``r``-subset drawn from ``T_i`` (a sum over
  subsets, e.g. an elementary-symmetric-polynomial recursion), not the marginals ``p`` alone.
- ``lcs_knn``, ``edit_distance_knn``: depend on the *order* inside the lists (a tie break also
  orders the tied members) through a maximum / minimum over alignments: no linear form; only
  enumeration or Monte Carlo over tie breaks.
- ``cknna``: the HSIC terms of the masked kernels mix linear terms (``sum M_ij K_ij L_ji``,
  expectation ``p_A p_B``) with products of mask entries of the same row, whose joint
  inclusion probabilities (``r (r - 1) / (|T| (|T| - 1))`` within one tie set) differ from
  ``p p``; and the score is a ratio of such sums, whose expectation is not the ratio of the
  expectations.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from prh_fast._validate import as_features, check_memory_budget, check_topk, compute_dtype
from prh_fast.errors import InputError
from prh_fast.knn import DEFAULT_MEMORY_BUDGET
from prh_fast.knn._exact import margins, search_exponent
from prh_fast.knn._merge import fixed_dots
from prh_fast.prepare import row_norms

if TYPE_CHECKING:
    from prh_fast._validate import Features

__all__ = ["NeighbourTies", "neighbour_ties", "expected_mutual", "TIES_MODES", "check_ties",
           "distinct_rows", "list_ties", "tie_warning", "relabel_ties", "TIE_WARN_FRACTION"]

#: The values of a neighbour metric's ``ties`` option: ``"rule"`` (ties to the lower index, the
#: reference-compatible default) and ``"expected"`` (the expectation over uniform tie breaks).
TIES_MODES = ("rule", "expected")


def check_ties(ties) -> str:
    """``ties`` as one of :data:`TIES_MODES`, else an ``InputError`` naming ``ties``.

    Example:
        >>> check_ties("expected")
        'expected'
    """
    if not isinstance(ties, str) or ties not in TIES_MODES:
        raise InputError(f"ties: expected one of {TIES_MODES}, got {ties!r}")
    return ties


@dataclasses.dataclass
class NeighbourTies:
    """The boundary of every row's ``k``-list in one layer (see the module docstring).

    Members of ``G_i`` and ``T_i`` are stored as CSR arrays: row ``i``'s keys are
    ``keys[indptr[i]:indptr[i + 1]]`` (ascending), ``tied`` marks those in ``T_i``.

    Attributes:
        n: rows ``N``.
        k: list length.
        kth: ``[N]`` float64, ``s_k(i)`` (the fixed-order score of the features as searched,
            which may be scaled by a power of two).
        n_greater: ``[N]`` int64, ``|G_i|``.
        n_tied: ``[N]`` int64, ``|T_i|``.
        indptr: ``[N + 1]`` int64 row offsets into ``keys``.
        keys: ``[nnz]`` int64 members of ``G_i ∪ T_i``.
        tied: ``[nnz]`` bool, the member is in ``T_i``.
        distinct_rows: number of distinct rows (exact duplicates counted once).

    Example:
        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
        >>> t = neighbour_ties(X, 1)
        >>> t.n_tied.tolist(), t.distinct_rows, t.tied_fraction
        ([2, 2, 2, 3], 2, 1.0)
    """

    n: int
    k: int
    kth: torch.Tensor
    n_greater: torch.Tensor
    n_tied: torch.Tensor
    indptr: torch.Tensor
    keys: torch.Tensor
    tied: torch.Tensor
    distinct_rows: int

    @property
    def is_tied(self) -> torch.Tensor:
        """``[N]`` bool: the row's ``k``-th neighbour is tied with its ``(k+1)``-th."""
        return self.n_greater + self.n_tied > self.k

    @property
    def tied_fraction(self) -> float:
        """Share of rows whose ``k``-th neighbour is tied with the ``(k+1)``-th."""
        return float(self.is_tied.to(torch.float64).mean()) if self.n else 0.0

    def tie_weight(self) -> torch.Tensor:
        """``[N]`` float64, ``r_i / |T_i|``: each tied member's chance of entering the list."""
        return (self.k - self.n_greater).to(torch.float64) / self.n_tied.to(torch.float64)

    def probabilities(self, mode: str = "expected") -> torch.Tensor:
        """``[nnz]`` float64, ``p(i, j)`` of each stored member (aligned with ``keys``).

        ``mode="rule"``: the lower-index rule's lists instead, ``1`` for ``G_i`` and for the
        ``r_i`` lowest indices of ``T_i``, ``0`` for the rest of ``T_i`` (the exact search's
        list as a set)."""
        rows = torch.repeat_interleave(torch.arange(self.n), self.indptr.diff())
        if mode == "rule":
            # rank of each tied member among its row's tied members (keys are ascending)
            c = torch.cat([torch.zeros(1, dtype=torch.int64),
                           self.tied.to(torch.int64).cumsum(0)])
            rank = c[1:] - c[self.indptr[:-1]][rows]  # c[indptr[i]]: tied members before row i
            keep = ~self.tied | (rank <= (self.k - self.n_greater)[rows])
            return keep.to(torch.float64)
        w = self.tie_weight()[rows]
        return torch.where(self.tied, w, torch.ones_like(w))

    def rule_lists(self) -> "NeighbourTies":
        """The lower-index rule's lists as a boundary without ties: each row keeps ``G_i`` and
        the ``r_i`` lowest indices of ``T_i``, all with probability 1. Relabelled by a
        permutation (:func:`relabel_ties`) it stays the same lists, as relabelling the
        searched lists does."""
        keep = self.probabilities("rule").bool()
        rows = torch.repeat_interleave(torch.arange(self.n), self.indptr.diff())
        counts = torch.bincount(rows[keep], minlength=self.n)
        indptr = torch.zeros_like(self.indptr)
        indptr[1:] = counts.cumsum(0)
        return NeighbourTies(n=self.n, k=self.k, kth=self.kth, n_greater=counts,
                             n_tied=torch.zeros_like(counts), indptr=indptr,
                             keys=self.keys[keep], tied=torch.zeros(int(keep.sum()), dtype=bool),
                             distinct_rows=self.distinct_rows)

    def summary(self) -> dict:
        """Plain numbers for reports: ``n``, ``k``, ``distinct_rows``, ``tied_fraction``,
        ``tied_rows`` and the largest ``|T_i|``."""
        return {"n": self.n, "k": self.k, "distinct_rows": self.distinct_rows,
                "tied_fraction": self.tied_fraction, "tied_rows": int(self.is_tied.sum()),
                "max_tie": int(self.n_tied.max()) if self.n else 0}


def _prepare(X):
    """The rows as the metrics search them: compute dtype, scaled by a power of two when their
    products would leave its range (exact: every score scales by the same factor)."""
    X = as_features(X, "X")
    X = X.to(compute_dtype(X)).contiguous()
    norms = row_norms(X)
    e = search_exponent(float(norms.max()) if norms.numel() else 0.0, X.dtype)
    if e:
        X = torch.ldexp(X, torch.tensor(-e, dtype=torch.int32, device=X.device))
        norms = row_norms(X)
    return X, norms


def _block_rows(n: int, budget: int) -> int:
    # per entry: the product score and its mask, with room for the candidates (32 bytes)
    return max(1, min(n, budget // (32 * max(1, n))))


def neighbour_ties(X: Features, k: int, *, memory_budget: int | None = None) -> NeighbourTies:
    """The tie structure at the boundary of each row's ``k`` nearest neighbours.

    The rows are taken as given (the caller normalises; float64 stays float64, other dtypes
    are computed in float32, as the metrics). Exact ties are decided on the fixed-order
    float64 scores, never on matrix products (module docstring).

    Args:
        X: ``[N, D]`` features (tensor or array).
        k: list length, ``1 <= k <= N - 1``.
        memory_budget: bytes of scratch for a block of product scores (default 256 MiB).

    Returns:
        A :class:`NeighbourTies`.

    Raises:
        InputError: naming the argument (``X``, ``k``, ``memory_budget``).

    Example:
        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
        >>> t = neighbour_ties(X, 1)
        >>> t.n_greater.tolist(), t.n_tied.tolist(), t.distinct_rows
        ([0, 0, 0, 0], [1, 1, 1, 2], 3)
    """
    X, qn = _prepare(X)
    n, d = X.shape
    k = check_topk(k, n, "k")
    budget = check_memory_budget(memory_budget, DEFAULT_MEMORY_BUDGET)
    # fixed(i, j) depends only on the two rows' values: few distinct rows are scored once
    U, inv = torch.unique(X, dim=0, return_inverse=True)
    table = _pair_table(U, n, k)
    e_all = margins(qn, float(qn.max()), d, X.dtype)
    step = _block_rows(n, budget)
    kth, n_gt, n_eq, keys, tied, counts = [], [], [], [], [], []
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = torch.arange(r0, r1, device=X.device)
        S = X[r0:r1] @ X.T
        S[rows - r0, rows] = float("-inf")  # a row is not its own neighbour
        thr = S.topk(k, dim=1).values[:, k - 1].to(torch.float64) - 2.0 * e_all[r0:r1]
        hit = S >= _round_down(thr, S.dtype).unsqueeze(1)  # a superset of fixed >= s_k
        del S
        rr, cc = hit.nonzero(as_tuple=True)
        del hit
        f = _pair_scores(X, U, inv, table, rr + r0, cc)
        sk = _kth_per_row(f, rr, r1 - r0, k)
        fk = sk[rr]
        member = f >= fk
        rr, cc, eq = rr[member], cc[member], (f == fk)[member]
        cnt = torch.bincount(rr, minlength=r1 - r0)
        n_tie = torch.bincount(rr[eq], minlength=r1 - r0)
        kth.append(sk.cpu())
        n_eq.append(n_tie.cpu())
        n_gt.append((cnt - n_eq[-1].to(cnt.device)).cpu())
        keys.append(cc.cpu())
        tied.append(eq.cpu())
        counts.append(cnt.cpu())
    indptr = torch.zeros(n + 1, dtype=torch.int64)
    indptr[1:] = torch.cat(counts).cumsum(0)
    return NeighbourTies(n=n, k=k, kth=torch.cat(kth), n_greater=torch.cat(n_gt),
                         n_tied=torch.cat(n_eq), indptr=indptr,
                         keys=torch.cat(keys).to(torch.int64), tied=torch.cat(tied),
                         distinct_rows=int(U.shape[0]))


def _round_down(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``dtype`` values ``<= t`` (float64 ``t``): comparing ``dtype`` scores with
    them keeps every score ``>= t``."""
    r = t.to(dtype)
    over = r.to(torch.float64) > t
    return torch.where(over, torch.nextafter(r, torch.full_like(r, float("-inf"))), r)


def _pair_table(U: torch.Tensor, n: int, k: int):
    """``fixed`` of every pair of distinct rows ``U`` when they are few (``[u, u]`` float64),
    else ``None``: heavily duplicated layers then score each candidate by a lookup."""
    u = U.shape[0]
    if u * u > min(1 << 22, 4 * n * k):
        return None
    a = torch.arange(u, device=U.device)
    return fixed_dots(U, U, a.repeat_interleave(u), a.repeat(u)).view(u, u)


def _pair_scores(X, U, inv, table, i, j) -> torch.Tensor:
    """``fixed(x_i, x_j)`` for the pairs ``(i, j)``: from ``table`` (pairs of distinct rows
    ``U``, ``inv`` each row's index into ``U``) when there is one."""
    if table is None:
        return fixed_dots(X, X, i, j).to(i.device)
    return table[inv[i], inv[j]]


def _kth_per_row(f: torch.Tensor, rows: torch.Tensor, r: int, k: int) -> torch.Tensor:
    """Each row's ``k``-th largest value among the entries ``f`` of that row (``rows``
    ascending, every row with at least ``k`` entries): ``[r]`` values."""
    cnt = torch.bincount(rows, minlength=r)
    if bool((cnt < k).any()):
        raise InputError("X: fewer than k candidates above a row's threshold (non-finite "
                         "scores?)")
    first = torch.zeros(r, dtype=torch.int64, device=f.device)
    first[1:] = cnt.cumsum(0)[:-1]
    # the entries padded into an [r, max count] block (no larger than the block of products)
    pos = torch.arange(f.numel(), device=f.device) - first[rows]
    P = torch.full((r, int(cnt.max())), float("-inf"), dtype=f.dtype, device=f.device)
    P[rows, pos] = f
    return P.topk(k, dim=1).values[:, k - 1]


def _flat(t: NeighbourTies, mode: str):
    """``(codes, p)``: each stored member as the sorted code ``i * N + j`` and its probability
    under ``mode``, numpy arrays kept on ``t`` (a grid scores every layer against many)."""
    memo = t.__dict__.setdefault("_flat_memo", {})
    if mode not in memo:
        rows = np.repeat(np.arange(t.n, dtype=np.int64), np.diff(t.indptr.numpy()))
        memo[mode] = (rows * t.n + t.keys.numpy(), t.probabilities(mode).numpy())
    return memo[mode]


def _row_sums(a: NeighbourTies, b: NeighbourTies, mode: str = "expected") -> float:
    """``sum_i sum_j p_A(i, j) p_B(i, j)``: the members both boundaries store, matched by a
    binary search of B's codes among A's (both sorted: rows ascending, keys ascending)."""
    ca, pa = _flat(a, mode)
    cb, pb = _flat(b, mode)
    if not ca.size or not cb.size:
        return 0.0
    pos = np.minimum(np.searchsorted(ca, cb), ca.size - 1)
    hit = ca[pos] == cb
    return float(pa[pos[hit]] @ pb[hit])


def expected_mutual(ties_A: NeighbourTies, ties_B: NeighbourTies, *,
                    mode: str = "expected") -> float:
    """``mutual_knn``'s expectation under independent uniform tie breaks in A and B:
    ``mean_i sum_j p_A(i, j) p_B(i, j) / k``.

    Args:
        ties_A, ties_B: :func:`neighbour_ties` of the two layers (same ``N`` and ``k``).
        mode: ``"rule"`` gives the lower-index rule's ``mutual_knn`` instead (the same value
            as from the searched lists: see :meth:`NeighbourTies.probabilities`), so one
            boundary serves both values.

    Returns:
        The expected score in ``[0, 1]``.

    Raises:
        InputError: the two describe different ``N`` or ``k``.

    Example:
        >>> import torch
        >>> A = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]])
        >>> round(expected_mutual(neighbour_ties(A, 1), neighbour_ties(A, 1)), 4)
        0.4583
    """
    if ties_A.n != ties_B.n or ties_A.k != ties_B.k:
        raise InputError(f"ties_A/ties_B: describe N = {ties_A.n}, k = {ties_A.k} and "
                         f"N = {ties_B.n}, k = {ties_B.k}; expected the same N and k")
    return _row_sums(ties_A, ties_B, mode=check_ties(mode)) / (ties_A.n * ties_A.k)


# --------------------------------------------------------------------------------------------
# diagnostics from an ordinary search, and the tie-aware score under a relabelling

#: A layer whose share of tied rows (k-th neighbour tied with the (k+1)-th) reaches this is
#: reported with a warning: the lower-index rule, not the features, picks part of its lists.
TIE_WARN_FRACTION = 0.01


def distinct_rows(X) -> int:
    """The number of distinct rows of ``X`` (``-0.0`` and ``0.0`` count as equal).

    Each row is hashed by its fixed-order float64 inner product with a fixed random vector
    (:func:`prh_fast.knn._merge.fixed_dots`: the value depends only on the row, so equal rows
    hash equally); rows with different hashes differ, so only rows whose hash repeats are
    compared exactly (``torch.unique``). The count is exact and costs one pass over ``X`` when
    the rows are distinct.

    Example:
        >>> import torch
        >>> distinct_rows(torch.tensor([[1.0, 0.0], [1.0, -0.0], [0.0, 1.0]]))
        2
    """
    X = as_features(X, "X")
    n, d = X.shape
    if n == 0:
        return 0
    Xc = X.to(compute_dtype(X)).contiguous()
    g = torch.Generator().manual_seed(0x5EED)
    w = (torch.rand((1, d), generator=g, dtype=torch.float64) + 0.5).to(Xc.dtype).to(X.device)
    rows = torch.arange(n, device=X.device)
    h = fixed_dots(Xc, w, rows, torch.zeros_like(rows))
    _, inv, counts = torch.unique(h, return_inverse=True, return_counts=True)
    repeated = counts[inv] > 1
    if not bool(repeated.any()):
        return n
    return int((~repeated).sum()) + int(torch.unique(X[repeated] + 0.0, dim=0).shape[0])


def list_ties(idx: torch.Tensor, vals: torch.Tensor, k: int, distinct: int | None) -> dict:
    """Tie diagnostics of one layer from an exact search of ``k + 1`` neighbours.

    ``vals`` are the exact search's fixed-order float64 scores (``prh_fast.knn._search``), so
    the ``k``-th neighbour is tied with the ``(k + 1)``-th exactly when their scores are equal.
    With ``idx`` of only ``k = N - 1`` columns (every other row listed) nothing is tied.

    Args:
        idx: ``[N, k + 1]`` (or ``[N, N - 1]``) neighbour indices.
        vals: their float64 scores, same shape.
        k: the list length the metrics use.
        distinct: the layer's :func:`distinct_rows` (``None``: not counted, e.g. a layer
            streamed from a store).

    Returns:
        ``{"n", "k", "distinct_rows", "tied_rows", "tied_fraction"}``.

    Example:
        >>> import torch
        >>> v = torch.tensor([[0.9, 0.5, 0.5], [0.9, 0.7, 0.5]], dtype=torch.float64)
        >>> list_ties(torch.zeros(2, 3, dtype=torch.long), v, 2, 2)["tied_rows"]
        1
    """
    n = int(idx.shape[0])
    if idx.shape[1] > k:
        tied = int((vals[:, k - 1] == vals[:, k]).sum())
    else:
        tied = 0
    return {"n": n, "k": int(k), "distinct_rows": None if distinct is None else int(distinct),
            "tied_rows": tied,
            "tied_fraction": tied / n if n else 0.0}


def tie_warning(x_ties, y_ties, mode: str, metric: str, names=("X", "Y")) -> str | None:
    """A one-line warning when ties decide part of some layer's lists (``None`` otherwise).

    ``x_ties`` / ``y_ties``: per-layer dicts of :func:`list_ties` or
    :meth:`NeighbourTies.summary` (``None`` entries are skipped); ``mode``: the run's ``ties``.

    Example:
        >>> d = {"n": 100, "k": 10, "distinct_rows": 8, "tied_rows": 100, "tied_fraction": 1.0}
        >>> tie_warning([d], [], "rule", "mutual_knn").split(":")[0]
        'ties at the k-th neighbour decide the lists of 100% of the rows in X layer 0'
    """
    worst = None
    for name, side in zip(names, (x_ties, y_ties)):
        for layer, t in enumerate(side or []):
            if t is not None and (worst is None or t["tied_fraction"] > worst[2]["tied_fraction"]):
                worst = (name, layer, t)
    if worst is None or worst[2]["tied_fraction"] < TIE_WARN_FRACTION:
        return None
    name, layer, t = worst
    rows = (f"{t['n']} rows" if t.get("distinct_rows") is None
            else f"{t['distinct_rows']} distinct rows of {t['n']}")
    msg = (f"ties at the k-th neighbour decide the lists of {t['tied_fraction']:.0%} of the rows "
           f"in {name} layer {layer}: {rows}, k = {t['k']}")
    if mode == "expected":
        return msg + "; scored as the expectation over uniform tie breaks (ties='expected')"
    if metric == "mutual_knn":
        return msg + ("; the lower-index rule picks the tied neighbours: ties='expected' gives "
                      "the tie-aware score")
    return msg + (f"; the lower-index rule picks the tied neighbours ({metric} has no "
                  f"closed tie-aware form: compare mutual_knn with ties='expected')")


def relabel_ties(t: NeighbourTies, perm: torch.Tensor) -> NeighbourTies:
    """The boundary of the samples reordered by ``perm`` (row ``i`` becomes sample
    ``perm[i]``, every key ``j`` becomes ``perm⁻¹[j]``), as :func:`neighbour_ties` would find it
    for ``X[perm]``: a relabelling, no new scores.

    Example:
        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.0, 1.0]])
        >>> p = torch.tensor([2, 0, 3, 1])
        >>> r = relabel_ties(neighbour_ties(X, 1), p)
        >>> r.n_tied.tolist() == neighbour_ties(X[p], 1).n_tied.tolist()
        True
    """
    perm = perm.to(torch.int64).cpu()
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    counts = t.indptr.diff()[perm]
    indptr = torch.zeros_like(t.indptr)
    indptr[1:] = counts.cumsum(0)
    # gather each new row's members from the old row perm[i]
    starts = t.indptr[:-1][perm]
    rows = torch.repeat_interleave(torch.arange(t.n), counts)
    pos = torch.arange(int(indptr[-1])) - indptr[:-1][rows] + starts[rows]
    keys = inv[t.keys[pos]]
    tied = t.tied[pos]
    order = torch.argsort(rows * t.n + keys)  # keys ascending within each row
    return NeighbourTies(n=t.n, k=t.k, kth=t.kth[perm], n_greater=t.n_greater[perm],
                         n_tied=t.n_tied[perm], indptr=indptr, keys=keys[order],
                         tied=tied[order], distinct_rows=t.distinct_rows)
