"""Alignment over a grid of models (docs/metrics.md, "The pipeline" step 5).

``align_models`` scores every (x model, y model) pair over all their layer pairs, as the
reference's ``measure_alignment.py`` does, but

- each model's features are loaded once (the reference reloads the y model for every pair);
- for the neighbour metrics (the ``*_knn`` ones and CKNNA) each model's layers are searched
  once and every pair is scored from the cached lists, so a grid of ``M`` models of ``L``
  layers costs ``M·L`` searches instead of ``2·Mx·My·Lx·Ly``;
- a symmetric metric scores each unordered pair once and mirrors it (not ``cycle_knn``, which
  is asymmetric, nor unbiased CKNNA, whose ``1ᵀK̃L̃1`` term is not symmetric for the masked,
  non-symmetric kernels);
- the whole ``Lx x Ly`` matrix of every pair is kept.

Orientation. The reference calls ``compute_score(y_feats, x_feats)`` for grid entry ``[i, j]``:
the metric's first argument is the *y* model, its tie rule scans the y model's layers first,
and the stored pair is ``(y layer, x layer)``. ``reference_order=True`` (the default) scores
pairs that way, which only changes ``cycle_knn``'s value (and the pick among exactly tied
pairs); ``GridResult`` itself always reads x first: ``indices[a, b] = (x layer, y layer)``.
``GridResult.save`` writes the ``.npy`` exactly as the reference does (see ``save``).

``Alignment`` is the reference's scoring class over local feature files (no downloads).

A grid's settings are checked once, by :class:`GridSpec` (``align_models``' arguments), which
also plans the pairs, builds the model cache, scores a pair and assembles the result; the
distributed grid (``prh_fast.distributed.align_models``) uses the same spec.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import numpy as np
import torch

from prh_fast import _lock, store
from prh_fast._align import (
    _KNN_RAW,
    NULL_FIELDS,
    AlignmentResult,
    _align_prepared,
    _cknna_side,
    _knn_side,
    _labelled,
    _metric_options,
    _prepare_side,
    ann_pair_report,
    best_pair,
    set_path_runner,
)
from prh_fast._io import atomic_write
from prh_fast._stream_align import StreamPolicy
from prh_fast._threads import with_threads
from prh_fast._validate import as_layers, count_samples, layer_feats, resolve_memory_budget
from prh_fast.errors import InputError
from prh_fast.metrics import SUPPORTED_METRICS
from prh_fast.metrics._ties import tie_warning
from prh_fast.prepare import prepare_features

if TYPE_CHECKING:
    from prh_fast._validate import Layers, StrPath
    from prh_fast.knn import AnnParams

    #: The models of one side of a grid: name -> feature file, store folder, features or
    #: record dict; or a list of feature files (name = file stem).
    Models: TypeAlias = "Mapping[str, StrPath | Layers | Mapping[str, Any]] | Sequence[StrPath]"

__all__ = ["align_models", "GridResult", "Alignment", "GridSpec", "output_stem"]

logger = logging.getLogger(__name__)

#: Prepared layers kept in memory for the kernel metrics (CKA, SVCCA), which need the features
#: of both models of a pair; beyond this the least recently used model is dropped and reloaded.
DEFAULT_CACHE_BYTES = 4 * 2**30


def output_stem(metric: str, topk: object) -> str:
    """The reference's file name (without ``.npy``): ``<metric>_k<topk>`` when the metric's
    name contains "knn" (cknna included), else ``<metric>``."""
    return f"{metric}_k{topk}" if "knn" in metric else metric


def _symmetric(metric: str, opts: dict) -> bool:
    if metric == "cycle_knn":
        return False
    if metric == "cknna" and opts.get("unbiased", True):
        return False
    return True


# --------------------------------------------------------------------------------------------
# models: names, sources, loading, per-model caches
# --------------------------------------------------------------------------------------------
@dataclass
class _Model:
    name: str
    source: object  # a path (str) or in-memory features / record dict
    key: object  # identity: the resolved path, or id() of the in-memory object

    @property
    def where(self) -> str:
        return self.source if isinstance(self.source, str) else f"model {self.name!r}"


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


def _names_for_paths(paths) -> list:
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    # Same stem in different folders: name by the path below the common folder.
    root = os.path.commonpath([os.path.abspath(p) for p in paths])
    return [os.path.splitext(os.path.relpath(os.path.abspath(p), root))[0] for p in paths]


def _as_models(models, arg: str) -> list:
    if isinstance(models, (str, os.PathLike)):
        raise InputError(f"{arg}: expected a dict name -> features/path or a list of paths, "
                         f"got a single path {os.fspath(models)!r}")
    if isinstance(models, dict):
        items = [(str(k), v) for k, v in models.items()]
    elif isinstance(models, (list, tuple)):
        bad = [m for m in models if not _is_path(m)]
        if bad:
            raise InputError(f"{arg}: a list must hold feature-file paths (use a dict "
                             f"name -> features for loaded ones), got {type(bad[0]).__name__}")
        items = list(zip(_names_for_paths(models), models))
    else:
        raise InputError(f"{arg}: expected a dict name -> features/path or a list of paths, "
                         f"got {type(models).__name__}")
    if not items:
        raise InputError(f"{arg}: no models given")
    out = []
    for name, src in items:
        if _is_path(src):
            src = os.fspath(src)
            out.append(_Model(name, src, os.path.realpath(src)))
        else:
            out.append(_Model(name, src, ("obj", id(src))))
    names = [m.name for m in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{arg}: duplicate model names {dup}")
    return out


def _n_in_memory(m: _Model) -> int:
    return count_samples(m.source, m.where)


def _check_n(models) -> int:
    """Same N everywhere; the error names the first file (or model) that differs."""
    files, seen = [], set()
    for m in models:
        if isinstance(m.source, str) and m.key not in seen:
            seen.add(m.key)
            files.append(m.source)
    n_ref, where_ref = None, None
    if files:
        n_ref, where_ref = store.check_same_samples(files), files[0]
    for m in models:
        if isinstance(m.source, str):
            continue
        n = _n_in_memory(m)
        if n_ref is None:
            n_ref, where_ref = n, m.where
        elif n != n_ref:
            raise InputError(f"{m.where}: has N = {n} samples, but {where_ref} has N = {n_ref}; "
                             f"alignment needs the same (paired) samples for every model")
    return n_ref


class _ModelCache:
    """Loads a model's features once, prepares them (clip, normalise) and keeps what pairs need:
    the neighbour data of every layer for the neighbour metrics (small: ``L·N·k``), or the
    prepared layers (LRU, ``cache_bytes``) for the kernel metrics."""

    def __init__(self, *, q=None, exact=False, normalize=True, backend=None, device=None,
                 cache_bytes=DEFAULT_CACHE_BYTES, stream=None, memory_budget=None,
                 progress=False):
        self.q, self.exact, self.normalize = q, bool(exact), bool(normalize)
        self.backend, self.device = backend, device
        self.cache_bytes = int(cache_bytes)
        self._layers: OrderedDict = OrderedDict()
        self._sides: dict = {}
        self.timings = {"load": 0.0, "prepare": 0.0, "neighbours": 0.0}
        self.counts = {"loads": 0, "searched_models": 0, "streamed_models": 0}
        # store folders: streamed instead of loaded (prh_fast._stream_align)
        self.stream = StreamPolicy(stream=stream, budget=memory_budget, q=q, exact=exact,
                                   normalize=normalize, backend=backend, device=device,
                                   progress=progress)
        self.ann: dict = {}  # model key -> its layers' AnnReports (approximate searches)
        self.ties: dict = {}  # model key -> its layers' tie diagnostics (exact searches)

    def layers(self, m: _Model) -> list:
        if m.key in self._layers:
            self._layers.move_to_end(m.key)
            return self._layers[m.key]
        t0 = time.perf_counter()
        if isinstance(m.source, str):
            feats = store.load_features(m.source, map_location=self.device or "cpu")["feats"]
        else:
            feats = layer_feats(m.source)
            if self.device is not None and isinstance(feats, torch.Tensor):
                feats = feats.to(self.device)
            elif self.device is not None and isinstance(feats, (list, tuple)):
                feats = [f.to(self.device) if isinstance(f, torch.Tensor) else f for f in feats]
        self.counts["loads"] += 1
        t1 = time.perf_counter()
        self.timings["load"] += t1 - t0
        try:
            if self.q is not None:
                feats = prepare_features(feats, q=self.q, exact=self.exact)
            layers = _prepare_side(as_layers(feats, m.name), self.normalize, False)
        except ValueError as err:
            msg = str(err)
            raise InputError(msg if m.where in msg else f"{m.where}: {msg}") from err
        self.timings["prepare"] += time.perf_counter() - t1
        self._layers[m.key] = layers
        while len(self._layers) > 1 and sum(
                x.numel() * x.element_size() for v in self._layers.values() for x in v
        ) > self.cache_bytes:
            self._layers.popitem(last=False)
        return layers

    def side(self, m: _Model, metric: str, k: int, opts: dict):
        """``(stand_ins, data)``: the model's neighbour data for ``metric`` and shape-only
        stand-ins for its layers (``[N, 0]`` tensors: the scorers read only ``N``, the number
        of layers and the device from them). The features themselves are not kept."""
        kind = "cknna" if metric == "cknna" else "knn"
        ties = opts.get("ties", "rule")
        ckey = (m.key, kind, k, tuple(sorted(opts.items())) if kind == "cknna" else (ties,))
        # the tie-aware score reads each layer's rows (neighbour_ties): in memory, not streamed
        if ckey not in self._sides and ties != "expected" and self.stream.streams_knn(m):
            t0 = time.perf_counter()
            data = self.stream.knn_side(m, metric, k, opts)
            self.timings["neighbours"] += time.perf_counter() - t0
            if self.stream.reports.get(m.key):  # an approximate search streamed from a store
                self.ann[m.key] = self.stream.reports[m.key]
            self._note_ties(m, data, metric)
            self.counts["streamed_models"] += 1
            self._sides[ckey] = (self.stream.stand_ins(m), data)
        if ckey not in self._sides:
            layers = self.layers(m)
            t0 = time.perf_counter()
            reports: list = []
            if kind == "cknna":
                data = _cknna_side(layers, k, self.backend, reports=reports, **opts)
            else:
                data = _knn_side(layers, k, self.backend, reports, ties)
                self._note_ties(m, data, metric)
            self.timings["neighbours"] += time.perf_counter() - t0
            if any(r is not None for r in reports):
                self.ann[m.key] = reports
            self.counts["searched_models"] += 1
            stand = [torch.empty((layers[0].shape[0], 0), device=layers[0].device)
                     for _ in layers]
            self._sides[ckey] = (stand, data)
            self._layers.pop(m.key, None)  # lists are all a neighbour metric needs
        return self._sides[ckey]

    def _note_ties(self, m: _Model, data, metric: str) -> None:
        """Keep the model's tie diagnostics (a ``NeighbourSide``'s) and warn, once per model,
        when ties decide part of its lists."""
        ties = getattr(data, "ties", None)
        if ties is None:
            return
        self.ties[m.key] = ties
        mode = "expected" if getattr(data, "boundary", None) is not None else "rule"
        msg = tie_warning(ties, None, mode, metric, names=(f"model {m.name!r}", ""))
        if msg:
            logger.warning("prh_fast: %s", msg)


class PairScore(NamedTuple):
    """One model pair's scores."""

    matrix: np.ndarray        # [Lx, Ly] float64, x-oriented: matrix[i, j] = (x layer i, y layer j)
    best: float               # the best score under the reference's tie rule (0 if none > 0)
    pair: tuple | None        # (x layer, y layer) of the best score, None when none is positive
    null: dict | None         # NULL_FIELDS (best_mean, best_p, ...) under shuffled pairings
    seconds: float = 0.0      # scoring time (searches and loads are counted by the cache)

    def transposed(self, reference_order: bool) -> "PairScore":
        """The same pair with the models swapped (a symmetric metric's mirrored pair)."""
        mat = self.matrix.T.copy()
        best, pair = _best(mat, reference_order)
        return PairScore(mat, best, pair, self.null, 0.0)


