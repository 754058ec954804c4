"""Pure-torch neighbour search (CPU or CUDA): query blocks x key tiles, running top-k merge.

``torch.topk`` does not define the order of equal values, so each merge is followed by an exact
fix: rows where a tie straddles the last kept place are redone with a stable sort on
(score desc, index asc), and every kept list is put in that canonical order. Candidates carry
their fixed-order float64 scores (computed when they enter, from the tile in hand), and
``prh_fast.knn._exact`` ranks the final lists by those.
"""
from __future__ import annotations

import torch

from prh_fast.knn._exact import _canonical, candidate_count, fixed_dots, refine_in_memory
from prh_fast.knn._tiles import block_rows

__all__ = ["select_topk", "torch_tiles", "knn_torch", "torch_candidates", "merge_tile",
           "_canonical"]


def _canonical_order(vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Column order putting each row by score desc, ties by index asc (two stable sorts)."""
    o = torch.argsort(idx, dim=1, stable=True)
    o2 = torch.argsort(vals.gather(1, o), dim=1, descending=True, stable=True)
    return o.gather(1, o2)


def select_topk(scores: torch.Tensor, ids: torch.Tensor, k: int, payload=None):
    """Exact top-k of each row of ``scores`` with ties to the lower id.

    ``scores``, ``ids`` (and ``payload``, carried along): ``[b, m]`` with ``m >= k``. Returns
    ``(vals, idx)`` -- or ``(vals, idx, payload)`` -- ``[b, k]`` in canonical order.
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


def torch_tiles(n: int, m: int, k: int, itemsize: int, budget: int):
    """``(rows, cols)``: query block height and key tile width of a search of ``n`` queries
    against ``m`` keys: a ``[rows, cols]`` score tile plus the merge buffer fit ``budget``. The
    streaming search uses the same shapes."""
    cols = min(m, max(k, 4096))
    rows = min(n, block_rows(cols + k, itemsize + 16, budget, buffers=3))
    return rows, cols


def merge_tile(run, q, K, qids, c0, kc, exclude_self):
    """One merge step: running candidates ``run = (vals, idx, fixed)`` of the query rows ``q``
    (global ids ``qids``) with the keys ``K`` (ids ``c0 ..``). ``fixed`` None: product scores
    only; else new entrants get their fixed-order scores. Returns the new ``run``."""
    dev = q.device
    c1 = c0 + K.shape[0]
    s = q @ K.T
    ids = torch.arange(c0, c1, device=dev).expand(q.shape[0], -1)
    if exclude_self:
        s = s.masked_fill(ids == qids.unsqueeze(1), float("-inf"))
    kk = min(kc, run[0].shape[1] + s.shape[1])
    if run[2] is None:
        v, i = select_topk(torch.cat([run[0], s], dim=1), torch.cat([run[1], ids], dim=1), kk)
        return v, i, None
    nan = torch.full(s.shape, float("nan"), dtype=torch.float64, device=dev)
    v, i, f = select_topk(torch.cat([run[0], s], dim=1), torch.cat([run[1], ids], dim=1), kk,
                          torch.cat([run[2], nan], dim=1))
    new = torch.isnan(f)
    if bool(new.any()):
        rr, tt = new.nonzero(as_tuple=True)
        f[rr, tt] = fixed_dots(q, K, rr, i[rr, tt] - c0)
    return v, i, f


def torch_candidates(X: torch.Tensor, kc: int, budget: int, keys: torch.Tensor | None = None,
                     with_fixed: bool = False):
    """``(idx, prod, fixed)`` ``[N, kc]``: each query row's ``kc`` best keys by the product
    score (self excluded in a self search), with -- ``with_fixed`` -- the fixed-order scores
    (else None)."""
    K = X if keys is None else keys
    n, m = X.shape[0], K.shape[0]
    dev = X.device
    rows, cols = torch_tiles(n, m, kc, X.element_size(), budget)
    out_v = torch.empty((n, kc), dtype=X.dtype, device=dev)
    out_i = torch.empty((n, kc), dtype=torch.int64, device=dev)
    out_f = torch.empty((n, kc), dtype=torch.float64, device=dev) if with_fixed else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        q = X[r0:r1]
        qids = torch.arange(r0, r1, device=dev)
        run = (torch.full((r1 - r0, 0), float("-inf"), dtype=X.dtype, device=dev),
               torch.empty((r1 - r0, 0), dtype=torch.int64, device=dev),
               torch.empty((r1 - r0, 0), dtype=torch.float64, device=dev) if with_fixed
               else None)
        for c0 in range(0, m, cols):
            c1 = min(m, c0 + cols)
            run = merge_tile(run, q, K[c0:c1], qids, c0, kc,
                             keys is None and c0 < r1 and r0 < c1)
        out_v[r0:r1], out_i[r0:r1] = run[0], run[1]
        if with_fixed:
            out_f[r0:r1] = run[2]
    return out_i, out_v, out_f


def knn_torch(X: torch.Tensor, k: int, budget: int, keys: torch.Tensor | None = None,
              norms: torch.Tensor | None = None):
    """Self search (``keys is None``, self excluded) or cross search of ``X`` against ``keys``:
    exact lists ``(idx [N, k], fixed scores [N, k] float64)``."""
    m = X.shape[0] - 1 if keys is None else keys.shape[0]
    kc = candidate_count(k, m)
    cand = torch_candidates(X, kc, budget, keys)
    return refine_in_memory(X, keys, k, cand, budget, norms=norms)
