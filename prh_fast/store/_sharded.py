"""The sharded feature store: one folder per (data set, model, pooling), out of core.

Layout of a store folder::

    prh_store.json                 the index (written last, atomically)
    shard-000000.safetensors       rows [0, r0): one tensor "layer.<l>" [r0, D_l] per layer
    shard-000001.safetensors       rows [r0, r0 + r1) ...
    extras.safetensors             per-model tensors from the .pt record (mask, loss, ...)
    cache/                         derived data keyed by the store's content (neighbour lists,
                                   clipping thresholds); safe to delete

Shards are plain safetensors files (any safetensors reader opens them) in the dtype they were
written in (float32, float16, bfloat16 or float64). The index records, per shard, its first row,
row count, size in bytes and SHA-256, plus the layer widths, the dtype, the layout the features
came in (``"tensor"``: ``[N, L, D]``; ``"list"``: per-layer ``[N, D_l]``) and the user metadata.

Writing (:class:`StoreWriter`) buffers appended rows until a shard is full, writes the shard to
a temporary file, fsyncs it, renames it into place, and only then rewrites the index (also temp
file + rename). A crash at any point leaves a consistent store holding every shard the index
names; at most the shard in flight is lost, and reopening the writer deletes the debris and
resumes at ``rows_done``.

Reading (:class:`FeatureStore`, :func:`open_store`) is lazy: opening reads the index and checks
every shard's size; ``layer(l, rows)`` reads just those rows of that layer from the shards that
hold them (``pread`` into the output tensor, or zero-copy views of a memory map with
``mmap=True``). Checksums are checked by :meth:`FeatureStore.verify` (``prh-fast store verify``).
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import threading
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from prh_fast import _lock
from prh_fast._io import atomic_write, confined
from prh_fast.errors import InputError, StoreError

if TYPE_CHECKING:
    from prh_fast._validate import Layers, StrPath

__all__ = ["StoreWriter", "FeatureStore", "open_store", "is_store", "StoreError",
           "INDEX_NAME", "STORE_DTYPES", "DEFAULT_SHARD_BYTES"]

log = logging.getLogger(__name__)

INDEX_NAME = "prh_store.json"
FORMAT = "prh_fast.store"
VERSION = 1
EXTRAS_NAME = "extras.safetensors"
CACHE_DIR = "cache"

#: Storage dtypes by name, and their safetensors codes.
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16, "float64": torch.float64}
_ST_CODE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# numpy views of the raw bytes (numpy has no bfloat16: read as int16, reinterpret in torch)
_NP_RAW = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16,
           "float64": np.float64}

#: Target size of one shard when ``shard_rows`` is not given.
DEFAULT_SHARD_BYTES = 128 * 2**20

_SHARD_RE = re.compile(r"^shard-(\d{6,})\.safetensors$")


def is_store(path: StrPath) -> bool:
    """Whether ``path`` is a folder holding a store index.

    Args:
        path: Anything; non-paths give False.

    Returns:
        True for a store folder (finished or not).

    Example:
        >>> import tempfile
        >>> from prh_fast.store import is_store
        >>> is_store(tempfile.mkdtemp()), is_store(None)
        (False, False)
    """
    try:
        p = os.fspath(path)
    except TypeError:
        return False
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, INDEX_NAME))


def _dtype_name(dtype, arg: str = "dtype") -> str:
    if isinstance(dtype, torch.dtype):
        for name, d in STORE_DTYPES.items():
            if d == dtype:
                return name
        raise InputError(f"{arg}: expected one of {sorted(STORE_DTYPES)}, got {dtype}")
    if isinstance(dtype, str):
        name = dtype.replace("torch.", "")
        name = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                "float": "float32", "double": "float64", "fp64": "float64"}.get(name, name)
        if name in STORE_DTYPES:
            return name
    raise InputError(f"{arg}: expected one of {sorted(STORE_DTYPES)}, got {dtype!r}")


def _json_safe(key: str, value):
    """Plain JSON value for ``value`` (numpy/torch scalars converted); ValueError otherwise."""
    if isinstance(value, (np.generic,)):
        value = value.item()
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, dict):
        return {str(k): _json_safe(f"{key}.{k}", v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(f"{key}[{i}]", v) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return {"__float__": repr(value)}  # JSON has no NaN/Inf
        return value
    raise InputError(f"meta[{key!r}]: cannot store a {type(value).__name__} in the index "
                     f"(tensors and arrays go to the extras file; other values must be JSON)")


def _json_restore(value):
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_restore(v) for v in value]
    return value


def _split_meta(meta: dict):
    """``(json_meta, tensor_extras)``: tensors/arrays go to the extras file."""
    plain, tensors = {}, {}
    for key, v in (meta or {}).items():
        key = str(key)
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, torch.Tensor):
            tensors[key] = v.detach().cpu().contiguous()
        else:
            plain[key] = _json_safe(key, v)
    return plain, tensors


def _safetensors_bytes(tensors: dict, metadata: dict | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def _write_bytes(f, data) -> None:
    """Write a shard's bytes (one place, so tests can interrupt a write half-way)."""
    f.write(data)


def _sha256_file(path: str, bufsize: int = 8 << 20) -> str:
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(mv)
            if not got:
                break
            h.update(mv[:got])
    return h.hexdigest()


