"""Model grids over ranks: ``prh_fast.grid.align_models`` with its model pairs split.

The pairs the single-process grid would *compute* (mirrored pairs of a symmetric metric are
copied, not computed) are listed in its row-major order and cut into ``P`` contiguous runs
(``shard_range``), so a rank touches few x models and each model a rank needs is loaded and,
for the neighbour metrics, searched once on that rank. Each pair is scored by the very function
the single-process grid uses (``prh_fast.grid.GridSpec.score``, which runs
``prh_fast.grid._score_pair``), so every number is the one a single process computes. The
settings are checked once, by the same ``prh_fast.grid.GridSpec``.

Resume. With ``output_dir``, each finished pair is written at once (atomically) to
``<output_dir>/.<stem>.parts/pair-<a>-<b>.json`` together with a fingerprint of the job
(metric, options, models and their files' sizes and times). A rerun of the same job (any number
of ranks) loads the pairs whose part exists instead of recomputing them. Rank 0 assembles the
grid, writes the outputs exactly as ``GridResult.save`` does, then removes the parts. A
finished output is loaded and returned, as in the single-process grid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from prh_fast._io import atomic_write
from prh_fast.distributed._env import (
    DistributedError,
    agree,
    broadcast_object,
    collective,
    mark_done,
    shard_range,
    world,
)
from prh_fast.grid import PairScore, plan_pairs

if TYPE_CHECKING:
    import torch

    from prh_fast._validate import StrPath
    from prh_fast.grid import GridResult, Models
    from prh_fast.knn import AnnParams

__all__ = ["align_models", "plan_pairs"]

logger = logging.getLogger(__name__)


def _source_id(m):
    if isinstance(m.source, str):
        try:
            st = os.stat(m.source)
            return [m.name, os.path.realpath(m.source), st.st_size, st.st_mtime_ns]
        except OSError:
            return [m.name, m.source]
    return [m.name, "in-memory"]


def _fingerprint(job: dict) -> str:
    text = json.dumps(job, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _part_path(parts_dir, a, b):
    return os.path.join(parts_dir, f"pair-{a:05d}-{b:05d}.json")


def _load_part(path, fingerprint):
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("fingerprint") != fingerprint:
        return None
    try:  # a damaged part is recomputed, like a missing one
        mat = np.array(d["mat"], dtype=np.float64)
        pair = None if d["pair"] is None else tuple(int(v) for v in d["pair"])
        null = d.get("null")
        if mat.ndim != 2 or (pair is not None and len(pair) != 2) or not (
                null is None or isinstance(null, dict)):
            return None
        return PairScore(mat, float(d["best"]), pair, null, 0.0)
    except (KeyError, TypeError, ValueError):
        return None


def _save_part(path, fingerprint, a, b, x, y, ps: PairScore):
    d = {"fingerprint": fingerprint, "a": a, "b": b, "x": x, "y": y,
         "mat": ps.matrix.tolist(), "best": float(ps.best),
         "pair": None if ps.pair is None else [int(v) for v in ps.pair],
         "null": ps.null}
    text = json.dumps(d)  # floats as repr: they read back bit for bit
    atomic_write(path, lambda f: f.write(text.encode()))


def align_models(x_models: Models, y_models: Models, metric: str = "mutual_knn",
                 topk: int = 10, normalize: bool = True, q: float | None = None,
                 exact: bool = False, *, output_dir: StrPath | None = None,
                 force_remake: bool = False, progress: bool = True,
                 backend: str | AnnParams | None = None, reference_order: bool = True,
                 null_permutations: int = 0, seed: int = 0,
                 device: str | torch.device | None = None, cache_bytes: int | None = None,
                 stream: str | bool | None = None, memory_budget: int | None = None,
                 stream_budget: int | None = None, trust: bool = False,
                 **metric_kwargs: Any) -> GridResult:
    """``prh_fast.grid.align_models`` with the model pairs split over the ranks.

    Same arguments and the same ``GridResult`` (returned on every rank); without a process
    group, or with one rank, it *is* the single-process function. Call it on every rank of the
    default group with the same arguments. Feature files must be readable from every rank;
    ``output_dir`` is written by rank 0, and per-pair parts (for resuming) by the rank that
    computed them, so a restart on another number of ranks reuses them only when
    ``output_dir`` is on a file system all ranks share.

    Args:
        x_models, y_models, metric, topk, normalize, q, exact: as in
            ``prh_fast.grid.align_models``.
        output_dir, force_remake, progress, backend, reference_order, null_permutations,
        seed, device, cache_bytes, stream, memory_budget, trust, **metric_kwargs: as there.
        stream_budget: deprecated name of ``memory_budget`` (a ``FutureWarning``).

    Returns:
        The grid's ``GridResult``, on every rank.

    Raises:
        InputError: the single-process errors (naming the file or model), on every rank.
        DistributedError: naming the missing ranks when a rank dies or stalls.

    Example:
        >>> import torch
        >>> from prh_fast.distributed import align_models
        >>> X = torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(0))
        >>> align_models({"a": X}, {"b": X}, "mutual_knn", topk=5, progress=False).scores
        array([[1.]])
    """
    from prh_fast import grid as g

    spec = g.GridSpec.from_args(
        metric, topk=topk, normalize=normalize, q=q, exact=exact, output_dir=output_dir,
        force_remake=force_remake, progress=progress, backend=backend,
        reference_order=reference_order, null_permutations=null_permutations, seed=seed,
        device=device, cache_bytes=cache_bytes, stream=stream, memory_budget=memory_budget,
        stream_budget=stream_budget, trust=trust, **metric_kwargs)
    rank, P = world()
    if P == 1:
        return g.align_models(x_models, y_models, **_single_process_kwargs(spec, cache_bytes))
    t_all = time.perf_counter()
    xm, ym = _agreed_models(g, x_models, y_models)
    held = _hold_output_lock(g, spec, rank)
    try:
        done = _shared_existing(spec, xm, ym, rank)
        if done is not None:
            return done
        plan, err = None, None
        try:
            plan = spec.plan(xm, ym)
        except (ValueError, TypeError, FileNotFoundError) as e:
            err = e
        agree(err, what="model check")
        fp = _fingerprint(_job(spec, plan, xm, ym))
        parts_dir = _parts_dir(spec, rank)
        cache = spec.cache(progress=False)
        mine_out, err = _score_my_pairs(g, spec, plan, cache, xm, ym, fp, parts_dir, rank, P)
        got = _gather(mine_out, fp)
        results, ann, ties = _merge(got, err, rank, xm, ym)
        res = spec.result(xm, ym, plan, results, _timings(got, results, plan, t_all, xm, ym, P),
                          cache.stream.mode, ann=ann, ties=ties,
                          distributed={"world_size": P, "split": "model_pair"})
        _write_output(spec, res, parts_dir, rank)
        return res
    finally:
        held.close()


def _single_process_kwargs(spec, cache_bytes) -> dict:
    """``prh_fast.grid.align_models``' keywords for ``spec`` (one rank)."""
    kwargs = dict(metric=spec.metric, topk=spec.topk, normalize=spec.normalize, q=spec.q,
                  exact=spec.exact, output_dir=spec.output_dir,
                  force_remake=spec.force_remake, progress=spec.progress,
                  backend=spec.backend, reference_order=spec.reference_order,
                  null_permutations=spec.null_permutations, seed=spec.seed,
                  device=spec.device, trust=spec.trust, stream=spec.stream,
                  memory_budget=spec.memory_budget, **spec.metric_kwargs)
    if cache_bytes is not None:
        kwargs["cache_bytes"] = cache_bytes
    return kwargs


