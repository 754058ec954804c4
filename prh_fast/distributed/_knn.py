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

Each rank merges a running top-k per query row. On CPU that is the native ``topk_update``
(scores strictly greater than the current k-th enter, so a row must see its keys in increasing
index order for the lower-index tie rule): the ring visits shards ``r, r+1, ..., P-1`` and then
``0, ..., r-1``, two increasing runs, so each run keeps its own list and the two lists are merged
at the end by (score desc, index asc). On GPU (or without the native module) every merge is the
order-independent ``select_topk``. The running lists hold ``k' > k`` candidates with their
fixed-order float64 scores (computed when they enter, from the key block in hand), and the final
lists come out of ``prh_fast.knn._exact``'s certificate; rows it leaves open (near-ties:
duplicated rows) get a second pass over the key shards (:class:`~prh_fast.knn._exact.Sweep`).
Either way the lists are those of ``prh_fast.knn.knn``: the ``k`` largest fixed-order inner
products, self excluded, ties to the lower global index. Shards are scaled by the same power of
two when the global largest row norm would take the products out of range (as ``knn`` does).
"""
from __future__ import annotations

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
from prh_fast.knn import DEFAULT_MEMORY_BUDGET
from prh_fast.knn._exact import Sweep, candidate_count, finish, margins, search_exponent
from prh_fast.knn._tiles import block_rows

__all__ = ["knn", "shard"]

_MODES = ("auto", "ring", "allgather")
_GATHER = ("all", "rank0", "none")


def shard(X, rank: int | None = None, world_size: int | None = None):
    """This rank's rows of a matrix every rank holds in full: ``X[start:stop]`` with
    ``shard_range(len(X), rank, world_size)`` (defaults: this process's rank and world)."""
    r, P = world()
    rank = r if rank is None else rank
    world_size = P if world_size is None else world_size
    start, stop = shard_range(len(X), rank, world_size)
    return X[start:stop]


def _check_local(X):
    """This rank's shard as a 2-D float tensor (an empty ``[0, D]`` shard is allowed)."""
    t = as_tensor(X, "X")
    if not t.is_floating_point():
        raise ValueError(f"X: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"X: expected a 2-D array [n, D] (this rank's rows), got "
                         f"{t.dim()}-D with shape {tuple(t.shape)}")
    if t.shape[1] == 0:
        raise ValueError(f"X: expected D >= 1 columns, got shape {tuple(t.shape)}")
    if t.shape[0] and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"X: contains {bad} NaN or Inf value(s)")
    return t


def _local_backend(backend, device) -> str:
    """The search each rank runs on its shard (``cpu``, ``torch`` or ``triton``), as the
    backend registry resolves a distributed request: faiss and the approximate backends are
    refused (the distributed search is exact, ties by the lower index)."""
    from prh_fast.knn._backends import resolve

    return resolve(backend, device, distributed=True).search


class _Merger:
    """Running candidates of ``rows`` query rows (global ids ``q0 ..``) over key blocks fed in
    any order: the ``kc`` best keys by product score with their fixed-order scores. ``native``:
    CPU ``topk_update``, one list per increasing run of key offsets; else ``merge_tile`` on the
    device."""

    def __init__(self, Q, q0: int, kc: int, budget: int, native: bool):
        self.Q, self.q0, self.k, self.budget = Q, q0, kc, budget
        self.native = native
        self.rows = Q.shape[0]
        self.runs = []  # native: [vals, idx, fixed] ndarrays
        self.last = -1
        self.run = None
        if not native:
            self.run = (torch.full((self.rows, 0), float("-inf"), dtype=Q.dtype, device=Q.device),
                        torch.empty((self.rows, 0), dtype=torch.int64, device=Q.device),
                        torch.empty((self.rows, 0), dtype=torch.float64, device=Q.device))

    def add(self, K, k0: int):
        """Merge keys ``K`` ``[m, D]`` with global ids ``k0 .. k0 + m - 1``."""
        m = K.shape[0]
        if m == 0 or self.rows == 0:
            return
        cols = min(m, max(self.k, 1024 if self.native else 4096))
        rows = min(self.rows, block_rows(cols + self.k, self.Q.element_size() + 16, self.budget,
                                         buffers=3))
        if self.native:
            self._add_native(K, k0, rows, cols)
        else:
            self._add_torch(K, k0, rows, cols)

    def _add_native(self, K, k0, rows, cols):
        from prh_fast._native import native

        _C = native()
        if k0 < self.last or not self.runs:
            npd = np.float64 if self.Q.dtype == torch.float64 else np.float32
            self.runs.append((np.full((self.rows, self.k), -np.inf, dtype=npd),
                              np.full((self.rows, self.k), -1, dtype=np.int64),
                              np.full((self.rows, self.k), -np.inf, dtype=np.float64)))
        self.last = k0
        vals, idx, fixed = self.runs[-1]
        buf = torch.empty(rows * cols, dtype=self.Q.dtype)
        K = K.contiguous()
        qn, kn = self.Q.numpy(), K.numpy()
        for c0 in range(0, K.shape[0], cols):
            c1 = min(K.shape[0], c0 + cols)
            Kt = K[c0:c1].T
            for r0 in range(0, self.rows, rows):
                r1 = min(self.rows, r0 + rows)
                S = buf[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
                torch.mm(self.Q[r0:r1], Kt, out=S)
                _C.topk_update(S.numpy(), self.q0 + r0, k0 + c0, vals[r0:r1], idx[r0:r1], True,
                               qn[r0:r1], kn[c0:c1], fixed[r0:r1])

    def _add_torch(self, K, k0, rows, cols):
        from prh_fast.knn._torch import merge_tile

        dev = self.Q.device
        K = K.to(dev)
        out = []
        for r0 in range(0, self.rows, rows):
            r1 = min(self.rows, r0 + rows)
            run = tuple(t[r0:r1] for t in self.run)
            qids = torch.arange(self.q0 + r0, self.q0 + r1, device=dev)
            for c0 in range(0, K.shape[0], cols):
                c1 = min(K.shape[0], c0 + cols)
                run = merge_tile(run, self.Q[r0:r1], K[c0:c1], qids, k0 + c0, self.k, True)
            out.append(run)
        self.run = tuple(torch.cat([o[t] for o in out]) for t in range(3))

    def candidates(self):
        """``(idx, prod, fixed)`` ``[rows, kc]``."""
        from prh_fast.knn._torch import select_topk

        if not self.native:
            v, i, f = self.run
        elif not self.runs:
            dt = self.Q.dtype
            return (torch.empty((self.rows, self.k), dtype=torch.int64),
                    torch.empty((self.rows, self.k), dtype=dt),
                    torch.empty((self.rows, self.k), dtype=torch.float64))
        else:
            v = torch.from_numpy(np.concatenate([r[0] for r in self.runs], axis=1))
            i = torch.from_numpy(np.concatenate([r[1] for r in self.runs], axis=1))
            f = torch.from_numpy(np.concatenate([r[2] for r in self.runs], axis=1))
            if len(self.runs) > 1:
                # Unfilled slots (-inf, id -1) sort last only if some real score beats them,
                # which holds for finite inputs: there are N - 1 >= kc real candidates.
                v, i, f = select_topk(v, i, self.k, f)
        if self.rows and (i.shape[1] < self.k or bool((i < 0).any())):
            raise ValueError("X: neighbour search produced empty slots (non-finite scores?)")
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


def knn(X, k: int, *, gather: str = "all", mode: str = "auto", memory_budget: int | None = None,
        backend: str | None = None, return_scores: bool = False):
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
    """
    import torch.distributed as dist

    rank, P = world()
    err, t = None, None
    try:
        if gather not in _GATHER:
            raise ValueError(f"gather: expected one of {_GATHER}, got {gather!r}")
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        budget = check_memory_budget(memory_budget, DEFAULT_MEMORY_BUDGET)
        t = _check_local(X)
        _local_backend(backend, t.device if t.device.type == "cuda" else comm_device())
    except (ValueError, TypeError, RuntimeError) as e:
        err = e
    if P == 1:
        if err is not None:
            raise err
        from prh_fast.knn import knn as knn1

        return knn1(t, k, memory_budget=budget, backend=backend, return_scores=return_scores)
    # Everyone learns everyone's shape, dtype and largest row norm (and errors) in one object
    # all-gather.
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
        raise ValueError(f"X: every rank's shard must have the same number of columns D, got "
                         f"{[m[1][1] for m in metas]} on ranks 0..{P - 1}")
    f64 = {m[1][2] for m in metas if m[1][0] > 0}
    if len(f64) > 1:
        raise ValueError("X: some ranks hold float64 shards and others not; use one dtype on "
                         "every rank")
    D = dims.pop()
    N = sum(sizes)
    k = check_topk(k, N, "k")
    dtype = torch.float64 if f64 == {True} else torch.float32
    offs = np.concatenate([[0], np.cumsum(sizes)]).tolist()
    out_dev = t.device
    cdev = comm_device()
    work_dev = t.device if t.device.type == "cuda" else cdev
    # every rank scales by the same power of two when the products would leave the range
    e_scale = search_exponent(max(m[1][3] for m in metas), dtype)
    Q = t.to(device=work_dev, dtype=dtype).contiguous()
    if e_scale:
        Q = torch.ldexp(Q, torch.tensor(-e_scale, device=Q.device)).to(dtype)
    qn = row_norms(Q) if Q.shape[0] else torch.zeros(0, dtype=torch.float64, device=Q.device)
    kmax = math.ldexp(max(m[1][3] for m in metas), -e_scale)
    native = _local_backend(backend, work_dev) == "cpu"
    kc = candidate_count(k, N - 1)
    merger = _Merger(Q, offs[rank], kc, budget, native)
    nmax = max(sizes)
    itemsize = torch.finfo(dtype).bits // 8
    if mode == "auto":
        mode = "allgather" if P * nmax * D * itemsize <= budget else "ring"
    _visit_keys(mode, Q, sizes, offs, rank, P, D, dtype, cdev, work_dev, merger.add)
    rows = thr = None
    try:
        ci, cv, cf = merger.candidates()
        e = margins(qn.to(cv.device), kmax, D, dtype)
        idx, vals, (rows, thr) = finish(ci, cv, cf, k, e, all_keys=kc >= N - 1)
        err = None
    except ValueError as e_:
        err = e_
    agree(err, what="search result check")
    # rows the certificate left open (near-ties) on any rank: one more pass over the keys
    open_rows = [None] * P
    with collective("sharing the rows left to re-score"):
        dist.all_gather_object(open_rows, int(rows.numel()))
    if any(open_rows):
        sweep = Sweep(Q[rows.to(Q.device)], rows.to(Q.device) + offs[rank], thr, k, budget)
        _visit_keys(mode, Q, sizes, offs, rank, P, D, dtype, cdev, work_dev, sweep.add)
        try:
            si, sv = sweep.result()
            idx[rows], vals[rows] = si.to(idx.device), sv.to(vals.device)
            err = None
        except ValueError as e_:
            err = e_
        agree(err, what="re-score check")
    if e_scale:
        vals = torch.ldexp(vals, torch.tensor(2 * e_scale, device=vals.device))
    vals = _checked_scores(vals, dtype)
    if gather == "none":
        idx, vals = idx.to(out_dev), vals.to(out_dev)
        return (idx, vals) if return_scores else idx
    # Gather the lists (and scores) in rank order, padded to the largest shard.
    packed = torch.zeros((nmax, 2 * k), dtype=torch.float64, device=cdev)
    packed[: sizes[rank], :k] = idx.to(cdev, torch.float64)
    packed[: sizes[rank], k:] = vals.to(cdev, torch.float64)
    if gather == "all":
        bufs = [torch.empty_like(packed) for _ in range(P)]
        with collective("all-gathering the neighbour lists"):
            dist.all_gather(bufs, packed)
    else:
        bufs = [torch.empty_like(packed) for _ in range(P)] if rank == 0 else None
        with collective("gathering the neighbour lists on rank 0", peers=[0]):
            dist.gather(packed, bufs, dst=0)
        if rank != 0:
            return None
    full = torch.cat([b[: sizes[r]] for r, b in enumerate(bufs)])
    idx = full[:, :k].to(torch.int64).to(out_dev)
    vals = full[:, k:].to(dtype).to(out_dev)
    return (idx, vals) if return_scores else idx


def _checked_scores(vals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Scores in the compute dtype; inf where the float64 ones were finite means overflow."""
    out = vals.to(dtype)
    if bool(torch.isinf(out).any()) and not bool(torch.isinf(vals).any()):
        raise ValueError(f"X: the neighbours' inner products exceed the {dtype} range; pass "
                         f"float64 features or normalise the rows")
    return out
