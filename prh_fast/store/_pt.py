"""The reference's ``.pt`` feature files (docs/metrics.md, "Reference feature files").

A model's features are stored as ``torch.save({"feats": Tensor[N, L, D] or a list of
[N, D_l] tensors, "num_params": int, ...})``; language models add ``"mask"``, ``"loss"`` and
``"bpb"``. These helpers read such files as they are (every key kept), write them atomically, and
turn every failure into an error that names the file.

Loading is safe by default (``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects); ``trust=True`` allows the unsafe fallback for files holding other Python objects.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import TYPE_CHECKING, Any

import torch

from prh_fast._io import atomic_write
from prh_fast.errors import InputError

if TYPE_CHECKING:
    from prh_fast._validate import Layers, StrPath

__all__ = ["load_features", "save_features", "feature_info"]
# check_same_samples lives in prh_fast.store (it also reads store folders).


# --------------------------------------------------------------------------------------------
# validation of the loaded object
# --------------------------------------------------------------------------------------------
def _layers_n(feats, where: str) -> list:
    """Check ``feats`` and return ``[(N, D_l), ...]`` per layer; ValueError naming ``where``."""
    if isinstance(feats, torch.Tensor):
        if feats.dim() != 3:
            raise InputError(f"{where}: 'feats' must be a [N, L, D] tensor or a list of [N, D] "
                             f"tensors, got a {feats.dim()}-D tensor of shape "
                             f"{tuple(feats.shape)}")
        if not feats.is_floating_point():
            raise InputError(f"{where}: 'feats' must be floating point, got {feats.dtype}")
        n, nl, d = feats.shape
        if nl == 0:
            raise InputError(f"{where}: 'feats' has no layers (shape {tuple(feats.shape)})")
        return [(n, d)] * nl
    if isinstance(feats, (list, tuple)):
        if len(feats) == 0:
            raise InputError(f"{where}: 'feats' is an empty list of layers")
        dims = []
        for i, f in enumerate(feats):
            if not isinstance(f, torch.Tensor):
                raise InputError(f"{where}: 'feats'[{i}] must be a tensor, got "
                                 f"{type(f).__name__}")
            if f.dim() != 2:
                raise InputError(f"{where}: 'feats'[{i}] must be a [N, D] tensor, got a "
                                 f"{f.dim()}-D tensor of shape {tuple(f.shape)}")
            if not f.is_floating_point():
                raise InputError(f"{where}: 'feats'[{i}] must be floating point, got {f.dtype}")
            dims.append(tuple(f.shape))
        for i, (n, _) in enumerate(dims):
            if n != dims[0][0]:
                raise InputError(f"{where}: 'feats'[{i}] has {n} samples, 'feats'[0] has "
                                 f"{dims[0][0]}")
        return dims
    raise InputError(f"{where}: 'feats' must be a [N, L, D] tensor or a list of [N, D] tensors, "
                     f"got {type(feats).__name__}")


def _check_record(obj, where: str) -> list:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a dict with a 'feats' key, got {type(obj).__name__}")
    if "feats" not in obj:
        keys = ", ".join(repr(k) for k in obj) or "none"
        raise InputError(f"{where}: no 'feats' key (keys: {keys})")
    return _layers_n(obj["feats"], where)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
def _is_unsupported_type(err: Exception) -> bool:
    # torch.load(weights_only=True) wraps every unpickling failure in the same UnpicklingError;
    # a refused class shows up as "Unsupported global", while garbage bytes show up as
    # "Unsupported operand" / invalid opcodes and are corruption, not a trust question.
    return isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err)


def _load(path, map_location, trust: bool, mmap: bool = False):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such feature file")
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a feature file")
    kw = {"map_location": map_location}
    if mmap:
        kw["mmap"] = True
    try:
        try:
            return torch.load(path, weights_only=True, **kw)
        except Exception as err:  # noqa: BLE001  (torch.load raises many types on bad input)
            if mmap and not _is_unsupported_type(err):
                # mmap needs the zip format; old-style (legacy) files load without it.
                kw.pop("mmap")
                return torch.load(path, weights_only=True, **kw)
            raise
    except Exception as err:  # noqa: BLE001
        if not _is_unsupported_type(err):
            raise InputError(f"{path}: corrupt or truncated feature file "
                             f"({type(err).__name__}: {_first_line(err)})") from err
        if not trust:
            raise InputError(
                f"{path}: holds Python objects that the safe loader refuses "
                f"({_first_global(err)}); loading it would run code from the file. Pass "
                f"trust=True only if you trust its source.") from err
    kw.pop("mmap", None)
    try:
        return torch.load(path, weights_only=False, **kw)
    except (AttributeError, ImportError) as err:
        # Trusted, but the class the file pickled is not importable in this process.
        raise InputError(f"{path}: trust=True: the file holds objects of a class that cannot "
                         f"be imported here ({_first_line(err)}); import the module that "
                         f"defines it first, or save the file without it") from err
    except Exception as err:  # noqa: BLE001
        raise InputError(f"{path}: corrupt or truncated feature file "
                         f"({type(err).__name__}: {_first_line(err)})") from err


def _first_line(err: Exception) -> str:
    """The gist of a loader's error: its first sentence (torch appends paragraphs of advice
    that do not apply here), at most 160 characters."""
    lines = [s.strip() for s in str(err).splitlines() if s.strip()]
    if not lines:
        return ""
    first = re.split(r"(?<=\.)\s", lines[0], maxsplit=1)[0]
    return first if len(first) <= 160 else first[:157] + "..."


def _first_global(err: Exception) -> str:
    m = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
    return f"unsupported global {m.group(1)}" if m else "unsupported type"


def load_features(path: StrPath, *, map_location: str | torch.device | None = "cpu",
                  trust: bool = False) -> dict[str, Any]:
    """Read a reference feature file ``torch.save({"feats": ..., "num_params": ..., ...})``.

    Args:
        path: The ``.pt`` file.
        map_location: Passed to ``torch.load`` (default ``"cpu"``).
        trust: When the safe loader (``weights_only=True``) refuses a type in the file, retry
            with ``weights_only=False`` (runs code from the file) instead of raising.

    Returns:
        The stored dict as it is: ``"feats"`` (a ``[N, L, D]`` tensor or a list of ``[N, D_l]``
        tensors, dtype unchanged) and every other key (``"num_params"``, ``"mask"``, ...).

    Raises:
        FileNotFoundError: No such file (the message names it).
        ValueError: Naming the file: corrupt or truncated file; a refused type without
            ``trust``; not a dict; no ``"feats"``; feats of the wrong type, rank or dtype; list
            layers with different numbers of samples.

    Example:
        >>> import os, tempfile, torch
        >>> from prh_fast.store import _pt
        >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
        >>> _pt.save_features(path, [torch.zeros(4, 2), torch.zeros(4, 3)], num_params=7)
        >>> sorted(_pt.load_features(path))
        ['feats', 'num_params']
    """
    obj = _load(path, map_location, trust)
    _check_record(obj, os.fspath(path))
    return obj


def feature_info(path: StrPath, *, trust: bool = False) -> dict[str, Any]:
    """Summary of a feature file (or of an already-loaded record dict).

    Files in the zip format are memory-mapped, so the features are not read into memory.

    Args:
        path: The ``.pt`` file, or a record dict.
        trust: As in :func:`load_features`.

    Returns:
        ``{"n", "num_layers", "dims", "dtype", "layout", "keys", "num_params"}``: samples,
        layers, the width of every layer, the feats dtype (as a string like
        ``"torch.float32"``), ``"tensor"`` or ``"list"``, all keys of the record, and
        ``num_params`` (None when absent).

    Example:
        >>> import torch
        >>> from prh_fast.store._pt import feature_info
        >>> info = feature_info({"feats": torch.zeros(6, 2, 3, dtype=torch.float16)})
        >>> info["n"], info["num_layers"], info["dtype"], info["num_params"]
        (6, 2, 'torch.float16', None)
    """
    if isinstance(path, dict):
        obj, where = path, "record"
    else:
        where = os.fspath(path)
        obj = _load(path, "cpu", trust, mmap=True)
    dims = _check_record(obj, where)
    feats = obj["feats"]
    first = feats if isinstance(feats, torch.Tensor) else feats[0]
    return {
        "n": dims[0][0],
        "num_layers": len(dims),
        "dims": [d for _, d in dims],
        "dtype": str(first.dtype),
        "layout": "tensor" if isinstance(feats, torch.Tensor) else "list",
        "keys": list(obj.keys()),
        "num_params": obj.get("num_params"),
    }


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------
def _compact(t):
    """A tensor that owns exactly its data: torch.save writes a view's whole storage."""
    if isinstance(t, torch.Tensor) and (
            not t.is_contiguous() or t.storage_offset() != 0
            or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        return t.contiguous().clone()
    return t


def save_features(path: StrPath, feats: Layers, **extra: Any) -> None:
    """Write ``{"feats": feats, **extra}`` in the reference format, atomically.

    The record goes to a temporary file in the target's folder, is flushed and fsynced, then
    renamed over ``path`` (``os.replace``), so ``path`` is never half-written: after a failure
    the old file (if any) is intact and no temporary file is left. Parent folders are created.

    Args:
        path: The ``.pt`` file to write.
        feats: A ``[N, L, D]`` float tensor or a list of ``[N, D_l]`` float tensors (saved as
            they are, dtype and device kept; views are compacted so only their own data is
            written).
        **extra: Other keys, e.g. ``num_params=...``, ``mask=...``.

    Raises:
        ValueError: ``feats`` of the wrong type, rank or dtype (naming ``path``).

    Example:
        >>> import os, tempfile, torch
        >>> import prh_fast
        >>> path = os.path.join(tempfile.mkdtemp(), "features", "model.pt")
        >>> prh_fast.save_features(path, torch.zeros(100, 2, 8)[:10], num_params=1)
        >>> os.path.getsize(path) < 100 * 2 * 8 * 4  # the view's 10 rows, not its storage
        True
    """
    path = os.fspath(path)
    if isinstance(feats, tuple):
        feats = list(feats)
    _layers_n(feats, path)
    if isinstance(feats, list):
        feats = [_compact(f) for f in feats]
    else:
        feats = _compact(feats)
    record = {"feats": feats, **extra}
    atomic_write(path, lambda f: torch.save(record, f))