def _agreed_models(g, x_models, y_models):
    """Both model lists, checked on every rank (an error on any rank is raised on all)."""
    xm = ym = err = None
    try:
        xm, ym = g._as_models(x_models, "x_models"), g._as_models(y_models, "y_models")
    except (ValueError, TypeError, FileNotFoundError) as e:
        err = e
    agree(err, what="model lists")
    return xm, ym


def _hold_output_lock(g, spec, rank) -> contextlib.ExitStack:
    """Rank 0 holds the output's writer lock for the whole job (the other ranks write parts
    under it); a job already writing this output makes every rank fail at once."""
    held, err = contextlib.ExitStack(), None
    if rank == 0 and spec.output_dir is not None:
        try:
            held.enter_context(g.output_lock(spec.output_dir, spec.metric, spec.topk))
        except (ValueError, OSError) as e:
            err = e
    try:
        agree(err, what="output lock")
    except BaseException:
        held.close()
        raise
    return held


def _shared_existing(spec, xm, ym, rank):
    """A finished output: rank 0 loads it (as the single-process grid does) and shares it;
    None on every rank when there is none."""
    if spec.output_dir is None or spec.force_remake:
        return None
    done = None
    if rank == 0:
        try:
            done = spec.existing(xm, ym)
        except (ValueError, TypeError, FileNotFoundError) as e:
            done = e
    done = broadcast_object(done, what="sharing the existing output")
    if isinstance(done, Exception):
        raise type(done)(str(done))
    return done


def _job(spec, plan, xm, ym) -> dict:
    """What a part's fingerprint covers: the metric, its options and the models' files."""
    return {"metric": spec.metric, "topk": spec.topk, "k": plan.k, "opts": plan.opts,
            "q": spec.q, "exact": bool(spec.exact), "normalize": bool(spec.normalize),
            "reference_order": bool(spec.reference_order),
            "null_permutations": int(spec.null_permutations), "seed": int(spec.seed),
            "n": plan.n, "x": [_source_id(m) for m in xm], "y": [_source_id(m) for m in ym]}


