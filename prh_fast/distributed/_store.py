"""The one place this package touches feature storage: merging the row-range parts of a
sharded extraction into one reference ``.pt`` file or one store folder.

Only the store's public API is used: ``open_store(path)`` with ``.n``, ``.num_layers``,
``.meta``, ``.layer(l, rows=slice)``; ``StoreWriter(path)`` with ``.rows_done``,
``.append(list_of_layer_tensors)``, ``.finish(meta)``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from prh_fast.errors import InputError

if TYPE_CHECKING:
    from prh_fast._validate import StrPath

__all__ = ["merge_parts"]

#: Rows copied per step when merging store parts.
MERGE_CHUNK = 65536


def _merge_pt(parts, out_path, meta):
    from prh_fast.store import load_features, save_features

    recs = [load_features(p) for p in parts]
    layers_of = []
    for r in recs:
        f = r["feats"]
        layers_of.append(list(f) if isinstance(f, (list, tuple)) else list(f.unbind(1)))
    nl = {len(x) for x in layers_of}
    if len(nl) != 1:
        raise InputError(f"{parts[0]}: parts disagree on the number of layers ({sorted(nl)})")
    layers = []
    for l in range(nl.pop()):
        ts = [x[l] for x in layers_of]
        if len({t.shape[1] for t in ts}) != 1:
            raise InputError(f"{parts[0]}: parts disagree on the width of layer {l}")
        layers.append(torch.cat(ts))
    feats = (torch.stack(layers, dim=1) if len({t.shape[1] for t in layers}) == 1 else layers)
    ns = [x[0].shape[0] for x in layers_of]
    extra = {}
    for key, v in recs[0].items():
        if key == "feats":
            continue
        vals = [r.get(key) for r in recs]
        if all(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == n
               for x, n in zip(vals, ns)):
            # Per-sample values (masks, token losses): concatenated in row order.
            extra[key] = torch.cat(vals)
        else:
            # Everything else (num_params, settings) is taken from the first part.
            extra[key] = v
    extra.update(meta or {})
    save_features(out_path, feats, **extra)
    return out_path


def _merge_store(parts, out_path, meta):
    from prh_fast.store import StoreWriter, open_store

    # Widths, dtype and layout come from the first appended rows; reopening the same output
    # resumes an interrupted merge at its rows_done.
    w = StoreWriter(out_path)
    row = 0
    merged_meta = {}
    for p in parts:
        s = open_store(p)
        merged_meta = merged_meta or dict(getattr(s, "meta", {}) or {})
        for a in range(0, s.n, MERGE_CHUNK):
            b = min(s.n, a + MERGE_CHUNK)
            if row + (b - a) <= w.rows_done:  # already copied by an interrupted merge
                row += b - a
                continue
            if row < w.rows_done:
                raise InputError(f"{out_path}: an interrupted merge stopped inside a chunk "
                                 f"({w.rows_done} rows); remove it and rerun")
            w.append([s.layer(l, rows=slice(a, b)) for l in range(s.num_layers)])
            row += b - a
    merged_meta.update(meta or {})
    w.finish(merged_meta)
    return out_path


def merge_parts(parts: Sequence[StrPath], out_path: StrPath,
                meta: dict[str, Any] | None = None) -> StrPath:
    """Concatenate row-range parts, in order, into one feature file or store.

    ``.pt`` parts become one reference ``.pt`` file (per-sample tensors such as ``mask`` are
    concatenated, other keys taken from the first part); store folders become one store.

    Args:
        parts: The parts' paths, in row order (all files or all folders).
        out_path: The merged ``.pt`` file or store folder.
        meta: Extra keys (``.pt``) or store metadata added to the merged output.

    Returns:
        ``out_path``.

    Raises:
        ValueError: No parts, parts that disagree on layers or widths, or a mix of files and
            folders.
        FileNotFoundError: A part is missing.

    Example:
        >>> import os, tempfile, torch
        >>> import prh_fast
        >>> from prh_fast.distributed import merge_parts
        >>> tmp = tempfile.mkdtemp()
        >>> parts = [os.path.join(tmp, f"part{i}.pt") for i in range(2)]
        >>> for i, p in enumerate(parts):
        ...     prh_fast.save_features(p, torch.full((3, 2, 4), float(i)), num_params=10)
        >>> out = merge_parts(parts, os.path.join(tmp, "all.pt"), meta={"model": "m"})
        >>> rec = prh_fast.load_features(out)
        >>> tuple(rec["feats"].shape), rec["feats"][:, 0, 0].tolist(), rec["model"]
        ((6, 2, 4), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], 'm')
    """
    if not parts:
        raise InputError(f"{out_path}: no parts to merge (no rows were extracted)")
    if all(os.path.isfile(p) for p in parts):
        return _merge_pt(parts, out_path, meta)
    if all(os.path.isdir(p) for p in parts):
        return _merge_store(parts, out_path, meta)
    missing = [p for p in parts if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: part missing (the extraction callable did not "
                                f"write it)")
    raise InputError(f"{parts[0]}: parts mix files and folders")
