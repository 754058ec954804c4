"""Pure-torch neighbour search (CPU or CUDA): query blocks x key tiles, running top-k merge.

Each ``[rows, cols]`` product tile goes into a :class:`~prh_fast.knn._merge.TopK` with the torch
merge (``select_topk``: ``torch.topk`` plus an exact fix where a tie straddles the last kept
place, every list in canonical order). Candidates carry their fixed-order float64 scores
(computed when they enter, from the tile in hand), and ``prh_fast.knn._exact`` ranks the final
lists by those.
"""
from __future__ import annotations

import torch

from prh_fast.knn._exact import candidate_count, refine_in_memory
from prh_fast.knn._merge import TopK, _canonical, select_topk
from prh_fast.knn._tiles import block_rows

# select_topk and _canonical are re-exported for the backends that rank lists of their own
# (prh_fast.knn._faiss, prh_fast.knn._faiss_ann).
__all__ = ["select_topk", "torch_tiles", "knn_torch", "torch_candidates", "_canonical"]


def torch_tiles(n: int, m: int, k: int, itemsize: int, budget: int):
    """``(rows, cols)``: query block height and key tile width of a search of ``n`` queries
    against ``m`` keys: a ``[rows, cols]`` score tile plus the merge buffer fit ``budget``. The
    streaming search uses the same shapes."""
    cols = min(m, max(k, 4096))
    rows = min(n, block_rows(cols + k, itemsize + 16, budget, buffers=3))
    return rows, cols


def torch_candidates(X: torch.Tensor, kc: int, budget: int, keys: torch.Tensor | None = None,
                     with_fixed: bool = False):
    """``(idx, prod, fixed)`` ``[N, kc]``: each query row's ``kc`` best keys by the product
    score (self excluded in a self search), with -- ``with_fixed`` -- the fixed-order scores
    (else None)."""
    K = X if keys is None else keys
    n, m = X.shape[0], K.shape[0]
    rows, cols = torch_tiles(n, m, kc, X.element_size(), budget)
    top = TopK(n, kc, X.dtype, X.device, with_fixed=with_fixed)
    for r0 in range(0, n, rows):
        q = X[r0:r0 + rows]
        for c0 in range(0, m, cols):
            top.add_product(q, K[c0:c0 + cols], row0=r0, col0=c0, exclude_self=keys is None)
    vals, idx, fixed = top.result()
    return idx, vals, fixed


def knn_torch(X: torch.Tensor, k: int, budget: int, keys: torch.Tensor | None = None,
              norms: torch.Tensor | None = None):
    """Self search (``keys is None``, self excluded) or cross search of ``X`` against ``keys``:
    exact lists ``(idx [N, k], fixed scores [N, k] float64)``."""
    m = X.shape[0] - 1 if keys is None else keys.shape[0]
    kc = candidate_count(k, m)
    cand = torch_candidates(X, kc, budget, keys)
    return refine_in_memory(X, keys, k, cand, budget, norms=norms)
