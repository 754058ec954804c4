"""Feature storage: reference ``.pt`` files and the sharded out-of-core store.

- ``load_features`` / ``save_features`` / ``feature_info`` / ``check_same_samples``: the
  reference's ``.pt`` files (``_pt.py``). ``load_features``, ``feature_info`` and
  ``check_same_samples`` also accept a store folder, so everything that takes a feature file
  (``align_models``, ``prh-fast align``) takes a store too.
- ``StoreWriter`` / ``open_store`` / ``FeatureStore``: the sharded store (``_sharded.py``):
  safetensors shards + a JSON index, written incrementally and atomically, read lazily,
  verifiable (``prh-fast store verify``).
- ``pt_to_store`` / ``store_to_pt``: conversion both ways (``prh-fast store convert``).
- ``stream_knn`` / ``clip_thresholds`` / ``StreamPrep`` (``_stream.py``) and ``kernel_scores``
  (``_moments.py``): exact neighbour lists, the clipping threshold and linear CKA / unbiased
  CKA / SVCCA of a store without loading it, equal to the in-memory pipeline; results cached
  in the store (imported on first use: they sit on top of ``prh_fast.knn`` and ``metrics``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prh_fast.errors import InputError

if TYPE_CHECKING:
    import torch

    from prh_fast._validate import StrPath
from prh_fast.store import _pt
from prh_fast.store._convert import pt_to_store, store_to_pt
from prh_fast.store._pt import save_features
from prh_fast.store._sharded import (
    DEFAULT_SHARD_BYTES,
    INDEX_NAME,
    STORE_DTYPES,
    FeatureStore,
    StoreError,
    StoreWriter,
    is_store,
    open_store,
)

__all__ = ["load_features", "save_features", "feature_info", "check_same_samples",
           "StoreWriter", "FeatureStore", "open_store", "is_store", "StoreError",
           "pt_to_store", "store_to_pt", "INDEX_NAME", "STORE_DTYPES", "DEFAULT_SHARD_BYTES",
           "stream_knn", "clip_thresholds", "StreamPrep", "kernel_scores"]

_LAZY = {"stream_knn": "_stream", "clip_thresholds": "_stream", "StreamPrep": "_stream",
         "kernel_scores": "_moments"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"prh_fast.store.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'prh_fast.store' has no attribute {name!r}")


def load_features(path: StrPath, *, map_location: str | torch.device | None = "cpu",
                  trust: bool = False) -> dict[str, Any]:
    """Read a reference feature file, or a store folder as the same record.

    For ``.pt`` files see :func:`prh_fast.store._pt.load_features`. A store folder gives
    ``{"feats": [N, L, D] (layout "tensor") or a list of [N, D_l], **meta, **extras}`` with the
    stored dtype, read entirely into memory (use :func:`open_store` to stream instead).

    Args:
        path: A ``.pt`` file or a store folder.
        map_location: Where the tensors go (``torch.load``'s argument; for a store, a device).
        trust: Allow the unsafe pickle fallback for ``.pt`` files (runs code from the file).

    Returns:
        The record dict: ``"feats"`` and every other key the file holds.

    Raises:
        FileNotFoundError: No such file.
        ValueError: A corrupt, truncated or malformed file (the message names it).

    Example:
        >>> import os, tempfile, torch
        >>> import prh_fast
        >>> path = os.path.join(tempfile.mkdtemp(), "model.pt")
        >>> prh_fast.save_features(path, torch.zeros(10, 3, 4), num_params=123)
        >>> rec = prh_fast.load_features(path)
        >>> tuple(rec["feats"].shape), rec["num_params"]
        ((10, 3, 4), 123)
    """
    if not isinstance(path, dict) and is_store(path):
        rec = open_store(path).to_record()
        if map_location not in (None, "cpu") and str(map_location) != "cpu":
            f = rec["feats"]
            rec["feats"] = ([t.to(map_location) for t in f] if isinstance(f, list)
                            else f.to(map_location))
        return rec
    return _pt.load_features(path, map_location=map_location, trust=trust)


def feature_info(path: StrPath, *, trust: bool = False) -> dict[str, Any]:
    """Summary of a feature file, a loaded record, or a store folder (no features read).

    Args:
        path: A ``.pt`` file, a store folder, or a record dict already loaded.
        trust: As in :func:`load_features`.

    Returns:
        ``{"n", "num_layers", "dims", "dtype", "layout", "keys", "num_params"}``.

    Example:
        >>> import torch
        >>> from prh_fast.store import feature_info
        >>> info = feature_info({"feats": [torch.zeros(8, 4), torch.zeros(8, 6)]})
        >>> info["n"], info["dims"], info["layout"]
        (8, [4, 6], 'list')
    """
    if not isinstance(path, dict) and is_store(path):
        info = open_store(path).info()
        return {k: info[k] for k in ("n", "num_layers", "dims", "dtype", "layout", "keys",
                                     "num_params")}
    return _pt.feature_info(path, trust=trust)


def check_same_samples(paths_or_dicts: Sequence[StrPath | Mapping[str, Any]]) -> int:
    """Check that every model has the same number of samples ``N``.

    Args:
        paths_or_dicts: ``.pt`` files, store folders or record dicts.

    Returns:
        The common ``N``.

    Raises:
        ValueError: An empty list, or a model whose ``N`` differs (naming it and the first).

    Example:
        >>> import torch
        >>> from prh_fast.store import check_same_samples
        >>> check_same_samples([{"feats": torch.zeros(5, 2, 3)}, {"feats": torch.zeros(5, 1, 7)}])
        5
    """
    items = list(paths_or_dicts)
    if not items:
        raise InputError("paths_or_dicts: expected at least one feature file or record")
    first_n = first_name = None
    for i, item in enumerate(items):
        name = f"paths_or_dicts[{i}]" if isinstance(item, dict) else os.fspath(item)
        if isinstance(item, dict):
            n = _pt._check_record(item, name)[0][0]
        else:
            n = feature_info(item)["n"]
        if first_n is None:
            first_n, first_name = n, name
        elif n != first_n:
            raise InputError(f"{name}: has N = {n} samples, but {first_name} has N = {first_n}; "
                             f"alignment needs the same (paired) samples for every model")
    return first_n
