"""IVF-Flat search at matrix-product speed, with lists that do not depend on the query blocks.

FAISS's ``IndexIVFFlat.search`` scans each probed cell one query at a time: an inner product
per (query, vector), about 3.5 GMAC/s on the project's 2-core machine, where a matrix product
runs at ~100 GFLOP/s. ``IvfFlatScan`` searches the same index the other way round: the
queries of a block are assigned to their ``nprobe`` nearest centroids, grouped by cell, and
each cell's queries are scored against the cell's vectors with one matrix product; the native
``topk_scatter`` merges those scores into each query's running top-``kk`` list. Same
candidates as FAISS's search; ~4-5x less search time at N = 1M (``benchmarks/bench_ann.py``).

Reproducible, tie-aware lists. A BLAS product sums each score in an order chosen for the
product's shape and the score's position in it (on MKL a ``[M, D] @ [D, n]`` product with
``M < 12`` takes another path than a larger one; two equal keys in one product can score one
ulp apart). So the product's scores only filter: a key enters a list by its fixed-order float64
inner product (``dot_fixed``, the score the exact backends rank ties by), ties by the lower key
id, and the product's score skips a key only when it lies below the list's last score by more
than the product's rounding bound (``2·γ_D·|q|·max|v|``, ``γ_D = D·u / (1 - D·u)``,
``u = 2^-24``). The lists are therefore the exact top-``kk`` of the probed cells by those
scores, whatever the rows that share a product, the order of the cells or the query blocks:
an in-memory search and a store's chunked search of the same index are equal, exact duplicates
tie exactly, and the recall sample searched alone equals its rows in the search of all rows
(``tests/test_ivf_scan.py``, which also checks the candidates against FAISS's own search).

The centroid assignment is a product of queries and centroids merged by the native
``topk_update`` (ties by the lower cell), computed on tiles of ``TILE`` (32) query rows,
zero-padded: the same product shapes for every block, so the probed cells do not depend on
the blocking either.

Used by ``prh_fast.knn._faiss_ann.search_lists`` for CPU ``IndexIVFFlat`` indexes with an
inner-product flat quantiser (what ``new_index`` builds) when the native module is built; GPU
indexes, IVF-PQ and HNSW keep FAISS's own search. The scores returned are the float64
fixed-order inner products.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from prh_fast import _native

__all__ = ["TILE", "IvfFlatScan", "tile_mm"]

#: Query rows per product tile: every product has a multiple of this many rows.
TILE = 32
#: Unit roundoff of float32.
_U32 = 2.0**-24
#: Bytes of centroid scores per product of the assignment (cache-sized: larger tiles were
#: ~1.4x slower on the 2-core machine, the scores making a round trip through memory).
_PROBE_TILE_BYTES = 16 * 2**20


def tile_mm(Q: torch.Tensor, K: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``Q @ K.T`` (float32, ``[r, m]``) computed on ``Q`` zero-padded to a multiple of
    ``TILE`` rows, so each row's scores do not depend on how many rows share the product.

    Args:
        Q: ``[r, D]`` query rows.
        K: ``[m, D]`` key rows (any row stride, unit column stride).
        out: an optional ``[ceil(r / TILE) * TILE, D]`` float32 scratch for the padded rows.

    Example:
        >>> Q, K = torch.randn(5, 8), torch.randn(7, 8)
        >>> torch.allclose(tile_mm(Q, K), Q @ K.T, atol=1e-5)
        True
        >>> torch.equal(tile_mm(Q, K)[2], tile_mm(Q[2:3], K)[0])
        True
    """
    r, d = Q.shape
    g = -(-max(r, 1) // TILE) * TILE
    if g == r:
        return torch.mm(Q, K.T)
    pad = out[:g] if out is not None and out.shape[0] >= g else Q.new_empty((g, d))
    pad[:r] = Q
    pad[r:] = 0
    return torch.mm(pad, K.T)[:r]


class IvfFlatScan:
    """Views of a CPU ``faiss.IndexIVFFlat``'s centroids and inverted lists (no copy; the
    scan keeps the index alive; valid while no rows are added), and a grouped search of them.

    Example:
        >>> import faiss  # doctest: +SKIP
        >>> x = torch.nn.functional.normalize(torch.randn(2000, 16), dim=1)  # doctest: +SKIP
        >>> index = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 16,
        ...                            faiss.METRIC_INNER_PRODUCT)  # doctest: +SKIP
        >>> index.train(x.numpy()); index.add(x.numpy())  # doctest: +SKIP
        >>> D, I = IvfFlatScan.of(index).search(x[:5], 4, 10, 2**26)  # doctest: +SKIP
        >>> I.shape  # doctest: +SKIP
        torch.Size([5, 10])
    """

    def __init__(self, centroids: torch.Tensor, vecs: list, ids: list, index: Any = None
                 ) -> None:
        self.centroids = centroids
        self.vecs = vecs
        self.ids = ids
        self.index = index  # the views read the index's memory: keep it alive
        self.nlist = centroids.shape[0]
        self.d = centroids.shape[1]
        u = self.d * _U32
        #: twice the float32 rounding bound of a length-D inner product, per unit of |q|·|v|
        self.gamma = 2.0 * u / (1.0 - u)
        #: the largest row norm of each cell, an upper bound: a float32 norm is within
        #: gamma / 2 of the true one, so inflated by gamma it bounds it (as the queries' norms)
        self.vmax = [0.0 if v is None else float(v.norm(dim=1).max()) * (1.0 + self.gamma)
                     for v in vecs]

    @classmethod
    def of(cls, index: Any) -> IvfFlatScan | None:
        """The scan of ``index``, or ``None`` when it is not a CPU IVF-Flat index with a flat
        inner-product quantiser, or the native module is not built (FAISS searches then)."""
        if not _native.HAS_NATIVE:
            return None
        import faiss

        if type(index) is not faiss.IndexIVFFlat or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            return None
        quant = faiss.downcast_index(index.quantizer)
        if type(quant) is not faiss.IndexFlatIP or not index.is_trained:
            return None
        nlist, d = index.nlist, index.d
        if quant.ntotal != nlist:
            return None
        cent = np.frombuffer(faiss.rev_swig_ptr(quant.get_xb(), nlist * d), dtype=np.float32)
        inv = index.invlists
        vecs: list = []
        ids: list = []
        for c in range(nlist):
            n = inv.list_size(c)
            if n == 0:
                vecs.append(None)
                ids.append(None)
                continue
            codes = faiss.rev_swig_ptr(inv.get_codes(c), n * d * 4)
            vecs.append(torch.from_numpy(np.frombuffer(codes, dtype=np.float32).reshape(n, d)))
            ids.append(np.frombuffer(faiss.rev_swig_ptr(inv.get_ids(c), n), dtype=np.int64))
        return cls(torch.from_numpy(cent.reshape(nlist, d)), vecs, ids, index)

    def block_rows(self, nprobe: int, kk: int, budget: int) -> int:
        """Query rows per block within ``budget`` bytes: the probe lists and their sort
        (~64 bytes per probe) and the block's lists; at least ``TILE``."""
        per_row = nprobe * 64 + kk * 12 + 64
        return max(TILE, budget // per_row)

    def probes(self, Q: torch.Tensor, nprobe: int, budget: int) -> torch.Tensor:
        """``[r, nprobe]`` int64: each query row's ``nprobe`` cells by centroid inner product,
        descending, ties by the lower cell (tiled products, native merge)."""
        nat = _native.native()
        r = Q.shape[0]
        nprobe = min(nprobe, self.nlist)
        out_v = np.full((r, nprobe), -np.inf, dtype=np.float32)
        out_i = np.full((r, nprobe), -1, dtype=np.int64)
        per_row = self.nlist * 4
        step = max(TILE, min(budget // 2, _PROBE_TILE_BYTES) // per_row // TILE * TILE)
        pad = torch.empty((min(step, -(-r // TILE) * TILE), self.d), dtype=torch.float32)
        for a in range(0, r, step):
            b = min(r, a + step)
            S = tile_mm(Q[a:b], self.centroids, pad)
            nat.topk_update(S.numpy(), 0, 0, out_v[a:b], out_i[a:b], False)
        return torch.from_numpy(out_i)

    def search(self, Q: torch.Tensor, nprobe: int, kk: int, budget: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``kk`` best keys of each float32 query row among its ``nprobe`` cells:
        ``(scores [r, kk] float64, ids [r, kk] int64)``, by fixed-order score desc, ties by
        id asc; missing entries (too few vectors probed) ``-inf`` / ``-1``. The candidates
        of FAISS's search of the index, ranked by exact-tie-aware scores."""
        nat = _native.native()
        Q = Q.to(torch.float32).contiguous()
        r = Q.shape[0]
        nprobe = max(1, min(int(nprobe), self.nlist))
        vals = np.full((r, kk), -np.inf, dtype=np.float64)
        idx = np.full((r, kk), -1, dtype=np.int64)
        step = self.block_rows(nprobe, kk, budget)
        # the rounding bound of each query row's products, per unit of key norm (an inflated
        # float32 norm, as vmax: no float64 copy of the block)
        qbound = Q.norm(dim=1).double().mul_(self.gamma * (1.0 + self.gamma))
        for a in range(0, r, step):
            b = min(r, a + step)
            P = self.probes(Q[a:b], nprobe, budget).view(-1)
            order = torch.argsort(P, stable=True)
            rows = (order // nprobe).add_(a)
            counts = torch.bincount(P, minlength=self.nlist)
            cells = counts.nonzero().view(-1).tolist()
            ends = counts.cumsum(0).tolist()
            counts = counts.tolist()
            for c in cells:
                V = self.vecs[c]
                if V is None:
                    continue
                e = ends[c]
                s = e - counts[c]
                q = rows[s:e]
                Qc = Q.index_select(0, q)
                S = torch.mm(Qc, V.T)
                margin = qbound.index_select(0, q).mul_(self.vmax[c])
                nat.topk_scatter(S.numpy(), Qc.numpy(), V.numpy(), margin.numpy(),
                                 self.ids[c], q.numpy(), vals, idx)
        return torch.from_numpy(vals), torch.from_numpy(idx)
