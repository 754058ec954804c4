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
- ``"triton"`` (also ``"cuda"``): the fused GPU kernel (``_triton.py``): tensor-core tile
  products with an on-chip running top-k, never an ``N x N`` tile in memory. Exact by default
  (certified candidates re-scored in float32: the lists equal the float32 lists);
  ``exact=False`` is the faster approximate mode (bf16 products, no re-score, logged).
- ``"faiss-ivf"``, ``"faiss-ivfpq"``, ``"faiss-hnsw"``: approximate FAISS indexes (IVF-Flat,
  IVF-PQ, HNSW; ``_faiss_ann.py``). Parameters: ``backend=AnnParams(...)`` or a spec string
  ``"faiss-ivf:nprobe=16"``. Every such search measures its recall@k against an exact search
  of a seeded sample of rows and logs it; ``return_report=True`` also returns the
  ``AnnReport``. Self and cross (``keys=``) searches.
- ``"auto"``: ``cpu`` for CPU tensors (``torch`` for a cross search), ``triton`` for CUDA
  tensors when Triton can run, else ``torch`` (one log line).
"""
from __future__ import annotations

import torch

from prh_fast._backend import ANN_BACKENDS, resolve_knn_backend
from prh_fast._validate import as_features, check_positive_int, check_topk, compute_dtype
from prh_fast.knn._faiss_ann import AnnParams, AnnReport

__all__ = ["knn", "DEFAULT_MEMORY_BUDGET", "AnnParams", "AnnReport"]

#: Bytes of scratch memory a search may use for score tiles (not counting inputs/outputs).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def knn(X, k: int, *, backend: str | None = None, memory_budget: int | None = None,
        return_scores: bool = False, keys=None, exact: bool = True,
        precision: str | None = None, return_report: bool = False):
    """Indices ``[N, k]`` (int64, on ``X``'s device) of each row's ``k`` nearest other rows.

    Args:
        X: ``[N, D]`` torch tensor (any float dtype, CPU or CUDA) or NumPy array.
        k: number of neighbours, ``1 <= k <= N - 1`` (``<= M`` for a cross search).
        backend: ``"auto"`` (default), ``"cpu"``, ``"torch"``, ``"faiss"``, ``"triton"``,
            ``"cuda"``, or an approximate search: ``"faiss-ivf"``, ``"faiss-ivfpq"``,
            ``"faiss-hnsw"``, a spec string such as ``"faiss-ivf:nprobe=16"``, or an
            ``AnnParams`` (see the module docstring).
        memory_budget: bytes of scratch for score tiles (default 256 MiB).
        return_scores: also return the ``[N, k]`` inner products, in the compute dtype
            (float64 for float64 input, float32 otherwise).
        keys: ``[M, D]`` keys for a cross search: each row of ``X`` gets its ``k`` best keys
            (nothing excluded). ``torch``, ``triton`` and the approximate faiss backends.
        exact: ``False`` lets the triton backend skip the float32 re-score (approximate lists
            and scores, logged once). The other backends are always exact.
        precision: product format of the triton candidate pass: ``"auto"`` (default: tf32
            for float32 features when exact, bf16 when fast; the features' own format for
            bf16/fp16), ``"tf32"``, ``"bf16"``, ``"fp16"`` (fp16 features) or ``"fp32"``.
            In exact mode it changes only the speed, never the lists. Ignored elsewhere.
        return_report: also return the approximate search's ``AnnReport`` (``None`` for the
            exact backends) as the last element: ``(idx, report)`` or ``(idx, vals, report)``.
    """
    X = as_features(X, "X")
    if keys is not None:
        keys = as_features(keys, "keys")
        if keys.shape[1] != X.shape[1]:
            raise ValueError(f"keys: expected {X.shape[1]} columns like X, got shape "
                             f"{tuple(keys.shape)}")
        if keys.device != X.device:
            raise ValueError(f"keys: must be on X's device ({X.device}), got {keys.device}")
        k = check_positive_int(k, "k", minimum=1, maximum=keys.shape[0])
    else:
        k = check_topk(k, X.shape[0], "k")
    if not isinstance(exact, bool):
        raise ValueError(f"exact: expected True or False, got {exact!r}")
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {memory_budget}")
    name = resolve_knn_backend(backend, X.device, cross=keys is not None)

    def out(idx, vals, report=None):
        res = (idx, vals) if return_scores else (idx,)
        res = res + (report,) if return_report else res
        return res if len(res) > 1 else res[0]

    if name in ANN_BACKENDS:
        from prh_fast.knn._faiss_ann import as_ann_params, knn_ann

        return out(*knn_ann(X, k, as_ann_params(backend, name), budget, keys=keys))
    if name == "triton":
        from prh_fast.knn._triton import knn_triton

        return out(*knn_triton(X, k, budget, keys=keys, exact=exact, precision=precision))
    if precision is not None:
        from prh_fast.knn._triton import product_format

        product_format(X.dtype, precision, exact)  # a bad name is still an error
    if keys is not None:
        cd = torch.promote_types(compute_dtype(X), compute_dtype(keys))
        from prh_fast.knn._torch import knn_torch

        return out(*knn_torch(X.to(cd).contiguous(), k, budget, keys=keys.to(cd).contiguous()))
    Xc = X.to(compute_dtype(X)).contiguous()
    if name == "cpu":
        from prh_fast.knn._cpu import knn_cpu as impl
    elif name == "faiss":
        from prh_fast.knn._faiss import knn_faiss as impl
    else:
        from prh_fast.knn._torch import knn_torch as impl
    return out(*impl(Xc, k, budget))