def plan_pairs(xm, ym, symmetric: bool):
    """``(compute, mirror)``: the pairs ``(a, b)`` a grid computes, in row-major order, and
    ``{(a, b): (a', b')}`` for those it copies (transposed) from an earlier pair: with a
    symmetric metric, (y, x) is (x, y) transposed when both models appear on both sides."""
    done, compute, mirror = {}, [], {}
    for a, x in enumerate(xm):
        for b, y in enumerate(ym):
            src = done.get((y.key, x.key)) if symmetric else None
            if src is not None:
                mirror[(a, b)] = src
            else:
                compute.append((a, b))
            done[(x.key, y.key)] = (a, b)
    return compute, mirror


def score_pair(cache, x, y, metric, k, opts, reference_order, null_permutations,
               seed) -> PairScore:
    """``_score_pair`` with errors that do not name a model prefixed by the pair's names."""
    try:
        return _score_pair(cache, x, y, metric, k, opts, reference_order, null_permutations,
                           seed)
    except ValueError as err:
        msg = str(err)
        if x.where in msg or y.where in msg:
            raise
        raise InputError(f"{x.name} vs {y.name}: {msg}") from err


def assemble(metric: str, topk, xm, ym, computed: dict, mirror: dict, *,
             reference_order: bool, null_permutations: int, timings: dict,
             options: dict) -> "GridResult":
    """The ``GridResult`` of a grid from its computed pairs ``{(a, b): PairScore}`` and its
    mirrored pairs ``{(a, b): (a', b')}`` (see :func:`plan_pairs`); used by the single-process
    and the distributed grid alike."""
    mx_, my_ = len(xm), len(ym)
    scores = np.zeros((mx_, my_), dtype=np.float64)
    indices = np.full((mx_, my_, 2), -1, dtype=np.int64)
    nulls = ({a: np.full((mx_, my_), np.nan) for a in NULL_FIELDS}
             if null_permutations else None)
    pair_scores: dict = {}
    scored = dict(computed)  # mirrored pairs join it: a mirror's source may be a mirror too
    for a, x in enumerate(xm):
        for b, y in enumerate(ym):
            if (a, b) in mirror:
                ps = scored[(a, b)] = scored[mirror[(a, b)]].transposed(reference_order)
            else:
                ps = scored[(a, b)]
            pair_scores[(x.name, y.name)] = ps.matrix
            scores[a, b] = ps.best
            if ps.pair is not None:
                indices[a, b] = ps.pair
            if nulls is not None and ps.null is not None:
                for s in nulls:
                    nulls[s][a, b] = ps.null.get(s, np.nan)
    return GridResult(metric=metric, topk=topk, x_names=[m.name for m in xm],
                      y_names=[m.name for m in ym], scores=scores, indices=indices,
                      pair_scores=pair_scores, timings=timings, options=options, null=nulls)


