"""Resumable writers for extracted features.

A writer receives batches of per-layer features in sample order and produces one feature file
(or store) at the end. Every batch is made durable before the next one is computed, so an
interrupted extraction resumes from the last complete batch instead of starting over.

The interface (``rows_done``, ``append``, ``finish``) is the one the sharded store's writer
implements too, so the extraction loop does not care which format it fills.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil

import torch

from prh_fast import _lock
from prh_fast._io import atomic_write
from prh_fast.errors import InputError

__all__ = ["PtWriter", "STORAGE_DTYPES"]

log = logging.getLogger(__name__)

STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PART = re.compile(r"^part-(\d{12})-(\d{12})\.pt$")


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, torch.dtype):
        return str(o).replace("torch.", "")
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _canon(d: dict) -> str:
    return json.dumps(d, sort_keys=True, default=_json_default)


class PtWriter(_lock.HoldsLock):
    """Write a reference-format ``.pt`` feature file batch by batch.

    Batches are kept as atomic part files in ``<path>.partial/`` next to a ``job.json`` that
    records the job's ``fingerprint`` (model, data, pooling, ...). Re-opening the same path with
    the same fingerprint resumes after the last complete part; a different fingerprint is an
    error unless ``overwrite=True``. ``finish`` concatenates the parts into
    ``{"feats": [N, L, D] (or a list of [N, D_l] when widths differ), "num_params", ...}``,
    writes it atomically with :func:`prh_fast.store.save_features`, and removes the parts.

    ``extras`` passed to :meth:`append` are per-sample 1-D tensors (for example token losses)
    kept with the batch, so statistics over the whole data set survive an interruption too.

    Rows may be appended in another order than the file's: :meth:`use_layout` declares how the
    appended rows map to the file's rows (for example each distinct input once, longest first,
    with ``index[i]`` the appended row that file row ``i`` repeats). :meth:`finish` and
    :meth:`extras` then return rows in the file's order. The layout is recorded with the
    unfinished parts; parts written under another layout (or none) are discarded rather than
    resumed.

    One writer per output: the writer holds the output's lock (``.<name>.lock`` beside it)
    from opening until :meth:`finish` or :meth:`close`; a second writer of the same path
    fails at once with :class:`prh_fast.DestinationLocked` naming the first.

    Args:
        path: The ``.pt`` file to write.
        fingerprint: JSON-able description of the job; a resume must match it.
        dtype: Storage dtype, one of :data:`STORAGE_DTYPES`.
        overwrite: Discard an unfinished extraction of another job at ``path``.

    Raises:
        ValueError: A bad ``dtype``, or unfinished parts of a different job.
        DestinationLocked: Another writer holds ``path``.

    Example:
        >>> import os, tempfile, torch
        >>> import prh_fast
        >>> from prh_fast.extract._writer import PtWriter
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> with PtWriter(path, fingerprint={"model": "m"}) as w:
        ...     w.append([torch.zeros(4, 8), torch.ones(4, 8)])
        >>> with PtWriter(path, fingerprint={"model": "m"}) as w:  # resumes after row 4
        ...     print(w.rows_done)
        ...     w.append([torch.zeros(2, 8), torch.ones(2, 8)])
        ...     _ = w.finish({"num_params": 3})
        4
        >>> tuple(prh_fast.load_features(path)["feats"].shape)
        (6, 2, 8)
    """

    def __init__(self, path, *, fingerprint: dict, dtype: str = "float32",
                 overwrite: bool = False):
        if dtype not in STORAGE_DTYPES:
            raise InputError(f"dtype: expected one of {sorted(STORAGE_DTYPES)}, got {dtype!r}")
        self.path = os.fspath(path)
        self.dtype = STORAGE_DTYPES[dtype]
        self.partial = self.path + ".partial"
        self.fingerprint = dict(fingerprint)
        self._disk_layout = None   # the layout recorded with the parts found on disk
        self._layout = None        # the layout declared by use_layout
        self._index = None
        self._settled = False      # parts checked against the declared (or no) layout
        self._held = _lock.acquire(self.path, folder=False)
        try:
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    def _open(self, overwrite: bool) -> None:
        job = os.path.join(self.partial, "job.json")
        if overwrite and os.path.isdir(self.partial):
            shutil.rmtree(self.partial)
        if os.path.isdir(self.partial) and os.path.isfile(job):
            try:
                with open(job) as fh:
                    old = json.load(fh)
            except (OSError, ValueError) as err:
                raise InputError(f"{job}: unreadable job record ({err}); remove "
                                 f"{self.partial} or pass overwrite=True") from None
            if isinstance(old, dict):
                self._disk_layout = old.pop("layout", None)
            if _canon(old) != _canon(self.fingerprint):
                changed = sorted(k for k in set(old) | set(self.fingerprint)
                                 if _canon({k: old.get(k)}) != _canon({k: self.fingerprint.get(k)}))
                raise InputError(f"{self.path}: an unfinished extraction with different settings "
                                 f"is in {self.partial} (differs in: {', '.join(changed)}); "
                                 f"pass overwrite=True (CLI: --force) to start over")
        else:
            os.makedirs(self.partial, exist_ok=True)
            atomic_write(job, lambda fh: fh.write(_canon(self.fingerprint).encode()))
        self._parts = self._scan()

    def use_layout(self, layout: dict, index) -> None:
        """Declare that rows are appended in another order than the file's.

        Call it once, before :attr:`rows_done` or :meth:`append`. Parts on disk written under
        a different layout (or none) are removed, so a resume never mixes orders.

        Args:
            layout: JSON-able description of the appended order (it must change whenever the
                order could, e.g. with a digest of the ordered inputs); ``layout["rows"]`` is
                the number of rows that will be appended.
            index: ``[N]`` integer tensor: file row ``i`` is appended row ``index[i]``.

        Raises:
            ValueError: A second call, a call after rows were read or written, or an index
                that does not fit ``layout["rows"]``.
        """
        if self._settled:
            raise InputError("use_layout: call it once, before rows_done or append")
        if not isinstance(layout, dict) or not isinstance(layout.get("rows"), int):
            raise InputError(f"layout: expected a dict with an integer 'rows', got {layout!r}")
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= layout["rows"]):
            raise InputError(f"index: entries must lie in [0, {layout['rows']})")
        self._layout, self._index = dict(layout), index
        self._settle()

    def _settle(self) -> None:
        """Drop parts of another layout and record the current one with the job (once)."""
        if self._settled:
            return
        self._settled = True
        if _canon({"l": self._disk_layout}) == _canon({"l": self._layout}):
            return
        if self._parts:
            log.warning("prh_fast.extract: %s holds rows written in another order; "
                        "starting that extraction over", self.partial)
            for _, _, full in self._parts:
                os.remove(full)
            self._parts = []
        record = dict(self.fingerprint)
        if self._layout is not None:
            record["layout"] = self._layout
        job = os.path.join(self.partial, "job.json")
        atomic_write(job, lambda fh: fh.write(_canon(record).encode()))
        self._disk_layout = self._layout

    # ------------------------------------------------------------------------------------------
    def _scan(self) -> list:
        """Complete, contiguous parts from row 0; anything after a gap or unreadable is dropped."""
        found = []
        for name in os.listdir(self.partial):
            m = _PART.match(name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), name))
            elif name.endswith(".tmp") or ".tmp" in name:
                os.remove(os.path.join(self.partial, name))   # debris of an interrupted write
        found.sort()
        parts, row = [], 0
        for start, stop, name in found:
            full = os.path.join(self.partial, name)
            if start != row:
                log.warning("prh_fast.extract: dropping %s (expected a part starting at row %d)",
                            full, row)
                os.remove(full)
                continue
            parts.append((start, stop, full))
            row = stop
        return parts

    @property
    def rows_done(self) -> int:
        """Rows durably written: a resumed extraction continues from here."""
        self._settle()
        return self._parts[-1][1] if self._parts else 0

    def append(self, layers, extras: dict | None = None) -> None:
        """Write one batch as a durable part file.

        Args:
            layers: One ``[B, D_l]`` tensor per layer (cast to the storage dtype).
            extras: Per-sample ``[B]`` tensors kept with the batch (e.g. token losses).

        Raises:
            ValueError: Shapes that disagree, or a closed writer.
        """
        if self._held is None:
            raise InputError(f"{self.path}: this writer was closed; open a new one to resume")
        self._settle()
        if not layers:
            raise InputError("layers: expected at least one [B, D] tensor")
        b = int(layers[0].shape[0])
        for i, t in enumerate(layers):
            if t.dim() != 2 or t.shape[0] != b:
                raise InputError(f"layers[{i}]: expected [{b}, D], got {tuple(t.shape)}")
        extras = dict(extras or {})
        for k, v in extras.items():
            if v.dim() != 1 or v.shape[0] != b:
                raise InputError(f"extras[{k!r}]: expected [{b}], got {tuple(v.shape)}")
        start = self.rows_done
        stop = start + b
        payload = {"layers": [t.detach().to("cpu", self.dtype).contiguous() for t in layers],
                   "extras": {k: v.detach().cpu() for k, v in extras.items()}}
        full = os.path.join(self.partial, f"part-{start:012d}-{stop:012d}.pt")
        atomic_write(full, lambda fh: torch.save(payload, fh))
        self._parts.append((start, stop, full))

    def _load_parts(self):
        for start, stop, full in self._parts:
            try:
                yield torch.load(full, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable part is reported the same way
                raise InputError(f"{full}: unreadable part of an unfinished extraction ({err}); "
                                 f"delete it to recompute rows {start}..{stop}") from None

    def _check_complete(self) -> None:
        if self._layout is not None and self.rows_done != self._layout["rows"]:
            raise InputError(f"{self.path}: {self.rows_done} rows written, the layout has "
                             f"{self._layout['rows']}")

    def extras(self) -> dict:
        """Per-sample extras of every row written so far, concatenated (in the file's order
        when a layout was declared, which needs every row written).

        Returns:
            ``{name: [rows] tensor}``.

        Raises:
            ValueError: A layout was declared and not every row is written yet.
        """
        self._settle()
        out: dict = {}
        for part in self._load_parts():
            for k, v in part["extras"].items():
                out.setdefault(k, []).append(v)
        if self._index is not None:
            self._check_complete()
            return {k: torch.cat(v)[self._index] for k, v in out.items()}
        return {k: torch.cat(v) for k, v in out.items()}

    def finish(self, meta: dict) -> str:
        """Concatenate the parts into the feature file, remove them and release the lock.

        Args:
            meta: Other keys of the record (``num_params``, settings, ...).

        Returns:
            The file's path.

        Raises:
            ValueError: Nothing was written, or the parts disagree or are unreadable.
        """
        from prh_fast.store import save_features

        self._settle()
        if not self._parts:
            raise InputError(f"{self.path}: nothing was extracted (no rows written)")
        per_layer = None
        for part in self._load_parts():
            if per_layer is None:
                per_layer = [[t] for t in part["layers"]]
            elif len(part["layers"]) != len(per_layer):
                raise InputError(f"{self.partial}: parts disagree on the number of layers")
            else:
                for acc, t in zip(per_layer, part["layers"]):
                    acc.append(t)
        layers = [torch.cat(ts) for ts in per_layer]
        if self._index is not None:
            self._check_complete()
            # Duplicated file rows are copies of one appended row: bit-identical.
            layers = [t[self._index] for t in layers]
        dims = {t.shape[1] for t in layers}
        feats = torch.stack(layers, dim=1) if len(dims) == 1 else layers
        save_features(self.path, feats, **meta)
        shutil.rmtree(self.partial, ignore_errors=True)
        self.close()
        return self.path

    def __exit__(self, exc_type, *exc):
        if exc_type is not None and not self._parts and self._held is not None:
            # Failed before any row was written (e.g. the model did not load): leave no
            # unfinished extraction behind.
            shutil.rmtree(self.partial, ignore_errors=True)
        return super().__exit__(exc_type, *exc)
