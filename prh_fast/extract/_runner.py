"""The extraction loop: each distinct input once, a progress bar, durable batches, resume.

``extract_text`` and ``extract_images`` take a model (a name or path, or an already loaded
encoder) and paired data (a source string or a loaded :class:`PairedDataset`), and write the
reference's feature file ``<features_dir>/<data set>/<model>_pool-<pool>_prompt-<bool>.pt``.
A finished file whose recorded settings match is reused; an unfinished one resumes.

Distinct inputs. A caption that occurs several times (or an image id that does) is encoded
once and its row copied to every sample that has it, so duplicates get bit-identical rows and
a language model's per-sample loss terms are those of the one encoding (the totals weight
each distinct caption by its multiplicity, as encoding every sample would). Distinct captions
are encoded longest first (token count), so each batch pads little; a caption's features do
not depend on its batch-mates beyond float32 rounding. The file holds rows in sample order
as before.

Loaded models. The last model loaded by name is kept in this process, so extracting several
caption levels or subsets with the same model loads it once; loading another model releases
it first, and :func:`release_cached_model` releases it explicitly.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from prh_fast.errors import InputError
from prh_fast.extract._writer import STORAGE_DTYPES, PtWriter

if TYPE_CHECKING:
    from prh_fast._validate import StrPath
    from prh_fast.extract._data import PairedDataset
    from prh_fast.extract._text import TextEncoder
    from prh_fast.extract._vision import ImageEncoder

__all__ = ["extract_text", "extract_images", "extract_sharded", "feature_path", "safe_name",
           "TEXT_POOLINGS", "release_cached_model"]

TEXT_POOLINGS = ("avg", "last", "prompt")


def safe_name(name: str) -> str:
    """A model or data-set name usable as a file name (the reference replaces '/' by '_').

    Args:
        name: A model name, hub id or path.

    Returns:
        The name with separators and unusual characters replaced by ``_``.

    Example:
        >>> from prh_fast.extract._runner import safe_name
        >>> safe_name("bigscience/bloomz-560m")
        'bigscience_bloomz-560m'
    """
    s = str(name).rstrip("/\\").replace("/", "_").replace("\\", "_")
    s = "".join(c if (c.isalnum() or c in "-_.+") else "_" for c in s)
    return s.lstrip(".") or "model"


def feature_path(features_dir: StrPath, data_name: str, model_name: str, pool: str,
                 prompt: bool = False) -> str:
    """Where a model's features are written, in the reference's feature-file layout.

    Args:
        features_dir: The root folder of feature files.
        data_name: The data set's name (``PairedDataset.name``; ``/`` makes sub-folders).
        model_name: The model's name.
        pool: The pooling.
        prompt: Whether the captions were wrapped in the paper's prompt.

    Returns:
        ``<features_dir>/<data>/<model>_pool-<pool>_prompt-<prompt>.pt``.

    Example:
        >>> from prh_fast.extract import feature_path
        >>> path = feature_path("results/features", "easy-vqa/train-n1024-seed0/full",
        ...                     "bigscience/bloomz-560m", "avg")
        >>> path.split("/")[2:]
        ['easy-vqa', 'train-n1024-seed0', 'full', 'bigscience_bloomz-560m_pool-avg_prompt-False.pt']
    """
    parts = [safe_name(p) for p in str(data_name).split("/") if p]
    return os.path.join(os.fspath(features_dir), *parts,
                        f"{safe_name(model_name)}_pool-{pool}_prompt-{bool(prompt)}.pt")


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
    return batch_size


def _subset(n, total: int, where: str) -> int:
    if n is None:
        return total
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n: expected a positive integer, got {n!r}")
    if n > total:
        raise InputError(f"n: {n} samples requested but {where} has only {total}")
    return n


def _digest(items) -> str:
    h = hashlib.sha1()
    for it in items:
        h.update(str(it).encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _fingerprint(kind: str, name: str, pool: str, ds, n: int, storage_dtype: str) -> dict:
    """What a finished feature file must have been made from to be reused."""
    if kind == "text":
        return {"model": name, "pool": pool, "data": ds.name, "n": n,
                "captions_sha1": _digest(ds.captions(range(n))), "storage_dtype": storage_dtype,
                "kind": "text"}
    ids = ds.meta.get("ids") if isinstance(getattr(ds, "meta", None), dict) else None
    return {"model": name, "pool": pool, "data": ds.name, "n": n,
            "images_sha1": _digest(list(ids)[:n]) if ids is not None else None,
            "storage_dtype": storage_dtype, "kind": "vision"}


def _existing_matches(path: str, fingerprint: dict) -> bool:
    """A finished feature file whose recorded job fingerprint equals ``fingerprint``."""
    if not os.path.isfile(path):
        return False
    from prh_fast.extract._writer import _canon

    try:
        rec = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - an unreadable file is simply not reused
        return False
    return isinstance(rec, dict) and _canon(rec.get("job", {})) == _canon(fingerprint)


def _progress(total: int, initial: int, desc: str, enabled: bool, unit: str = "sample"):
    from tqdm.auto import tqdm

    # With the total known, tqdm shows the rate (<unit>/s) and the time left.
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled,
                dynamic_ncols=True, leave=False)


def _distinct(keys) -> tuple:
    """``(first, inverse)``: the position of each distinct key's first occurrence, in order of
    appearance, and for every position the number of its key in ``first`` (int64 tensor)."""
    number: dict = {}
    first, inverse = [], []
    for i, k in enumerate(keys):
        j = number.get(k)
        if j is None:
            j = number[k] = len(first)
            first.append(i)
        inverse.append(j)
    return first, torch.tensor(inverse, dtype=torch.int64)


def _appended_index(order, inverse) -> torch.Tensor:
    """For each sample, the appended row holding its input when distinct input ``order[r]`` is
    appended as row ``r``."""
    pos = torch.empty(len(order), dtype=torch.int64)
    pos[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order), dtype=torch.int64)
    return pos[inverse]


def _token_lengths(enc, texts, pool) -> list:
    """Tokens per text as the encoder will see it (UTF-8 bytes for encoders that do not say)."""
    fn = getattr(enc, "token_lengths", None)
    if callable(fn):
        return [int(x) for x in fn(texts, pool=pool)]
    return [len(t.encode("utf-8")) for t in texts]


# ----------------------------------------------------------------------------- loaded models

_MODEL_LOCK = threading.Lock()
_MODEL_CACHE: dict = {}   # at most one entry: key -> loaded encoder


def _files_stamp(name) -> tuple:
    """Changes when a local model's files do (size and mtime of the entries of its folder)."""
    path = os.fspath(name) if isinstance(name, (str, os.PathLike)) else None
    if not path or not os.path.exists(path):
        return ()
    try:
        if os.path.isdir(path):
            entries = sorted(os.scandir(path), key=lambda e: e.name)
            return tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries)
        st = os.stat(path)
        return ((path, st.st_size, st.st_mtime_ns),)
    except OSError:
        return ("unreadable",)