def grid_options(xm, ym, opts: dict, **settings) -> dict:
    """``GridResult.options``: the run's settings, the models' sources and the metric's plain
    keyword values."""
    return {**settings,
            "x_sources": [m.source if isinstance(m.source, str) else None for m in xm],
            "y_sources": [m.source if isinstance(m.source, str) else None for m in ym],
            "metric_kwargs": {a: v for a, v in opts.items()
                              if isinstance(v, (bool, int, float, str))}}


def _score_pair(cache, mx, my, metric, k, opts, reference_order, null_permutations,
                seed) -> PairScore:
    """One model pair (see :class:`PairScore`)."""
    a, b = (my, mx) if reference_order else (mx, my)
    timings: dict = {}
    if metric in _KNN_RAW or metric == "cknna":
        xa, ca = cache.side(a, metric, k, opts)
        xb, cb = cache.side(b, metric, k, opts)
    elif cache.stream.streams_kernel(a, b, metric, opts, null_permutations):
        mat = cache.stream.kernel_matrix(a, b, metric, opts, cache.layers, timings).numpy()
        mat = mat.T if reference_order else mat
        best, pair = _best(mat, reference_order)
        return PairScore(mat, best, pair, None, timings.get("score", 0.0))
    else:
        xa, xb = cache.layers(a), cache.layers(b)
        ca = cb = None
    if xa[0].shape[0] != xb[0].shape[0]:
        raise InputError(f"{my.where}: has N = {xb[0].shape[0]} samples, but {mx.where} has "
                         f"N = {xa[0].shape[0]}")
    res = _align_prepared(metric, xa, xb, list(range(len(xa))), list(range(len(xb))), k, opts,
                          cache.backend, null_permutations, seed, timings,
                          x_cache=ca, y_cache=cb)
    mat = res.scores.detach().cpu().double().numpy()
    if reference_order:
        mat = mat.T
    best, pair = _best(mat, reference_order)
    null = None
    if res.null is not None:
        null = {a: res.null[a] for a in NULL_FIELDS}
    return PairScore(mat, best, pair, null, timings.get("score", 0.0))


def _best(mat: np.ndarray, reference_order: bool):
    """Best score and ``(x layer, y layer)`` of an x-oriented matrix under the reference's tie
    rule; with ``reference_order`` the scan runs over y layers first, as the reference's."""
    if reference_order:
        best, pair = best_pair(mat.T)
        return best, (None if pair is None else (pair[1], pair[0]))
    return best_pair(mat)


# --------------------------------------------------------------------------------------------
# result
# --------------------------------------------------------------------------------------------
def _jsonable(v):
    if isinstance(v, float) and not np.isfinite(v):
        return None
    return v


