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


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"prh_fast.store.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'prh_fast.store' has no attribute {name!r}")


def load_features(path, *, map_location="cpu", trust: bool = False) -> dict:
    """Read a reference feature file, or a store folder as the same record.

    For ``.pt`` files see :func:`prh_fast.store._pt.load_features`. A store folder gives
    ``{"feats": [N, L, D] (layout "tensor") or a list of [N, D_l], **meta, **extras}`` with the
    stored dtype, read entirely into memory (use :func:`open_store` to stream instead).
    """
    if not isinstance(path, dict) and is_store(path):
        rec = open_store(path).to_record()
        if map_location not in (None, "cpu") and str(map_location) != "cpu":
            f = rec["feats"]
            rec["feats"] = ([t.to(map_location) for t in f] if isinstance(f, list)
                            else f.to(map_location))
        return rec
    return _pt.load_features(path, map_location=map_location, trust=trust)


def feature_info(path, *, trust: bool = False) -> dict:
    """Summary of a feature file, a loaded record, or a store folder (no features read):
    ``{"n", "num_layers", "dims", "dtype", "layout", "keys", "num_params"}``."""
    if not isinstance(path, dict) and is_store(path):
        info = open_store(path).info()
        return {k: info[k] for k in ("n", "num_layers", "dims", "dtype", "layout", "keys",
                                     "num_params")}
    return _pt.feature_info(path, trust=trust)


def check_same_samples(paths_or_dicts) -> int:
    """Check that every model (``.pt`` file, store folder or record dict) has the same ``N``
    and return it; ValueError naming the first one that differs."""
    items = list(paths_or_dicts)
    if not items:
        raise ValueError("paths_or_dicts: expected at least one feature file or record")
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
            raise ValueError(f"{name}: has N = {n} samples, but {first_name} has N = {first_n}; "
                             f"alignment needs the same (paired) samples for every model")
    return first_n
