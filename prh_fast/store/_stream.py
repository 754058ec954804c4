"""Streaming computations over one layer of a store: prepared rows, the clipping threshold,
exact neighbour lists. Nothing here holds a whole layer unless the memory budget allows it.

Preparation (:class:`StreamPrep`) applies, row chunk by row chunk, exactly what the alignment
pipeline applies to a model in memory (docs/metrics.md, "The pipeline"; ``prh_fast.grid``): cast as
``prepare_features`` does (float64 stays float64, everything else float32), clamp to
``[-t, t]`` with the model's clipping threshold ``t``, L2-normalise each row. Every step is
element- or row-wise once ``t`` is known, so a chunk comes out bit-equal to the same rows of
the in-memory result (checked in ``tests/test_stream.py``).

The threshold (:func:`clip_thresholds`) is the in-memory one, bit for bit:

- exact mode, ``t = sorted(|x|)[int(q·M)]`` over the ``M`` values of the model (all layers of a
  ``"tensor"`` store at once; one threshold per layer of a ``"list"`` store, as
  ``prepare_features`` does for a list): an MSB-first radix select over the stored values' bit
  patterns. Clearing the sign bit of an IEEE float gives an unsigned integer that orders
  ``|x|`` exactly as the floats do (``-0.0`` and ``0.0`` both map to 0, subnormals below the
  normals), so each pass histograms the next digit of the keys that share the prefix found so
  far and keeps the bucket holding rank ``int(q·M)``. float16 / bfloat16 stores (15-bit keys)
  take one pass, float32 two (16 + 15 bits), float64 three (21 bits each): at most three
  passes, memory one row chunk plus a ``2**21``-bin histogram. The selected stored value,
  cast like the in-memory features, is the exact element the full sort would find.
- approximate mode, ``t = mean_i quantile(|x_i|, q)``: each sample's quantile depends on its
  own row only, so one pass computes them chunk by chunk with ``prepare_features``' own
  routine and the ``[N]`` vector is averaged as the in-memory code averages it.

Thresholds are cached in the store (``cache/``, keyed on q, mode and the store's content).
Every pass, search and cache hit is a DEBUG record on this module's logger (:func:`_note`).

Neighbours (:func:`stream_knn`) are the in-memory ``prh_fast.knn.knn`` lists (self excluded,
ties to the lower index), identical to them: the tiles propose candidates, each with its
fixed-order float64 score computed as it enters (both rows are in hand), and
``prh_fast.knn._exact`` certifies the lists; rows it leaves open (near-ties) get one more
streamed pass. Since the lists are those of the fixed-order scores, any tiling gives the same
lists and scores. Candidates come from a query *panel* held in memory and key blocks streamed
from the store:

- ``cpu`` (the native backend): the symmetric tile search of ``prh_fast.knn._cpu`` with the
  same ``b x b`` tiles (``cpu_tile``) and the same running top-k (``prh_fast.knn._merge.TopK``,
  native ``topk_update``). A
  panel of consecutive blocks is read once; tiles inside it are processed in the in-memory
  order, then every later key block is read once and multiplied with each panel block, its
  transposed tile feeding that key block's own lists. Every row therefore sees its key tiles in
  increasing index order, exactly as in memory, so the strictly-greater insertion keeps the
  lower index at product ties. Flops are those of the in-memory search; the store is read
  about ``1 + blocks/panel`` times.
- ``torch`` (CPU or CUDA): the query-block x key-tile search of ``prh_fast.knn._torch`` (the
  torch merge of ``TopK``), tile shapes from ``torch_tiles``; a panel of query blocks stays on
  the device while key tiles stream past it.

Approximate backends (``faiss-ivf``, ``faiss-ivfpq``, ``faiss-hnsw``) go to
``prh_fast.store._ann``: the in-memory approximate search with the same parameters and seed,
its index built from rows streamed from the store and cached there with its lists.

``memory_budget`` bounds the scratch: score tiles, the query panel, the key blocks in flight
and their raw reads. The result itself (``[N, k]`` indices and scores, kept for the running
merge) is not counted: it is the output. Results are cached in the store, keyed on the layer,
``k``, the preparation settings, the backend and tile shapes and the store's content, so a grid
of models never searches a layer twice.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from prh_fast._validate import check_memory_budget
from prh_fast.errors import InputError
from prh_fast.knn._faiss_ann import AnnParams
from prh_fast.prepare import normalize_rows
from prh_fast.store._sharded import FeatureStore, open_store

__all__ = ["StreamPrep", "clip_thresholds", "stream_knn", "knn_plan",
           "DEFAULT_STREAM_BUDGET", "as_store"]

log = logging.getLogger(__name__)

#: Default scratch budget of the streaming computations (bytes).
DEFAULT_STREAM_BUDGET = 512 * 2**20

#: Cache format version: bump when a cached result's meaning changes.
_CACHE_VERSION = 1
#: Version of the cached neighbour lists (2: ranked by fixed-order float64 scores).
_KNN_CACHE_VERSION = 2

# Integer view, bit width and the key of +inf (smallest non-finite |x| key) per stored dtype.
_BITS = {torch.float16: (torch.int16, 16, 0x7C00),
         torch.bfloat16: (torch.int16, 16, 0x7F80),
         torch.float32: (torch.int32, 32, 0x7F800000),
         torch.float64: (torch.int64, 64, 0x7FF0000000000000)}


def as_store(store: str | os.PathLike | FeatureStore, arg: str = "store") -> FeatureStore:
    """An open :class:`FeatureStore` (a path is opened; unfinished stores are refused)."""
    if isinstance(store, FeatureStore):
        return store
    try:
        return open_store(store)
    except TypeError:
        raise InputError(f"{arg}: expected a store folder or FeatureStore, got "
                         f"{type(store).__name__}") from None


def _check_layer(st: FeatureStore, layer) -> int:
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not (
            -st.num_layers <= layer < st.num_layers):
        raise InputError(f"layer: expected a layer index in [0, {st.num_layers}) of "
                         f"{st.path}, got {layer!r}")
    return int(layer) % st.num_layers


def _compute_dtype(st: FeatureStore) -> torch.dtype:
    # prepare_features' cast (float64 stays, the rest becomes float32) = knn's compute dtype.
    return torch.float64 if st.dtype == torch.float64 else torch.float32


def _note(event: str, path: str, count: int = 1, **fields) -> None:
    """A DEBUG record on this module's logger saying that a streaming computation ran or came
    from the store's cache (a second grid over the same stores must not search again).

    The numbers ride on the record as ``extra`` fields: ``stream_event`` (``"threshold_passes"``,
    ``"threshold_cache_hits"``, ``"knn_searches"``, ``"knn_cache_hits"`` or
    ``"knn_sweep_rows"``), ``stream_count`` (passes, hits, searches or rows), ``stream_store``
    and any ``fields`` (``stream_layer``).

    Args:
        event: what happened.
        path: the store.
        count: how many.
        **fields: more ``stream_*`` fields.
    """
    if log.isEnabledFor(logging.DEBUG):
        extra = {"stream_event": event, "stream_count": int(count), "stream_store": path}
        extra.update({f"stream_{a}": v for a, v in fields.items()})
        log.debug("prh_fast.store: %s += %d (%s)", event, count, path, extra=extra)


def _digest(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cache_get(st: FeatureStore, name: str, settings: dict):
    return st.cache_load(name, settings)


def _cache_put(st: FeatureStore, name: str, tensors: dict, settings: dict) -> None:
    """Save atomically (``cache_save``); a store we may not write to just isn't cached."""
    try:
        st.cache_save(name, tensors, settings)
    except OSError as err:
        log.warning("prh_fast.store: could not cache %s in %s (%s)", name, st.path, err)