@dataclass
class GridResult:
    """Best scores of every (x model, y model) pair.

    Attributes:
        scores: ``[Mx, My]`` float64, the best score over layer pairs (0 when none is positive).
        indices: ``[Mx, My, 2]`` int64, ``(x layer, y layer)`` of the best pair; ``(-1, -1)``
            where there is none (all scores non-positive; the reference's ``None``).
        pair_scores: ``(x_name, y_name) -> [Lx, Ly]`` float64 matrix of every layer pair.
        x_names, y_names, metric, topk: what was compared (``topk`` as given).
        timings: seconds (load, prepare, neighbours, score, total) and counts.
        options: q, exact, normalize, reference_order and whether the symmetric shortcut ran.
        null: with ``null_permutations``: ``[Mx, My]`` arrays of the best score's null
            statistics (``prh_fast._align.NULL_FIELDS``): ``best_mean``, ``best_std``,
            ``best_low`` / ``best_high`` (central 95%), ``best_p`` (permutation p-value,
            ``(b + 1) / (P + 1)``), ``best_z``.

    Example:
        >>> import tempfile, torch
        >>> from prh_fast import GridResult, align_models
        >>> X = torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(0))
        >>> res = align_models({"a": X}, {"b": X.flip(1)}, "cka", progress=False)
        >>> res.best("a", "b")[1], res.stem
        ((0, 1), 'cka')
        >>> out = tempfile.mkdtemp()
        >>> sorted(res.save(out))
        ['csv', 'json', 'npy']
        >>> GridResult.load(out, "cka").best("a", "b")[1]
        (0, 1)
    """

    metric: str
    topk: object
    x_names: list
    y_names: list
    scores: np.ndarray
    indices: np.ndarray
    pair_scores: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    null: dict | None = None

    @property
    def stem(self) -> str:
        return output_stem(self.metric, self.topk)

    def best(self, x_name: str, y_name: str) -> tuple[float, tuple[int, int] | None]:
        """``(score, (i, j) or None)`` of one model pair, as ``compute_score`` returns it."""
        a, b = self.x_names.index(x_name), self.y_names.index(y_name)
        i, j = (int(v) for v in self.indices[a, b])
        return float(self.scores[a, b]), (None if i < 0 else (i, j))

    def reference_arrays(self) -> dict:
        """``{"scores", "indices"}`` exactly as the reference's ``np.save`` stores them:
        ``indices`` float64 holding ``compute_score(y_feats, x_feats)``'s tuple, i.e.
        ``(y layer, x layer)``, and NaN where that tuple was ``None``."""
        idx = self.indices[..., ::-1].astype(np.float64)
        idx[self.indices[..., 0] < 0] = np.nan
        return {"scores": self.scores.astype(np.float64), "indices": idx}

    def to_dict(self) -> dict:
        def pair(v):
            return None if v[0] < 0 else [int(v[0]), int(v[1])]

        d = {"metric": self.metric, "topk": self.topk, "x_names": self.x_names,
             "y_names": self.y_names,
             "scores": [[_jsonable(float(s)) for s in row] for row in self.scores],
             "indices": [[pair(v) for v in row] for row in self.indices],
             "pair_scores": [{"x": x, "y": y, "scores": [[_jsonable(float(s)) for s in r]
                                                         for r in m]}
                             for (x, y), m in self.pair_scores.items()],
             "timings": self.timings, "options": self.options}
        if self.null is not None:
            d["null"] = {a: [[_jsonable(float(s)) for s in r] for r in v]
                         for a, v in self.null.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GridResult":
        def arr(rows):
            return np.array([[np.nan if s is None else s for s in r] for r in rows],
                            dtype=np.float64).reshape(len(d["x_names"]), len(d["y_names"]))

        idx = np.array([[[-1, -1] if v is None else v for v in r] for r in d["indices"]],
                       dtype=np.int64).reshape(len(d["x_names"]), len(d["y_names"]), 2)
        pairs = {(p["x"], p["y"]): np.array([[np.nan if s is None else s for s in r]
                                             for r in p["scores"]], dtype=np.float64)
                 for p in d.get("pair_scores", [])}
        null = d.get("null")
        return cls(metric=d["metric"], topk=d["topk"], x_names=list(d["x_names"]),
                   y_names=list(d["y_names"]), scores=arr(d["scores"]), indices=idx,
                   pair_scores=pairs, timings=d.get("timings", {}),
                   options=d.get("options", {}),
                   null=None if null is None else {a: arr(v) for a, v in null.items()})

    def paths(self, output_dir: StrPath) -> dict[str, str]:
        base = os.path.join(os.fspath(output_dir), self.stem)
        return {"npy": base + ".npy", "json": base + ".json", "csv": base + ".csv"}

    def save(self, output_dir: StrPath) -> dict[str, str]:
        """Write ``<stem>.npy`` (the reference's ``np.save(path, {"scores", "indices"})``, a
        pickled dict; see ``reference_arrays``), ``<stem>.json`` (everything, x-oriented
        indices, ``null`` for no pair) and ``<stem>.csv`` (one row per pair: x, y, score, i, j
        with i the x layer), each atomically. ``stem`` is ``output_stem(metric, topk)``.
        Returns the paths."""
        p = self.paths(output_dir)
        ref = self.reference_arrays()
        # The JSON first: it is what a later run resumes from (it cannot carry code; the
        # reference's pickled .npy is written for its readers, never unpickled by ours).
        text = json.dumps(self.to_dict(), indent=1)
        atomic_write(p["json"], lambda f: f.write(text.encode()))
        atomic_write(p["npy"], lambda f: np.save(f, ref, allow_pickle=True))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["x", "y", "score", "i", "j"])
        for a, x in enumerate(self.x_names):
            for b, y in enumerate(self.y_names):
                i, j = (int(v) for v in self.indices[a, b])
                w.writerow([x, y, repr(float(self.scores[a, b]))]
                           + (["", ""] if i < 0 else [i, j]))
        atomic_write(p["csv"], lambda f: f.write(buf.getvalue().encode()))
        return p

    @classmethod
    def load(cls, output_dir: StrPath, metric: str, topk: object = 10, *,
             x_names: Sequence[str] | None = None, y_names: Sequence[str] | None = None,
             trust: bool = False) -> "GridResult":
        """Read a saved grid: the ``.json`` when present, else the reference's ``.npy`` (which
        holds no names: ``x_names`` / ``y_names`` label it, or ``x0, x1, ...``).

        The reference's ``.npy`` is a pickled dict, and unpickling a file can run code hidden
        in it; it is read only with ``trust=True`` (CLI ``--trust``), for files you wrote
        yourself. The ``.json`` is always safe to read. Errors name the file.
        """
        base = os.path.join(os.fspath(output_dir), output_stem(metric, topk))
        if os.path.exists(base + ".json"):
            try:
                with open(base + ".json", "rb") as f:
                    return cls.from_dict(json.loads(f.read().decode("utf-8")))
            except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError,
                    AttributeError, RecursionError) as err:
                raise InputError(f"{base}.json: unreadable or malformed saved grid "
                                 f"({type(err).__name__}: {err})") from None
        npy = base + ".npy"
        if not os.path.exists(npy):
            raise FileNotFoundError(f"{base}.json: no saved grid here (nor {npy})")
        try:
            d = np.load(npy, allow_pickle=bool(trust))
            if trust:
                d = d.item()
        except ValueError as err:
            if not trust and "allow_pickle" in str(err):
                raise InputError(
                    f"{npy}: holds a pickled Python object (the reference's format); reading "
                    f"it back would run any code hidden in the file. Pass trust=True (CLI: "
                    f"--trust) only if you wrote it yourself, or recompute it "
                    f"(force_remake=True, CLI: --force_remake)") from None
            raise InputError(f"{npy}: unreadable saved grid ({err})") from None
        except (OSError, EOFError) as err:
            raise InputError(f"{npy}: unreadable saved grid ({err})") from None
        try:
            scores = np.asarray(d["scores"], dtype=np.float64)
            ref_idx = np.asarray(d["indices"], dtype=np.float64)
            idx = np.where(np.isnan(ref_idx), -1, ref_idx)[..., ::-1].astype(np.int64)
            if scores.ndim != 2 or idx.shape != scores.shape + (2,):
                raise InputError(f"scores {scores.shape}, indices {ref_idx.shape}")
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise InputError(f"{npy}: not a saved alignment grid ({err})") from None
        mx, my = scores.shape
        return cls(metric=metric, topk=topk,
                   x_names=list(x_names) if x_names else [f"x{a}" for a in range(mx)],
                   y_names=list(y_names) if y_names else [f"y{b}" for b in range(my)],
                   scores=scores, indices=idx, options={"loaded_from": base + ".npy"})

    def table(self, width: int = 10) -> str:
        """The best-score matrix as text (rows: x models, columns: y models)."""
        def cut(s, w):
            return s if len(s) <= w else s[: w - 1] + "~"

        rw = min(32, max(len(n) for n in self.x_names))
        head = " " * rw + " " + " ".join(f"{cut(y, width):>{width}}" for y in self.y_names)
        rows = [head]
        for a, x in enumerate(self.x_names):
            rows.append(f"{cut(x, rw):<{rw}} " + " ".join(
                f"{self.scores[a, b]:>{width}.4f}" for b in range(len(self.y_names))))
        return "\n".join(rows)