def _cached_model(load, name, **kwargs):
    """``load(name, **kwargs)``, reusing the encoder of the previous call with the same loader,
    name, options and files; a different request releases the kept encoder before loading."""
    key = (load, str(name), _files_stamp(name),
           tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
    with _MODEL_LOCK:
        enc = _MODEL_CACHE.get(key)
        if enc is None:
            _MODEL_CACHE.clear()
    if enc is not None:
        return enc
    enc = load(name, **kwargs)
    with _MODEL_LOCK:
        _MODEL_CACHE.clear()
        _MODEL_CACHE[key] = enc
    return enc


def release_cached_model() -> bool:
    """Release the model that ``extract_text`` / ``extract_images`` keep loaded between calls.

    The last model loaded by name stays in memory so that the next extraction with it does not
    load it again; call this to free that memory (for example before training on the GPU).

    Returns:
        Whether a model was kept.

    Example:
        >>> from prh_fast.extract._runner import release_cached_model
        >>> release_cached_model() in (True, False)
        True
    """
    with _MODEL_LOCK:
        had = bool(_MODEL_CACHE)
        _MODEL_CACHE.clear()
    return had


def _version() -> str:
    from prh_fast._version import __version__

    return __version__


class _Job:
    """What ``extract_text`` and ``extract_images`` share: checked arguments, the data set, the
    sample range, the model name (or a loaded encoder), the output path and the fingerprint."""

    def __init__(self, kind, model, data, *, pool, features_dir, out, n, batch_size,
                 storage_dtype, caption_level, split, rows):
        self.batch_size = _check_batch_size(batch_size)
        if storage_dtype not in STORAGE_DTYPES:
            raise InputError(f"storage_dtype: expected one of {sorted(STORAGE_DTYPES)}, "
                             f"got {storage_dtype!r}")
        self.ds = _load_data(data, caption_level, split)
        self.n = _subset(n, len(self.ds), f"data set {self.ds.name!r}")
        self.lo, self.hi = _rows(rows, self.n, out)
        loaded = hasattr(model, "encode") and not isinstance(model, (str, os.PathLike))
        self.enc = model if loaded else None
        self.name = model.name if loaded else str(model)
        self.pool = pool
        self.path = os.fspath(out) if out is not None else feature_path(
            features_dir, self.ds.name, self.name, pool, prompt=(pool == "prompt"))
        self.fingerprint = _fingerprint(kind, self.name, pool, self.ds, self.n, storage_dtype)
        if rows is not None:
            self.fingerprint["rows"] = [self.lo, self.hi]

    def run(self, encode, writer, progress: bool, n_rows: int, unit: str):
        """``encode(range of appended rows)`` over ``n_rows`` rows (this job's distinct
        inputs), batch by batch; the bar counts distinct inputs of ``hi - lo`` samples."""
        n = self.hi - self.lo
        what = f"distinct {unit}s" if n_rows != n else f"{unit}s"
        desc = f"{safe_name(self.name)} [{self.pool}] {n_rows} {what} of {n}"
        _run(encode, n_rows, self.batch_size, writer, desc, progress, unit)


def _run(encode, n: int, batch_size: int, writer, desc: str, progress: bool,
         unit: str = "sample"):
    done = writer.rows_done
    bar = _progress(n, done, desc, progress, unit)
    try:
        for start in range(done, n, batch_size):
            stop = min(n, start + batch_size)
            layers, extras = encode(range(start, stop))
            writer.append(layers, extras)
            bar.update(stop - start)
    finally:
        bar.close()


def _load_data(data, caption_level=None, split=None):
    if isinstance(data, str):
        from prh_fast.extract._data import load_pairs

        return load_pairs(data, split=split, caption_level=caption_level)
    for attr in ("name", "captions", "images"):
        if not hasattr(data, attr):
            raise TypeError(f"data: expected a source name or a PairedDataset, got "
                            f"{type(data).__name__}")
    return data


def extract_text(model: str | TextEncoder, data: str | PairedDataset, *, pool: str = "avg",
                 features_dir: StrPath = "./results/features", out: StrPath | None = None,
                 n: int | None = None, batch_size: int = 32,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 storage_dtype: str = "float32", caption_level: str | None = None,
                 split: str | None = None, force: bool = False, progress: bool = True,
                 rows: tuple[int, int] | None = None) -> str:
    """Hidden states of a language model for the captions of ``data``, written to a file.

    The file also records the mean next-token loss (nats per predicted token) and bits per
    byte (total nats / ln 2 / UTF-8 bytes of the scored text) for causal LMs, and per sample
    (``sample_nll_sum``, ``sample_n_tokens``, ``sample_n_bytes``) so that files of sample
    ranges can be merged exactly. Writing is resumable and atomic; a finished file of the same
    job is returned without work unless ``force``. Each distinct caption is encoded once (most
    tokens first, so batches pad little) and its row and loss terms copied to every sample
    that has it; the progress bar counts distinct captions. A model given by name stays
    loaded for the next call with the same name (see :func:`release_cached_model`).

    Args:
        model: A name or path understood by :func:`load_text_model`, or a loaded encoder.
        data: A source for :func:`load_pairs`, or a :class:`PairedDataset`.
        pool: ``"avg"`` (mean over valid tokens), ``"last"`` (last valid token) or
            ``"prompt"`` (the paper's prompt around the caption, last token).
        features_dir: Root of the feature-file layout (see :func:`feature_path`).
        out: The output file, instead of the layout's path.
        n: A seeded subset of that many pairs (None: all).
        batch_size: Captions per forward pass.
        device: Where the model runs.
        dtype: The model's compute dtype (default: the loader's).
        storage_dtype: The dtype written to the file.
        caption_level: The caption level or column (see :func:`load_pairs`).
        split: The data set's split.
        force: Extract again even when a finished file of this job exists.
        progress: Show a progress bar.
        rows: ``(start, stop)``: only samples ``start..stop-1`` of the first ``n`` (one rank's
            range in a distributed extraction, see :func:`extract_sharded`); give ``out``
            with it.

    Returns:
        The feature file's path.

    Raises:
        ValueError: A bad option (checked before any model loads).
        ModelNotAvailableError: The weights are neither on disk nor fetchable.
        DestinationLocked: Another job is writing the same file.

    Example:
        >>> from prh_fast.extract import extract_text
        >>> path = extract_text("all-minilm-l6-v2", "easy-vqa", n=64,
        ...                     features_dir="results/features")  # doctest: +SKIP
    """
    if pool not in TEXT_POOLINGS:
        raise InputError(f"pool: expected one of {list(TEXT_POOLINGS)}, got {pool!r}")
    job = _Job("text", model, data, pool=pool, features_dir=features_dir, out=out, n=n,
               batch_size=batch_size, storage_dtype=storage_dtype, caption_level=caption_level,
               split=split, rows=rows)
    if not force and _existing_matches(job.path, job.fingerprint):
        return job.path
    name, enc = job.name, job.enc
    captions = job.ds.captions(range(job.n))
    with PtWriter(job.path, fingerprint=job.fingerprint, dtype=storage_dtype,
                  overwrite=force) as writer:
        if enc is None:
            from prh_fast.extract import _text

            enc = _cached_model(_text.load_text_model, name, device=device, dtype=dtype)
        return _extract_text_into(writer, job, enc, captions, pool, storage_dtype, progress)


def _extract_text_into(writer, job, enc, captions, pool, storage_dtype, progress) -> str:
    ds, lo, hi = job.ds, job.lo, job.hi
    first, inverse = _distinct(captions[lo:hi])
    distinct = [captions[lo + i] for i in first]
    lengths = _token_lengths(enc, distinct, pool)
    # Longest first (a stable sort: equal lengths keep their order of appearance).
    order = sorted(range(len(distinct)), key=lambda j: -lengths[j])
    texts = [distinct[j] for j in order]
    writer.use_layout({"rows": len(texts), "order": "distinct captions, most tokens first",
                       "inputs_sha1": _digest(texts)}, _appended_index(order, inverse))

    def encode(idx):
        tb = enc.encode(texts[idx.start:idx.stop], pool=pool)
        extras = {"n_bytes": tb.n_bytes.to(torch.int64)}
        if tb.nll_sum is not None:
            extras["nll_sum"] = tb.nll_sum.to(torch.float64)
            extras["n_tokens"] = tb.n_tokens.to(torch.int64)
        return tb.feats, extras

    t0 = time.perf_counter()
    job.run(encode, writer, progress, len(texts), "caption")
    ex = writer.extras()   # per sample: each distinct caption's terms once per occurrence
    meta = _meta(enc, ds, hi - lo, pool, storage_dtype, job.fingerprint, time.perf_counter() - t0)
    meta["n_distinct"] = len(texts)
    meta["sample_n_bytes"] = ex["n_bytes"]
    if "nll_sum" in ex:
        meta["sample_nll_sum"] = ex["nll_sum"]
        meta["sample_n_tokens"] = ex["n_tokens"]
        meta.update(_lm_scores(ex["nll_sum"], ex["n_tokens"], ex["n_bytes"]))
    meta["prompt"] = pool == "prompt"
    return writer.finish(meta)


def _lm_scores(nll_sum, n_tokens, n_bytes) -> dict:
    """Mean loss (nats per predicted token), bits per byte and per-sample loss."""
    nll = float(nll_sum.double().sum())
    return {"loss": nll / max(int(n_tokens.sum()), 1),
            "bpb": nll / math.log(2) / max(int(n_bytes.sum()), 1),
            "sample_loss": (nll_sum / n_tokens.clamp_min(1)).to(torch.float32)}


def _rows(rows, n: int, out) -> tuple:
    if rows is None:
        return 0, n
    try:
        lo, hi = (int(rows[0]), int(rows[1]))
        ok = len(rows) == 2 and 0 <= lo < hi <= n
    except (TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise InputError(f"rows: expected (start, stop) with 0 <= start < stop <= n = {n}, "
                         f"got {rows!r}")
    if out is None:
        raise InputError("rows: give out= too (a sample range is written to its own file)")
    return lo, hi


def extract_images(model: str | ImageEncoder, data: str | PairedDataset, *,
                   pool: str = "cls", features_dir: StrPath = "./results/features",
                   out: StrPath | None = None, n: int | None = None, batch_size: int = 32,
                   device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                   storage_dtype: str = "float32", split: str | None = None,
                   force: bool = False, progress: bool = True,
                   rows: tuple[int, int] | None = None) -> str:
    """Per-layer features of a vision model for the images of ``data``, written to a file.

    Samples with the same image id (``data.meta["ids"]``) share one encoding; the progress bar
    counts distinct images. A model given by name stays loaded for the next call with the
    same name and options (see :func:`release_cached_model`).

    Args:
        model: A name or path understood by :func:`load_vision_model`, or a loaded encoder.
        data: A source for :func:`load_pairs`, or a :class:`PairedDataset`.
        pool: ``"cls"`` (class token after each block), ``"avg"`` (mean of patch tokens; for
            CNNs the global average of each stage) or ``"auto"`` (cls where the model has a
            class token, else avg).
        features_dir: Root of the feature-file layout (see :func:`feature_path`).
        out: The output file, instead of the layout's path.
        n: A seeded subset of that many pairs (None: all).
        batch_size: Images per forward pass.
        device: Where the model runs.
        dtype: The model's compute dtype (default: the loader's).
        storage_dtype: The dtype written to the file.
        split: The data set's split.
        force: Extract again even when a finished file of this job exists.
        progress: Show a progress bar.
        rows: ``(start, stop)``: one sample range (see :func:`extract_text`).

    Returns:
        The feature file's path.

    Raises:
        ValueError: A bad option.
        ModelNotAvailableError: The weights are neither on disk nor fetchable.
        DestinationLocked: Another job is writing the same file.

    Example:
        >>> from prh_fast.extract import extract_images
        >>> path = extract_images("efficientnet-lite0", "easy-vqa", n=64,
        ...                       pool="avg")  # doctest: +SKIP
    """
    job = _Job("vision", model, data, pool=pool, features_dir=features_dir, out=out, n=n,
               batch_size=batch_size, storage_dtype=storage_dtype, caption_level=None,
               split=split, rows=rows)
    if not force and _existing_matches(job.path, job.fingerprint):
        return job.path
    ds, name, enc = job.ds, job.name, job.enc
    with PtWriter(job.path, fingerprint=job.fingerprint, dtype=storage_dtype,
                  overwrite=force) as writer:
        if enc is None:
            from prh_fast.extract import _vision

            enc = _cached_model(_vision.load_vision_model, name, device=device, dtype=dtype,
                                pool=pool)
        lo, hi = job.lo, job.hi
        # The data set's image ids name its images (they fingerprint them too): an id that
        # repeats is one image, encoded once. Without ids every sample is its own image.
        ids = ds.meta.get("ids") if isinstance(getattr(ds, "meta", None), dict) else None
        keys = list(ids)[lo:hi] if ids is not None else range(hi - lo)
        first, inverse = _distinct(keys)
        writer.use_layout({"rows": len(first), "order": "distinct images, as they appear",
                           "inputs_sha1": _digest([keys[i] for i in first])}, inverse)

        def encode(idx):
            return enc.encode(ds.images([lo + first[r] for r in idx])), None

        t0 = time.perf_counter()
        job.run(encode, writer, progress, len(first), "image")
        meta = _meta(enc, ds, hi - lo, getattr(enc, "pool", pool), storage_dtype,
                     job.fingerprint, time.perf_counter() - t0)
        meta["n_distinct"] = len(first)
        return writer.finish(meta)


def _meta(enc, ds, n, pool, storage_dtype, fingerprint, seconds) -> dict:
    dims = [int(d) for d in getattr(enc, "dims", [])]
    return {
        "num_params": int(getattr(enc, "num_params", 0)),
        "model": getattr(enc, "name", None),
        "model_source": str(getattr(enc, "source", "")),
        "pool": pool,
        "dataset": ds.name,
        "dataset_meta": {k: v for k, v in getattr(ds, "meta", {}).items() if k != "ids"},
        "n": int(n),
        "num_layers": len(dims),
        "dims": dims,
        "dtype": storage_dtype,
        "compute_dtype": str(getattr(enc, "dtype", "")).replace("torch.", ""),
        "device": str(getattr(enc, "device", "")),
        "seconds": round(float(seconds), 3),
        "prh_fast_version": _version(),
        "job": fingerprint,
    }


def extract_sharded(kind: str, model: Any, data: str | PairedDataset, *,
                    pool: str | None = None, features_dir: StrPath = "./results/features",
                    out: StrPath | None = None, n: int | None = None,
                    caption_level: str | None = None, split: str | None = None,
                    force: bool = False, **kwargs: Any) -> str:
    """:func:`extract_text` or :func:`extract_images` with the samples split over ranks.

    Under ``torchrun`` each rank extracts ``shard_range(n, rank, world_size)`` into its own
    part (resumable like any extraction), rank 0 merges the parts in row order into the same
    file a single process would write (same path, same features, loss and bits per byte
    recomputed over all samples, same job fingerprint, so later single-process runs reuse it),
    and every rank returns its path. Without a process group it runs in this process alone.

    Args:
        kind: ``"text"`` or ``"vision"``.
        model: As in :func:`extract_text` / :func:`extract_images`.
        data: As in :func:`extract_text`.
        pool: The pooling (default ``"avg"`` for text, ``"cls"`` for vision).
        features_dir: Root of the feature-file layout.
        out: The output file, instead of the layout's path.
        n: A seeded subset of that many pairs (None: all).
        caption_level: For text: the caption level or column.
        split: The data set's split.
        force: Extract again even when a finished file of this job exists.
        **kwargs: Passed on to the extraction function (``batch_size``, ``device``, ...).

    Returns:
        The merged feature file's path, on every rank.

    Raises:
        ValueError: An unknown ``kind`` or a bad option.
        DistributedError: A rank failed or died.

    Example:
        >>> from prh_fast.extract import extract_sharded
        >>> path = extract_sharded("text", "smollm2-135m", "easy-vqa", n=1024)  # doctest: +SKIP
    """
    from prh_fast.distributed import run_sharded, world
    from prh_fast.distributed._env import agree
    from prh_fast.distributed._store import merge_parts

    if kind not in ("text", "vision"):
        raise InputError(f"kind: expected 'text' or 'vision', got {kind!r}")
    fn = extract_text if kind == "text" else extract_images
    pool = pool or ("avg" if kind == "text" else "cls")
    ds = _load_data(data, caption_level if kind == "text" else None, split)
    n = _subset(n, len(ds), f"data set {ds.name!r}")
    kw = dict(kwargs, pool=pool, n=n, split=split)
    if kind == "text":
        kw["caption_level"] = caption_level
    name = getattr(model, "name", None) if hasattr(model, "encode") else None
    name = name or str(model)
    path = os.fspath(out) if out is not None else feature_path(
        features_dir, ds.name, name, pool, prompt=(kind == "text" and pool == "prompt"))
    rank, _ = world()
    err = None
    if rank == 0 and os.path.exists(path):
        # run_sharded returns an existing output as is: keep it only if it is this job's.
        want = _fingerprint(kind, name, pool, ds, n, kw.get("storage_dtype", "float32"))
        if force or not _existing_matches(path, want):
            try:
                os.remove(path)
            except OSError as e:
                err = e
    agree(err, what="removing a stale feature file")

    def extract_range(start, stop, part):
        os.makedirs(os.path.dirname(part) or ".", exist_ok=True)
        return fn(model, ds, out=part, rows=(start, stop), force=force, **kw)

    def merge(parts, out_path):
        recs = [torch.load(p, map_location="cpu", weights_only=True, mmap=True) for p in parts]
        job = dict(recs[0]["job"])
        job.pop("rows", None)
        meta = {"job": job, "n": n, "seconds": round(sum(float(r.get("seconds", 0))
                                                         for r in recs), 3),
                "ranks": len(parts)}
        if kind == "text" and all("sample_nll_sum" in r for r in recs):
            cat = {k: torch.cat([r[k] for r in recs])
                   for k in ("sample_nll_sum", "sample_n_tokens", "sample_n_bytes")}
            meta.update(_lm_scores(cat["sample_nll_sum"], cat["sample_n_tokens"],
                                   cat["sample_n_bytes"]))
        del recs
        merge_parts(parts, out_path, meta)

    return run_sharded(n, extract_range, path, merge=merge)