def _bar(total, desc, unit, progress):
    from tqdm.auto import tqdm

    # tqdm's default format shows the rate and the ETA.
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, leave=False,
                dynamic_ncols=True)


def _prefetched(fn, items):
    """Yield ``(item, fn(item))``, computing the next one in a background thread (store reads
    and torch ops release the GIL, so reading overlaps the products)."""
    items = list(items)
    if len(items) < 2:
        for it in items:
            yield it, fn(it)
        return
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(fn, items[0])
        for j, it in enumerate(items):
            got = fut.result()
            if j + 1 < len(items):
                fut = pool.submit(fn, items[j + 1])
            yield it, got


# ------------------------------------------------------------------------------------------------
# clipping threshold
# ------------------------------------------------------------------------------------------------
def _groups(st: FeatureStore) -> list:
    """Layers that share one threshold: all of them for a ``"tensor"`` store (one ``[N, L, D]``
    tensor), each alone for a ``"list"`` store (prepare_features clips list items one by one)."""
    if st.layout == "tensor":
        return [list(range(st.num_layers))]
    return [[l] for l in range(st.num_layers)]


def _chunk_rows(st: FeatureStore, layers, budget: int, per_value: int) -> int:
    width = sum(st.dims[l] for l in layers)
    rows = budget // max(1, width * per_value)
    if rows < 1:
        raise InputError(f"memory_budget: {budget} bytes cannot hold one row of {st.path} "
                         f"({width} values, ~{width * per_value} bytes of scratch); raise it")
    return int(min(st.n, rows))


def _radix_widths(key_bits: int) -> list:
    """Digit widths, most significant first: 1 pass up to 16 bits, 2 up to 32, else 3."""
    passes = 1 if key_bits <= 16 else (2 if key_bits <= 32 else 3)
    base, extra = divmod(key_bits, passes)
    return [base + (1 if i < extra else 0) for i in range(passes)]