@contextmanager
def output_lock(output_dir, metric: str, topk):
    """Hold the writer lock of one grid output (``<output_dir>/<stem>.*``) for the block; no-op
    without ``output_dir``. ``output_dir`` must be a folder (created when missing)."""
    if output_dir is None:
        yield
        return
    out = os.fspath(output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"output_dir: {out} exists and is not a folder")
    with _lock.exclusive_lock(os.path.join(out, output_stem(metric, topk)), folder=False):
        yield


#: Options a saved grid may lack because they were added later: their value in such a grid.
_SAVED_OPTION_DEFAULTS = {"ties": "rule"}


def load_existing(output_dir, metric: str, topk, x_names: list, y_names: list, *,
                  trust: bool = False, metric_kwargs: dict | None = None):
    """The saved grid in ``output_dir`` for these models, or None when there is none.

    Resumes from the ``.json`` (never runs code); a lone reference ``.npy`` is read only with
    ``trust=True``. A grid of other models, or one saved with other values of the metric
    options given in ``metric_kwargs``, is an error. Files missing beside the one read (an
    interrupted save) are written again."""
    p = {e: os.path.join(os.fspath(output_dir), output_stem(metric, topk) + "." + e)
         for e in ("json", "npy", "csv")}
    if not (os.path.exists(p["json"]) or os.path.exists(p["npy"])):
        return None
    res = GridResult.load(output_dir, metric, topk, x_names=x_names, y_names=y_names,
                          trust=trust)
    src = p["json"] if os.path.exists(p["json"]) else p["npy"]
    if (res.x_names != list(x_names) or res.y_names != list(y_names)
            or res.scores.shape != (len(x_names), len(y_names))):
        raise InputError(f"{src}: exists but holds a grid of other models "
                         f"({len(res.x_names)} x {len(res.y_names)}); pass "
                         f"force_remake=True to overwrite it")
    saved = res.options.get("metric_kwargs")
    if saved is not None:
        for a, v in (metric_kwargs or {}).items():
            if isinstance(v, (bool, int, float, str)) and a in saved | _SAVED_OPTION_DEFAULTS:
                was = saved.get(a, _SAVED_OPTION_DEFAULTS.get(a))
                if was != v:
                    raise InputError(f"{src}: exists but was computed with {a}={was!r}, not "
                                     f"{a}={v!r}; pass force_remake=True to overwrite it, or "
                                     f"another output folder")
    logger.warning("%s exists: loaded it instead of recomputing (force_remake=True "
                   "recomputes)", src)
    if not all(os.path.exists(v) for v in p.values()):
        res.save(output_dir)
    res.options = {**res.options, "resumed_from": src}
    return res


# --------------------------------------------------------------------------------------------
# the grid
# --------------------------------------------------------------------------------------------
class GridPlan(NamedTuple):
    """What a grid computes, from its models and :class:`GridSpec`."""

    n: int              # samples, the same for every model
    k: int | None       # the validated topk (None for metrics without one)
    opts: dict          # the metric's validated options (``_metric_options``)
    symmetric: bool     # whether mirrored pairs are copied (``_symmetric``)
    compute: list       # the pairs (a, b) to score, row-major (``plan_pairs``)
    mirror: dict        # (a, b) -> (a', b') copied transposed (``plan_pairs``)


@dataclass
class GridSpec:
    """A model grid's settings, checked in one place for the single-process grid
    (:func:`align_models`) and the distributed one (``prh_fast.distributed.align_models``).

    The fields are ``align_models``' arguments (``metric_kwargs``: the metric's own options).
    Build it with :meth:`from_args`, which also accepts the deprecated ``stream_budget``.

    Example:
        >>> from prh_fast.grid import GridSpec
        >>> spec = GridSpec.from_args("cka", memory_budget=1 << 20)
        >>> spec.metric, spec.memory_budget, spec.stem
        ('cka', 1048576, 'cka')
    """

    metric: str = "mutual_knn"
    topk: object = 10
    normalize: bool = True
    q: object = None
    exact: bool = False
    output_dir: object = None
    force_remake: bool = False
    progress: bool = True
    backend: object = None
    reference_order: bool = True
    null_permutations: int = 0
    seed: int = 0
    device: object = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    stream: object = None
    memory_budget: object = None
    trust: bool = False
    metric_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.metric not in SUPPORTED_METRICS:
            raise InputError(f"metric: unknown metric {self.metric!r}; supported: "
                             f"{SUPPORTED_METRICS}")
        if self.cache_bytes is None:
            self.cache_bytes = DEFAULT_CACHE_BYTES

    @classmethod
    def from_args(cls, metric: str = "mutual_knn", *, stream_budget: int | None = None,
                  memory_budget: int | None = None, **kwargs: Any) -> "GridSpec":
        """The spec of ``align_models(x, y, metric, **kwargs)``: keywords that are not
        fields go to ``metric_kwargs``; ``stream_budget`` is ``memory_budget``'s deprecated
        alias (a ``FutureWarning``; both is an ``InputError``)."""
        names = set(cls.__dataclass_fields__) - {"metric", "metric_kwargs"}
        fields = {a: v for a, v in kwargs.items() if a in names}
        extra = {a: v for a, v in kwargs.items() if a not in names}
        budget = resolve_memory_budget(memory_budget, stream_budget, stacklevel=4)
        return cls(metric=metric, memory_budget=budget, metric_kwargs=extra, **fields)

    @property
    def stem(self) -> str:
        """The output files' name (``output_stem``)."""
        return output_stem(self.metric, self.topk)

    @property
    def show_progress(self) -> bool:
        return bool(self.progress) and sys.stderr.isatty()

    def existing(self, xm: list[_Model], ym: list[_Model]) -> GridResult | None:
        """The finished output in ``output_dir`` for these models (``load_existing``), or
        None (no ``output_dir``, ``force_remake``, or nothing saved)."""
        if self.output_dir is None or self.force_remake:
            return None
        return load_existing(self.output_dir, self.metric, self.topk, [m.name for m in xm],
                             [m.name for m in ym], trust=self.trust,
                             metric_kwargs=self.metric_kwargs)

    def plan(self, xm: list[_Model], ym: list[_Model]) -> GridPlan:
        """Check the models (same N) and the metric's options; list the pairs to score."""
        n = _check_n(xm + ym)
        k, opts = _metric_options(self.metric, n, self.topk, self.metric_kwargs,
                                  self.memory_budget)
        symmetric = _symmetric(self.metric, opts)
        compute, mirror = plan_pairs(xm, ym, symmetric)
        return GridPlan(n, k, opts, symmetric, compute, mirror)

    def cache(self, progress: bool | None = None) -> "_ModelCache":
        """A model cache with these settings (loads, preparation, searches, streaming)."""
        return _ModelCache(q=self.q, exact=self.exact, normalize=self.normalize,
                           backend=self.backend, device=self.device,
                           cache_bytes=self.cache_bytes, stream=self.stream,
                           memory_budget=self.memory_budget,
                           progress=self.show_progress if progress is None else progress)

    def score(self, cache: _ModelCache, plan: GridPlan, x: _Model, y: _Model) -> PairScore:
        """One model pair's scores (:func:`score_pair`)."""
        return score_pair(cache, x, y, self.metric, plan.k, plan.opts, self.reference_order,
                          self.null_permutations, self.seed)

    def result(self, xm: list[_Model], ym: list[_Model], plan: GridPlan, computed: dict,
               timings: dict, stream_mode: str, ann: dict | None = None,
               ties: dict | None = None, **extra_options: Any) -> "GridResult":
        """The grid's :class:`GridResult` (``assemble``), with its ``options``; for an
        approximate search ``options["ann"]`` (``ann``: model key -> layer reports); for the
        neighbour metrics ``options["ties"]`` (``ties``: model name -> per-layer diagnostics,
        ``prh_fast._align.NeighbourSide.ties``)."""
        res = assemble(self.metric, self.topk, xm, ym, computed, plan.mirror,
                       reference_order=self.reference_order,
                       null_permutations=self.null_permutations, timings=timings,
                       options=grid_options(xm, ym, plan.opts, q=self.q,
                                            exact=bool(self.exact),
                                            normalize=bool(self.normalize),
                                            reference_order=bool(self.reference_order),
                                            symmetric_shortcut=plan.symmetric, k=plan.k,
                                            stream=stream_mode, **extra_options))
        if ann:
            res.options["ann"] = _ann_grid(ann, xm, ym, self.metric, plan.k, plan.opts)
        if ties:
            res.options["ties"] = {"mode": plan.opts.get("ties", "rule"), "k": plan.k,
                                   "models": {name: _labelled(v, range(len(v)))
                                              for name, v in ties.items()}}
        return res


