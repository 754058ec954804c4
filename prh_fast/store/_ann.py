"""Approximate neighbour lists of one store layer (FAISS IVF-Flat, IVF-PQ, HNSW), streamed
from the store, with the index and the lists cached in the store.

The search is the in-memory ``prh_fast.knn.knn(X, k, backend=AnnParams(...))`` of the layer
prepared in memory (``prh_fast.knn._faiss_ann``), step for step, with the rows read from the
store instead of a tensor:

1. the index is trained on the same seeded rows (``numpy.random.default_rng([seed, 0x7A1])``,
   sorted), read from the store (memory-mapped pages of those rows only);
2. the prepared rows are added in store order, chunk by chunk under the memory budget (IVF
   lists keep the order of the adds, so chunked adds give the in-memory index; an HNSW graph
   depends on the batches, so HNSW adds all rows at once when they fit and in chunks only
   otherwise);
3. the recall sample (``sample_rows``) gets its exact lists from a streamed exact search of
   those rows against every key block (each block searched exactly, the block lists merged by
   ``(fixed-order score desc, index asc)``: the lists of the in-memory exact search);
4. the query-time parameters are tuned to the target on that sample (``tune_query``, with the
   sample rows searched in this index);
5. every row is searched chunk by chunk; IVF-PQ candidates are re-scored with exact float32
   inner products of the candidate rows read from the store; rows with fewer than ``k``
   results get exact lists, as in memory.

Memory: the index lives in memory (IVF-Flat and HNSW hold the flat float32 vectors, IVF-PQ its
codes); it must fit ``memory_budget`` with room for a chunk of rows, else an ``InputError``
names the budget and suggests ``faiss-ivfpq`` (compressed codes) -- the index type is never
changed behind the user's back.

Cache (the store's ``cache/`` folder, like the exact lists): the trained and filled index,
serialised by FAISS (``faiss.write_index`` / ``read_index`` through a callback, streamed: the
index is never held twice) inside our own file format -- a magic line, a JSON header (the
settings it was built with, the store's ``content_id``), the payload and a trailer with its
length and SHA-256 -- written atomically under a writer lock (no pickle anywhere);
and the final lists with their report (safetensors). The index is keyed on the layer, the
preparation, the build-time parameters and the store's content; the lists also on ``k``, the
query-time parameters and the target, so a grid's second metric on the same layer searches
nothing. A changed store (``content_id``) or different settings miss the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from prh_fast.errors import DestinationLocked, InputError
from prh_fast.knn._faiss_ann import (
    AnnParams,
    AnnReport,
    new_index,
    search_lists,
    training_rows,
)

log = logging.getLogger(__name__)

__all__ = ["AnnPlan", "ann_plan", "index_bytes", "stream_ann"]

#: Version of the cached index files and of the cached lists (bump when their meaning changes).
_INDEX_VERSION = 1
_LISTS_VERSION = 1
_MAGIC = b"PRHFAST-FAISS-INDEX\n"
#: Fields of ``AnnParams`` fixed when the index is built (the rest are query-time).
_BUILD_FIELDS = ("backend", "nlist", "train_size", "pq_m", "pq_nbits", "hnsw_m",
                 "ef_construction", "seed")
_MIB = 2**20


# ------------------------------------------------------------------------------------------------
# memory plan
# ------------------------------------------------------------------------------------------------
def index_bytes(p: AnnParams, n: int, d: int) -> int:
    """Bytes an index of ``n`` points of width ``d`` holds in memory (resolved ``p``).

    IVF-Flat: the float32 vectors and int64 ids plus the centroids; IVF-PQ: the codes and ids
    plus the centroids and the PQ codebooks; HNSW: the vectors plus about ``3·M`` int32 links
    per point (``2·M`` at level 0, the upper levels' share) and the per-point offsets. An
    estimate of the content: FAISS's inverted lists grow like ``std::vector`` (capacity up to
    twice the content while rows are added), which this does not count.

    Args:
        p: resolved parameters (``AnnParams.resolved``).
        n: points.
        d: width.

    Returns:
        The estimate, in bytes.

    Example:
        >>> index_bytes(AnnParams("faiss-ivf", nlist=16), 1000, 8)
        40512
    """
    if p.backend == "faiss-ivf":
        return n * (4 * d + 8) + p.nlist * d * 4
    if p.backend == "faiss-ivfpq":
        code = (p.pq_m * p.pq_nbits + 7) // 8
        return n * (code + 8) + p.nlist * d * 4 + 2**p.pq_nbits * d * 4
    return n * (4 * d + 3 * p.hnsw_m * 4 + 24)


@dataclass(frozen=True)
class AnnPlan:
    """How a streamed approximate search uses its memory budget.

    Attributes:
        n: rows of the layer.
        index: bytes of the index (:func:`index_bytes`).
        free: bytes of the budget beside the index (the scratch of every step).
        train: bytes of the training sample (float32 rows).
        chunk: rows per add chunk.
        row_bytes: scratch bytes of a row in flight (raw read, cast, prepared, FAISS's copy).
        key_block: key rows per block of the exact sample search.
        hnsw_batches: HNSW adds every row in one batch (``chunk >= N``): the in-memory graph.

    Example:
        >>> p = AnnParams("faiss-hnsw", ef_search=32).resolved(1000, 8, 5)
        >>> ann_plan(p, 1000, 8, 5, 4, 2**20).hnsw_batches
        True
    """

    n: int
    index: int
    free: int
    train: int
    chunk: int
    row_bytes: int
    key_block: int
    hnsw_batches: bool

    def search_chunk(self, k: int, refine: int | None) -> int:
        """Query rows per search chunk: a row in flight plus its ``(k + 1)·refine`` results
        (distances, ids, the canonical sort's copies).

        Args:
            k: neighbours.
            refine: IVF-PQ's candidate factor (``None``: 1).

        Returns:
            The rows, at least 1.

        Example:
            >>> AnnPlan(100, 0, 10**6, 0, 100, 100, 100, True).search_chunk(9, None)
            100
        """
        per = self.row_bytes + 3 * (k + 1) * (refine or 1) * 12
        return int(max(1, min(self.n, self.free // 2 // per)))


def ann_plan(p: AnnParams, n: int, d: int, k: int, store_itemsize: int, budget: int,
             where: str = "the layer") -> AnnPlan:
    """The memory plan of a streamed approximate search; ``InputError`` naming
    ``memory_budget`` when the index (with the recall sample's rows and a chunk of rows) does
    not fit.

    Args:
        p: resolved parameters.
        n, d, k: rows, width, neighbours.
        store_itemsize: bytes per stored value (the raw reads).
        budget: ``memory_budget`` in bytes.
        where: what is searched (the messages name it).

    Returns:
        An :class:`AnnPlan`.

    Raises:
        InputError: the index does not fit the budget (IVF-Flat / HNSW: the message suggests
            ``faiss-ivfpq`` or a larger ``memory_budget``), or the training sample does not.

    Example:
        >>> p = AnnParams("faiss-ivf", nlist=16, nprobe=4).resolved(1000, 8, 5)
        >>> ann_plan(p, 1000, 8, 5, 4, 2**20).chunk
        1000
    """
    idx = index_bytes(p, n, d)
    row = d * (store_itemsize + 24) + 64
    # the recall sample's rows, held while the sample is searched and tuned (twice: the
    # exact search's queries and the tuning's)
    sample = 2 * min(n, p.recall_sample or n) * d * 4
    least = min(n, 256)
    need = idx + sample + 2 * least * (row + 3 * (k + 1) * 12)
    if need > budget:
        if p.backend == "faiss-ivfpq":
            hint = "raise memory_budget or use fewer / smaller codes (pq_m, pq_nbits)"
        else:
            what = ("IVF-Flat" if p.backend == "faiss-ivf" else "HNSW")
            pq = AnnParams("faiss-ivfpq", seed=p.seed).resolved(n, d, k)
            hint = (f"the {what} index holds the float32 vectors (~{idx / _MIB:.1f} MiB); use "
                    f"backend='faiss-ivfpq' (compressed codes: ~"
                    f"{index_bytes(pq, n, d) / _MIB:.1f} MiB with the default pq_m = {pq.pq_m})"
                    f" or raise memory_budget")
        raise InputError(f"memory_budget: a {p.backend} index of {where} (N = {n}, D = {d}) "
                         f"needs ~{need / _MIB:.1f} MiB with its recall sample and a chunk of "
                         f"{least} rows, more than memory_budget = {budget / _MIB:.1f} MiB; "
                         f"{hint}")
    free = budget - idx
    chunk = int(max(1, min(n, (free - sample) // row)))
    train = 0
    if p.backend != "faiss-hnsw":
        train = p.train_size * d * 4
        if train + least * row > budget:
            raise InputError(f"memory_budget: the training sample of {where} (train_size = "
                             f"{p.train_size} rows of D = {d}, ~{train / _MIB:.1f} MiB) does "
                             f"not fit memory_budget = {budget / _MIB:.1f} MiB; pass a smaller "
                             f"train_size or raise memory_budget")
    # exact sample search: a key block (raw, cast, float32) beside the block search's tiles
    key_block = int(max(1, min(n, (free - sample) // 2 // max(1, d * (store_itemsize + 12)))))
    return AnnPlan(n=n, index=idx, free=free, train=train, chunk=chunk, row_bytes=row,
                   key_block=key_block, hnsw_batches=chunk >= n)


# ------------------------------------------------------------------------------------------------
# the index file
# ------------------------------------------------------------------------------------------------
def _digest(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _header(st, settings: dict) -> dict:
    return {"settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
            "content_id": str(st.content_id)}


_TRAILER = struct.Struct("<Q32s")  # payload length, SHA-256 of the payload


class _Hashing:
    """A file writer that hashes and counts what goes through it (FAISS writes the payload
    through it piece by piece: the serialised index is never held twice in memory)."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.size += len(b)
        return len(b)


def _load_index(faiss, st, name: str, settings: dict):
    """The cached index of ``settings`` (None when missing, stale or damaged).

    The file: ``_MAGIC``, the header's length (8 bytes), the JSON header (settings, the store's
    ``content_id``, format version, FAISS version), FAISS's serialisation of the index, and a
    trailer (the payload's length and SHA-256). The payload is checked (streamed through the
    hash) before FAISS reads it, piece by piece, from the file."""
    if not st.complete:
        return None
    full = st.cache_path(name)
    if not os.path.isfile(full):
        return None
    try:
        size = os.path.getsize(full)
        with open(full, "rb") as f:
            if f.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("not a prh_fast index file")
            (hlen,) = struct.unpack("<Q", f.read(8))
            if hlen > 1 << 20:
                raise ValueError("header too long")
            head = json.loads(f.read(hlen).decode())
            want = _header(st, settings)
            if head.get("settings") != want["settings"] or \
                    head.get("content_id") != want["content_id"]:
                return None
            start = len(_MAGIC) + 8 + hlen
            nbytes = size - start - _TRAILER.size
            f.seek(size - _TRAILER.size)
            plen, digest = _TRAILER.unpack(f.read(_TRAILER.size))
            if nbytes < 0 or plen != nbytes:
                raise ValueError("the index payload is truncated")
            f.seek(start)
            sha = hashlib.sha256()
            left = nbytes
            while left:
                b = f.read(min(left, 1 << 24))
                if not b:
                    raise ValueError("the index payload is truncated")
                sha.update(b)
                left -= len(b)
            if sha.digest() != digest:
                raise ValueError("the index payload is damaged (SHA-256 mismatch)")
            f.seek(start)
            left = [nbytes]

            def read(want: int) -> bytes:
                b = f.read(min(want, left[0]))
                left[0] -= len(b)
                return b

            return faiss.read_index(faiss.PyCallbackIOReader(read))
    except Exception as err:  # noqa: BLE001 - any damage means "not cached"
        log.warning("prh_fast.store: ignoring unreadable index file %s (%s)", full, err)
        return None


def _save_index(faiss, st, name: str, settings: dict, index) -> None:
    """Write the index atomically (:func:`_load_index`'s format), holding the file's writer
    lock; a store we may not write to, or a writer already writing this file, just leaves it
    uncached."""
    from prh_fast._io import atomic_write
    from prh_fast._lock import exclusive_lock

    if not st.complete:
        return
    head = _header(st, settings)
    head.update(format="prh_fast faiss index", version=_INDEX_VERSION,
                faiss=faiss.__version__)
    hb = json.dumps(head, sort_keys=True).encode()

    def write(f):
        f.write(_MAGIC)
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        h = _Hashing(f)
        w = faiss.PyCallbackIOWriter(h.write)
        faiss.write_index(index, w)
        del w  # flushes FAISS's buffer into the file
        f.write(_TRAILER.pack(h.size, h.sha.digest()))

    full = st.cache_path(name)
    try:
        with exclusive_lock(full, folder=False):
            atomic_write(full, write)
    except DestinationLocked as err:
        log.info("prh_fast.store: %s is being written by another process (%s)", full, err)
    except OSError as err:
        log.warning("prh_fast.store: could not cache %s in %s (%s)", name, st.path, err)


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------
def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False,
                dynamic_ncols=True)


def _rows32(src, l: int, a: int, b: int) -> np.ndarray:
    return np.ascontiguousarray(src.rows(l, a, b).to(torch.float32).cpu().numpy())


def _take32(src, l: int, ids: torch.Tensor) -> torch.Tensor:
    return src.take(l, ids).to(torch.float32).cpu().contiguous()


def _build(faiss, src, l: int, p: AnnParams, plan: AnnPlan, timings: dict, progress: bool):
    n, d = src.n, src.dims[l]
    index = new_index(faiss, p, d)
    t0 = time.perf_counter()
    if p.backend != "faiss-hnsw":
        sel = training_rows(n, p)
        m = n if sel is None else int(sel.numel())
        train = np.empty((m, d), dtype=np.float32)
        step = max(1, plan.chunk)
        for a in range(0, m, step):
            b = min(m, a + step)
            train[a:b] = (_rows32(src, l, a, b) if sel is None
                          else _take32(src, l, sel[a:b]).numpy())
        index.train(train)
        del train
    timings["train"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    step = n if (p.backend == "faiss-hnsw" and plan.hnsw_batches) else plan.chunk
    bar = _bar(n, f"{p.backend} index {src.name} layer {l}", "row", progress)
    try:
        for a in range(0, n, step):
            b = min(n, a + step)
            index.add(_rows32(src, l, a, b))
            bar.update(b - a)
    finally:
        bar.close()
    timings["add"] = time.perf_counter() - t0
    return index


# ------------------------------------------------------------------------------------------------
# searching
# ------------------------------------------------------------------------------------------------
def _exact_rows(src, l: int, ids: torch.Tensor, k: int, plan: AnnPlan, budget: int):
    """Exact float32 lists ``[r, k]`` of rows ``ids`` (sorted, distinct) against every row of
    the layer, self excluded: ``prh_fast.knn._faiss_ann.exact_rows`` with the keys streamed.

    Each key block is searched exactly (fixed-order scores, ties to the lower index) and the
    block lists are merged by ``(score desc, index asc)``: the top ``k + 1`` of all keys, the
    row itself among them unless duplicates crowd it out; it is dropped (else the last)."""
    from prh_fast.knn._merge import merge_results
    from prh_fast.knn._torch import knn_torch

    n = src.n
    Q = _take32(src, l, ids)
    kk = min(n, k + 1)
    cur = None
    tile = max(1 << 20, budget // 4)
    for a in range(0, n, plan.key_block):
        b = min(n, a + plan.key_block)
        K = src.rows(l, a, b).to(torch.float32).cpu()
        i, v = knn_torch(Q, min(kk, b - a), tile, keys=K)
        part = (v, i + a)
        cur = part if cur is None else merge_results([cur, part], min(kk, cur[0].shape[1]
                                                                      + part[0].shape[1]))
    vals, idx = cur
    vals = vals.to(torch.float32)
    is_self = idx == ids.view(-1, 1)
    drop = torch.where(is_self.any(dim=1), is_self.int().argmax(dim=1),
                       torch.full_like(ids, kk - 1))
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[torch.arange(idx.shape[0]), drop] = False
    return idx[keep].view(-1, kk - 1)[:, :k], vals[keep].view(-1, kk - 1)[:, :k]


def _dots64(src, l: int, rows: torch.Tensor, I: torch.Tensor, budget: int,
            Q: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 inner products ``[b, c]`` of the rows ``rows`` with their listed keys ``I``
    (``-1``: none -> ``-inf``), both read from the store (the in-memory ``_dots64``'s
    arithmetic), in row blocks within the memory budget. ``Q``: the rows' float32 values when
    already in hand."""
    b, c = I.shape
    d = src.dims[l]
    out = torch.empty((b, c), dtype=torch.float64)
    if b == 0 or c == 0:
        return out
    step = max(1, budget // max(1, c * d * 8 * 2))
    for r0 in range(0, b, step):
        r1 = min(b, r0 + step)
        ii = I[r0:r1]
        q = (_take32(src, l, rows[r0:r1]) if Q is None else Q[r0:r1]).double()
        cand = _take32(src, l, ii.clamp_min(0).reshape(-1)).double().view(r1 - r0, c, d)
        s = torch.einsum("bd,bcd->bc", q, cand)
        out[r0:r1] = s.masked_fill(ii < 0, float("-inf"))
    return out


def _search_rows(index, p: AnnParams, src, l: int, Q: torch.Tensor, ids: torch.Tensor, k: int,
                 budget: int):
    """``prh_fast.knn._faiss_ann.search_lists`` of the float32 query rows ``Q`` (store rows
    ``ids``, excluded from their own lists), IVF-PQ candidates re-scored from store rows."""
    return search_lists(index, p, Q, ids, k, src.n, lambda ii: _take32(src, l, ii), budget)


def _complete(src, l, ids, out_i, out_v, short, k, plan, budget) -> int:
    """Exact lists for the rows ``short`` (positions in ``ids``) that had fewer than ``k``
    results; returns how many."""
    if short.numel() == 0:
        return 0
    ii, vv = _exact_rows(src, l, ids[short], k, plan, budget)
    out_i[short], out_v[short] = ii, vv
    return int(short.numel())


# ------------------------------------------------------------------------------------------------
# the lists cache
# ------------------------------------------------------------------------------------------------
#: ``AnnReport`` fields kept as tensors in the cached lists (the rest go to its JSON).
_REPORT_TENSORS = ("sample", "approx", "exact", "approx_scores", "kth")


def _report_dict(rep: AnnReport) -> dict:
    return {f.name: getattr(rep, f.name) for f in fields(rep)
            if f.name not in _REPORT_TENSORS and not f.name.startswith("_")}


def _lists_put(st, name: str, settings: dict, idx, vals, rep: AnnReport) -> None:
    blob = json.dumps(_report_dict(rep), default=_json_default).encode()
    tensors = {"idx": idx.cpu(), "vals": vals.cpu(),
               "report": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    tensors.update({a: getattr(rep, a).cpu() for a in _REPORT_TENSORS
                    if getattr(rep, a) is not None})
    try:
        st.cache_save(name, tensors, settings)
    except OSError as err:
        log.warning("prh_fast.store: could not cache %s in %s (%s)", name, st.path, err)


def _json_default(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, tuple):
        return list(v)
    return str(v)


def _lists_get(st, name: str, settings: dict, n: int, k: int):
    """``(idx, vals, report fields)`` of the cached lists, or None."""
    got = st.cache_load(name, settings)
    if got is None or any(a not in got for a in ("idx", "vals", "report", "sample", "approx",
                                                  "exact")):
        return None
    if tuple(got["idx"].shape) != (n, k) or got["vals"].dtype != torch.float64:
        return None
    try:
        meta = json.loads(bytes(got["report"].numpy()).decode())
        known = {f.name for f in fields(AnnReport)}
        meta = {a: v for a, v in meta.items() if a in known and not a.startswith("_")}
        if isinstance(meta.get("recall_ci"), list):
            meta["recall_ci"] = tuple(meta["recall_ci"])
        meta.update({a: got[a] for a in _REPORT_TENSORS if a in got})
    except Exception as err:  # noqa: BLE001 - an unreadable report means "not cached"
        log.warning("prh_fast.store: ignoring cached lists %s (%s)", name, err)
        return None
    return got["idx"], got["vals"], meta


# ------------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------------
def _scaled_source(prep, l: int, block: int, scaled_cls, max_norm):
    """``(source, e)``: the prepared rows, scaled by ``2**-e`` when their inner products would
    leave the compute dtype (the in-memory search scales the same way)."""
    from prh_fast.knn._exact import search_exponent

    if prep.normalize:
        return prep, 0  # unit rows (or zero rows): always in range
    e = search_exponent(max_norm(prep, l, block), prep.dtype)
    return (scaled_cls(prep, e), e) if e else (prep, 0)


def stream_ann(prep: Any, l: int, k: int, params: AnnParams, budget: int, *,
               cache: bool = True, progress: bool = False,
               note: Callable[..., None] | None = None, scaled_cls: type | None = None,
               max_norm: Callable[..., float] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, AnnReport]:
    """Approximate lists of layer ``l`` of a store: ``(idx [N, k] int64, vals [N, k] float64,
    report)``, equal to ``prh_fast.knn.knn(X, k, backend=params)`` on the layer prepared in
    memory (self excluded; CPU tensors).

    Args:
        prep: the layer's prepared rows (``prh_fast.store._stream.StreamPrep``: ``rows``,
            ``take``, ``settings``, ``store``).
        l: the layer.
        k: neighbours, ``1 <= k <= N - 1``.
        params: the approximate search (``AnnParams``; ``None`` fields derived from N).
        budget: bytes of memory for the index and the chunks in flight (``memory_budget``).
        cache: read / write the index and the lists in the store's cache.
        progress: tqdm bars over the adds.
        note: ``note(event, path, count=1, **fields)``: records what ran or came from the
            cache (``prh_fast.store._stream._note``): ``ann_index_builds``,
            ``ann_index_cache_hits``, ``ann_searches``, ``ann_cache_hits``.
        scaled_cls, max_norm: the streamed search's scaled view of a layer and its row-norm
            pass (``prh_fast.store._stream._Scaled`` / ``_max_norm``), for layers that are not
            normalised.

    Returns:
        ``(idx, vals, report)``: the lists, their scores (float32 scores widened, scaled back)
        and the ``AnnReport``.

    Raises:
        InputError: the index does not fit ``memory_budget`` (see :func:`ann_plan`), bad
            parameters for this layer, or a recall target the index cannot reach.

    Example:
        >>> import tempfile, torch
        >>> from prh_fast.store import StoreWriter
        >>> from prh_fast.store._stream import StreamPrep
        >>> w = StoreWriter(tempfile.mkdtemp() + "/feats", dtype="float32")
        >>> w.append([torch.randn(300, 8, generator=torch.Generator().manual_seed(0))])
        >>> prep = StreamPrep(w.finish(), cache=False)
        >>> p = AnnParams("faiss-hnsw", ef_search=300)
        >>> idx, _, rep = stream_ann(prep, 0, 5, p, 2**26, cache=False)  # doctest: +SKIP
        >>> rep.recall  # doctest: +SKIP
        1.0
    """
    from prh_fast.knn._faiss_ann import (
        _faiss,
        sample_rows,
        set_query_params,
        tune_query,
    )

    faiss = _faiss()
    note = note or (lambda *a, **kw: None)
    st = prep.store
    n, d = prep.n, prep.dims[l]
    p = params.resolved(n, d, k)
    plan = ann_plan(p, n, d, k, st.dtype.itemsize, budget, f"layer {l} of {st.path}")
    scratch = plan.free // 2  # beside the index: the chunks in flight and the searches' tiles
    full = p.to_dict()
    build = {a: full.get(a) for a in _BUILD_FIELDS if a in full}
    isettings = {"kind": "ann-index", "version": _INDEX_VERSION, "layer": l,
                 **prep.settings(), "params": build, "faiss": faiss.__version__}
    if p.backend == "faiss-hnsw" and not plan.hnsw_batches:
        isettings["add_rows"] = plan.chunk  # the graph depends on the add batches
    lsettings = {**isettings, "kind": "ann-lists", "version": _LISTS_VERSION, "k": k,
                 "query": {a: v for a, v in full.items() if a not in build}}
    lname = f"annlists-l{l}-k{k}-{_digest(lsettings)}.safetensors"
    if cache:
        got = _lists_get(st, lname, lsettings, n, k)
        if got is not None:
            note("ann_cache_hits", st.path, layer=l)
            idx, vals, meta = got
            src, _ = _scaled_source(prep, l, plan.key_block, scaled_cls, max_norm)
            rep = AnnReport(**meta, _grow=_grower(src, l, idx, k, plan, scratch))
            return idx, vals, rep
    note("ann_searches", st.path, layer=l)
    src, e = _scaled_source(prep, l, plan.key_block, scaled_cls, max_norm)
    timings: dict = {}
    iname = f"annindex-l{l}-{p.backend}-{_digest(isettings)}.faiss"
    index = _load_index(faiss, st, iname, isettings) if cache else None
    if index is not None:
        note("ann_index_cache_hits", st.path, layer=l)
        timings["train"] = timings["add"] = 0.0
    else:
        note("ann_index_builds", st.path, layer=l)
        index = _build(faiss, src, l, p, plan, timings, progress)
        if cache:
            _save_index(faiss, st, iname, isettings, index)

    # the recall sample's exact lists come first: the tuning measures its trials against them
    t0 = time.perf_counter()
    sample = sample_rows(n, p.recall_sample, p.seed)
    ex_i = _exact_rows(src, l, sample, k, plan, scratch)[0]
    Qs = _take32(src, l, sample)
    kth = _dots64(src, l, sample, ex_i[:, -1:], scratch, Qs).view(-1)
    timings["report"] = time.perf_counter() - t0
    target = p.target_recall

    def search_sample(q: AnnParams) -> torch.Tensor:
        set_query_params(index, q)
        ii, vv, short = _search_rows(index, q, src, l, Qs, sample, k, scratch)
        _complete(src, l, sample, ii, vv, short, k, plan, scratch)
        return ii

    t0 = time.perf_counter()
    p, tuning = tune_query(p, search_sample, ex_i, k, n_keys=n,
                           scores=lambda lists: _dots64(src, l, sample, lists, scratch, Qs),
                           kth=kth)
    timings["tune"] = time.perf_counter() - t0
    set_query_params(index, p)

    t0 = time.perf_counter()
    out_i = torch.empty((n, k), dtype=torch.int64)
    out_v = torch.empty((n, k), dtype=torch.float32)
    short_all = []
    step = plan.search_chunk(k, p.refine if p.backend == "faiss-ivfpq" else None)
    for a in range(0, n, step):
        b = min(n, a + step)
        Q = src.rows(l, a, b).to(torch.float32).cpu().contiguous()
        ii, vv, short = _search_rows(index, p, src, l, Q, torch.arange(a, b), k, scratch)
        out_i[a:b], out_v[a:b] = ii, vv
        if short.numel():
            short_all.append(short + a)
    rows_c = torch.cat(short_all) if short_all else torch.empty(0, dtype=torch.int64)
    completed = _complete(src, l, torch.arange(n), out_i, out_v, rows_c, k, plan, scratch)
    timings["search"] = time.perf_counter() - t0
    index = None  # only the lists are kept

    ap_i = out_i[sample]
    rep = AnnReport(backend=p.backend, params=p.to_dict(), n=n, n_keys=n, d=d, k=k,
                    sample=sample, approx=ap_i, exact=ex_i, recall=0.0, rows_equal=0.0,
                    rows_completed=completed, device="cpu", timings=timings,
                    target_recall=target, tuning=tuning,
                    approx_scores=_dots64(src, l, sample, ap_i, scratch, Qs), kth=kth,
                    _grow=_grower(src, l, out_i, k, plan, scratch))
    log.warning(rep.summary())
    vals = out_v.to(torch.float64)
    if e:
        vals = torch.ldexp(vals, torch.tensor(2 * e))
    if cache:
        _lists_put(st, lname, lsettings, out_i, vals, rep)
    return out_i, vals, rep


def _grower(src, l: int, out_i: torch.Tensor, k: int, plan: AnnPlan, budget: int):
    """``AnnReport``'s ``_grow``: rows outside the sample -> ``(approx, exact, approx scores,
    k-th exact score)``, the exact lists streamed from the store."""

    def grow(rows: torch.Tensor) -> tuple:
        ex = _exact_rows(src, l, rows, k, plan, budget)[0]
        ap = out_i[rows]
        return (ap, ex, _dots64(src, l, rows, ap, budget),
                _dots64(src, l, rows, ex[:, -1:], budget).view(-1))

    return grow