def _exact_thresholds(st: FeatureStore, q: float, budget: int, progress: bool) -> list:
    """Per group: the stored value at rank ``min(int(q·M), M-1)`` of the ascending ``|x|``."""
    itype, nbits, inf_key = _BITS[st.dtype]
    key_bits = nbits - 1
    absmask = (1 << key_bits) - 1
    groups = _groups(st)
    ranks, prefixes = [], [0] * len(groups)
    for g in groups:
        m = st.n * sum(st.dims[l] for l in g)
        # prepare.py's expression: int(q * M) with a Python float product, clamped.
        ranks.append(min(int(q * m), m - 1))
    # raw + int64 keys + a mask + int64 digits per value
    rows = _chunk_rows(st, range(st.num_layers), budget, st.dtype.itemsize + 8 + 1 + 8)
    widths = _radix_widths(key_bits)
    shift = key_bits
    for p, w in enumerate(widths):
        shift -= w
        hi = shift + w  # bits above this digit form the prefix
        counts = [torch.zeros(1 << w, dtype=torch.int64) for _ in groups]
        bar = _bar(st.n, f"clip threshold {st.path} (pass {p + 1}/{len(widths)})", "row",
                   progress)
        try:
            for a, chunk in st.iter_rows(rows):
                for gi, g in enumerate(groups):
                    for l in g:
                        keys = chunk[l].reshape(-1).view(itype) & absmask
                        if p == 0 and keys.numel() and int(keys.max()) >= inf_key:
                            raise InputError(f"{st.path}: layer {l} contains NaN or Inf "
                                             f"value(s) (rows {a}..{a + chunk[l].shape[0]})")
                        if hi < key_bits:
                            keys = keys[(keys >> hi) == prefixes[gi]]
                        digits = ((keys >> shift) & ((1 << w) - 1)).long()
                        counts[gi] += torch.bincount(digits, minlength=1 << w)
                bar.update(chunk[0].shape[0])
        finally:
            bar.close()
        _note("threshold_passes", st.path)
        for gi in range(len(groups)):
            cum = counts[gi].cumsum(0)
            digit = int((cum <= ranks[gi]).sum())  # first bucket whose cumulative count > rank
            if digit > 0:
                ranks[gi] -= int(cum[digit - 1])
            prefixes[gi] = (prefixes[gi] << w) | digit
    cd = _compute_dtype(st)
    out = []
    for gi, g in enumerate(groups):
        t = torch.tensor(prefixes[gi], dtype=itype).view(st.dtype).to(cd)
        out.extend([t] * len(g))
    return out


def _approx_thresholds(st: FeatureStore, q: float, budget: int, progress: bool,
                       device: torch.device) -> list:
    """Per group: the mean over samples of each sample's q-quantile of ``|x|`` (one pass)."""
    from prh_fast.prepare import _approx_per_sample

    cd = _compute_dtype(st)
    groups = _groups(st)
    pieces = [[] for _ in groups]
    # raw + cast + |x| + kthvalue's copies
    rows = _chunk_rows(st, range(st.num_layers), budget, st.dtype.itemsize + 4 * cd.itemsize)
    bar = _bar(st.n, f"clip threshold {st.path}", "row", progress)
    try:
        for a, chunk in st.iter_rows(rows):
            for gi, g in enumerate(groups):
                xs = [chunk[l].to(device).to(cd) for l in g]
                for l, x in zip(g, xs):
                    if not bool(torch.isfinite(x).all()):
                        raise InputError(f"{st.path}: layer {l} contains NaN or Inf value(s) "
                                         f"(rows {a}..{a + x.shape[0]})")
                x = torch.stack(xs, dim=1) if st.layout == "tensor" else xs[0]
                pieces[gi].append(_approx_per_sample(x, q))
            bar.update(chunk[0].shape[0])
    finally:
        bar.close()
    _note("threshold_passes", st.path)
    out = []
    for gi, g in enumerate(groups):
        # the in-memory code averages the concatenated [N] vector: same tensor, same mean
        t = torch.cat(pieces[gi]).mean()
        out.extend([t] * len(g))
    return out


def clip_thresholds(store: str | os.PathLike | FeatureStore, q: float, exact: bool = False, *,
                    device: str | torch.device | None = None,
                    memory_budget: int | None = None, progress: bool = False,
                    cache: bool = True) -> list:
    """The clipping threshold of every layer, as ``prepare_features(feats, q, exact)`` finds it
    for the store's features in memory (bit for bit): a list of 0-d tensors (float32, or
    float64 for a float64 store), equal for all layers of a ``"tensor"`` store.

    Args:
        store: a store folder or :class:`FeatureStore`.
        q: the quantile in ``(0, 1]`` (``1`` gives no threshold: returns ``None`` per layer).
        exact: exact mode (radix select, at most three passes) or approximate mode (one pass).
        device: where the approximate mode's per-sample quantiles are computed (the device the
            in-memory features would be on; the exact mode is a selection and device-free).
        memory_budget: bytes of scratch (row chunks); default ``DEFAULT_STREAM_BUDGET``.
        progress: tqdm bars (rate, ETA) for the passes.
        cache: read / write the result in the store's cache.

    Returns:
        One threshold per layer (``None`` per layer when ``q == 1``).

    Example:
        >>> import tempfile, torch
        >>> from prh_fast.store import StoreWriter
        >>> w = StoreWriter(tempfile.mkdtemp() + "/feats", dtype="float32")
        >>> w.append([torch.arange(1.0, 11.0).reshape(5, 2)])
        >>> clip_thresholds(w.finish(), 0.5, exact=True, cache=False)
        [tensor(6.)]
    """
    from prh_fast.prepare import _check_q

    st = as_store(store)
    q = _check_q(q)
    exact = bool(exact)
    budget = check_memory_budget(memory_budget, DEFAULT_STREAM_BUDGET)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if q == 1:
        return [None] * st.num_layers
    settings = {"kind": "clip", "version": _CACHE_VERSION, "q": repr(q), "exact": exact,
                "layout": st.layout, "device": "any" if exact else dev.type}
    name = f"clip-{_digest(settings)}.safetensors"
    if cache:
        got = _cache_get(st, name, settings)
        if got is not None and "t" in got and got["t"].numel() == st.num_layers:
            _note("threshold_cache_hits", st.path)
            return [got["t"][l].clone() for l in range(st.num_layers)]
    if exact:
        ts = _exact_thresholds(st, q, budget, progress)
    else:
        ts = _approx_thresholds(st, q, budget, progress, dev)
    ts = [t.cpu() for t in ts]
    if cache:
        _cache_put(st, name, {"t": torch.stack(ts)}, settings)
    return ts


