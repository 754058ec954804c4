"""Extraction split by sample range: each rank extracts its rows into its own part, rank 0
merges the parts into one feature file (or store) at the end.

The extraction itself is the caller's (a model forward pass over a data set). ``run_sharded``
only decides the ranges, calls the callable, and merges:

- rank ``r`` gets rows ``shard_range(n, r, P)`` and calls ``extract_range(start, stop, part)``,
  which must write those rows to ``part`` (a ``.pt`` file or a store folder) and create it
  atomically when complete (``PtWriter.finish`` / ``StoreWriter.finish`` do), resuming from its
  own partial state if it was interrupted;
- a range whose ``part`` already exists is not extracted again (a restart after a failure
  redoes only the unfinished ranges; with the same number of ranks the ranges are the same);
- errors on any rank are raised on every rank; a rank that dies is named;
- rank 0 merges the parts in row order (``merge(parts, out_path)``, default
  :func:`merge_parts`) and removes them; every rank returns ``out_path``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prh_fast import _lock
from prh_fast.distributed._env import (
    agree,
    broadcast_object,
    collective,
    mark_done,
    shard_range,
    world,
)
from prh_fast.distributed._store import merge_parts
from prh_fast.errors import InputError

if TYPE_CHECKING:
    from prh_fast._validate import StrPath

__all__ = ["run_sharded", "part_path"]


def part_path(out_path: StrPath, start: int, stop: int) -> str:
    """Where rows ``[start, stop)`` of ``out_path`` are written before the merge.

    Args:
        out_path: The merged output.
        start: First row of the range.
        stop: End of the range (exclusive).

    Returns:
        ``<out_path>.ranges/rows-<start>-<stop>``, plus ``.pt`` when ``out_path`` ends in it.

    Example:
        >>> from prh_fast.distributed import part_path
        >>> part_path("out/model.pt", 0, 512)
        'out/model.pt.ranges/rows-000000000000-000000000512.pt'
    """
    out_path = os.fspath(out_path)
    ext = ".pt" if out_path.endswith(".pt") else ""
    return os.path.join(out_path + ".ranges", f"rows-{start:012d}-{stop:012d}{ext}")


def run_sharded(n: int, extract_range: Callable[[int, int, str], object], out_path: StrPath,
                *, merge: Callable[[list[str], StrPath], object] | None = None,
                meta: dict[str, Any] | None = None, keep_parts: bool = False) -> StrPath:
    """Run ``extract_range(start, stop, part_path)`` on each rank's sample range, then merge.

    An existing ``out_path`` is returned at once (delete it to extract again). Without a
    process group it runs the whole range in this process.

    Args:
        n: Number of samples.
        extract_range: Callable writing rows ``[start, stop)`` to the given path (see the
            module notes); its return value, if a path, replaces the given one.
        out_path: The merged output (``.pt`` file, or a store folder).
        merge: ``merge(parts, out_path)`` run on rank 0 (default: :func:`merge_parts`, which
            concatenates ``.pt`` parts or store parts).
        meta: Dict passed to the default merge as extra keys / store metadata.
        keep_parts: Keep ``<out_path>.ranges/`` after merging.

    Returns:
        ``out_path``, on every rank.

    Raises:
        ValueError: A bad ``n`` or ``extract_range``.
        DestinationLocked: Another job is writing ``out_path``.
        DistributedError: A rank failed or died (raised on every rank).

    Example:
        >>> import os, tempfile, torch
        >>> import prh_fast
        >>> from prh_fast.distributed import run_sharded
        >>> data = torch.arange(40, dtype=torch.float32).reshape(10, 1, 4)
        >>> def extract_range(start, stop, part):
        ...     prh_fast.save_features(part, data[start:stop])
        >>> out = run_sharded(10, extract_range, os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> bool((prh_fast.load_features(out)["feats"] == data).all())
        True
    """
    out_path = os.fspath(out_path)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n: expected a positive number of samples, got {n!r}")
    if not callable(extract_range):
        raise InputError("extract_range: expected a callable (start, stop, path)")
    rank, P = world()
    # Rank 0 holds the merged output's lock for the whole job (every rank's part has a writer
    # lock of its own): a second job writing the same output fails at once on every rank.
    held, err = contextlib.ExitStack(), None
    if rank == 0:
        try:
            held.enter_context(_lock.exclusive_lock(out_path, folder=False))
        except (_lock.DestinationLocked, OSError) as e:
            err = e
    agree(err, what="output lock")
    with held:
        return _run_sharded(n, extract_range, out_path, merge, meta, keep_parts, rank, P)


def _run_sharded(n, extract_range, out_path, merge, meta, keep_parts, rank, P) -> str:
    done = broadcast_object(os.path.exists(out_path) if rank == 0 else None,
                            what="checking for a finished output")
    if done:
        return out_path
    start, stop = shard_range(n, rank, P)
    part = part_path(out_path, start, stop)
    err = None
    if stop > start and not os.path.exists(part):
        try:
            got = extract_range(start, stop, part)
            if isinstance(got, (str, os.PathLike)):
                part = os.fspath(got)
            if not os.path.exists(part):
                raise FileNotFoundError(f"{part}: extract_range({start}, {stop}, ...) returned "
                                        f"without writing its part")
        except Exception as e:  # noqa: BLE001 - shared with every rank, then re-raised
            err = e
    mark_done(f"extract-{os.path.abspath(out_path)}")
    agree(err, what=f"extraction of rows {start}..{stop}")
    parts = [None] * P
    if P > 1:
        import torch.distributed as dist

        tag = f"extract-{os.path.abspath(out_path)}"
        with collective("gathering the extracted parts", tag=tag):
            dist.all_gather_object(parts, part if stop > start else None)
    else:
        parts = [part]
    err = None
    if rank == 0:
        try:
            todo = [p for p in parts if p is not None]
            if merge is None:
                merge_parts(todo, out_path, meta)
            else:
                merge(todo, out_path)
            if not keep_parts:
                shutil.rmtree(out_path + ".ranges", ignore_errors=True)
        except Exception as e:  # noqa: BLE001
            err = e
    agree(err, what="merge of the extracted parts")
    return out_path
