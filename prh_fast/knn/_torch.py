"""Pure-torch neighbour search (CPU or CUDA): query blocks x key tiles, running top-k merge.

``torch.topk`` does not define the order of equal values, so each merge is followed by an exact
fix: rows where a tie straddles the k-th place are redone with a stable sort on
(score desc, index asc), and every kept list is put in that canonical order.
"""
from __future__ import annotations

import torch

from prh_fast.knn._tiles import block_rows


def _canonical(vals: torch.Tensor, idx: torch.Tensor):
    """Order each row by score desc, ties by index asc (two stable sorts)."""
    o = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, o), idx.gather(1, o)
    o = torch.argsort(vals, dim=1, descending=True, stable=True)
    return vals.gather(1, o), idx.gather(1, o)


def select_topk(scores: torch.Tensor, ids: torch.Tensor, k: int):
    """Exact top-k of each row of ``scores`` with ties to the lower id.

    ``scores``, ``ids``: ``[b, m]`` with ``m >= k``. Returns ``(vals, idx)`` ``[b, k]`` in canonical
    order.
    """
    vals, pos = torch.topk(scores, k, dim=1)
    idx = ids.gather(1, pos)
    kth = vals[:, -1:]
    # A tie straddles the boundary when more than k entries are >= the k-th value.
    straddle = (scores >= kth).sum(dim=1) > k
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        s, i = _canonical(scores[rows], ids[rows])
        vals[rows], idx[rows] = s[:, :k], i[:, :k]
    return _canonical(vals, idx)


def torch_tiles(n: int, m: int, k: int, itemsize: int, budget: int):
    """``(rows, cols)``: query block height and key tile width of a search of ``n`` queries
    against ``m`` keys: a ``[rows, cols]`` score tile plus the merge buffer fit ``budget``. The
    streaming search uses the same shapes (equal shapes give bit-equal products)."""
    cols = min(m, max(k, 4096))
    rows = min(n, block_rows(cols + k, itemsize + 8, budget, buffers=3))
    return rows, cols


def knn_torch(X: torch.Tensor, k: int, budget: int, keys: torch.Tensor | None = None):
    """Self search (``keys is None``, self excluded) or cross search of ``X`` against ``keys``."""
    K = X if keys is None else keys
    n, m = X.shape[0], K.shape[0]
    dev = X.device
    rows, cols = torch_tiles(n, m, k, X.element_size(), budget)
    out_v = torch.empty((n, k), dtype=X.dtype, device=dev)
    out_i = torch.empty((n, k), dtype=torch.int64, device=dev)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        q = X[r0:r1]
        run_v = torch.full((r1 - r0, 0), float("-inf"), dtype=X.dtype, device=dev)
        run_i = torch.empty((r1 - r0, 0), dtype=torch.int64, device=dev)
        for c0 in range(0, m, cols):
            c1 = min(m, c0 + cols)
            s = q @ K[c0:c1].T
            ids = torch.arange(c0, c1, device=dev).expand(r1 - r0, -1)
            if keys is None and c0 < r1 and r0 < c1:
                qi = torch.arange(r0, r1, device=dev).unsqueeze(1)
                s = s.masked_fill(ids == qi, float("-inf"))
            cat_v = torch.cat([run_v, s], dim=1)
            cat_i = torch.cat([run_i, ids], dim=1)
            kk = min(k, cat_v.shape[1])
            run_v, run_i = select_topk(cat_v, cat_i, kk)
        out_v[r0:r1], out_i[r0:r1] = run_v, run_i
    return out_i, out_v