# ------------------------------------------------------------------------------------------------
# prepared rows
# ------------------------------------------------------------------------------------------------
class StreamPrep:
    """Rows of a store prepared as the alignment pipeline prepares a model in memory.

    ``q=None`` (or 1) skips clipping; ``normalize`` L2-normalises rows (docs/metrics.md,
    pipeline steps 2-3). ``rows(l, a, b)`` returns rows ``a:b`` of layer ``l`` on ``device`` in
    the compute dtype (float64 for a float64 store, else float32), bit-equal to the same rows of
    the in-memory preparation. The threshold is found (or read from the cache) on first use.

    Example:
        >>> import tempfile, torch
        >>> from prh_fast.store import StoreWriter
        >>> w = StoreWriter(tempfile.mkdtemp() + "/feats", dtype="float32")
        >>> w.append([torch.tensor([[3.0, 4.0], [0.0, 2.0]])])
        >>> StreamPrep(w.finish(), cache=False).rows(0, 0, 2)
        tensor([[0.6000, 0.8000],
                [0.0000, 1.0000]])
    """

    def __init__(self, store: str | os.PathLike | FeatureStore, *, q: float | None = None,
                 exact: bool = False, normalize: bool = True,
                 device: str | torch.device | None = None, memory_budget: int | None = None,
                 progress: bool = False, cache: bool = True) -> None:
        from prh_fast.prepare import _check_q

        self.store = as_store(store)
        self.q = None if q is None else _check_q(q)
        if self.q == 1:
            self.q = None  # prepare_features(q=1) returns the (cast) input
        self.exact = bool(exact)
        self.normalize = bool(normalize)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = _compute_dtype(self.store)
        self._budget = check_memory_budget(memory_budget, DEFAULT_STREAM_BUDGET)
        self._progress = bool(progress)
        self._cache = bool(cache)
        self._t = None
        self._mapped = None  # the store opened with memory maps, for take()

    @property
    def n(self) -> int:
        return self.store.n

    @property
    def dims(self) -> list:
        return list(self.store.dims)

    @property
    def name(self) -> str:
        return self.store.path

    def settings(self) -> dict:
        """What the prepared values depend on (besides the store's content)."""
        return {"q": None if self.q is None else repr(self.q),
                "exact": self.exact if self.q is not None else None,
                "normalize": self.normalize, "dtype": str(self.dtype).replace("torch.", "")}

    def thresholds(self) -> list:
        if self._t is None:
            if self.q is None:
                self._t = [None] * self.store.num_layers
            else:
                ts = clip_thresholds(self.store, self.q, self.exact, device=self.device,
                                     memory_budget=self._budget, progress=self._progress,
                                     cache=self._cache)
                self._t = [t.to(self.device) for t in ts]
        return self._t

    def rows(self, l: int, a: int, b: int) -> torch.Tensor:
        """Prepared rows ``a:b`` of layer ``l`` (``[b - a, D_l]``, compute dtype, ``device``).

        Args:
            l: the layer.
            a, b: the first and the end row.

        Returns:
            The rows, bit-equal to the same rows of the in-memory preparation.

        Example:
            >>> import tempfile, torch
            >>> from prh_fast.store import StoreWriter
            >>> w = StoreWriter(tempfile.mkdtemp() + "/feats", dtype="float32")
            >>> w.append([torch.tensor([[3.0, 4.0], [0.0, 2.0]])])
            >>> StreamPrep(w.finish(), cache=False).rows(0, 1, 2)
            tensor([[0., 1.]])
        """
        return self._prepare(l, self.store.layer(l, slice(a, b)), f"rows {a}..{b}")

    def take(self, l: int, ids: torch.Tensor) -> torch.Tensor:
        """Prepared rows ``ids`` (any order, repeats allowed) of layer ``l``: only the pages
        holding them are read (memory-mapped shards), and each row is prepared exactly as
        :meth:`rows` prepares it (every step is row-wise), so the values are bit-equal.

        Args:
            l: the layer.
            ids: ``[r]`` int64 row indices in ``[0, N)``.

        Returns:
            ``[r, D_l]`` prepared rows (compute dtype, on ``device``).

        Example:
            >>> import tempfile, torch
            >>> from prh_fast.store import StoreWriter
            >>> w = StoreWriter(tempfile.mkdtemp() + "/feats", dtype="float32")
            >>> w.append([torch.tensor([[3.0, 4.0], [0.0, 2.0]])])
            >>> StreamPrep(w.finish(), cache=False).take(0, torch.tensor([1, 0, 1]))
            tensor([[0.0000, 1.0000],
                    [0.6000, 0.8000],
                    [0.0000, 1.0000]])
        """
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).cpu()
        d = self.store.dims[l]
        if ids.numel() == 0:
            return torch.empty((0, d), dtype=self.dtype, device=self.device)
        if int(ids.min()) < 0 or int(ids.max()) >= self.n:
            raise InputError(f"ids: row indices must lie in [0, {self.n}) for "
                             f"{self.store.path}")
        uniq, inv = np.unique(ids.numpy(), return_inverse=True)
        if self._mapped is None:
            st = self.store
            self._mapped = st if st._mmap else FeatureStore(st.path, mmap=True)
        mm = self._mapped
        raw = torch.empty((uniq.size, d), dtype=mm.dtype)
        bounds = np.searchsorted(uniq, mm._starts + [mm.n])
        for i in range(len(mm.shards)):
            lo, hi = int(bounds[i]), int(bounds[i + 1])
            if hi > lo:
                s0 = mm._starts[i]
                view = mm.layer(l, slice(s0, s0 + int(mm.shards[i]["rows"])))
                raw[lo:hi] = view[torch.from_numpy(uniq[lo:hi] - s0)]
        x = self._prepare(l, raw, f"{uniq.size} selected rows")
        if uniq.size == ids.numel():  # distinct ids (sorted, or not): no copy when sorted
            if bool((np.diff(ids.numpy()) > 0).all()):
                return x
        return x[torch.from_numpy(inv.reshape(-1)).to(self.device)]

    def _prepare(self, l: int, raw: torch.Tensor, where: str) -> torch.Tensor:
        t = self.thresholds()[l]
        x = raw.to(self.device)
        x = x if x.dtype == torch.float64 else x.float()
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"{self.store.path}: layer {l} contains NaN or Inf value(s) "
                             f"({where})")
        if t is not None:
            x = torch.clamp(x, -t, t)
        if self.normalize:
            x = normalize_rows(x)
        return x


