"""CPU neighbour search: BLAS tile products + native streaming top-k selection.

For a self search the score matrix is symmetric, so each tile ``X_I X_J^T`` (``J >= I``) is
computed once and used twice: rows of block ``I`` against keys of ``J``, and (transposed) rows
of ``J`` against keys of ``I`` (``TopK.add_product(..., symmetric=True)`` of
``prh_fast.knn._merge``). The native ``topk_update`` keeps each row's running
candidates sorted and inserts only scores *strictly* greater than the current last; because
every query row sees its key tiles in increasing index order (block ``J`` receives keys
``0..J-1`` as transposes while the outer loop advances, then ``J..`` directly), an equal score
never displaces a lower index. Each entry that enters a list also gets its fixed-order float64
score (the tile's rows are passed along); ``prh_fast.knn._exact`` ranks the final lists by those,
so exact duplicates tie exactly whatever BLAS did.
"""
from __future__ import annotations

import torch

from prh_fast.knn._exact import candidate_count, refine_in_memory
from prh_fast.knn._merge import TopK
from prh_fast.knn._tiles import square_tile


def cpu_tile(n: int, itemsize: int, budget: int) -> int:
    """Side of the square score tiles of a symmetric search of ``n`` rows.

    Tiles of 256..1024 rows: small enough that the symmetric saving is real (about half the
    products at 8+ blocks), large enough for BLAS to run at full speed (measured on 2 cores:
    N=4096, D=768 takes 0.097 s with 512-row tiles, 0.135 s with 2048, 0.163 s unblocked).
    The streaming search (``prh_fast.store._stream``) uses the same tiles.
    """
    return square_tile(n, itemsize, budget, buffers=1, maximum=min(1024, max(256, -(-n // 8))))


def cpu_candidates(X: torch.Tensor, kc: int, budget: int, with_fixed: bool = False):
    """``(idx, prod, fixed)`` ``[N, kc]``: each row's ``kc`` best other rows by the BLAS score
    (lower index at ties), with those scores and -- ``with_fixed`` -- the candidates'
    fixed-order float64 scores, computed as they enter (else ``fixed`` is None: in memory a
    pass over the final candidates is cheaper, about ``kc`` instead of ``kc·(1 + ln(N/kc))``
    re-scores per row)."""
    n = X.shape[0]
    top = TopK(n, kc, X.dtype, native=True, with_fixed=with_fixed)
    b = cpu_tile(n, X.element_size(), budget)
    for i0 in range(0, n, b):
        Xi = X[i0:i0 + b]
        for j0 in range(i0, n, b):
            # Off the diagonal the transposed tile feeds block j0's lists as a view: the native
            # kernel walks column-major tiles in row blocks (measured: as fast as a transposed
            # copy at N = 4096, 9% faster at N = 16384, and no second tile buffer).
            top.add_product(Xi, X[j0:j0 + b], row0=i0, col0=j0, exclude_self=True,
                            symmetric=j0 != i0)
    vals, idx, fixed = top.result("X")
    return idx, vals, fixed


def knn_cpu(X: torch.Tensor, k: int, budget: int, norms: torch.Tensor | None = None):
    """Exact lists ``(idx [N, k], fixed scores [N, k] float64)`` of a self search."""
    n = X.shape[0]
    kc = candidate_count(k, n - 1)
    cand = cpu_candidates(X, kc, budget)
    return refine_in_memory(X, None, k, cand, budget, norms=norms)