@with_threads
def align_models(x_models: Models, y_models: Models, metric: str = "mutual_knn",
                 topk: int = 10, normalize: bool = True, q: float | None = None,
                 exact: bool = False, *, output_dir: StrPath | None = None,
                 force_remake: bool = False, progress: bool = True,
                 backend: str | AnnParams | None = None, reference_order: bool = True,
                 null_permutations: int = 0, seed: int = 0,
                 device: str | torch.device | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, stream: str | bool | None = None,
                 memory_budget: int | None = None, stream_budget: int | None = None,
                 trust: bool = False, **metric_kwargs: Any) -> GridResult:
    """Align every (x model, y model) pair: the reference's ``measure_alignment.py`` grid.

    Args:
        x_models, y_models: dicts name -> feature file (``.pt``, reference format) or name ->
            already loaded features (``[N, L, D]`` tensor, list of ``[N, D_l]``, or a record
            dict with ``"feats"``); or lists of feature files (name = file stem).
        metric, topk, normalize: as in ``align`` (``topk`` goes to the "knn" metrics, cknna
            included).
        q, exact: outlier clipping (``prepare_features(feats, q, exact)``) of each model before
            scoring; ``None`` (default) skips it. The reference always clips with q = 0.95.
        output_dir: when given, the result is saved there (``GridResult.save``); an existing
            result is loaded and returned instead of recomputed unless ``force_remake``. It
            resumes from the saved ``.json``; the reference's pickled ``.npy`` alone is read
            only with ``trust=True``. While the grid runs, its output is locked: a second
            run writing the same metric and k to the same folder fails at once
            (``prh_fast.DestinationLocked``, naming the running one).
        force_remake: recompute even when ``output_dir`` holds a finished result.
        progress: a tqdm bar over model pairs (shown only on a terminal).
        backend: neighbour-search backend (see ``prh_fast.knn``).
        reference_order: score each pair as the reference's ``compute_score(y_feats,
            x_feats)`` (metric's first argument = the y model; ties scan y layers first). Only
            ``cycle_knn``'s values depend on it. ``False``: the metric reads x first.
        null_permutations, seed: as in ``align``; the result's ``null`` holds each pair's
            ``best_mean``, ``best_std`` and ``best_z``.
        device: where features are loaded (``map_location``; default CPU, or the input's).
        cache_bytes: memory for prepared layers kept between pairs for the kernel metrics.
        stream: store folders are streamed instead of loaded (``prh_fast._stream_align``):
            ``"auto"`` (default, or ``PRH_FAST_STREAM``): neighbour lists of stores on a CPU
            always (the same lists, searched once and cached in the store), kernel metrics
            (linear CKA, unbiased CKA, SVCCA: one float64 pass) when a store's prepared
            features exceed 1 GiB; ``True``: every store, an error where a metric cannot
            stream (RBF CKA, null permutations of kernel metrics); ``False``: load everything.
        memory_budget: bytes of scratch memory, as in ``align``: the streamed computations
            (default 512 MiB, or ``PRH_FAST_MEMORY_BUDGET``) and CKA's kernel row blocks in
            memory (default 256 MiB).
        stream_budget: deprecated name of ``memory_budget`` (a ``FutureWarning``).
        trust: allow reading back a reference-format ``.npy`` (a pickle: it can run code
            hidden in the file) when no ``.json`` is beside it. Only for files you wrote.
        **metric_kwargs: the metric's own options, as in ``align``.

    Returns:
        A :class:`GridResult` (best scores ``[Mx, My]``, every pair's ``[Lx, Ly]`` matrix).

    Raises:
        InputError: naming the file (or model): bad or unreadable features, a number of
            samples N that differs from the other models'; or naming a bad argument.
        FileNotFoundError: a missing file.

    Example:
        >>> import torch
        >>> from prh_fast import align_models
        >>> g = torch.Generator().manual_seed(0)
        >>> X = torch.randn(40, 2, 8, generator=g)
        >>> res = align_models({"a": X, "b": X + 0.1 * torch.randn(40, 2, 8, generator=g)},
        ...                    {"a": X}, "mutual_knn", topk=5, progress=False)
        >>> res.scores.shape, res.best("a", "a")
        ((2, 1), (1.0, (0, 0)))
    """
    spec = GridSpec.from_args(
        metric, topk=topk, normalize=normalize, q=q, exact=exact, output_dir=output_dir,
        force_remake=force_remake, progress=progress, backend=backend,
        reference_order=reference_order, null_permutations=null_permutations, seed=seed,
        device=device, cache_bytes=cache_bytes, stream=stream, memory_budget=memory_budget,
        stream_budget=stream_budget, trust=trust, **metric_kwargs)
    t_all = time.perf_counter()
    xm, ym = _as_models(x_models, "x_models"), _as_models(y_models, "y_models")
    # One writer per output: a second run of the same grid into the same folder would mix
    # its files with ours; it fails at once naming this one instead.
    with output_lock(output_dir, metric, topk):
        res = spec.existing(xm, ym)
        if res is not None:
            return res
        res, _ = _compute_grid(spec, xm, ym, t_all)
        if output_dir is not None:
            res.save(output_dir)
        return res


