"""Exact k-nearest-neighbour search by inner product, the step every ``*_knn`` metric shares.

``knn(X, k)[i]`` holds the ``k`` rows ``j != i`` with the largest ``<x_i, x_j>``, by decreasing
similarity, ties broken by the lower index (docs/metrics.md, "Nearest neighbours"). No backend
ever holds an ``N x N`` matrix: queries are processed in blocks against key tiles, with a
running top-k merge, under a memory budget.

What "largest" means for the exact ``cpu`` / ``torch`` backends (and the streamed and
distributed searches, which share the mechanism, ``_exact.py``): tile products only propose
``k + extra`` candidates; the lists rank them by the inner product accumulated in float64 in
one fixed order per pair, so exact duplicate rows tie exactly (BLAS sums a product in an order
that depends on the tile, which can set equal rows an ulp apart), and a certified error margin
(with an exact sweep for rows it leaves open) makes the lists those of the fixed-order scores,
whatever the tiles. Features whose inner products would leave the compute dtype's range are
searched scaled by a power of two (exact; the lists are the same).

Backends (``backend=``, else the configured one: ``prh_fast.config_context`` /
``prh_fast.set_config`` / ``PRH_FAST_BACKEND``). Each is declared once, with what it supports,
in the registry ``_backends.py``, whose ``resolve`` is the one dispatch point of the in-memory,
streamed and distributed searches and of the neighbour-set step after them:

- ``"cpu"``: BLAS tile products (through torch) + native C++/OpenMP selection. Symmetric
  search computes each tile once and feeds it to both its query block and its key block.
- ``"torch"``: pure torch tiles + ``topk`` with an exact tie fix; runs on CPU and CUDA.
- ``"faiss"``: FAISS flat inner-product search (float32 only; ties at the k-th place follow
  FAISS's order, not the lower-index rule).
- ``"triton"``: the fused GPU kernel (``_triton.py``): tensor-core tile products with an
  on-chip running top-k, never an ``N x N`` tile in memory. Exact by default (certified
  candidates re-scored in float32: the lists equal the float32 lists); ``exact=False`` is the
  faster approximate mode (bf16 products, no re-score, logged).
- ``"cuda"``: the same Triton search here; the name also selects the native CUDA
  neighbour-set and CKNNA kernels for the step after the search (``prh_fast.metrics``,
  ``prh_fast.align``), which ``"triton"`` and ``"auto"`` leave to torch on a GPU.
- ``"faiss-ivf"``, ``"faiss-ivfpq"``, ``"faiss-hnsw"``: approximate FAISS indexes (IVF-Flat,
  IVF-PQ, HNSW; ``_faiss_ann.py``). Parameters: ``backend=AnnParams(...)`` or a spec string
  ``"faiss-ivf:nprobe=16"``. Every such search measures its recall@k against an exact search
  of a seeded sample of rows and logs it; ``return_report=True`` also returns the
  ``AnnReport``. Self and cross (``keys=``) searches.
- ``"auto"``: ``cpu`` for CPU tensors (``torch`` for a cross search or without the native
  module), ``triton`` for CUDA tensors when Triton can run, else ``torch`` (a backend skipped
  because it cannot run here is logged once, with the reason).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

import torch

from prh_fast._threads import with_threads
from prh_fast._validate import (
    as_features,
    check_memory_budget,
    check_positive_int,
    check_topk,
    compute_dtype,
)
from prh_fast.errors import InputError
from prh_fast.knn._backends import ANN_BACKENDS, resolve
from prh_fast.knn._faiss_ann import AnnParams, AnnReport

if TYPE_CHECKING:
    from prh_fast._validate import Features

__all__ = ["knn", "DEFAULT_MEMORY_BUDGET", "AnnParams", "AnnReport"]

#: Bytes of scratch memory a search may use for score tiles (not counting inputs/outputs).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


@overload
def knn(X: Features, k: int, *, backend: str | AnnParams | None = None,
        memory_budget: int | None = None, keys: Features | None = None, exact: bool = True,
        precision: str | None = None, include_self: bool = False,
        return_scores: Literal[False] = False, return_report: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def knn(X: Features, k: int, *, backend: str | AnnParams | None = None,
        memory_budget: int | None = None, keys: Features | None = None, exact: bool = True,
        precision: str | None = None, include_self: bool = False,
        return_scores: Literal[True], return_report: Literal[False] = False,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def knn(X: Features, k: int, *, backend: str | AnnParams | None = None,
        memory_budget: int | None = None, keys: Features | None = None, exact: bool = True,
        precision: str | None = None, include_self: bool = False,
        return_scores: Literal[False] = False, return_report: Literal[True],
) -> tuple[torch.Tensor, AnnReport | None]: ...


@overload
def knn(X: Features, k: int, *, backend: str | AnnParams | None = None,
        memory_budget: int | None = None, keys: Features | None = None, exact: bool = True,
        precision: str | None = None, include_self: bool = False,
        return_scores: Literal[True], return_report: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor, AnnReport | None]: ...


@overload
def knn(X: Features, k: int, *, backend: str | AnnParams | None = None,
        memory_budget: int | None = None, keys: Features | None = None, exact: bool = True,
        precision: str | None = None, include_self: bool = False,
        return_scores: bool = False, return_report: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]: ...


@with_threads
def knn(X: Features, k: int, *, backend: str | AnnParams | None = None,
        memory_budget: int | None = None, return_scores: bool = False,
        keys: Features | None = None, exact: bool = True, precision: str | None = None,
        return_report: bool = False,
        include_self: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Indices ``[N, k]`` (int64, on ``X``'s device) of each row's ``k`` nearest other rows.

    The exact backends rank by the fixed-order float64 inner product (``prh_fast.knn._exact``):
    the ``k`` largest ``<x_i, x_j>``, ``j != i``, ties -- exact duplicates included -- to the
    lower index. Features of any scale are searched (they are scaled by a power of two when
    their inner products would leave the compute dtype's range; the lists do not change).

    Args:
        X: ``[N, D]`` torch tensor (any float dtype, CPU or CUDA; a tensor that requires grad
            is detached) or NumPy array.
        k: number of neighbours, ``1 <= k <= N - 1`` (``<= M`` for a cross search).
        backend: ``"auto"`` (default), ``"cpu"``, ``"torch"``, ``"faiss"``, ``"triton"``,
            ``"cuda"``, or an approximate search: ``"faiss-ivf"``, ``"faiss-ivfpq"``,
            ``"faiss-hnsw"``, a spec string such as ``"faiss-ivf:nprobe=16"``, or an
            ``AnnParams`` (see the module docstring).
        memory_budget: bytes of scratch for score tiles (default 256 MiB).
        return_scores: also return the ``[N, k]`` inner products, in the compute dtype
            (float64 for float64 input, float32 otherwise); ``ValueError`` when they overflow
            it (e.g. float32 features ~1e20: pass float64, or normalise the rows).
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
        include_self: the row's own entry is eligible too (score ``<x_i, x_i>``): each row's
            ``k`` largest entries of the whole row ``X X^T``, ``1 <= k <= N - 1`` (what
            ``cknna(unbiased=False)`` masks, as the reference). Self search only.

    Returns:
        ``idx`` ``[N, k]`` int64; with ``return_scores`` / ``return_report`` a tuple
        ``(idx[, scores][, report])``.

    Raises:
        InputError: a bad argument (named), or a backend asked for by name whose declared
            support does not cover the search (wrong device, ``keys=`` with ``cpu``/``faiss``).
        BackendUnavailableError: a backend asked for by name that cannot run here.

    Example:
        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> knn(X, 1).tolist()
        [[1], [0], [3], [2]]
        >>> idx, vals = knn(X, 2, backend="torch", return_scores=True)
        >>> idx[0].tolist(), round(float(vals[0, 0]), 2)
        ([1, 3], 0.9)
    """
    idx, vals, report, cd = _search(X, k, backend=backend, memory_budget=memory_budget,
                                    keys=keys, exact=exact, precision=precision,
                                    include_self=include_self)
    res: tuple[torch.Tensor, ...] = (idx,)
    if return_scores:
        out = vals.to(cd)
        if bool(torch.isinf(out).any()) and not bool(torch.isinf(vals).any()):
            raise InputError(f"X: the neighbours' inner products exceed the {cd} range (largest "
                             f"{float(vals.abs().max()):.3g}); pass float64 features, normalise "
                             f"the rows, or leave return_scores=False")
        res = res + (out,)
    if return_report:
        res = res + (report,)
    return res if len(res) > 1 else res[0]