def _read_header(path: str) -> tuple:
    """``(data_start, header_dict)`` of a safetensors file; StoreError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise StoreError(f"{path}: truncated shard (no safetensors header)")
            (hlen,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if hlen > size - 8 or hlen > 100 << 20:
                raise StoreError(f"{path}: corrupt shard (header length {hlen} exceeds the file)")
            head = f.read(hlen)
    except OSError as err:
        raise StoreError(f"{path}: cannot read shard ({err})") from None
    try:
        header = json.loads(head.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StoreError(f"{path}: corrupt shard (unreadable safetensors header)") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: corrupt shard (header is not a JSON object)")
    return 8 + hlen, header


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------
class StoreWriter(_lock.HoldsLock):
    """Write a store incrementally; reopen the same path to resume.

    Args:
        path: The store folder (created; parents too).
        layers: Number of layers (optional when ``dims`` is given or inferred from the first
            :meth:`append`).
        dims: Width of every layer (inferred from the first append when omitted).
        dtype: Storage dtype, ``"float32"`` / ``"float16"`` / ``"bfloat16"`` / ``"float64"``
            or a torch dtype (default: the first batch's dtype when it is one of those, else
            float32). Appended tensors are cast to it.
        meta: Metadata recorded when the store is created (e.g. the extraction's settings).
            Reopening an unfinished store with a different ``meta`` is an error (a resume must
            not mix two jobs) unless ``overwrite=True``.
        shard_rows: Rows per shard (default: about 128 MiB per shard, at least 1 row).
        layout: ``"tensor"`` (read back as ``[N, L, D]``, needs equal widths) or ``"list"``;
            default ``"tensor"`` when all widths are equal, as the reference stores them.
        overwrite: Delete an existing store at ``path`` and start over.

    ``rows_done`` is the number of rows safely on disk (the index's count): a resumed job
    continues from there. :meth:`append` takes one ``[B, D_l]`` tensor per layer; rows go to
    disk a shard at a time. :meth:`finish` writes the last (short) shard and the final metadata
    (tensors in it, e.g. ``mask``/``loss``, go to ``extras.safetensors``).

    Raises:
        ValueError: Bad arguments, or ``path`` is a file or a folder that is not a store.
        DestinationLocked: Another writer holds the store.

    Example:
        >>> import os, tempfile, torch
        >>> from prh_fast.store import StoreWriter, open_store
        >>> path = os.path.join(tempfile.mkdtemp(), "store")
        >>> g = torch.Generator().manual_seed(0)
        >>> with StoreWriter(path, dims=[8, 8], shard_rows=16) as w:
        ...     for _ in range(3):
        ...         w.append([torch.randn(10, 8, generator=g), torch.randn(10, 8, generator=g)])
        ...     _ = w.finish({"num_params": 1000})
        >>> s = open_store(path)
        >>> s.n, s.dims, len(s.shards), s.meta["num_params"]
        (30, [8, 8], 2, 1000)
    """

    def __init__(self, path: StrPath, *, layers: int | None = None,
                 dims: Sequence[int] | None = None, dtype: str | torch.dtype | None = None,
                 meta: dict | None = None, shard_rows: int | None = None,
                 layout: str | None = None, overwrite: bool = False) -> None:
        self.path = os.fspath(path)
        self._index_path = os.path.join(self.path, INDEX_NAME)
        if dims is not None:
            dims = [int(d) for d in dims]
            if not dims or any(d < 1 for d in dims):
                raise InputError(f"dims: expected a non-empty list of positive widths, got {dims}")
            if layers is not None and int(layers) != len(dims):
                raise InputError(f"layers: {layers} does not match dims ({len(dims)} widths)")
        if layers is not None and (isinstance(layers, bool) or int(layers) < 1):
            raise InputError(f"layers: expected a positive number of layers, got {layers!r}")
        if shard_rows is not None and (isinstance(shard_rows, bool) or int(shard_rows) < 1):
            raise InputError(f"shard_rows: expected a positive integer, got {shard_rows!r}")
        if layout is not None and layout not in ("tensor", "list"):
            raise InputError(f"layout: expected 'tensor' or 'list', got {layout!r}")
        self._want = {"layers": None if layers is None else int(layers), "dims": dims,
                      "dtype": None if dtype is None else _dtype_name(dtype),
                      "shard_rows": None if shard_rows is None else int(shard_rows),
                      "layout": layout}
        self._create_meta = _split_meta(meta or {})[0] if meta is not None else None
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise InputError(f"{self.path}: exists and is a file, not a store folder")
        self._buf: list = []      # pending batches: lists of per-layer tensors
        self._buf_rows = 0
        self._index = None
        existed = os.path.isdir(self.path)
        # One writer per store: a second one would interleave its shards with ours.
        self._held = _lock.acquire(self.path, folder=True)
        try:
            if overwrite and existed:
                self._remove_existing()
            if os.path.isfile(self._index_path):
                self._resume()
            else:
                self._fresh()
        except BaseException:
            self.close()
            if not existed:
                try:
                    os.rmdir(self.path)  # the folder the lock created, now empty again
                except OSError:
                    pass
            raise

    # -- opening ---------------------------------------------------------------------------------
    def _remove_existing(self):
        if not is_store(self.path) and not self._only_debris():
            raise InputError(f"{self.path}: exists and is not a store folder; not deleting it")
        # The index goes first, so that a reader opening the folder meanwhile finds no store
        # rather than an index naming shards that are being deleted. The lock file stays.
        try:
            os.remove(self._index_path)
        except FileNotFoundError:
            pass
        for name in os.listdir(self.path):
            if name == _lock.LOCK_NAME:
                continue
            full = os.path.join(self.path, name)
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)

    def _only_debris(self) -> bool:
        if not os.path.isdir(self.path):
            return False
        for name in os.listdir(self.path):
            if not (_SHARD_RE.match(name) or name.endswith(".tmp") or name == CACHE_DIR
                    or name == EXTRAS_NAME or name == _lock.LOCK_NAME):
                return False
        return True

    def _clean_debris(self):
        """Remove temporary files and shards the index does not name (a crash between a
        shard's rename and the index update)."""
        known = {s["file"] for s in self._index["shards"]} if self._index else set()
        for name in os.listdir(self.path):
            full = os.path.join(self.path, name)
            if name.endswith(".tmp") or (_SHARD_RE.match(name) and name not in known):
                log.info("prh_fast.store: removing %s (left by an interrupted write)", full)
                os.remove(full)

    def _fresh(self):
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise InputError(f"{self.path}: exists and is a file, not a store folder")
            if os.listdir(self.path) and not self._only_debris():
                raise InputError(f"{self.path}: folder exists and is not a store (no "
                                 f"{INDEX_NAME}); choose an empty or new folder")
        os.makedirs(self.path, exist_ok=True)
        self._clean_debris()
        if self._want["dims"] is not None:
            self._create_index(self._want["dims"], self._want["dtype"] or "float32")

    def _create_index(self, dims, dtype_name):
        layout = self._want["layout"] or ("tensor" if len(set(dims)) == 1 else "list")
        if layout == "tensor" and len(set(dims)) != 1:
            raise InputError(f"layout: 'tensor' needs equal layer widths, got dims {dims}")
        row_bytes = sum(dims) * _ITEMSIZE[dtype_name]
        shard_rows = self._want["shard_rows"] or max(1, DEFAULT_SHARD_BYTES // row_bytes)
        self._index = {
            "format": FORMAT, "version": VERSION, "complete": False,
            "n": 0, "num_layers": len(dims), "dims": list(dims), "dtype": dtype_name,
            "layout": layout, "shard_rows": int(shard_rows), "shards": [],
            "create_meta": self._create_meta or {}, "meta": {}, "extras": None,
            "content_id": None,
            # Random, recorded in every shard: a shard from another store (or another write of
            # this folder) is recognised on open, without reading its data.
            "store_id": uuid.uuid4().hex,
        }
        self._write_index()

    def _resume(self):
        self._index = _load_index(self.path)
        idx = self._index
        w = self._want
        checks = [("layers", w["layers"], idx["num_layers"]), ("dims", w["dims"], idx["dims"]),
                  ("dtype", w["dtype"], idx["dtype"]),
                  ("shard_rows", w["shard_rows"], idx["shard_rows"]),
                  ("layout", w["layout"], idx["layout"])]
        for name, want, have in checks:
            if want is not None and want != have:
                raise InputError(f"{self.path}: existing store has {name} = {have}, the writer "
                                 f"was asked for {want}; pass overwrite=True to start over")
        if self._create_meta is not None and not idx["complete"]:
            old = idx.get("create_meta") or {}
            if _canon(old) != _canon(self._create_meta):
                diff = sorted(k for k in set(old) | set(self._create_meta)
                              if _canon(old.get(k)) != _canon(self._create_meta.get(k)))
                raise InputError(f"{self.path}: an unfinished store written with different "
                                 f"meta is here (differs in: {', '.join(diff)}); pass "
                                 f"overwrite=True to start over")
        # Every shard the index names must be intact in size; a damaged one is not resumable.
        for s in idx["shards"]:
            _check_shard_size(self.path, s)
        if not idx["complete"]:
            self._clean_debris()

    # -- state -----------------------------------------------------------------------------------
    @property
    def rows_done(self) -> int:
        """Rows durably written (buffered rows not counted)."""
        return int(self._index["n"]) if self._index else 0

    @property
    def rows_buffered(self) -> int:
        return self._buf_rows

    @property
    def finished(self) -> bool:
        return bool(self._index and self._index["complete"])

    @property
    def dims(self) -> list[int] | None:
        return None if self._index is None else list(self._index["dims"])

    def _write_index(self):
        text = json.dumps(self._index, indent=1, sort_keys=True) + "\n"
        atomic_write(self._index_path, lambda f: f.write(text.encode()))

    # -- appending -------------------------------------------------------------------------------
    def append(self, layers: Layers) -> None:
        """Append one batch of rows.

        Args:
            layers: A list with one ``[B, D_l]`` tensor (or array) per layer, or a
                ``[B, L, D]`` tensor. Rows are cast to the store's dtype.

        Raises:
            ValueError: Wrong number of layers, widths or row counts, or a finished/closed
                writer.
        """
        self._check_open()
        if isinstance(layers, torch.Tensor) and layers.dim() == 3:
            layers = list(layers.unbind(1))
        if not isinstance(layers, (list, tuple)) or not layers:
            raise InputError("layers: expected a list with one [B, D] tensor per layer")
        ts = []
        for i, t in enumerate(layers):
            if isinstance(t, np.ndarray):
                t = torch.from_numpy(t)
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise InputError(f"layers[{i}]: expected a 2-D floating-point [B, D] tensor, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
            ts.append(t)
        b = int(ts[0].shape[0])
        for i, t in enumerate(ts):
            if t.shape[0] != b:
                raise InputError(f"layers[{i}]: has {t.shape[0]} rows, layers[0] has {b}")
        if self._index is None:  # first batch decides widths and dtype
            if self._want["layers"] is not None and self._want["layers"] != len(ts):
                raise InputError(f"layers: expected {self._want['layers']} layers, got {len(ts)}")
            dt = self._want["dtype"]
            if dt is None:
                dt = next((n for n, d in STORE_DTYPES.items() if d == ts[0].dtype), "float32")
            self._create_index([int(t.shape[1]) for t in ts], dt)
        dims = self._index["dims"]
        if len(ts) != len(dims):
            raise InputError(f"layers: expected {len(dims)} layers, got {len(ts)}")
        for i, (t, d) in enumerate(zip(ts, dims)):
            if t.shape[1] != d:
                raise InputError(f"layers[{i}]: expected width {d}, got {t.shape[1]}")
        if b == 0:
            return
        dtype = STORE_DTYPES[self._index["dtype"]]
        self._buf.append([t.detach().to("cpu", dtype) for t in ts])
        self._buf_rows += b
        while self._buf_rows >= self._index["shard_rows"]:
            self._flush(self._index["shard_rows"])

    def _take(self, rows: int) -> list:
        """Remove the first ``rows`` buffered rows; per-layer contiguous tensors."""
        out = [[] for _ in self._index["dims"]]
        need = rows
        while need:
            batch = self._buf[0]
            b = batch[0].shape[0]
            if b <= need:
                self._buf.pop(0)
                for acc, t in zip(out, batch):
                    acc.append(t)
                need -= b
            else:
                for acc, t in zip(out, batch):
                    acc.append(t[:need])
                self._buf[0] = [t[need:] for t in batch]
                need = 0
        self._buf_rows -= rows
        return [torch.cat(a).contiguous() if len(a) > 1 else a[0].contiguous() for a in out]

    def _flush(self, rows: int):
        tensors = self._take(rows)
        start = self.rows_done
        number = len(self._index["shards"])
        name = f"shard-{number:06d}.safetensors"
        data = _safetensors_bytes({f"layer.{l}": t for l, t in enumerate(tensors)},
                                  _shard_identity(self._index, name, start, rows))
        digest = hashlib.sha256(data).hexdigest()
        atomic_write(os.path.join(self.path, name), lambda f: _write_bytes(f, data))
        self._index["shards"].append({"file": name, "start": start, "rows": rows,
                                      "bytes": len(data), "sha256": digest})
        self._index["n"] = start + rows
        self._write_index()

    def _check_open(self) -> None:
        if self.finished:
            raise InputError(f"{self.path}: the store is finished; open a new one to add rows")
        if self._held is None:
            raise InputError(f"{self.path}: this writer was closed; open a new StoreWriter on "
                             f"the path to resume")

    def flush(self) -> None:
        """Write the buffered rows now as a (short) shard."""
        self._check_open()
        if self._buf_rows:
            self._flush(self._buf_rows)

    def finish(self, extra_meta: dict | None = None) -> str:
        """Write the buffered rows and the metadata; mark the store complete.

        Args:
            extra_meta: JSON-able values go to the index's ``meta``; tensors / arrays
                (per-sample masks, losses, ...) go to ``extras.safetensors``.

        Returns:
            The store's path.
        """
        self._check_open()
        if self._index is None:
            raise InputError(f"{self.path}: nothing was written (no rows appended)")
        self.flush()
        if self._index["n"] == 0:
            raise InputError(f"{self.path}: nothing was written (no rows appended)")
        plain, tensors = _split_meta(extra_meta or {})
        meta = dict(self._index.get("create_meta") or {})
        meta.update(self._index.get("meta") or {})
        meta.update(plain)
        self._index["meta"] = meta
        order = list(self._index.get("record_keys") or [])
        for k in [str(k) for k in (extra_meta or {})] + list(meta):
            if k not in order:
                order.append(k)
        self._index["record_keys"] = order
        if tensors:
            data = _safetensors_bytes(tensors, {"format": FORMAT})
            atomic_write(os.path.join(self.path, EXTRAS_NAME), lambda f: f.write(data))
            self._index["extras"] = {"file": EXTRAS_NAME, "bytes": len(data),
                                     "sha256": hashlib.sha256(data).hexdigest(),
                                     "keys": sorted(tensors)}
        h = hashlib.sha256()
        for s in self._index["shards"]:
            h.update(s["sha256"].encode())
        h.update(json.dumps(self._index["dims"]).encode() + self._index["dtype"].encode())
        self._index["content_id"] = h.hexdigest()[:32]
        self._index["complete"] = True
        self._write_index()
        self.close()
        return self.path


def _canon(v) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _shard_identity(index: dict, name: str, start: int, rows: int) -> dict:
    """The safetensors metadata that makes a shard self-identifying (checked on open)."""
    md = {"format": FORMAT, "file": name, "start": str(start), "rows": str(rows)}
    if index.get("store_id"):
        md["store_id"] = index["store_id"]
    return md


def _check_identity(full: str, header: dict, want: dict) -> None:
    """StoreError unless the shard's own metadata says it is the shard the index names.

    Stores written before shards carried ``file`` and ``store_id`` are checked on the fields
    they have (``start`` and ``rows`` were always written)."""
    md = header.get("__metadata__")
    md = md if isinstance(md, dict) else {}
    for key, value in want.items():
        if key in ("file", "store_id") and "store_id" not in want and key not in md:
            continue
        if md.get(key) != value:
            raise StoreError(f"{full}: not the shard the index names ({key} is "
                             f"{md.get(key)!r}, expected {value!r}); it was swapped, replaced, "
                             f"or comes from another store")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _member(folder: str, name: str) -> str:
    """``folder/name`` for a file the index names, confined to the folder: a plain name (no
    separators, no ``..``) whose real path, symlinks resolved, is directly inside ``folder``."""
    full = confined(folder, name, direct=True)
    if full is None:
        full = os.path.join(folder, name)
        raise StoreError(f"{full}: leads outside the store folder (to "
                         f"{os.path.realpath(full)}); refusing to read it")
    return full


def _validate_index(idx, ipath: str) -> None:
    """Every field the readers rely on, with its type and range; StoreError naming the field.

    Paths are confined to the store folder: shard files must be named ``shard-NNNNNN...`` and
    the extras file ``extras.safetensors``, so no entry can name a file elsewhere."""
    def bad(field, why):
        raise StoreError(f"{ipath}: malformed store index: {field} {why}")

    if not isinstance(idx, dict) or idx.get("format") != FORMAT:
        raise StoreError(f"{ipath}: not a prh_fast store index")
    ver = idx.get("version")
    if not _is_int(ver) or ver < 1:
        bad("'version'", f"must be a positive integer, got {ver!r}")
    if ver > VERSION:
        raise StoreError(f"{ipath}: store format version {ver} is newer than this prh_fast "
                         f"reads ({VERSION}); upgrade prh_fast")
    for key in ("n", "num_layers", "shard_rows"):
        v = idx.get(key)
        if not _is_int(v) or v < (0 if key == "n" else 1):
            bad(repr(key), f"must be a {'non-negative' if key == 'n' else 'positive'} integer, "
                           f"got {v!r}")
    dims = idx.get("dims")
    if (not isinstance(dims, list) or len(dims) != idx["num_layers"]
            or not all(_is_int(d) and d >= 1 for d in dims)):
        bad("'dims'", f"must be a list of {idx['num_layers']} positive widths, got {dims!r}")
    if idx.get("dtype") not in STORE_DTYPES:
        bad("'dtype'", f"must be one of {sorted(STORE_DTYPES)}, got {idx.get('dtype')!r}")
    if idx.get("layout") not in ("tensor", "list"):
        bad("'layout'", f"must be 'tensor' or 'list', got {idx.get('layout')!r}")
    if not isinstance(idx.get("complete"), bool):
        bad("'complete'", f"must be true or false, got {idx.get('complete')!r}")
    for key in ("content_id", "store_id"):
        if idx.get(key) is not None and not isinstance(idx[key], str):
            bad(repr(key), f"must be a string, got {idx[key]!r}")
    for key in ("meta", "create_meta"):
        if idx.get(key) is not None and not isinstance(idx[key], dict):
            bad(repr(key), f"must be an object, got {type(idx[key]).__name__}")
    rk = idx.get("record_keys")
    if rk is not None and not (isinstance(rk, list) and all(isinstance(k, str) for k in rk)):
        bad("'record_keys'", "must be a list of strings")
    shards = idx.get("shards")
    if not isinstance(shards, list):
        bad("'shards'", f"must be a list, got {type(shards).__name__}")
    row = 0
    seen = set()
    for i, sh in enumerate(shards):
        where = f"'shards'[{i}]"
        if not isinstance(sh, dict):
            bad(where, "must be an object")
        f = sh.get("file")
        if not isinstance(f, str) or not _SHARD_RE.match(f) or f in seen:
            bad(f"{where}.file", f"must be a distinct shard-NNNNNN.safetensors name inside the "
                                 f"folder, got {f!r}")
        seen.add(f)
        for key, lo in (("start", 0), ("rows", 1), ("bytes", 0)):
            if not _is_int(sh.get(key)) or sh[key] < lo:
                bad(f"{where}.{key}", f"must be an integer >= {lo}, got {sh.get(key)!r}")
        if sh["start"] != row:
            bad(f"{where}.start", f"is {sh['start']}, the shards before it end at row {row}")
        if not isinstance(sh.get("sha256"), str):
            bad(f"{where}.sha256", f"must be a string, got {sh.get('sha256')!r}")
        row += sh["rows"]
    if row != idx["n"]:
        bad("'n'", f"is {idx['n']}, the shards hold {row} rows")
    ex = idx.get("extras")
    if ex is not None:
        if not isinstance(ex, dict):
            bad("'extras'", "must be an object or null")
        if ex.get("file") != EXTRAS_NAME:
            bad("'extras'.file", f"must be {EXTRAS_NAME!r}, got {ex.get('file')!r}")
        if not _is_int(ex.get("bytes")) or ex["bytes"] < 0:
            bad("'extras'.bytes", f"must be a non-negative integer, got {ex.get('bytes')!r}")
        if not isinstance(ex.get("sha256"), str):
            bad("'extras'.sha256", "must be a string")
        keys = ex.get("keys", [])
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            bad("'extras'.keys", "must be a list of strings")


def _load_index(path: str) -> dict:
    ipath = os.path.join(path, INDEX_NAME)
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise StoreError(f"{path}: not a store folder (it is a file)")
        raise FileNotFoundError(f"{path}: no such store folder")
    if not os.path.isfile(ipath):
        raise StoreError(f"{path}: not a store folder (no {INDEX_NAME})")
    _member(path, INDEX_NAME)
    try:
        with open(ipath, "rb") as f:
            idx = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise StoreError(f"{ipath}: unreadable store index ({err})") from None
    _validate_index(idx, ipath)
    idx["meta"] = _json_restore(idx.get("meta") or {})
    return idx


def _check_shard_size(path: str, shard: dict) -> None:
    full = _member(path, shard["file"])
    try:
        size = os.path.getsize(full)
    except OSError:
        raise StoreError(f"{full}: shard missing (rows {shard['start']}.."
                         f"{shard['start'] + shard['rows']}); the store is damaged") from None
    if size != shard["bytes"]:
        raise StoreError(f"{full}: shard is {size} bytes, the index says {shard['bytes']} "
                         f"({'truncated' if size < shard['bytes'] else 'grown'}); the store is "
                         f"damaged")


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
class FeatureStore:
    """Lazy reader of a store folder (see the module docstring). Use :func:`open_store`.

    Args:
        path: The store folder.
        mmap: Read shards through memory maps (zero-copy views where a range lies in one shard).
        allow_partial: Open an unfinished store (the rows written so far).

    Attributes:
        path: The folder.
        n: Number of rows (samples).
        num_layers: Number of layers.
        dims: Width of every layer.
        dtype: The stored torch dtype.
        layout: ``"tensor"`` or ``"list"``, as the features were given.
        meta: User metadata (dict).
        complete: Whether the writer finished.
        content_id: Changes whenever the rows change (keys the derived-data cache).
        shards: The index's shard table.

    Raises:
        StoreError: Not a store, an unfinished one (without ``allow_partial``), or a shard
            whose size differs from the index.

    Example:
        >>> import os, tempfile, torch
        >>> from prh_fast.store import StoreWriter, open_store
        >>> path = os.path.join(tempfile.mkdtemp(), "store")
        >>> with StoreWriter(path, dims=[4, 4, 4]) as w:
        ...     w.append(torch.arange(60, dtype=torch.float32).reshape(5, 3, 4))
        ...     _ = w.finish()
        >>> s = open_store(path)
        >>> s.layer(1, slice(2, 4)).tolist()
        [[28.0, 29.0, 30.0, 31.0], [40.0, 41.0, 42.0, 43.0]]
        >>> s.verify()["ok"]
        True
    """

    def __init__(self, path: StrPath, *, mmap: bool = False,
                 allow_partial: bool = False) -> None:
        self.path = os.fspath(path)
        idx = _load_index(self.path)
        if not idx["complete"] and not allow_partial:
            raise StoreError(f"{self.path}: the store is unfinished ({idx['n']} rows written, "
                             f"finish() never ran); resume its writer, or pass "
                             f"allow_partial=True to read the rows written so far")
        self._index = idx
        self.n = int(idx["n"])
        self.num_layers = int(idx["num_layers"])
        self.dims = [int(d) for d in idx["dims"]]
        self.dtype_name = idx["dtype"]
        self.dtype = STORE_DTYPES[self.dtype_name]
        self.layout = idx["layout"]
        self.meta = dict(idx.get("meta") or {})
        self.complete = bool(idx["complete"])
        self.content_id = idx.get("content_id")
        self.shards = list(idx["shards"])
        self.shard_rows = int(idx["shard_rows"])
        self._starts = [int(s["start"]) for s in self.shards]
        self._mmap = bool(mmap)
        self._headers: dict = {}
        self._maps: dict = {}
        self._lock = threading.Lock()
        for s in self.shards:
            _check_shard_size(self.path, s)

    def __repr__(self) -> str:
        return (f"FeatureStore({self.path!r}, n={self.n}, layers={self.num_layers}, "
                f"dims={self.dims if len(set(self.dims)) > 1 else self.dims[0]}, "
                f"dtype={self.dtype_name}, shards={len(self.shards)})")

    def __len__(self) -> int:
        return self.n

    # -- shard access ----------------------------------------------------------------------------
    def _shard_file(self, i: int) -> str:
        return _member(self.path, self.shards[i]["file"])

    def _layout_of(self, i: int) -> tuple:
        """``(data_start, {layer: (begin, end)})`` of shard ``i``, validated against the index."""
        got = self._headers.get(i)
        if got is not None:
            return got
        full = self._shard_file(i)
        start, header = _read_header(full)
        s = self.shards[i]
        _check_identity(full, header, _shard_identity(self._index, s["file"], s["start"],
                                                      s["rows"]))
        offs = {}
        size = s["bytes"]
        for l, d in enumerate(self.dims):
            e = header.get(f"layer.{l}")
            want_shape = [int(s["rows"]), d]
            if (not isinstance(e, dict) or e.get("dtype") != _ST_CODE[self.dtype_name]
                    or list(e.get("shape", [])) != want_shape):
                raise StoreError(f"{full}: corrupt shard (tensor layer.{l} is "
                                 f"{e!r}, expected {_ST_CODE[self.dtype_name]} {want_shape})")
            b, en = (int(x) for x in e["data_offsets"])
            if en - b != want_shape[0] * d * _ITEMSIZE[self.dtype_name] or start + en > size:
                raise StoreError(f"{full}: corrupt shard (bad offsets for layer.{l})")
            offs[l] = (start + b, start + en)
        got = (start, offs)
        self._headers[i] = got
        return got

    def _locate(self, rows) -> tuple:
        if rows is None:
            return 0, self.n
        if isinstance(rows, range):
            rows = slice(rows.start, rows.stop, rows.step)
        if not isinstance(rows, slice):
            raise InputError(f"rows: expected a slice or None, got {type(rows).__name__}")
        a, b, step = rows.indices(self.n)
        if step != 1:
            raise InputError(f"rows: expected a contiguous slice (step 1), got step {step}")
        return a, max(a, b)

    def _pieces(self, a: int, b: int):
        """``(shard index, first row in shard, last row in shard, output offset)`` for a..b."""
        if a >= b:
            return
        i = bisect.bisect_right(self._starts, a) - 1
        while a < b:
            s = self.shards[i]
            s0 = int(s["start"])
            r0, r1 = a - s0, min(b, s0 + int(s["rows"])) - s0
            yield i, r0, r1
            a = s0 + r1
            i += 1

    def _read_into(self, i: int, l: int, r0: int, r1: int, out: torch.Tensor) -> None:
        _, offs = self._layout_of(i)
        d = self.dims[l]
        item = _ITEMSIZE[self.dtype_name]
        off = offs[l][0] + r0 * d * item
        nbytes = (r1 - r0) * d * item
        raw = out.view(torch.uint8).numpy().reshape(-1) if out.numel() else None
        if raw is None:
            return
        full = self._shard_file(i)
        fd = os.open(full, os.O_RDONLY)
        try:
            mv = memoryview(raw)
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [mv[done:]], off + done)
                if got <= 0:
                    raise StoreError(f"{full}: truncated shard (read stopped at byte "
                                     f"{off + done})")
                done += got
        finally:
            os.close(fd)

    def _map(self, i: int, l: int) -> torch.Tensor:
        key = (i, l)
        t = self._maps.get(key)
        if t is None:
            _, offs = self._layout_of(i)
            b, e = offs[l]
            arr = np.memmap(self._shard_file(i), dtype=_NP_RAW[self.dtype_name], mode="c",
                            offset=b, shape=(int(self.shards[i]["rows"]), self.dims[l]))
            t = torch.from_numpy(arr)
            if self.dtype_name == "bfloat16":
                t = t.view(torch.bfloat16)
            self._maps[key] = t
        return t

    # -- public reading --------------------------------------------------------------------------
    def layer(self, l: int, rows: slice | None = None) -> torch.Tensor:
        """Rows of one layer, reading only those rows.

        With ``mmap=True`` a range inside one shard comes back as a zero-copy (copy-on-write)
        view of the memory-mapped file.

        Args:
            l: Layer index (negative counts from the end).
            rows: A slice of rows; None for all.

        Returns:
            ``[r, D_l]`` tensor in the stored dtype.
        """
        if isinstance(l, bool) or not isinstance(l, (int, np.integer)) or not (
                -self.num_layers <= l < self.num_layers):
            raise InputError(f"l: expected a layer index in [0, {self.num_layers}), got {l!r}")
        l = int(l) % self.num_layers
        a, b = self._locate(rows)
        pieces = list(self._pieces(a, b))
        if self._mmap and len(pieces) == 1:
            i, r0, r1 = pieces[0]
            return self._map(i, l)[r0:r1]
        out = torch.empty((b - a, self.dims[l]), dtype=self.dtype)
        pos = 0
        for i, r0, r1 in pieces:
            if self._mmap:
                out[pos:pos + r1 - r0] = self._map(i, l)[r0:r1]
            else:
                self._read_into(i, l, r0, r1, out[pos:pos + r1 - r0])
            pos += r1 - r0
        return out

    def rows(self, rows: slice | None = None,
             layers: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Rows ``rows`` of every layer (or of ``layers``): a list of ``[r, D_l]`` tensors."""
        ls = range(self.num_layers) if layers is None else layers
        return [self.layer(l, rows) for l in ls]

    def iter_rows(self, chunk: int | None = None, layers: Sequence[int] | None = None, *,
                  start: int = 0, stop: int | None = None,
                  prefetch: bool = True) -> Iterator[tuple[int, list[torch.Tensor]]]:
        """Iterate over consecutive row chunks.

        Args:
            chunk: Rows per step (default: the shard size).
            layers: Layer indices to read (default: all).
            start: First row.
            stop: End row (default: ``n``).
            prefetch: Read the next chunk in a background thread while the caller works on
                the current one.

        Yields:
            ``(first_row, [tensor per layer])``.
        """
        chunk = self.shard_rows if chunk is None else int(chunk)
        if chunk < 1:
            raise InputError(f"chunk: expected a positive number of rows, got {chunk}")
        stop = self.n if stop is None else min(int(stop), self.n)
        ls = list(range(self.num_layers)) if layers is None else [int(l) for l in layers]
        starts = list(range(int(start), stop, chunk))
        if not prefetch or len(starts) < 2:
            for a in starts:
                yield a, self.rows(slice(a, min(stop, a + chunk)), ls)
            return
        with ThreadPoolExecutor(1) as pool:
            fut = pool.submit(self.rows, slice(starts[0], min(stop, starts[0] + chunk)), ls)
            for j, a in enumerate(starts):
                got = fut.result()
                if j + 1 < len(starts):
                    nxt = starts[j + 1]
                    fut = pool.submit(self.rows, slice(nxt, min(stop, nxt + chunk)), ls)
                yield a, got

    def extras(self) -> dict:
        """The per-model tensors kept beside the features (``mask``, ``loss``, ...)."""
        e = self._index.get("extras")
        if not e:
            return {}
        full = _member(self.path, e["file"])
        try:
            size = os.path.getsize(full)
        except OSError:
            raise StoreError(f"{full}: extras file missing; the store is damaged") from None
        if size != e["bytes"]:
            raise StoreError(f"{full}: extras file is {size} bytes, the index says "
                             f"{e['bytes']}; the store is damaged")
        from safetensors.torch import load

        with open(full, "rb") as f:
            data = f.read()
        try:
            return dict(load(data))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise StoreError(f"{full}: corrupt extras file ({err})") from None

    def feats(self) -> torch.Tensor | list[torch.Tensor]:
        """All features in memory: ``[N, L, D]`` (layout ``"tensor"``) or a list of layers."""
        layers = [self.layer(l) for l in range(self.num_layers)]
        if self.layout == "tensor":
            return torch.stack(layers, dim=1)
        return layers

    def to_record(self) -> dict:
        """The reference ``.pt`` record: ``{"feats": ..., **meta, **extras}`` (in memory)."""
        rec = {"feats": self.feats()}
        rest = dict(self.meta)
        rest.update(self.extras())
        for k in self._record_keys():
            if k in rest:
                rec[k] = rest.pop(k)
        rec.update(rest)
        return rec

    def _record_keys(self) -> list:
        keys = list(self._index.get("record_keys") or [])
        extra = list((self._index.get("extras") or {}).get("keys", []))
        return keys + [k for k in list(self.meta) + extra if k not in keys]

    def info(self) -> dict:
        """Same keys as :func:`prh_fast.store.feature_info`, plus store details."""
        keys = ["feats"] + self._record_keys()
        return {"n": self.n, "num_layers": self.num_layers, "dims": list(self.dims),
                "dtype": str(self.dtype), "layout": self.layout, "keys": keys,
                "num_params": self.meta.get("num_params"), "shards": len(self.shards),
                "bytes": sum(int(s["bytes"]) for s in self.shards), "complete": self.complete,
                "content_id": self.content_id}

    # -- integrity -------------------------------------------------------------------------------
    def verify(self, *, checksums: bool = True, progress: bool = False) -> dict:
        """Check every shard (size, header and SHA-256) and the extras file.

        Args:
            checksums: Also compare SHA-256 digests (reads every byte).
            progress: Show a progress bar.

        Returns:
            A summary dict (``path``, ``n``, ``shards``, ``bytes``, ``checksums``, ``complete``,
            ``ok``).

        Raises:
            StoreError: Naming the first bad file.
        """
        from tqdm.auto import tqdm

        total = sum(int(s["bytes"]) for s in self.shards)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {self.path}",
                   disable=not progress, leave=False)
        try:
            for i, s in enumerate(self.shards):
                _check_shard_size(self.path, s)
                self._headers.pop(i, None)
                self._layout_of(i)
                if checksums:
                    full = self._shard_file(i)
                    got = _sha256_file(full)
                    if got != s["sha256"]:
                        raise StoreError(f"{full}: checksum mismatch (SHA-256 {got[:16]}..., "
                                         f"the index says {s['sha256'][:16]}...); the shard is "
                                         f"corrupt")
                bar.update(int(s["bytes"]))
        finally:
            bar.close()
        e = self._index.get("extras")
        if e:
            full = _member(self.path, e["file"])
            if checksums and os.path.isfile(full) and _sha256_file(full) != e["sha256"]:
                raise StoreError(f"{full}: checksum mismatch; the extras file is corrupt")
            self.extras()
        return {"path": self.path, "n": self.n, "shards": len(self.shards), "bytes": total,
                "checksums": bool(checksums), "complete": self.complete, "ok": True}

    # -- derived-data cache ----------------------------------------------------------------------
    def cache_path(self, name: str) -> str:
        folder = os.path.join(self.path, CACHE_DIR)
        if os.path.lexists(folder) and os.path.realpath(folder) != os.path.join(
                os.path.realpath(self.path), CACHE_DIR):
            raise StoreError(f"{folder}: the cache folder leads outside the store (to "
                             f"{os.path.realpath(folder)}); remove it")
        return os.path.join(folder, name)

    def cache_load(self, name: str, expect: dict) -> dict[str, torch.Tensor] | None:
        """Tensors of cache file ``name`` when its metadata matches ``expect`` (and this
        store's content), else None. A damaged cache file is ignored (and recomputed)."""
        full = self.cache_path(name)
        if not self.complete or not os.path.isfile(full):
            return None
        from safetensors.torch import load

        try:
            with open(full, "rb") as f:
                data = f.read()
            _, header = _read_header(full)
            meta = header.get("__metadata__") or {}
            want = {k: str(v) for k, v in expect.items()}
            want["content_id"] = str(self.content_id)
            if any(meta.get(k) != v for k, v in want.items()):
                return None
            return dict(load(data))
        except Exception as err:  # noqa: BLE001 - any damage means "not cached"
            log.warning("prh_fast.store: ignoring unreadable cache file %s (%s)", full, err)
            return None

    def cache_save(self, name: str, tensors: dict, meta: dict) -> None:
        """Write cache file ``name`` atomically (only for finished stores)."""
        if not self.complete:
            return
        md = {k: str(v) for k, v in meta.items()}
        md["content_id"] = str(self.content_id)
        data = _safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                  md)
        atomic_write(self.cache_path(name), lambda f: f.write(data))


def open_store(path: StrPath, *, mmap: bool = False,
               allow_partial: bool = False) -> FeatureStore:
    """Open a store folder for reading.

    Args:
        path: The store folder.
        mmap: As in :class:`FeatureStore`.
        allow_partial: As in :class:`FeatureStore`.

    Returns:
        A :class:`FeatureStore`; rows are read only when asked for.

    Raises:
        StoreError: Not a store folder, or a damaged one.

    Example:
        >>> import os, tempfile, torch
        >>> from prh_fast.store import StoreWriter, open_store
        >>> path = os.path.join(tempfile.mkdtemp(), "store")
        >>> with StoreWriter(path) as w:
        ...     w.append([torch.ones(6, 2)])
        ...     _ = w.finish()
        >>> store = open_store(path)
        >>> store.n, store.num_layers, store.dtype
        (6, 1, torch.float32)
    """
    return FeatureStore(path, mmap=mmap, allow_partial=allow_partial)