def _compute_grid(spec: GridSpec, xm, ym, t_all: float):
    """``(GridResult, the model cache)`` of a grid computed from scratch (the cache holds the
    models' search reports, ``cache.ann``)."""
    plan = spec.plan(xm, ym)
    cache = spec.cache()
    computed = _score_all(spec, cache, plan, xm, ym)
    timings = _grid_timings(cache.timings, cache.counts, computed, plan, t_all,
                            len(xm) * len(ym), len(plan.compute))
    res = spec.result(xm, ym, plan, computed, timings, cache.stream.mode, ann=cache.ann,
                      ties={m.name: cache.ties[m.key] for m in xm + ym if m.key in cache.ties})
    return res, cache


def _score_all(spec: GridSpec, cache, plan: GridPlan, xm, ym, pairs=None,
               desc: str | None = None, score=None) -> dict:
    """Score ``pairs`` (default: all of ``plan.compute``) under a progress bar:
    ``{(a, b): PairScore}``. ``score(a, b)`` replaces :meth:`GridSpec.score` (the distributed
    grid's resumable form)."""
    from tqdm.auto import tqdm

    pairs = plan.compute if pairs is None else pairs
    if score is None:
        def score(a, b):
            return spec.score(cache, plan, xm[a], ym[b])
    out: dict = {}
    bar = tqdm(total=len(pairs), desc=desc or f"align {spec.metric}", unit="pair",
               disable=not spec.show_progress)
    try:
        for a, b in pairs:
            out[(a, b)] = score(a, b)
            bar.update(1)
    finally:
        bar.close()
    return out


def _grid_timings(times: dict, counts: dict, computed: dict, plan: GridPlan, t_all: float,
                  pairs: int, n_computed: int, **extra) -> dict:
    """``GridResult.timings``: the cache's times, scoring time, totals, pair counts,
    ``extra`` and the cache's counts."""
    out = dict(times)
    out.update(score=sum(p.seconds for p in computed.values()),
               total=time.perf_counter() - t_all, pairs=pairs, computed=n_computed,
               mirrored=len(plan.mirror), **extra, **counts)
    return out


def _ann_grid(reports, xm, ym, metric, k, opts) -> dict:
    """``options["ann"]`` of a grid searched approximately: each model's per-layer recall and,
    per model pair, ``ann_pair_report``'s errors (x-oriented ``[Lx][Ly]``) with their 95%
    intervals and whether each is resolved. The pairs come first: a pair whose error is not
    resolved grows every layer's sample, and the models' entries then describe the grown
    samples. The reports' searches are released at the end (results hold no features)."""
    pairs = []
    sizes = []
    for x in xm:
        for y in ym:
            if x.key in reports and y.key in reports:
                rep = ann_pair_report(metric, k, reports[x.key], reports[y.key],
                                      normalize_lcs=opts.get("normalize_lcs", False))
                sizes.append(rep["sample_size"])
                pairs.append({"x": x.name, "y": y.name, "recall_min": rep["recall_min"],
                              "sample_size": rep["sample_size"], "resolved": rep["resolved"],
                              **{f"{a}_{f}": v[f] for a, v in rep["metrics"].items()
                                 for f in ("error", "error_max", "error_ci", "error_bound_max",
                                           "resolved_all") if f in v}})
    models = {m.name: [r.to_dict() for r in reports[m.key]] for m in xm + ym
              if m.key in reports}
    for rs in reports.values():
        for r in rs:
            r.release()
    first = next(iter(reports.values()))[0]
    out = {"backend": first.backend, "params": first.params, "k": first.k,
           "sample_size": min(sizes) if sizes else int(first.sample.numel()),
           "models": models, "pairs": pairs,
           "recall_min": min(r["recall"] for v in models.values() for r in v),
           "resolved": all(p["resolved"] for p in pairs),
           "mutual_knn_error_max": max((p["mutual_knn_error_max"] for p in pairs),
                                       default=None)}
    logger.warning("prh_fast: %s approximate lists on %d sampled rows: recall@%d >= %.4f, "
                   "max |mutual_knn(approx) - mutual_knn(exact)| over all layer pairs = %s",
                   out["backend"], out["sample_size"], out["k"], out["recall_min"],
                   "n/a" if out["mutual_knn_error_max"] is None
                   else f"{out['mutual_knn_error_max']:.4f}")
    return out