# ------------------------------------------------------------------------------------------------
# neighbours
# ------------------------------------------------------------------------------------------------
def _resolve_choice(backend, device: torch.device, n: int | None = None,
                    dim: int | None = None):
    """The streamed search the backend registry picks
    (``prh_fast.knn._backends.resolve(..., stream=True)``): a ``Choice`` whose ``search`` is
    ``cpu`` (native), ``torch`` or an approximate FAISS search (with its ``params``). A backend
    passed here that has no streaming form raises; a configured one (``PRH_FAST_BACKEND``,
    ``config_context``) falls back to ``auto`` with a log line. ``n`` / ``dim``: the layer's
    rows and width, for the registry's estimate of a long exact search."""
    from prh_fast.knn._backends import resolve

    return resolve(backend, device, stream=True, n=n, dim=dim)


def _resolve_backend(backend, device: torch.device) -> str:
    """The name of the streamed search (:func:`_resolve_choice`): ``cpu``, ``torch`` or an
    approximate FAISS search."""
    return _resolve_choice(backend, device).search


def knn_plan(n: int, d: int, k: int, *, backend: str, compute_dtype: torch.dtype,
             store_itemsize: int, memory_budget: int) -> dict:
    """Tile shapes and panel size of a streaming search under ``memory_budget``; ValueError
    naming ``memory_budget`` when not even one block fits.

    The tiles are those of the in-memory search with its default budget whenever they fit
    beside one query block and two key blocks: then the lists equal the default in-memory
    ``knn(X, k, backend=...)``. A smaller budget gets the tiles of the in-memory search with
    ``memory_budget=plan["tile_budget"]`` (a quarter of the budget), and equals that search.
    """
    from prh_fast.knn import DEFAULT_MEMORY_BUDGET
    from prh_fast.knn._cpu import cpu_tile
    from prh_fast.knn._exact import candidate_count
    from prh_fast.knn._torch import torch_tiles

    item = torch.empty((), dtype=compute_dtype).element_size()
    budget = int(memory_budget)
    keyrow = d * (2 * item + store_itemsize)  # a key row: raw read, cast, prepared
    k = candidate_count(k, n - 1)  # the lists hold candidates (product + fixed scores)

    def cost(tile_budget):
        if backend == "cpu":
            b = cpu_tile(n, item, tile_budget)
            plan = {"backend": "cpu", "tile": b, "blocks": -(-n // b)}
            fixed = b * b * item + 2 * b * keyrow  # the score tile, 2 key blocks in flight
            per = b * d * item  # one panel block
        else:
            rows, cols = torch_tiles(n, n, k, item, tile_budget)
            plan = {"backend": "torch", "rows": rows, "cols": cols, "blocks": -(-n // rows)}
            # knn_torch's scratch (score tile + merge buffers), 2 key tiles in flight
            fixed = 3 * rows * (cols + k) * (item + 16) + 2 * cols * keyrow
            per = rows * d * item + 2 * rows * k * (item + 16)  # a query block and its lists
        plan["tile_budget"] = int(tile_budget)
        return plan, fixed, per

    plan, fixed, per = cost(DEFAULT_MEMORY_BUDGET)
    if fixed + per > budget:
        plan, fixed, per = cost(max(1, budget // 4))
    panel = (budget - fixed) // per
    if panel < 1:
        raise InputError(f"memory_budget: {budget} bytes is too small for a streaming search "
                         f"of {n} x {d} rows ({plan}); it needs at least {fixed + per} bytes")
    plan["panel"] = int(min(panel, plan["blocks"]))
    plan["scratch_bytes"] = int(fixed + plan["panel"] * per)
    return plan


class _Scaled:
    """Prepared rows of one layer times ``2**-e`` (exact): the search's view of the layer when
    its inner products would leave the compute dtype's range (``prh_fast.knn._exact``)."""

    def __init__(self, prep: StreamPrep, e: int):
        self.prep, self.e = prep, e
        self.n, self.dims, self.name, self.dtype = prep.n, prep.dims, prep.name, prep.dtype
        self.device = prep.device

    def rows(self, l: int, a: int, b: int) -> torch.Tensor:
        return self._scale(self.prep.rows(l, a, b))

    def take(self, l: int, ids: torch.Tensor) -> torch.Tensor:
        return self._scale(self.prep.take(l, ids))

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        if self.e == 0:
            return x
        return torch.ldexp(x, torch.tensor(-self.e, device=x.device)).to(x.dtype)


def _search_cpu(prep, l: int, kc: int, plan: dict, bar, norms: torch.Tensor):
    """Candidates ``(idx, prod, fixed)`` ``[N, kc]`` of the symmetric tile search, with the
    fixed-order scores of every entrant (the tile's rows are in hand); ``norms[N]`` receives
    the rows' float64 norms (each row is read once as a panel row)."""
    from prh_fast.knn._merge import TopK
    from prh_fast.prepare import row_norms

    n, d = prep.n, prep.dims[l]
    b, P = plan["tile"], plan["panel"]
    top = TopK(n, kc, prep.dtype, native=True, with_fixed=True)
    starts = list(range(0, n, b))
    nb = len(starts)

    def span(J):
        return starts[J], min(n, starts[J] + b)

    def tile(Xi, i0, Kj, j0, both):
        top.add_product(Xi, Kj, row0=i0, col0=j0, exclude_self=True, symmetric=both)
        bar.update(1)

    for p0 in range(0, nb, P):
        p1 = min(nb, p0 + P)
        r0, r1 = starts[p0], span(p1 - 1)[1]
        panel = torch.empty((r1 - r0, d), dtype=prep.dtype)
        for J in range(p0, p1):  # block by block: raw-read scratch stays one block
            j0, j1 = span(J)
            panel[j0 - r0:j1 - r0] = prep.rows(l, j0, j1)
        norms[r0:r1] = row_norms(panel)
        # inside the panel: the in-memory order (outer I, inner J >= I)
        for I in range(p0, p1):
            i0, i1 = span(I)
            Xi = panel[i0 - r0:i1 - r0]
            for J in range(I, p1):
                j0, j1 = span(J)
                tile(Xi, i0, panel[j0 - r0:j1 - r0], j0, J != I)
        # later key blocks, each read once; block J's rows get the transposes in I order
        for J, Kj in _prefetched(lambda J: prep.rows(l, *span(J)), range(p1, nb)):
            j0, j1 = span(J)
            for I in range(p0, p1):
                i0, i1 = span(I)
                tile(panel[i0 - r0:i1 - r0], i0, Kj, j0, True)
        del panel
    vals, idx, fixed = top.result(f"{prep.name}: layer {l}")
    return idx, vals, fixed


def _search_torch(prep, l: int, kc: int, plan: dict, bar, norms: torch.Tensor):
    """Candidates ``(idx, prod, fixed)`` of the query-block x key-tile search (the torch merge
    of ``prh_fast.knn._merge.TopK``), on the device; ``norms`` as in ``_search_cpu``."""
    from prh_fast.knn._merge import TopK
    from prh_fast.prepare import row_norms

    n = prep.n
    rows, cols, P = plan["rows"], plan["cols"], plan["panel"]
    top = TopK(n, kc, prep.dtype, prep.device, with_fixed=True)
    qstarts = list(range(0, n, rows))
    kstarts = list(range(0, n, cols))
    for p0 in range(0, len(qstarts), P):
        blocks = [(r0, min(n, r0 + rows)) for r0 in qstarts[p0:p0 + P]]
        Q = [prep.rows(l, r0, r1) for r0, r1 in blocks]
        for (r0, r1), q in zip(blocks, Q):
            norms[r0:r1] = row_norms(q).to(norms.device)
        for c0, K in _prefetched(lambda c0: prep.rows(l, c0, min(n, c0 + cols)), kstarts):
            for (r0, _), q in zip(blocks, Q):
                top.add_product(q, K, row0=r0, col0=c0, exclude_self=True)
                bar.update(1)
        del Q
    vals, idx, fixed = top.result()
    return idx, vals, fixed


def _read_rows(src, l: int, rows: torch.Tensor, block: int) -> torch.Tensor:
    """Rows ``rows`` (sorted ids) of layer ``l``, read block by block (only blocks holding one)."""
    n = src.n
    out = torch.empty((rows.numel(), src.dims[l]), dtype=src.dtype, device=src.device)
    rows_cpu = rows.cpu()
    for a in range(0, n, block):
        sel = ((rows_cpu >= a) & (rows_cpu < a + block)).nonzero().squeeze(1)
        if sel.numel():
            x = src.rows(l, a, min(n, a + block))
            out[sel.to(out.device)] = x[(rows_cpu[sel] - a).to(x.device)]
    return out


def _exact_lists(src, l: int, k: int, name: str, plan: dict, bar, budget: int):
    """Exact lists ``(idx [N, k], fixed [N, k] float64)`` of one layer of ``src`` (prepared
    rows, possibly scaled): the candidate search, the certificate, and a streamed sweep over the
    layer for the rows it leaves open (``prh_fast.knn._exact``). Also returns ``max |x_i|``."""
    from prh_fast.knn._exact import Sweep, candidate_count, finish, margins

    n, d = src.n, src.dims[l]
    kc = candidate_count(k, n - 1)
    norms = torch.empty(n, dtype=torch.float64)
    if name == "cpu":
        ci, cv, cf = _search_cpu(src, l, kc, plan, bar, norms)
    else:
        ci, cv, cf = _search_torch(src, l, kc, plan, bar, norms)
    kmax = float(norms.max())
    e = margins(norms.to(cv.device), kmax, d, src.dtype)
    idx, fixed, (rows, thr) = finish(ci, cv, cf, k, e, all_keys=kc >= n - 1)
    if rows.numel():
        _note("knn_sweep_rows", src.name, int(rows.numel()), layer=l)
        block = plan.get("tile") or plan.get("cols")
        sw = Sweep(_read_rows(src, l, rows, block), rows, thr, k, budget)
        for a, K in _prefetched(lambda a: src.rows(l, a, min(n, a + block)), range(0, n, block)):
            sw.add(K, a)
        idx[rows], fixed[rows] = sw.result()
    return idx, fixed, kmax


def _max_norm(src, l: int, block: int) -> float:
    from prh_fast.prepare import row_norms

    return max(float(row_norms(src.rows(l, a, min(src.n, a + block))).max())
               for a in range(0, src.n, block))


def _stream_search(prep: StreamPrep, l: int, k: int, name: str, plan: dict, bar, budget: int):
    """``(idx, float64 scores)`` of one layer, searched in range: when the rows' inner products
    would leave the compute dtype (features ~1e20 or ~1e-30 without normalisation), the search
    is run again on the rows scaled by a power of two (exact; the scores are scaled back)."""
    from prh_fast.knn._exact import search_exponent

    block = plan.get("tile") or plan.get("cols")
    try:
        idx, fixed, kmax = _exact_lists(prep, l, k, name, plan, bar, budget)
    except ValueError:  # non-finite products: out of range, or a real error (raised again)
        kmax = _max_norm(prep, l, block)
        if search_exponent(kmax, prep.dtype) == 0:
            raise
    e = search_exponent(kmax, prep.dtype)
    if e == 0:
        return idx, fixed
    idx, fixed, _ = _exact_lists(_Scaled(prep, e), l, k, name, plan, bar, budget)
    return idx, torch.ldexp(fixed, torch.tensor(2 * e, device=fixed.device))


def _self_scores(prep: StreamPrep, l: int, block: int) -> torch.Tensor:
    """``fixed(x_i, x_i)`` of every prepared row (``prh_fast.knn._exact.fixed_self``)."""
    from prh_fast.knn._exact import fixed_self

    return torch.cat([fixed_self(prep.rows(l, a, min(prep.n, a + block)))
                      for a in range(0, prep.n, block)])


def stream_knn(store: str | os.PathLike | FeatureStore, layer: int, k: int, *,
               q: float | None = None, exact: bool = False, normalize: bool = True,
               device: str | torch.device | None = None,
               backend: str | AnnParams | None = None, memory_budget: int | None = None,
               return_scores: bool = False, progress: bool = False, cache: bool = True,
               include_self: bool = False, return_report: bool = False
               ) -> torch.Tensor | tuple:
    """Neighbour lists ``[N, k]`` (int64, on ``device``) of one layer of a store.

    Equal to ``prh_fast.knn.knn(X, k, backend=backend)`` of the layer prepared in memory
    (``X`` = the layer of ``prepare_features(feats, q, exact)``, rows L2-normalised when
    ``normalize``). The exact backends: self excluded, by decreasing fixed-order inner product,
    ties to the lower index (see the module docstring and ``prh_fast.knn._exact``). The
    approximate backends (``"faiss-ivf"``, ``"faiss-ivfpq"``, ``"faiss-hnsw"``, a spec string
    or an ``AnnParams``): the in-memory approximate search with the same parameters and seed
    (training rows, add order, recall sample, tuning to ``target_recall``), its index built
    from rows streamed under ``memory_budget`` and cached in the store (``prh_fast.store._ann``).

    Args:
        store: a store folder or :class:`FeatureStore`.
        layer: the layer index.
        k: neighbours, ``1 <= k <= N - 1``.
        q, exact: outlier clipping as ``prepare_features`` (``None``: none).
        normalize: L2-normalise rows first (the alignment pipeline's default).
        device: where the products run (default CPU); CUDA uses the torch backend. The
            approximate searches run on the CPU (lists come back on ``device``).
        backend: ``"auto"`` (native ``cpu`` on CPU, ``torch`` on CUDA), ``"cpu"``,
            ``"torch"``, or an approximate search (see above).
        memory_budget: bytes of scratch (tiles, query panel, key blocks in flight); the
            ``[N, k]`` result is not counted. An approximate search counts its index too
            (IVF-Flat and HNSW hold the float32 vectors: an ``InputError`` suggests
            ``faiss-ivfpq`` when they do not fit). Default ``DEFAULT_STREAM_BUDGET``.
        return_scores: also return the ``[N, k]`` inner products (compute dtype; ValueError
            when they overflow it).
        progress: a tqdm bar over tiles with rate and ETA.
        cache: read / write the lists in the store's cache (``cache/``, atomic writes).
        include_self: the row's own entry competes too (``knn(..., include_self=True)``).
        return_report: also return the approximate search's ``AnnReport`` (``None`` for an
            exact backend) as the last element.

    Returns:
        ``idx``; with ``return_scores`` / ``return_report`` a tuple ``(idx[, scores][,
        report])``.

    Raises:
        ValueError naming the argument: bad ``layer`` / ``k`` / ``q`` / ``backend``, a
        ``memory_budget`` that is not positive or too small for one block, NaN/Inf values.

    Example:
        >>> import tempfile, torch
        >>> from prh_fast.store import StoreWriter
        >>> w = StoreWriter(tempfile.mkdtemp() + "/feats", dtype="float32")
        >>> w.append([torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])])
        >>> stream_knn(w.finish(), 0, 1, cache=False).tolist()
        [[1], [0], [3], [2]]
    """
    idx, vals, cd, report = _stream_knn_report(
        store, layer, k, q=q, exact=exact, normalize=normalize, device=device, backend=backend,
        memory_budget=memory_budget, progress=progress, cache=cache, include_self=include_self)
    res = (idx,)
    if return_scores:
        out = vals.to(cd)
        if bool(torch.isinf(out).any()) and not bool(torch.isinf(vals).any()):
            raise InputError(f"store: layer {layer}: the neighbours' inner products exceed the "
                             f"{cd} range; normalise the rows or leave return_scores=False")
        res = res + (out,)
    if return_report:
        res = res + (report,)
    return res if len(res) > 1 else res[0]


def _stream_knn(store, layer, k, **kw):
    """``stream_knn``'s work: ``(idx, float64 scores, compute dtype)``."""
    return _stream_knn_report(store, layer, k, **kw)[:3]


def _stream_knn_report(store, layer, k, *, q=None, exact=False, normalize=True, device=None,
                       backend=None, memory_budget=None, progress=False, cache=True,
                       include_self=False):
    """``stream_knn``'s work: ``(idx, float64 scores, compute dtype, AnnReport or None)``."""
    from prh_fast._validate import check_topk
    from prh_fast.knn._exact import merge_self
    from prh_fast.knn._faiss_ann import ANN_BACKENDS

    st = as_store(store)
    l = _check_layer(st, layer)
    k = check_topk(k, st.n, "k")
    if not isinstance(include_self, bool):
        raise InputError(f"include_self: expected True or False, got {include_self!r}")
    budget = check_memory_budget(memory_budget, DEFAULT_STREAM_BUDGET)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    choice = _resolve_choice(backend, dev, n=st.n, dim=st.dims[l])
    name = choice.search
    prep = StreamPrep(st, q=q, exact=exact, normalize=normalize, device=dev,
                      memory_budget=budget, progress=progress, cache=cache)
    if name in ANN_BACKENDS:
        return _stream_ann_lists(prep, l, k, choice.params, budget, dev, progress, cache,
                                 include_self)
    d = st.dims[l]
    plan = knn_plan(st.n, d, k, backend=name, compute_dtype=prep.dtype,
                    store_itemsize=st.dtype.itemsize, memory_budget=budget)
    settings = {"kind": "knn", "version": _KNN_CACHE_VERSION, "layer": l, "k": k,
                **prep.settings(), "backend": name, "device": dev.type,
                "tiles": {a: v for a, v in plan.items()
                          if a in ("tile", "rows", "cols")}}
    fname = f"knn-l{l}-k{k}-{_digest(settings)}.safetensors"
    got = _cache_get(st, fname, settings) if cache else None
    if got is not None and got.get("idx") is not None and tuple(got["idx"].shape) == (st.n, k) \
            and got.get("vals") is not None and got["vals"].dtype == torch.float64:
        _note("knn_cache_hits", st.path, layer=l)
        idx, vals = got["idx"].to(dev), got["vals"].to(dev)
    else:
        _note("knn_searches", st.path, layer=l)
        prep.thresholds()  # before the bar: its own passes have their own bars
        nb = plan["blocks"]
        total = nb * (nb + 1) // 2 if name == "cpu" else nb * -(-st.n // plan["cols"])
        bar = _bar(total, f"knn {st.path} layer {l}", "tile", progress)
        try:
            idx, vals = _stream_search(prep, l, k, name, plan, bar, budget)
        finally:
            bar.close()
        if cache:
            _cache_put(st, fname, {"idx": idx.cpu(), "vals": vals.cpu()}, settings)
        idx, vals = idx.to(dev), vals.to(dev)
    if include_self:
        selfs = _self_scores(prep, l, plan.get("tile") or plan.get("cols")).to(dev)
        idx, vals = merge_self(idx, vals, selfs, k)
    return idx, vals, prep.dtype, None


def _stream_ann_lists(prep: StreamPrep, l: int, k: int, params, budget: int,
                      dev: torch.device, progress: bool, cache: bool, include_self: bool):
    """The approximate search of one layer (``prh_fast.store._ann``) on the CPU: ``(idx,
    float64 scores, compute dtype, AnnReport)`` on ``dev``."""
    from prh_fast.knn._exact import check_scores_finite, merge_self
    from prh_fast.store._ann import stream_ann

    cpu = StreamPrep(prep.store, q=prep.q, exact=prep.exact, normalize=prep.normalize,
                     device="cpu", memory_budget=budget, progress=progress, cache=cache)
    cpu.thresholds()  # before the bars: its own passes have their own bars
    idx, vals, report = stream_ann(cpu, l, k, params, budget, cache=cache, progress=progress,
                                   note=_note, scaled_cls=_Scaled, max_norm=_max_norm)
    check_scores_finite(vals, "store")
    if include_self:
        block = max(1, min(prep.n, 4096))
        idx, vals = merge_self(idx, vals, _self_scores(cpu, l, block), k)
    return idx.to(dev), vals.to(dev), prep.dtype, report


def prepared_bytes(store: str | os.PathLike | FeatureStore, normalize: bool = True) -> int:
    """Bytes the prepared layers of a store take in memory (compute dtype)."""
    st = as_store(store)
    return st.n * sum(st.dims) * torch.empty((), dtype=_compute_dtype(st)).element_size()

