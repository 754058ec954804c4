"""FAISS flat inner-product search (exact up to FAISS's float32 arithmetic and tie order).

CUDA features use FAISS's GPU flat index when a faiss build with GPU support is installed
(``faiss.StandardGpuResources``; guarded, never run: the project's GPU machine has no FAISS);
otherwise they are searched on the CPU and the lists come back on their device.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)


def knn_faiss(X: torch.Tensor, k: int, budget: int):
    import faiss  # imported lazily: optional dependency

    from prh_fast._log import _log_once

    if X.dtype == torch.float64:
        _log_once("prh_fast: the faiss backend computes in float32; float64 features lose "
                  "precision there (use backend='cpu' for float64 search)", logger)
    n = X.shape[0]
    x = np.ascontiguousarray(X.detach().cpu().to(torch.float32).numpy())
    index = faiss.IndexFlatIP(x.shape[1])
    if X.device.type == "cuda" and hasattr(faiss, "StandardGpuResources") \
            and faiss.get_num_gpus() > 0:
        res = faiss.StandardGpuResources()  # noqa: F841  (must outlive the index)
        index = faiss.index_cpu_to_gpu(res, X.device.index or 0, index)
    index.add(x)
    # k + 1 results: the point itself is normally first; drop it wherever it appears, or drop
    # the last entry if self was crowded out by duplicates scoring as high.
    D, I = index.search(x, k + 1)
    is_self = I == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), k)
    keep = np.ones_like(I, dtype=bool)
    keep[np.arange(n), drop] = False
    I = I[keep].reshape(n, k)
    D = D[keep].reshape(n, k)
    vals = torch.from_numpy(D).to(X.device)
    idx = torch.from_numpy(I).to(X.device)
    from prh_fast.knn._torch import _canonical

    vals, idx = _canonical(vals, idx)
    return idx, vals.to(X.dtype)
