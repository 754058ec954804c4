"""Exact neighbour search over ranks: queries sharded, key shards passed around a ring.

Rank ``r`` holds rows ``[o_r, o_r + n_r)`` of the global ``[N, D]`` matrix (the ranks' blocks in
rank order; ``shard_range`` gives the balanced split). Its queries are its own rows; the keys are
everyone's. Two ways to see all keys:

- ``"ring"``: ``P`` steps. At step ``s`` rank ``r`` holds the key shard of rank ``(r + s) % P``,
  sends it on to rank ``r - 1`` and receives the next one from rank ``r + 1`` (one
  ``batch_isend_irecv`` per step, posted *before* the tile products on the shard in hand, into a
  second buffer, so the transfer overlaps the compute). Memory: two key shards. Each rank
  receives ``(P - 1)/P · N · D`` values in all.
- ``"allgather"``: one ``all_gather`` of every shard (padded to the largest), then a local
  search. Chosen by ``mode="auto"`` when all keys fit in the memory budget.

Each rank merges a running top-k per query row (``prh_fast.knn._merge.TopK``). On CPU that is
the native ``topk_update`` (scores strictly greater than the current k-th enter, so a row must
see its keys in increasing index order for the lower-index tie rule): the ring visits shards
``r, r+1, ..., P-1`` and then ``0, ..., r-1``, two increasing runs, so each run keeps its own
list and the two lists are merged at the end by (score desc, index asc) (``merge_results``). On
GPU (or without the native module) every merge is the order-independent torch merge. The
running lists hold ``k' > k`` candidates with their fixed-order float64 scores (computed when
they enter, from the key block in hand), and the final lists come out of
``prh_fast.knn._exact``'s certificate; rows it leaves open (near-ties:
duplicated rows) get a second pass over the key shards (:class:`~prh_fast.knn._exact.Sweep`).
Either way the lists are those of ``prh_fast.knn.knn``: the ``k`` largest fixed-order inner
products, self excluded, ties to the lower global index. Shards are scaled by the same power of
two when the global largest row norm would take the products out of range (as ``knn`` does).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from prh_fast._validate import as_tensor, check_memory_budget, check_topk
from prh_fast.distributed._env import (
    agree,
    collective,
    comm_device,
    shard_range,
    world,
)
from prh_fast.errors import InputError
from prh_fast.knn import DEFAULT_MEMORY_BUDGET
from prh_fast.knn._exact import Sweep, candidate_count, finish, margins, search_exponent
from prh_fast.knn._merge import TopK, check_filled, merge_results
from prh_fast.knn._tiles import block_rows

__all__ = ["knn", "shard"]

_MODES = ("auto", "ring", "allgather")
_GATHER = ("all", "rank0", "none")


def shard(X: torch.Tensor, rank: int | None = None,
          world_size: int | None = None) -> torch.Tensor:
    """This rank's rows of a matrix every rank holds in full: ``X[start:stop]`` with
    ``shard_range(len(X), rank, world_size)`` (defaults: this process's rank and world).

    Args:
        X: the full matrix (anything with ``len`` and row slicing).
        rank: the rank whose rows to take.
        world_size: the number of ranks.

    Returns:
        ``X[start:stop]``.

    Example:
        >>> shard(list(range(10)), rank=1, world_size=3)
        [4, 5, 6]
    """
    r, P = world()
    rank = r if rank is None else rank
    world_size = P if world_size is None else world_size
    start, stop = shard_range(len(X), rank, world_size)
    return X[start:stop]


def _check_local(X):
    """This rank's shard as a 2-D float tensor (an empty ``[0, D]`` shard is allowed)."""
    t = as_tensor(X, "X")
    if not t.is_floating_point():
        raise InputError(f"X: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise InputError(f"X: expected a 2-D array [n, D] (this rank's rows), got "
                         f"{t.dim()}-D with shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise InputError(f"X: expected D >= 1 columns, got shape {tuple(t.shape)}")
    if t.shape[0] and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise InputError(f"X: contains {bad} NaN or Inf value(s)")
    return t


def _local_backend(backend, device) -> str:
    """The search each rank runs on its shard (``cpu``, ``torch`` or ``triton``), as the
    backend registry resolves a distributed request: faiss and the approximate backends are
    refused (the distributed search is exact, ties by the lower index)."""
    from prh_fast.knn._backends import resolve

    return resolve(backend, device, distributed=True).search


class _Merger:
    """Running candidates of this rank's query rows ``Q`` (global ids ``q0 ..``) over key blocks
    fed in any order: the ``kc`` best keys by product score with their fixed-order scores, in
    :class:`~prh_fast.knn._merge.TopK` lists. ``native``: the native merge, which needs each row
    to see its keys in increasing index order, so one list per increasing run of key offsets,
    combined by :func:`~prh_fast.knn._merge.merge_results` at the end; else one torch-merged
    list on ``Q``'s device."""

    def __init__(self, Q, q0: int, kc: int, budget: int, native: bool):
        self.Q, self.q0, self.kc, self.budget = Q, q0, kc, budget
        self.native = native
        self.rows = Q.shape[0]
        self._runs = []  # TopK lists; native: one per increasing run of key offsets
        self._last = -1

    def _new_run(self):
        return TopK(self.rows, self.kc, self.Q.dtype, self.Q.device, native=self.native,
                    with_fixed=True, ids=self.q0)

    def add(self, K, k0: int):
        """Merge keys ``K`` ``[m, D]`` with global ids ``k0 .. k0 + m - 1``."""
        m = K.shape[0]
        if m == 0 or self.rows == 0:
            return
        cols = min(m, max(self.kc, 1024 if self.native else 4096))
        rows = min(self.rows, block_rows(cols + self.kc, self.Q.element_size() + 16, self.budget,
                                         buffers=3))
        if not self._runs or (self.native and k0 < self._last):
            self._runs.append(self._new_run())
        self._last = k0
        top = self._runs[-1]
        if self.native:
            # key tiles outermost: every row sees this block's keys in increasing order
            K = K.contiguous()
            tiles = [(r0, c0) for c0 in range(0, m, cols) for r0 in range(0, self.rows, rows)]
        else:
            K = K.to(self.Q.device)
            tiles = [(r0, c0) for r0 in range(0, self.rows, rows) for c0 in range(0, m, cols)]
        for r0, c0 in tiles:
            top.add_product(self.Q[r0:r0 + rows], K[c0:c0 + cols], row0=r0, col0=k0 + c0,
                            exclude_self=True)

    def candidates(self):
        """``(idx, prod, fixed)`` ``[rows, kc]``."""
        runs = self._runs or [self._new_run()]
        v, i, f = merge_results([top.result() for top in runs], self.kc)
        if self.rows:
            check_filled(i, "X")
        return i, v, f


def _visit_keys(mode, Q, sizes, offs, rank, P, D, dtype, cdev, work_dev, fn):
    """Call ``fn(K, k0)`` with every rank's key shard (global ids from ``k0``), by an all-gather
    or around the ring; collective on every rank."""
    import torch.distributed as dist

    nmax = max(sizes)

    def send_ready(x):
        return x.to(device=cdev, dtype=dtype).contiguous()

    if mode == "allgather":
        pad = torch.zeros((nmax, D), dtype=dtype, device=cdev)
        pad[: sizes[rank]] = send_ready(Q)
        bufs = [torch.empty_like(pad) for _ in range(P)]
        with collective("all-gathering the key shards"):
            dist.all_gather(bufs, pad)
        for src in range(P):
            fn(bufs[src][: sizes[src]].to(work_dev), offs[src])
        return
    cur = torch.empty((nmax, D), dtype=dtype, device=cdev)
    nxt = torch.empty_like(cur)
    cur[: sizes[rank]] = send_ready(Q)
    left, right = (rank - 1) % P, (rank + 1) % P
    for s in range(P):
        src = (rank + s) % P
        works = []
        if s < P - 1:
            nsrc = (src + 1) % P
            ops = []
            if sizes[src]:
                ops.append(dist.P2POp(dist.isend, cur[: sizes[src]], left))
            if sizes[nsrc]:
                ops.append(dist.P2POp(dist.irecv, nxt[: sizes[nsrc]], right))
            if ops:
                with collective(f"ring step {s + 1}/{P - 1} (posting the shard exchange)",
                                peers=[left, right]):
                    works = dist.batch_isend_irecv(ops)
        fn(cur[: sizes[src]].to(work_dev), offs[src])
        with collective(f"ring step {s + 1}/{P - 1}: sending the key shard to rank {left} "
                        f"and receiving one from rank {right}", peers=[left, right]):
            for w in works:
                w.wait()
        cur, nxt = nxt, cur


def knn(X: torch.Tensor, k: int, *, gather: str = "all", mode: str = "auto",
        memory_budget: int | None = None, backend: str | None = None,
        return_scores: bool = False,
        ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
    """Exact ``k`` nearest neighbours of the rows of a matrix split over the ranks.

    Call on every rank of the default process group (``torch.distributed``; gloo or nccl).

    Args:
        X: this rank's rows ``[n_r, D]`` of the global ``[N, D]`` matrix; the global matrix is
            the ranks' blocks in rank order (``shard(X_full)`` or ``shard_range`` split it
            evenly; any split works, empty blocks included). Any float dtype; float64 is
            searched in float64, anything else in float32, as ``prh_fast.knn.knn`` does.
        k: neighbours per row, ``1 <= k <= N - 1``.
        gather: ``"all"`` (every rank returns the ``[N, k]`` lists), ``"rank0"`` (rank 0 gets
            them, other ranks ``None``) or ``"none"`` (each rank gets its own ``[n_r, k]``
            rows; indices are global).
        mode: ``"ring"``, ``"allgather"`` or ``"auto"`` (all-gather when the padded keys of all
            ranks fit in ``memory_budget``, else ring).
        memory_budget: bytes for score tiles (and the threshold of ``mode="auto"``); default
            256 MiB. The ring also holds two key shards.
        backend: the local merge, as in ``prh_fast.knn.knn``: ``"cpu"`` (native
            ``topk_update``, CPU tensors), ``"torch"`` (``select_topk``, CPU or CUDA) or
            ``"auto"`` (default: cpu on CPU when the native module is built, else torch);
            ``"faiss"`` is not supported here.
        return_scores: also return the matching inner products.

    Returns:
        ``idx`` (int64, on ``X``'s device), or ``(idx, scores)``; ``None`` on ranks other than 0
        with ``gather="rank0"``. The lists equal ``prh_fast.knn.knn(X_full, k)``'s: self
        excluded, decreasing score, ties to the lower global index.

    Example:
        Without a process group (one rank) it is ``prh_fast.knn.knn``:

        >>> import torch
        >>> X = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
        >>> knn(X, 1).tolist()
        [[1], [0], [3], [2]]
    """
    rank, P = world()
    err, t, budget = _check_request(X, gather, mode, memory_budget, backend)
    if P == 1:
        if err is not None:
            raise err
        from prh_fast.knn import knn as knn1

        return knn1(t, k, memory_budget=budget, backend=backend, return_scores=return_scores)
    lay = _exchange_layout(t, err, rank, P)
    k = check_topk(k, lay.N, "k")
    work_dev = t.device if t.device.type == "cuda" else lay.cdev
    if mode == "auto":
        mode = "allgather" if P * lay.nmax * lay.D * lay.itemsize <= budget else "ring"
    Q, qn = _local_queries(t, lay, work_dev)

    def visit(fn):
        _visit_keys(mode, Q, lay.sizes, lay.offs, rank, P, lay.D, lay.dtype, lay.cdev, work_dev,
                    fn)

    native = _local_backend(backend, work_dev) == "cpu"
    idx, vals = _exact_lists(Q, qn, lay, k, budget, native, visit)
    if lay.e_scale:
        vals = torch.ldexp(vals, torch.tensor(2 * lay.e_scale, device=vals.device))
    vals = _checked_scores(vals, lay.dtype)
    if gather == "none":
        idx, vals = idx.to(t.device), vals.to(t.device)
        return (idx, vals) if return_scores else idx
    got = _gather_lists(idx, vals, lay, k, to_all=gather == "all")
    if got is None:
        return None
    idx, vals = got[0].to(t.device), got[1].to(t.device)
    return (idx, vals) if return_scores else idx


@dataclasses.dataclass(frozen=True)
class _Layout:
    """What every rank knows of the global matrix after the shape exchange.

    Attributes:
        rank: this rank; ``P``: the world size.
        sizes: rows of each rank's shard; ``offs``: their global offsets (``P + 1`` entries).
        D: columns; ``dtype``: the compute dtype (float64 when the shards are, else float32).
        max_norm: the largest row norm of all shards (unscaled).
        cdev: where the collectives' tensors live.
    """

    rank: int
    P: int
    sizes: list
    offs: list
    D: int
    dtype: torch.dtype
    max_norm: float
    cdev: torch.device

    @property
    def N(self) -> int:
        return self.offs[-1]

    @property
    def nmax(self) -> int:
        return max(self.sizes)

    @property
    def itemsize(self) -> int:
        return torch.finfo(self.dtype).bits // 8

    @property
    def e_scale(self) -> int:
        """Every rank scales by the same power of two when the products would leave the
        compute dtype's range (as ``prh_fast.knn.knn`` does)."""
        return search_exponent(self.max_norm, self.dtype)

    @property
    def kmax(self) -> float:
        """The largest row norm after the scaling."""
        return math.ldexp(self.max_norm, -self.e_scale)


def _check_request(X, gather, mode, memory_budget, backend):
    """This rank's argument checks: ``(error or None, local tensor, budget)``; the error is
    shared with every rank before anyone raises it."""
    err, t, budget = None, None, None
    try:
        if gather not in _GATHER:
            raise InputError(f"gather: expected one of {_GATHER}, got {gather!r}")
        if mode not in _MODES:
            raise InputError(f"mode: expected one of {_MODES}, got {mode!r}")
        budget = check_memory_budget(memory_budget, DEFAULT_MEMORY_BUDGET)
        t = _check_local(X)
        _local_backend(backend, t.device if t.device.type == "cuda" else comm_device())
    except (ValueError, TypeError, RuntimeError) as e:
        err = e
    return err, t, budget


def _exchange_layout(t, err, rank: int, P: int) -> _Layout:
    """Everyone learns everyone's shape, dtype and largest row norm (and errors) in one object
    all-gather; an error on any rank is raised on every rank, naming the rank."""
    import torch.distributed as dist

    from prh_fast.prepare import row_norms

    info = None
    if t is not None:
        tn = row_norms(t) if t.shape[0] else torch.zeros(0, dtype=torch.float64)
        info = (int(t.shape[0]), int(t.shape[1]), t.dtype == torch.float64,
                float(tn.max()) if tn.numel() else 0.0)
    metas = [None] * P
    with collective("exchanging shard shapes"):
        dist.all_gather_object(metas, (None if err is None else (type(err).__name__, str(err)),
                                       info))
    agree_err = next(((r, e) for r, (e, _) in enumerate(metas) if e is not None), None)
    if agree_err is not None:
        r, (kind, msg) = agree_err
        if r == rank:
            raise err
        raise (TypeError if kind == "TypeError" else ValueError)(f"(on rank {r}) {msg}")
    sizes = [m[1][0] for m in metas]
    dims = {m[1][1] for m in metas}
    if len(dims) != 1:
        raise InputError(f"X: every rank's shard must have the same number of columns D, got "
                         f"{[m[1][1] for m in metas]} on ranks 0..{P - 1}")
    f64 = {m[1][2] for m in metas if m[1][0] > 0}
    if len(f64) > 1:
        raise InputError("X: some ranks hold float64 shards and others not; use one dtype on "
                         "every rank")
    return _Layout(rank=rank, P=P, sizes=sizes,
                   offs=np.concatenate([[0], np.cumsum(sizes)]).tolist(), D=dims.pop(),
                   dtype=torch.float64 if f64 == {True} else torch.float32,
                   max_norm=max(m[1][3] for m in metas), cdev=comm_device())


def _local_queries(t, lay: _Layout, work_dev):
    """This rank's rows in the compute dtype on ``work_dev``, scaled as every rank scales
    (``lay.e_scale``), and their float64 norms."""
    from prh_fast.prepare import row_norms

    Q = t.to(device=work_dev, dtype=lay.dtype).contiguous()
    if lay.e_scale:
        Q = torch.ldexp(Q, torch.tensor(-lay.e_scale, device=Q.device)).to(lay.dtype)
    qn = row_norms(Q) if Q.shape[0] else torch.zeros(0, dtype=torch.float64, device=Q.device)
    return Q, qn


def _exact_lists(Q, qn, lay: _Layout, k: int, budget: int, native: bool, visit):
    """This rank's exact lists ``(idx [n_r, k], fixed scores float64)`` (still scaled): the
    candidate pass over every key shard (``visit(fn)`` feeds them to ``fn``), the certificate
    of ``prh_fast.knn._exact``, and a second pass for the rows it left open on any rank."""
    import torch.distributed as dist

    kc = candidate_count(k, lay.N - 1)
    merger = _Merger(Q, lay.offs[lay.rank], kc, budget, native)
    visit(merger.add)
    rows = thr = idx = vals = None
    try:
        ci, cv, cf = merger.candidates()
        e = margins(qn.to(cv.device), lay.kmax, lay.D, lay.dtype)
        idx, vals, (rows, thr) = finish(ci, cv, cf, k, e, all_keys=kc >= lay.N - 1)
        err = None
    except ValueError as e_:
        err = e_
    agree(err, what="search result check")
    # rows the certificate left open (near-ties) on any rank: one more pass over the keys
    open_rows = [None] * lay.P
    with collective("sharing the rows left to re-score"):
        dist.all_gather_object(open_rows, int(rows.numel()))
    if any(open_rows):
        sweep = Sweep(Q[rows.to(Q.device)], rows.to(Q.device) + lay.offs[lay.rank], thr, k,
                      budget)
        visit(sweep.add)
        try:
            si, sv = sweep.result()
            idx[rows], vals[rows] = si.to(idx.device), sv.to(vals.device)
            err = None
        except ValueError as e_:
            err = e_
        agree(err, what="re-score check")
    return idx, vals


def _gather_lists(idx, vals, lay: _Layout, k: int, to_all: bool):
    """The ``[N, k]`` lists and scores of all ranks in rank order (padded to the largest shard
    for the collective): on every rank (``to_all``) or on rank 0 only (other ranks: None)."""
    import torch.distributed as dist

    packed = torch.zeros((lay.nmax, 2 * k), dtype=torch.float64, device=lay.cdev)
    packed[: lay.sizes[lay.rank], :k] = idx.to(lay.cdev, torch.float64)
    packed[: lay.sizes[lay.rank], k:] = vals.to(lay.cdev, torch.float64)
    if to_all:
        bufs = [torch.empty_like(packed) for _ in range(lay.P)]
        with collective("all-gathering the neighbour lists"):
            dist.all_gather(bufs, packed)
    else:
        bufs = [torch.empty_like(packed) for _ in range(lay.P)] if lay.rank == 0 else None
        with collective("gathering the neighbour lists on rank 0", peers=[0]):
            dist.gather(packed, bufs, dst=0)
        if lay.rank != 0:
            return None
    full = torch.cat([b[: lay.sizes[r]] for r, b in enumerate(bufs)])
    return full[:, :k].to(torch.int64), full[:, k:].to(lay.dtype)


def _checked_scores(vals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scores in the compute dtype; inf where the float64 ones were finite means overflow."""
    out = vals.to(dtype)
    if bool(torch.isinf(out).any()) and not bool(torch.isinf(vals).any()):
        raise InputError(f"X: the neighbours' inner products exceed the {dtype} range; pass "
                         f"float64 features or normalise the rows")
    return out
