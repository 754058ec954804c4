"""Model grids over ranks: ``prh_fast.grid.align_models`` with its model pairs split.

The pairs the single-process grid would *compute* (mirrored pairs of a symmetric metric are
copied, not computed) are listed in its row-major order and cut into ``P`` contiguous runs
(``shard_range``), so a rank touches few x models and each model a rank needs is loaded and,
for the neighbour metrics, searched once on that rank. Each pair is scored by the very function
the single-process grid uses (``prh_fast.grid._score_pair``), so every number is the one a single
process computes.

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
import sys
import time

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

__all__ = ["align_models", "plan_pairs"]

logger = logging.getLogger("prh_fast")


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


def align_models(x_models, y_models, metric: str = "mutual_knn", topk=10, normalize: bool = True,
                 q=None, exact: bool = False, *, output_dir=None, force_remake: bool = False,
                 progress: bool = True, backend=None, reference_order: bool = True,
                 null_permutations: int = 0, seed: int = 0, device=None,
                 cache_bytes: int | None = None, stream=None, stream_budget=None,
                 trust: bool = False, **metric_kwargs):
    """``prh_fast.grid.align_models`` with the model pairs split over the ranks.

    Same arguments and the same ``GridResult`` (returned on every rank); without a process
    group, or with one rank, it *is* the single-process function. Call it on every rank of the
    default group with the same arguments. Feature files must be readable from every rank;
    ``output_dir`` is written by rank 0, and per-pair parts (for resuming) by the rank that
    computed them, so a restart on another number of ranks reuses them only when
    ``output_dir`` is on a file system all ranks share.

    Raises the single-process errors (``ValueError`` naming the file or model) on every rank,
    and :class:`DistributedError` naming the missing ranks when a rank dies or stalls.
    """
    from prh_fast import grid as g

    kwargs = dict(metric=metric, topk=topk, normalize=normalize, q=q, exact=exact,
                  output_dir=output_dir, force_remake=force_remake, progress=progress,
                  backend=backend, reference_order=reference_order,
                  null_permutations=null_permutations, seed=seed, device=device, trust=trust,
                  stream=stream, stream_budget=stream_budget, **metric_kwargs)
    if cache_bytes is not None:
        kwargs["cache_bytes"] = cache_bytes
    rank, P = world()
    if P == 1:
        return g.align_models(x_models, y_models, **kwargs)
    t_all = time.perf_counter()
    err = plan = None
    try:
        if metric not in g.SUPPORTED_METRICS:
            raise ValueError(f"metric: unknown metric {metric!r}; supported: "
                             f"{g.SUPPORTED_METRICS}")
        xm, ym = g._as_models(x_models, "x_models"), g._as_models(y_models, "y_models")
    except (ValueError, TypeError, FileNotFoundError) as e:
        err = e
    agree(err, what="model lists")
    stem = g.output_stem(metric, topk)
    # Rank 0 holds the output's writer lock for the whole job (the other ranks write parts
    # under it); a job already writing this output makes every rank fail at once.
    held, err = contextlib.ExitStack(), None
    if rank == 0 and output_dir is not None:
        try:
            held.enter_context(g.output_lock(output_dir, metric, topk))
        except (ValueError, OSError) as e:
            err = e
    agree(err, what="output lock")
    try:
        # A finished output: rank 0 loads it (as the single-process grid does) and shares it.
        if output_dir is not None and not force_remake:
            done = None
            if rank == 0:
                try:
                    done = g.load_existing(output_dir, metric, topk, [m.name for m in xm],
                                           [m.name for m in ym], trust=trust)
                except (ValueError, TypeError, FileNotFoundError) as e:
                    done = e
            done = broadcast_object(done, what="sharing the existing output")
            if isinstance(done, Exception):
                raise type(done)(str(done))
            if done is not None:
                return done
        err = None
        try:
            n = g._check_n(xm + ym)
            k, opts = g._metric_options(metric, n, topk, metric_kwargs)
            symmetric = g._symmetric(metric, opts)
            plan = plan_pairs(xm, ym, symmetric)
        except (ValueError, TypeError, FileNotFoundError) as e:
            err = e
        agree(err, what="model check")
        compute, mirror = plan
        job = {"metric": metric, "topk": topk, "k": k, "opts": opts, "q": q, "exact": bool(exact),
               "normalize": bool(normalize), "reference_order": bool(reference_order),
               "null_permutations": int(null_permutations), "seed": int(seed), "n": n,
               "x": [_source_id(m) for m in xm], "y": [_source_id(m) for m in ym]}
        fp = _fingerprint(job)
        parts_dir = (None if output_dir is None
                     else os.path.join(os.fspath(output_dir), f".{stem}.parts"))
        if parts_dir is not None and force_remake and rank == 0 and os.path.isdir(parts_dir):
            shutil.rmtree(parts_dir, ignore_errors=True)
        if force_remake and parts_dir is not None:
            # Nobody reads a part before rank 0 has cleared the old ones.
            broadcast_object(None, what="clearing old parts")
        a0, a1 = shard_range(len(compute), rank, P)
        mine = compute[a0:a1]
        cache = g._ModelCache(q=q, exact=exact, normalize=normalize, backend=backend, device=device,
                              stream=stream, stream_budget=stream_budget,
                              **({} if cache_bytes is None else {"cache_bytes": cache_bytes}))
        results, resumed = {}, 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc=f"align {metric} (rank {rank}/{P})", unit="pair",
                   disable=not progress or not sys.stderr.isatty())
        err = None
        try:
            for a, b in mine:
                x, y = xm[a], ym[b]
                item = None
                if parts_dir is not None and not force_remake:
                    item = _load_part(_part_path(parts_dir, a, b), fp)
                if item is not None:
                    resumed += 1
                else:
                    item = g.score_pair(cache, x, y, metric, k, opts, reference_order,
                                        null_permutations, seed)
                    if parts_dir is not None:
                        _save_part(_part_path(parts_dir, a, b), fp, a, b, x.name, y.name, item)
                results[(a, b)] = item
                bar.update(1)
        except (ValueError, TypeError, FileNotFoundError) as e:
            err = e
        finally:
            bar.close()
        mark_done(f"grid-{fp}")
        # Everyone shares its pairs (small: [Lx, Ly] matrices) and its error, if any.
        ann_mine = {m.name: cache.ann[m.key] for m in xm + ym if m.key in cache.ann}
        mine_out = {"err": None if err is None else (type(err).__name__, str(err)),
                    "results": ({ab: tuple(ps) for ab, ps in results.items()}
                                if err is None else {}),
                    # model keys are object ids in memory: share the reports by model name
                    "ann": ann_mine if err is None else {},
                    "timings": dict(cache.timings), "counts": dict(cache.counts),
                    "computed": len(mine) - resumed, "resumed": resumed}
        got = [None] * P
        import torch.distributed as dist

        with collective("gathering the grid's pairs from every rank", tag=f"grid-{fp}"):
            dist.all_gather_object(got, mine_out)
        bad = [(r, o["err"]) for r, o in enumerate(got) if o["err"] is not None]
        if bad:
            r, (kind, msg) = bad[0]
            if r == rank:
                raise err
            types = {"ValueError": ValueError, "TypeError": TypeError,
                     "FileNotFoundError": FileNotFoundError}
            raise types.get(kind, DistributedError)(f"(on rank {r}) {msg}")
        results, ann = {}, {}
        for o in got:
            results.update({ab: PairScore(*ps) for ab, ps in o["results"].items()})
            ann.update(o["ann"])
        timings = {key: sum(o["timings"].get(key, 0.0) for o in got)
                   for key in ("load", "prepare", "neighbours")}
        counts = {key: sum(o["counts"].get(key, 0) for o in got)
                  for key in ("loads", "searched_models")}
        timings.update(score=sum(ps.seconds for ps in results.values()),
                       total=time.perf_counter() - t_all, pairs=len(xm) * len(ym),
                       computed=sum(o["computed"] for o in got), mirrored=len(mirror),
                       resumed=sum(o["resumed"] for o in got), world_size=P, **counts)
        res = g.assemble(metric, topk, xm, ym, results, mirror, reference_order=reference_order,
                         null_permutations=null_permutations, timings=timings,
                         options=g.grid_options(
                             xm, ym, opts, q=q, exact=bool(exact), normalize=bool(normalize),
                             reference_order=bool(reference_order), symmetric_shortcut=symmetric,
                             k=k, stream=cache.stream.mode,
                             distributed={"world_size": P, "split": "model_pair"}))
        if ann:
            ann = {m.key: ann[m.name] for m in xm + ym if m.name in ann}
            res.options["ann"] = g._ann_grid(ann, xm, ym, metric, k, opts)
        if output_dir is not None:
            err = None
            if rank == 0:
                try:
                    res.save(output_dir)
                    if parts_dir is not None:
                        shutil.rmtree(parts_dir, ignore_errors=True)
                except OSError as e:
                    err = ValueError(f"output_dir {os.fspath(output_dir)}: cannot write ({e})")
            agree(err, what="output write")
        return res
    finally:
        held.close()
