"""The running top-k merge every exact search feeds its score tiles into, and the fixed-order
score its entries carry.

Tie rule (docs/metrics.md, "Nearest neighbours"): a list holds the ``k`` entries with the
largest scores, ties to the lower index, in that order (score descending, index ascending).
Selecting under this total order is associative: the top-k of a union is the top-k of the
parts' top-k, whatever the tiling or the order tiles arrive in, so one primitive serves the
in-memory searches (``cpu``, ``torch``, the triton backend's exact fallback), the streamed
search (``prh_fast.store._stream``) and the distributed one (``prh_fast.distributed._knn``).

- :func:`select_topk`: the top-k of the columns of each row, in canonical order.
- :func:`merge_results`: the top-k of several result lists of the same rows (shards, ranks,
  runs of key blocks).
- :class:`TopK`: running ``[n, k]`` lists that score tiles are added to. Two merges:

  * native (CPU, float32/float64): ``prh_fast._C.topk_update`` updates the lists in place. It
    inserts a score only when it is *strictly* greater than the row's current last, so each row
    must see its keys in increasing index order (then an equal score never displaces a lower
    index). Searches that cannot keep that order keep one :class:`TopK` per increasing run of
    keys and combine them with :func:`merge_results`.
  * torch (any device): the running lists and the tile are concatenated and
    :func:`select_topk` keeps the top-k; order-independent.

  Empty slots hold score ``-inf`` and index :data:`EMPTY`, which sorts after every real index,
  so a real entry never loses to an empty slot. With ``with_fixed`` every entry that enters a
  list also gets its fixed-order float64 score (below) from the rows whose product made the
  tile; ``prh_fast.knn._exact`` ranks the final lists by those.

The fixed-order score ``fixed(i, j)`` (:func:`fixed_dots`) is ``<x_i, x_j>`` accumulated in
float64 in one order that depends on ``D`` only: equal rows give bit-equal scores wherever they
sit in a tile (a BLAS product does not: its summation order depends on the tile).
"""
from __future__ import annotations

import numpy as np
import torch

from prh_fast import _native
from prh_fast.errors import InputError

__all__ = ["EMPTY", "TopK", "select_topk", "merge_results", "check_filled", "fixed_dots",
           "fixed_self"]

#: Index of an empty slot: sorts after every real index at equal (``-inf``) scores.
EMPTY = torch.iinfo(torch.int64).max


# --------------------------------------------------------------------------------------------
# the fixed-order score


