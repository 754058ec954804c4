"""Exact k-nearest-neighbour search by inner product, the step every ``*_knn`` metric shares.

``knn(X, k)[i]`` holds the ``k`` rows ``j != i`` with the largest ``<x_i, x_j>``, by decreasing
similarity, ties broken by the lower index (SPEC, "Nearest neighbours"). No backend ever holds
an ``N x N`` matrix: queries are processed in blocks against key tiles, with a running top-k
merge, under a memory budget.

Backends (``backend=`` or ``PRH_FAST_BACKEND``):

- ``"cpu"``: BLAS tile products (through torch) + native C++/OpenMP selection. Symmetric
  search computes each tile once and feeds it to both its query block and its key block.
- ``"torch"``: pure torch tiles + ``topk`` with an exact tie fix; runs on CPU and CUDA.
- ``"faiss"``: FAISS flat inner-product search (float32 only; ties at the k-th place follow
  FAISS's order, not the lower-index rule).
"""
from __future__ import annotations

import torch

from prh_fast._backend import resolve_knn_backend
from prh_fast._validate import as_features, check_topk, compute_dtype

__all__ = ["knn", "DEFAULT_MEMORY_BUDGET"]

#: Bytes of scratch memory a search may use for score tiles (not counting inputs/outputs).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def knn(X, k: int, *, backend: str | None = None, memory_budget: int | None = None,
        return_scores: bool = False):
    """Indices ``[N, k]`` (int64, on ``X``'s device) of each row's ``k`` nearest other rows.

    Args:
        X: ``[N, D]`` torch tensor (any float dtype, CPU or CUDA) or NumPy array.
        k: number of neighbours, ``1 <= k <= N - 1``.
        backend: ``"auto"`` (default), ``"cpu"``, ``"torch"`` or ``"faiss"``.
        memory_budget: bytes of scratch for score tiles (default 256 MiB).
        return_scores: also return the ``[N, k]`` inner products, in the compute dtype
            (float64 for float64 input, float32 otherwise).
    """
    X = as_features(X, "X")
    k = check_topk(k, X.shape[0], "k")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {memory_budget}")
    name = resolve_knn_backend(backend, X.device)
    Xc = X.to(compute_dtype(X)).contiguous()
    if name == "cpu":
        from prh_fast.knn._cpu import knn_cpu as impl
    elif name == "faiss":
        from prh_fast.knn._faiss import knn_faiss as impl
    else:
        from prh_fast.knn._torch import knn_torch as impl
    idx, vals = impl(Xc, k, budget)
    return (idx, vals) if return_scores else idx
