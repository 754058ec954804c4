"""Conversion between reference ``.pt`` feature files and store folders."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from prh_fast.errors import InputError

if TYPE_CHECKING:
    from prh_fast._validate import StrPath
from prh_fast.store import _pt
from prh_fast.store._sharded import StoreWriter, _dtype_name, _load_index, is_store, open_store

__all__ = ["pt_to_store", "store_to_pt"]


def pt_to_store(pt_path: StrPath, store_path: StrPath, *,
                dtype: str | torch.dtype | None = None, shard_rows: int | None = None,
                overwrite: bool = False, trust: bool = False, progress: bool = False) -> str:
    """Write the reference feature file ``pt_path`` as a store folder ``store_path``.

    Every key of the record besides ``feats`` is kept: tensors in ``extras.safetensors``, the
    rest in the index's metadata. The features are read memory-mapped (zip-format files), so
    the file need not fit in memory twice. An interrupted conversion resumes where it stopped.

    Args:
        pt_path: The reference ``.pt`` file.
        store_path: The store folder to write.
        dtype: Storage dtype (default: the file's own).
        shard_rows: Rows per shard (default: about 128 MiB per shard).
        overwrite: Replace a finished store at ``store_path``.
        trust: As in :func:`prh_fast.store.load_features`.
        progress: Show a progress bar.

    Returns:
        ``store_path``.

    Raises:
        ValueError: A finished store is already there (without ``overwrite``), or the file
            is malformed or empty.
        DestinationLocked: Another writer holds ``store_path``.

    Example:
        >>> import os, tempfile, torch
        >>> import prh_fast
        >>> from prh_fast.store import open_store, pt_to_store
        >>> tmp = tempfile.mkdtemp()
        >>> pt = os.path.join(tmp, "model.pt")
        >>> prh_fast.save_features(pt, torch.zeros(20, 2, 4), num_params=5)
        >>> store = open_store(pt_to_store(pt, os.path.join(tmp, "store"), dtype="bfloat16"))
        >>> store.n, store.dtype, store.meta["num_params"]
        (20, torch.bfloat16, 5)
    """
    from tqdm.auto import tqdm

    pt_path, store_path = os.fspath(pt_path), os.fspath(store_path)
    if not overwrite and is_store(store_path) and _load_index(store_path)["complete"]:
        raise InputError(f"{store_path}: a finished store is already there; pass "
                         f"overwrite=True to replace it")
    rec = _pt._load(pt_path, "cpu", trust, mmap=True)
    dims = _pt._check_record(rec, pt_path)
    feats = rec["feats"]
    layers = list(feats.unbind(1)) if isinstance(feats, torch.Tensor) else list(feats)
    layout = "tensor" if isinstance(feats, torch.Tensor) else "list"
    name = _dtype_name(dtype if dtype is not None else layers[0].dtype)
    n = dims[0][0]
    if n == 0:
        raise InputError(f"{pt_path}: has no samples (N = 0)")
    w = StoreWriter(store_path, dims=[d for _, d in dims], dtype=name, shard_rows=shard_rows,
                    layout=layout, overwrite=overwrite)
    step = w._index["shard_rows"]
    with tqdm(total=n, initial=w.rows_done, unit="row", desc=f"convert {pt_path}",
              disable=not progress, leave=False) as bar:
        for a in range(w.rows_done, n, step):
            b = min(n, a + step)
            w.append([t[a:b] for t in layers])
            bar.update(b - a)
    extra = {k: v for k, v in rec.items() if k != "feats"}
    return w.finish(extra)


def store_to_pt(store_path: StrPath, pt_path: StrPath) -> str:
    """Write a store folder as one reference ``.pt`` file (features in memory once).

    Args:
        store_path: The store folder.
        pt_path: The ``.pt`` file to write (atomically).

    Returns:
        ``pt_path`` as a string.

    Example:
        >>> import os, tempfile, torch
        >>> import prh_fast
        >>> from prh_fast.store import StoreWriter, store_to_pt
        >>> tmp = tempfile.mkdtemp()
        >>> with StoreWriter(os.path.join(tmp, "store")) as w:
        ...     w.append([torch.ones(3, 2), torch.ones(3, 5)])
        ...     _ = w.finish({"num_params": 9})
        >>> pt = store_to_pt(os.path.join(tmp, "store"), os.path.join(tmp, "model.pt"))
        >>> rec = prh_fast.load_features(pt)
        >>> [tuple(t.shape) for t in rec["feats"]], rec["num_params"]
        ([(3, 2), (3, 5)], 9)
    """
    s = open_store(store_path)
    rec = s.to_record()
    feats = rec.pop("feats")
    _pt.save_features(pt_path, feats, **rec)
    return os.fspath(pt_path)