def _tree_dots(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Row-wise ``<A[p], B[p]>`` in float64 by a pairwise tree over ``D`` (zero-padded to a power
    of two): elementwise multiplies and adds only, no reduction kernel, so the order of every
    sum is fixed by ``D`` on any device and for any number of rows."""
    p = A.to(torch.float64) * B.to(torch.float64)
    d = p.shape[1]
    w = 1 << max(0, d - 1).bit_length()
    if w != d:
        p = torch.cat([p, p.new_zeros((p.shape[0], w - d))], dim=1)
    while w > 1:
        w //= 2
        p = p[:, :w] + p[:, w:2 * w]
    return p[:, 0]


def _native_ok(*ts) -> bool:
    return _native.HAS_NATIVE and all(t.device.type == "cpu" for t in ts)


def fixed_dots(X: torch.Tensor, Y: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
               chunk_values: int = 1 << 24) -> torch.Tensor:
    """``fixed(X[i[p]], Y[j[p]])`` for every pair ``p``: float64 ``[P]`` on ``X``'s device.

    CPU tensors use the native ``pair_dots`` (``dot_fixed`` in ``csrc/common/rowops.h``: four
    float64 partial sums, one fixed order); other devices (or a build without the native
    module) the pairwise tree of :func:`_tree_dots`. Either way the value depends only on the
    two rows and ``D``.

    Args:
        X: ``[R, D]`` rows.
        Y: ``[M, D]`` rows (same device).
        i: ``[P]`` row indices into ``X``.
        j: ``[P]`` row indices into ``Y``.
        chunk_values: largest temporary (values) of the tree path.

    Returns:
        ``[P]`` float64 scores.
    """
    P = int(i.numel())
    if P == 0:
        return torch.empty(0, dtype=torch.float64, device=X.device)
    if _native_ok(X, Y):
        x = X.contiguous() if X.stride(-1) != 1 else X
        y = Y.contiguous() if Y.stride(-1) != 1 else Y
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        out = _native.native().pair_dots(x.numpy(), y.numpy(),
                                          i.to(torch.int64).contiguous().numpy(),
                                          j.to(torch.int64).contiguous().numpy())
        return torch.from_numpy(out)
    step = max(1, chunk_values // max(1, X.shape[1]))
    out = torch.empty(P, dtype=torch.float64, device=X.device)
    for p0 in range(0, P, step):
        out[p0:p0 + step] = _tree_dots(X[i[p0:p0 + step]], Y[j[p0:p0 + step]])
    return out


def fixed_self(X: torch.Tensor) -> torch.Tensor:
    """``fixed(x_i, x_i)`` for every row: ``[N]`` float64."""
    r = torch.arange(X.shape[0], device=X.device)
    return fixed_dots(X, X, r, r)


# --------------------------------------------------------------------------------------------
# selection under the tie rule


def _canonical_order(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Column order putting each row by score desc, ties by index asc (two stable sorts)."""
    o = torch.argsort(idx, dim=1, stable=True)
    o2 = torch.argsort(vals.gather(1, o), dim=1, descending=True, stable=True)
    return o.gather(1, o2)


def _canonical(vals: torch.Tensor, idx: torch.Tensor):
    """Each row in canonical order (score desc, index asc): ``(vals, idx)``."""
    o = _canonical_order(vals, idx)
    return vals.gather(1, o), idx.gather(1, o)


def select_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, payload=None):
    """Top-k of each row of ``scores`` with ties to the lower id, in canonical order.

    ``torch.topk`` does not define the order of equal values, so rows where a tie straddles the
    last kept place are redone with the two stable sorts, and every kept list is put in
    canonical order.

    Args:
        scores: ``[b, m]`` scores, ``m >= k``.
        ids: ``[b, m]`` int64 ids of the entries.
        k: entries to keep.
        payload: optional ``[b, m]`` tensor carried along with the entries.

    Returns:
        ``(vals, idx)`` -- or ``(vals, idx, payload)`` -- ``[b, k]``.

    Example:
        >>> v, i = select_topk(torch.tensor([[1.0, 3.0, 3.0]]), torch.tensor([[0, 2, 1]]), 2)
        >>> i.tolist()
        [[1, 2]]
    """
    vals, pos = torch.topk(scores, k, dim=1)
    kth = vals[:, -1:]
    # A tie straddles the boundary when more than k entries are >= the k-th value.
    straddle = (scores >= kth).sum(dim=1) > k
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        pos[rows] = _canonical_order(scores[rows], ids[rows])[:, :k]
    pos = pos.gather(1, _canonical_order(scores.gather(1, pos), ids.gather(1, pos)))
    out = (scores.gather(1, pos), ids.gather(1, pos))
    return out if payload is None else out + (payload.gather(1, pos),)


def merge_results(parts, k: int):
    """The top-k of several result lists of the same rows (canonical order).

    Args:
        parts: non-empty sequence of ``(vals, idx)`` or ``(vals, idx, payload)`` tuples, each
            ``[b, m_p]`` (all with a payload or none), e.g. the lists of key shards or ranks.
        k: list length, at most the total width.

    Returns:
        ``(vals, idx)`` or ``(vals, idx, payload)``, ``[b, k]``.
    """
    parts = list(parts)
    if not parts:
        raise InputError("parts: expected at least one result list")
    if len(parts) == 1 and parts[0][0].shape[1] == k:
        return tuple(parts[0])
    cols = [torch.cat([p[t] for p in parts], dim=1) for t in range(len(parts[0]))]
    return select_topk(cols[0], cols[1], k, cols[2] if len(cols) > 2 else None)