def _search(X, k, *, backend=None, memory_budget=None, keys=None, exact=True, precision=None,
            include_self=False):
    """``knn``'s work: ``(idx, float64 scores, report, compute dtype)``. The float64 scores are
    the exact backends' fixed-order scores (other backends: theirs, widened), unscaled."""
    from prh_fast.knn._exact import check_scores_finite, fixed_self, merge_self, search_exponent
    from prh_fast.prepare import row_norms

    X = as_features(X, "X")
    if keys is not None:
        keys = as_features(keys, "keys")
        if keys.shape[1] != X.shape[1]:
            raise InputError(f"keys: expected {X.shape[1]} columns like X, got shape "
                             f"{tuple(keys.shape)}")
        if keys.device != X.device:
            raise InputError(f"keys: must be on X's device ({X.device}), got {keys.device}")
        k = check_positive_int(k, "k", minimum=1, maximum=keys.shape[0])
        if include_self:
            raise InputError("include_self: only for a self search (keys=None)")
    else:
        k = check_topk(k, X.shape[0], "k")
    if not isinstance(exact, bool):
        raise InputError(f"exact: expected True or False, got {exact!r}")
    if not isinstance(include_self, bool):
        raise InputError(f"include_self: expected True or False, got {include_self!r}")
    budget = check_memory_budget(memory_budget, DEFAULT_MEMORY_BUDGET)
    choice = resolve(backend, X.device, k=k, dtype=X.dtype, cross=keys is not None,
                     n=X.shape[0], dim=X.shape[1],
                     n_keys=None if keys is None else keys.shape[0])
    name = choice.search
    cd = compute_dtype(X) if keys is None else torch.promote_types(compute_dtype(X),
                                                                    compute_dtype(keys))
    Xc = X.to(cd).contiguous()
    # Inner products must stay inside the compute dtype: scale by a power of two if they
    # would not (exact; the lists are the same, scores are scaled back in float64).
    xn = row_norms(Xc)
    ex = search_exponent(float(xn.max()), cd)
    ek = ex
    Kc = None
    if keys is not None:
        Kc = keys.to(cd).contiguous()
        ek = search_exponent(float(row_norms(Kc).max()), cd)
        if ek:
            Kc = torch.ldexp(Kc, torch.tensor(-ek, device=Kc.device)).to(cd)
    if ex:
        Xc = torch.ldexp(Xc, torch.tensor(-ex, device=Xc.device)).to(cd)
        xn = torch.ldexp(xn, torch.tensor(-ex, device=xn.device))
    report = None
    if name in ANN_BACKENDS:
        from prh_fast.knn._faiss_ann import knn_ann

        idx, vals, report = knn_ann(Xc, k, choice.params, budget, keys=Kc)
    elif name == "triton":
        from prh_fast.knn._triton import knn_triton

        idx, vals = knn_triton(Xc, k, budget, keys=Kc, exact=exact, precision=precision)
    else:
        if precision is not None:
            from prh_fast.knn._triton import product_format

            product_format(X.dtype, precision, exact)  # a bad name is still an error
        if keys is not None:
            from prh_fast.knn._torch import knn_torch

            idx, vals = knn_torch(Xc, k, budget, keys=Kc, norms=xn)
        elif name == "cpu":
            from prh_fast.knn._cpu import knn_cpu

            idx, vals = knn_cpu(Xc, k, budget, norms=xn)
        elif name == "faiss":
            from prh_fast.knn._faiss import knn_faiss

            idx, vals = knn_faiss(Xc, k, budget)
        else:
            from prh_fast.knn._torch import knn_torch

            idx, vals = knn_torch(Xc, k, budget, norms=xn)
    vals = vals.to(torch.float64)
    check_scores_finite(vals, "X")  # every backend: never a list ranked by inf or NaN
    if include_self:
        idx, vals = merge_self(idx, vals, fixed_self(Xc).to(vals.device), k)
    if ex or ek:
        vals = torch.ldexp(vals, torch.tensor(ex + ek, device=vals.device))
    return idx, vals, report, cd