# --------------------------------------------------------------------------------------------
# the reference's scoring class, on local files
# --------------------------------------------------------------------------------------------
class Alignment:
    """Score new features against a set of reference models' features, as the reference's
    ``Alignment`` class, from local feature files (nothing is downloaded).

    Args:
        features: a folder of ``.pt`` feature files (searched recursively) or a list of files;
            model name = file stem.
        metric, topk: defaults for ``score``.
        data: the paired data set, for ``get_data``: a dict of lists (``"image"``, ``"text"``)
            or a JSONL file whose records have ``"image"`` and ``"text"`` fields.
        backend: neighbour-search backend (see ``prh_fast.knn``).
        device: where features are loaded (default CPU).
        memory_budget: bytes of scratch memory, as in :func:`align_models`.
        stream_budget: deprecated name of ``memory_budget`` (a ``FutureWarning``).

    Each reference model is loaded once and, for the neighbour metrics, searched once per
    ``(topk, q, normalize)``; later ``score`` calls reuse its lists.

    Raises:
        InputError: no feature files, or files with different numbers of samples.

    Example:
        >>> import os, tempfile, torch
        >>> from prh_fast import Alignment
        >>> X = torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(0))
        >>> folder = tempfile.mkdtemp()
        >>> torch.save({"feats": X}, os.path.join(folder, "ref.pt"))
        >>> Alignment(folder, metric="mutual_knn", topk=5).score(X[:, 1:])
        {'ref': (1.0, (0, 1))}
    """

    def __init__(self, features: StrPath | Sequence[StrPath], *, metric: str | None = None,
                 topk: int | None = None, data: StrPath | Mapping[str, list] | None = None,
                 backend: str | AnnParams | None = None,
                 device: str | torch.device | None = None, memory_budget: int | None = None,
                 stream_budget: int | None = None) -> None:
        if _is_path(features) and os.path.isdir(features):
            paths = sorted(str(p) for p in Path(features).rglob("*.pt"))
            if not paths:
                raise InputError(f"{os.fspath(features)}: no .pt feature files in this folder")
        elif _is_path(features):
            paths = [os.fspath(features)]
        else:
            paths = [os.fspath(p) for p in features]
        self._models = _as_models(paths, "features")
        self.n = _check_n(self._models)
        self.metric, self.topk = metric, topk
        self.backend, self.device = backend, device
        self.memory_budget = resolve_memory_budget(memory_budget, stream_budget)
        self._data = data
        self._caches: dict = {}

    @property
    def models(self) -> list[str]:
        return [m.name for m in self._models]

    @property
    def paths(self) -> dict[str, str]:
        return {m.name: m.source for m in self._models}

    def score(self, features: StrPath | Layers, metric: str | None = None,
              topk: int | None = None, normalize: bool = True, q: float | None = None,
              **metric_kwargs: Any) -> dict[str, tuple[float, tuple[int, int] | None]]:
        """``{model_name: (score, (i, j))}``: ``compute_score(features, model)`` for every
        reference model, ``i`` a layer of ``features`` and ``j`` one of the model's (``None``
        when no score is positive). ``features``: ``[N, L, D]`` tensor, list of ``[N, D_l]``,
        or a feature file; ``q`` clips both sides first (``prepare_features``)."""
        metric = metric or self.metric or "mutual_knn"
        topk = topk if topk is not None else (self.topk if self.topk is not None else 10)
        if metric not in SUPPORTED_METRICS:
            raise InputError(f"metric: unknown metric {metric!r}; supported: "
                             f"{SUPPORTED_METRICS}")
        if _is_path(features):
            src = _Model(Path(features).stem, os.fspath(features),
                         os.path.realpath(features))
            n = store.feature_info(src.source)["n"]
        else:
            src = _Model("features", features, ("obj", id(features)))
            n = _n_in_memory(src)
        if n != self.n:
            m = self._models[0]
            raise InputError(f"features: has N = {n} samples, but reference model {m.name!r} "
                             f"({m.source}) has N = {self.n}")
        k, opts = _metric_options(metric, n, topk, metric_kwargs, self.memory_budget)
        ckey = (q, bool(normalize))
        cache = self._caches.get(ckey)
        if cache is None:
            cache = self._caches[ckey] = _ModelCache(q=q, normalize=normalize,
                                                     backend=self.backend, device=self.device,
                                                     memory_budget=self.memory_budget)
        out = {}
        try:
            for m in self._models:
                _, best, pair, _, _ = _score_pair(cache, src, m, metric, k, opts, False, 0, 0)
                out[m.name] = (best, pair)
        finally:
            # The query's own cache entries are not worth keeping (its object may change).
            cache._layers.pop(src.key, None)
            for key in [c for c in cache._sides if c[0] == src.key]:
                del cache._sides[key]
        return out

    def get_data(self, modality: str) -> list:
        """The paired data set's ``"image"`` or ``"text"`` column (from ``data=``)."""
        if modality not in ("image", "text"):
            raise InputError(f"modality: expected 'image' or 'text', got {modality!r}")
        if self._data is None:
            raise InputError("no local paired data set was given: pass Alignment(..., data=) a "
                             "dict of lists or a JSONL file with 'image' and 'text' fields "
                             "(prh_fast downloads nothing)")
        data = self._data
        if _is_path(data):
            path = os.fspath(data)
            rows = []
            with open(path) as f:
                for ln, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise InputError(f"{path}:{ln}: not JSON ({err.msg})") from err
            missing = [ln for ln, r in enumerate(rows, 1) if modality not in r]
            if missing:
                raise InputError(f"{path}: record {missing[0]} has no {modality!r} field")
            return [r[modality] for r in rows]
        if isinstance(data, dict):
            if modality not in data:
                raise InputError(f"data: has no {modality!r} column (columns: "
                                 f"{sorted(data)})")
            return list(data[modality])
        raise InputError(f"data: expected a dict of lists or a JSONL path, got "
                         f"{type(data).__name__}")


@with_threads
def align_paths(x_feats, y_feats, metric, topk, normalize, *, concat=False, backend=None,
                null_permutations=0, seed=0, stream=None, memory_budget=None,
                **metric_kwargs):
    """``prh_fast.align`` for store folders or feature files (either side may also be in
    memory): the model grid's path (``align_models``) for one pair, as an
    ``AlignmentResult`` read x first. ``concat`` and per-pair null statistics need every
    layer in memory: load the features for those."""
    if concat:
        raise InputError("concat: concatenating all layers needs them in memory; load the "
                         "features (prh_fast.store.load_features) to use it")
    if null_permutations:
        raise InputError("null_permutations: per-pair null statistics need the features in "
                         "memory; prh_fast.align_models gives the best-score null from files "
                         "and stores")
    t0 = time.perf_counter()
    spec = GridSpec.from_args(metric, topk=topk, normalize=normalize, progress=False,
                              backend=backend, reference_order=False, seed=seed, stream=stream,
                              memory_budget=memory_budget, **metric_kwargs)
    xm, ym = _as_models({"x": x_feats}, "x_models"), _as_models({"y": y_feats}, "y_models")
    r, cache = _compute_grid(spec, xm, ym, t0)
    mat = torch.from_numpy(r.pair_scores[("x", "y")])
    best, pair = best_pair(mat)
    timings = dict(r.timings)
    timings["total"] = time.perf_counter() - t0
    k = r.options.get("k")
    ann_report = None
    if xm[0].key in cache.ann and ym[0].key in cache.ann:  # approximate lists, as in memory
        ann_report = ann_pair_report(metric, k, cache.ann[xm[0].key], cache.ann[ym[0].key],
                                     normalize_lcs=bool(metric_kwargs.get("normalize_lcs")),
                                     log=True)
    return AlignmentResult(metric=metric, scores=mat, best_score=best, best_pair=pair,
                           x_layers=list(range(mat.shape[0])),
                           y_layers=list(range(mat.shape[1])),
                           topk=k if "knn" in metric else None,
                           timings=timings, ann_report=ann_report)


# ``prh_fast.align`` on store folders or feature files runs this (``prh_fast._align`` sits below
# the grid and does not import it).
set_path_runner(align_paths)