def check_filled(idx: torch.Tensor, what: str) -> None:
    """``ValueError`` when a list still has an empty slot (scores that never entered: NaN or
    ``-inf`` products)."""
    if idx.numel() and bool((idx == EMPTY).any()):
        raise InputError(f"{what}: neighbour search produced empty slots (non-finite scores?)")


# --------------------------------------------------------------------------------------------
# the running lists


class TopK:
    """Running top-k lists of ``n`` query rows, fed score tiles (module docstring).

    Args:
        n: query rows.
        k: list length (``>= 1``).
        dtype: score dtype (the tiles' dtype; float32 or float64 for ``native``).
        device: where the lists live (``native``: CPU).
        native: merge with ``prh_fast._C.topk_update`` (keys must reach each row in increasing
            index order) instead of the torch merge.
        with_fixed: keep each entry's fixed-order float64 score.
        ids: global ids of the query rows, for the self mask: an ``int`` (row ``r`` is
            ``ids + r``) or an ``[n]`` int64 tensor (torch merge only).

    Example:
        >>> top = TopK(2, 1, torch.float32)
        >>> top.add(torch.tensor([[1.0, 5.0], [2.0, 2.0]]), col0=10)
        >>> top.result()[1].tolist()
        [[11], [10]]
    """

    def __init__(self, n: int, k: int, dtype: torch.dtype, device=None, *, native: bool = False,
                 with_fixed: bool = False, ids=0):
        if k < 1:
            raise InputError(f"k: the running lists must hold at least 1 entry, got {k}")
        self.n, self.k, self.dtype = int(n), int(k), dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.native, self.with_fixed = bool(native), bool(with_fixed)
        if self.native and (self.device.type != "cpu"
                            or dtype not in (torch.float32, torch.float64)):
            raise InputError(f"native: the native merge needs float32/float64 CPU lists, got "
                             f"{dtype} on {self.device}")
        self._qids = ids if isinstance(ids, torch.Tensor) else None
        self._id0 = 0 if self._qids is not None else int(ids)
        if self.native and self._qids is not None:
            raise InputError("ids: the native merge takes consecutive query ids (an int)")
        shape = (self.n, self.k)
        if self.native:
            npd = np.float64 if dtype == torch.float64 else np.float32
            self._v = np.full(shape, -np.inf, dtype=npd)
            self._i = np.full(shape, EMPTY, dtype=np.int64)
            self._f = np.full(shape, -np.inf, dtype=np.float64) if with_fixed else None
            self._buf = torch.empty(0, dtype=dtype)
        else:
            dev = self.device
            self._v = torch.full(shape, float("-inf"), dtype=dtype, device=dev)
            self._i = torch.full(shape, EMPTY, dtype=torch.int64, device=dev)
            self._f = (torch.full(shape, float("-inf"), dtype=torch.float64, device=dev)
                       if with_fixed else None)

    # ---------------------------------------------------------------------------------- add

    def add(self, scores: torch.Tensor, col0: int, *, row0: int = 0, exclude_self: bool = False,
            q: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> None:
        """Merge a score tile into rows ``row0 .. row0 + r - 1``.

        Args:
            scores: ``[r, c]`` tile (any strides; a transposed view is fine); entry ``(a, b)``
                is the score of key ``col0 + b`` for query row ``row0 + a``.
            col0: global id of the tile's first key.
            row0: first query row (position in these lists).
            exclude_self: skip the entry whose key id equals the row's global id.
            q: ``[r, D]`` the tile's query rows, ``keys``: ``[c, D]`` its key rows; needed with
                ``with_fixed`` (the entrants' fixed-order scores).
        """
        r, c = scores.shape
        if r == 0 or c == 0:
            return
        if self.with_fixed and (q is None or keys is None):
            raise InputError("q, keys: the tile's rows are needed for the fixed-order scores")
        if self.native:
            self._add_native(scores, col0, row0, exclude_self, q, keys)
        else:
            self._add_torch(scores, col0, row0, exclude_self, q, keys)

    def add_product(self, q: torch.Tensor, keys: torch.Tensor, *, row0: int = 0, col0: int = 0,
                    exclude_self: bool = False, symmetric: bool = False) -> None:
        """Score ``q @ keys.T`` and merge it (:meth:`add`).

        ``symmetric``: the keys are query rows of these lists too (rows ``col0 ..``; a self
        search's off-diagonal tile), and the transposed tile is merged into their lists with
        ``q`` as their keys: one product, two merges. The native merge multiplies into one
        reused scratch buffer.

        Args:
            q: ``[r, D]`` query rows ``row0 ..``.
            keys: ``[c, D]`` keys with global ids ``col0 ..``.
            row0, col0, exclude_self: as in :meth:`add`.
            symmetric: also merge the transposed tile into rows ``col0 ..``.
        """
        r, c = q.shape[0], keys.shape[0]
        if self.native:
            if self._buf.numel() < r * c:
                self._buf = torch.empty(r * c, dtype=self.dtype)
            S = self._buf[: r * c].view(r, c)
            torch.mm(q, keys.T, out=S)
        else:
            S = q @ keys.T
        self.add(S, col0, row0=row0, exclude_self=exclude_self, q=q, keys=keys)
        if symmetric:
            self.add(S.T, row0, row0=col0, exclude_self=exclude_self, q=keys, keys=q)

    def _add_native(self, S, col0, row0, exclude_self, q, keys):
        r1 = row0 + S.shape[0]
        pay = (q.numpy(), keys.numpy(), self._f[row0:r1]) if self.with_fixed else (None,) * 3
        _native.native().topk_update(S.numpy(), self._id0 + row0, col0, self._v[row0:r1],
                                     self._i[row0:r1], bool(exclude_self), *pay)

    def _add_torch(self, s, col0, row0, exclude_self, q, keys):
        r1 = row0 + s.shape[0]
        dev = s.device
        ids = torch.arange(col0, col0 + s.shape[1], device=dev).expand(s.shape[0], -1)
        if exclude_self:
            if self._qids is not None:
                qids = self._qids[row0:r1].to(dev)
            elif col0 < self._id0 + r1 and self._id0 + row0 < col0 + s.shape[1]:
                qids = torch.arange(self._id0 + row0, self._id0 + r1, device=dev)
            else:
                qids = None  # the tile misses the diagonal
            if qids is not None:
                s = s.masked_fill(ids == qids.unsqueeze(1), float("-inf"))
        run_v, run_i = torch.cat([self._v[row0:r1], s], 1), torch.cat([self._i[row0:r1], ids], 1)
        if not self.with_fixed:
            self._v[row0:r1], self._i[row0:r1] = select_topk(run_v, run_i, self.k)
            return
        # new entrants are marked NaN, then get their fixed-order scores
        nan = torch.full(s.shape, float("nan"), dtype=torch.float64, device=dev)
        v, i, f = select_topk(run_v, run_i, self.k, torch.cat([self._f[row0:r1], nan], 1))
        new = torch.isnan(f)
        if bool(new.any()):
            rr, tt = new.nonzero(as_tuple=True)
            f[rr, tt] = fixed_dots(q, keys, rr, i[rr, tt] - col0)
        self._v[row0:r1], self._i[row0:r1], self._f[row0:r1] = v, i, f

    # ------------------------------------------------------------------------------- result

    def result(self, what: str | None = None):
        """The lists: ``(vals [n, k], idx [n, k] int64, fixed [n, k] float64 or None)``, each
        row in canonical order, as torch tensors on ``device`` (the native lists are shared,
        not copied).

        Args:
            what: name for the error when a slot is still empty (``None``: no check; empty
                slots hold ``-inf`` and :data:`EMPTY`).

        Raises:
            ValueError: ``what`` given and a list has an empty slot.
        """
        if self.native:
            v, i = torch.from_numpy(self._v), torch.from_numpy(self._i)
            f = torch.from_numpy(self._f) if self.with_fixed else None
        else:
            v, i, f = self._v, self._i, self._f
        if what is not None:
            check_filled(i, what)
        return v, i, f