def _parts_dir(spec, rank):
    """The folder of per-pair parts (None without ``output_dir``); with ``force_remake``
    rank 0 clears the old parts before anyone reads one."""
    if spec.output_dir is None:
        return None
    parts_dir = os.path.join(os.fspath(spec.output_dir), f".{spec.stem}.parts")
    if spec.force_remake:
        if rank == 0 and os.path.isdir(parts_dir):
            shutil.rmtree(parts_dir, ignore_errors=True)
        broadcast_object(None, what="clearing old parts")
    return parts_dir


def _score_my_pairs(g, spec, plan, cache, xm, ym, fp, parts_dir, rank, P):
    """Score this rank's contiguous run of the pairs to compute, resuming from saved parts:
    ``(what this rank shares, its error or None)``."""
    a0, a1 = shard_range(len(plan.compute), rank, P)
    mine = plan.compute[a0:a1]
    resumed = [0]

    def score(a, b):
        x, y = xm[a], ym[b]
        item = None
        if parts_dir is not None and not spec.force_remake:
            item = _load_part(_part_path(parts_dir, a, b), fp)
        if item is not None:
            resumed[0] += 1
            return item
        item = spec.score(cache, plan, x, y)
        if parts_dir is not None:
            _save_part(_part_path(parts_dir, a, b), fp, a, b, x.name, y.name, item)
        return item

    results, err = {}, None
    try:
        results = g._score_all(spec, cache, plan, xm, ym, pairs=mine,
                               desc=f"align {spec.metric} (rank {rank}/{P})", score=score)
    except (ValueError, TypeError, FileNotFoundError) as e:
        err = e
    mark_done(f"grid-{fp}")
    # model keys are object ids in memory: share the reports by model name
    ann_mine = {m.name: cache.ann[m.key] for m in xm + ym if m.key in cache.ann}
    out = {"err": None if err is None else (type(err).__name__, str(err)),
           "results": ({ab: tuple(ps) for ab, ps in results.items()} if err is None else {}),
           "ann": ann_mine if err is None else {},
           "ties": {m.name: cache.ties[m.key] for m in xm + ym if m.key in cache.ties},
           "timings": dict(cache.timings), "counts": dict(cache.counts),
           "computed": len(mine) - resumed[0], "resumed": resumed[0]}
    return out, err


def _gather(mine_out: dict, fp: str) -> list:
    """Every rank's pairs (small: ``[Lx, Ly]`` matrices) and error, if any."""
    import torch.distributed as dist

    got = [None] * world()[1]
    with collective("gathering the grid's pairs from every rank", tag=f"grid-{fp}"):
        dist.all_gather_object(got, mine_out)
    return got


def _merge(got: list, err, rank: int, xm, ym):
    """All ranks' pairs ``{(a, b): PairScore}``, search reports (model key -> reports) and tie
    diagnostics (model name -> per-layer dicts);
    the first rank's error is raised on every rank."""
    bad = [(r, o["err"]) for r, o in enumerate(got) if o["err"] is not None]
    if bad:
        r, (kind, msg) = bad[0]
        if r == rank:
            raise err
        types = {"ValueError": ValueError, "TypeError": TypeError,
                 "FileNotFoundError": FileNotFoundError}
        raise types.get(kind, DistributedError)(f"(on rank {r}) {msg}")
    results, ann, ties = {}, {}, {}
    for o in got:
        results.update({ab: PairScore(*ps) for ab, ps in o["results"].items()})
        ann.update(o["ann"])
        ties.update(o.get("ties", {}))
    ann = {m.key: ann[m.name] for m in xm + ym if m.name in ann}
    return results, ann, ties


def _timings(got: list, results: dict, plan, t_all: float, xm, ym, P: int) -> dict:
    """``GridResult.timings`` summed over the ranks."""
    from prh_fast import grid as g

    times = {key: sum(o["timings"].get(key, 0.0) for o in got)
             for key in ("load", "prepare", "neighbours")}
    counts = {key: sum(o["counts"].get(key, 0) for o in got)
              for key in ("loads", "searched_models")}
    return g._grid_timings(times, counts, results, plan, t_all, len(xm) * len(ym),
                           sum(o["computed"] for o in got),
                           resumed=sum(o["resumed"] for o in got), world_size=P)


def _write_output(spec, res, parts_dir, rank) -> None:
    """Rank 0 writes the outputs (as ``GridResult.save``) and removes the parts; a failure
    is raised on every rank."""
    if spec.output_dir is None:
        return
    err = None
    if rank == 0:
        try:
            res.save(spec.output_dir)
            if parts_dir is not None:
                shutil.rmtree(parts_dir, ignore_errors=True)
        except OSError as e:
            err = ValueError(f"output_dir {os.fspath(spec.output_dir)}: cannot write ({e})")
    agree(err, what="output write")
