"""A reusable alignment probe: prepare a fixed reference model once, score many models against it.

``Probe(reference_feats, metrics=...)`` clips (``q``) and normalises the reference layers once
and keeps, per metric, what every later score needs from that side: the neighbour lists (and
their tie diagnostics) of the neighbour metrics, the lists, masked-kernel values and
self-similarities of CKNNA, and the prepared layers of the kernel metrics. :meth:`Probe.score`
prepares only the new side and scores it with the same code as :func:`prh_fast.align`, so
``probe.score(feats)[metric]`` equals ``prh_fast.align(feats, reference_feats, metric, ...)``
(features on the X side, the reference on the Y side).

:meth:`Probe.save` / :meth:`Probe.load` keep the prepared reference in a folder: tensors in
``probe.safetensors``, options and small diagnostics in ``probe.json`` (no pickle), each file
written atomically under the folder's lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from prh_fast._align import (
    _KNN_RAW,
    NeighbourSide,
    _align_prepared,
    _cknna_side,
    _knn_side,
    _metric_options,
    _prepare_side,
    _warn_ties,
    ann_pair_report,
    svcca_rank,
)
from prh_fast._threads import with_threads
from prh_fast._validate import as_layers, resolve_memory_budget
from prh_fast.errors import InputError
from prh_fast.metrics import SUPPORTED_METRICS
from prh_fast.prepare import _check_q, prepare_features

if TYPE_CHECKING:
    from prh_fast._align import AlignmentResult
    from prh_fast._validate import Layers, StrPath

__all__ = ["Probe"]

#: The options each metric takes (``prh_fast.align``'s ``**metric_kwargs``).
_OPTIONS = {
    **{m: ("normalize_lcs", "ties") for m in _KNN_RAW},
    "cknna": ("unbiased", "distance_agnostic", "exclude_self"),
    "cka": ("kernel_metric", "rbf_sigma", "unbiased"),
    "unbiased_cka": ("kernel_metric", "rbf_sigma", "unbiased"),
    "svcca": ("cca_dim",),
}

_FORMAT = 1
_JSON = "probe.json"
_TENSORS = "probe.safetensors"


def _side_key(metric: str, k, opts: dict):
    """The key of a side's neighbour data: metrics with equal keys share one search."""
    if metric in _KNN_RAW:
        return ("knn", k, opts["ties"])
    if metric == "cknna":
        return ("cknna", k, opts["unbiased"], opts["distance_agnostic"], opts["exclude_self"])
    return None


def _search_side(key, layers, backend, reports):
    """One side's neighbour data for ``key`` (:func:`_side_key`)."""
    if key[0] == "knn":
        return _knn_side(layers, key[1], backend, reports, ties=key[2])
    return _cknna_side(layers, key[1], backend, unbiased=key[2], distance_agnostic=key[3],
                       reports=reports, exclude_self=key[4])


class Probe:
    """A fixed reference model, prepared once, that scores other models' features.

    Args:
        reference_feats: the reference model's ``[N, L, D]`` tensor (or array) or list of
            ``[N, D_l]`` layers, on CPU or CUDA; or the path of a feature file or store folder
            (read into memory with ``prh_fast.store.load_features``).
        metrics: names from ``SUPPORTED_METRICS``, or a mapping ``{metric: {option: value}}``
            giving one metric its own options (they override the shared ``**metric_options``).
        topk: neighbours of the metrics whose name contains "knn" (cknna included).
        normalize: L2-normalise each layer's rows (as ``align``).
        q: clip both sides to the ``q`` outlier threshold first (``prepare_features(feats,
            q)``, applied to the reference here and to every scored model in :meth:`score`);
            ``None``: no clipping.
        concat: also score all layers concatenated, as index ``-1`` (as ``align``).
        backend: neighbour-search backend (see ``prh_fast.knn``).
        memory_budget: bytes of scratch memory of the blocked kernel computations (as
            ``align``).
        **metric_options: options of the metrics (as ``align``'s ``**metric_kwargs``), each
            given to every requested metric that takes it.

    Raises:
        InputError: naming the argument: bad features, an unknown metric, no metrics, an
            option that no requested metric takes, options that conflict (for example
            ``ties="expected"`` with ``cycle_knn``), a bad ``topk`` or ``q``.

    Example:
        >>> import torch
        >>> import prh_fast
        >>> from prh_fast.probe import Probe
        >>> g = torch.Generator().manual_seed(0)
        >>> ref = torch.randn(50, 3, 8, generator=g)
        >>> probe = Probe(ref, metrics=("mutual_knn", "cka"), topk=5)
        >>> feats = torch.randn(50, 2, 6, generator=g)
        >>> out = probe.score(feats)
        >>> sorted(out), tuple(out["cka"].scores.shape)
        (['cka', 'mutual_knn'], (2, 3))
        >>> bool(torch.equal(out["cka"].scores, prh_fast.align(feats, ref, "cka").scores))
        True
    """

    @with_threads
    def __init__(self, reference_feats: Layers | StrPath,
                 metrics: Sequence[str] | Mapping[str, Mapping[str, Any]] = ("mutual_knn",),
                 topk: int = 10, normalize: bool = True, q: float | None = None, *,
                 concat: bool = False, backend: str | None = None,
                 memory_budget: int | None = None, **metric_options: Any) -> None:
        self.topk, self.normalize, self.concat = topk, bool(normalize), bool(concat)
        self.backend = backend
        self.q = None if q is None else _check_q(q)
        self.memory_budget = resolve_memory_budget(memory_budget, None)
        reference_feats = _load(reference_feats, "reference_feats", None)
        first = as_layers(reference_feats, "reference_feats")
        self.n, self.device = int(first[0].shape[0]), first[0].device
        layers = self._layers(reference_feats, "reference_feats", check=False)
        self.shapes = [int(x.shape[1]) for x in layers]
        self._metrics = _check_metrics(metrics, metric_options)
        # per metric: (k, opts) exactly as align validates them
        self._plan = {m: _metric_options(m, self.n, topk, o, self.memory_budget)
                      for m, o in self._metrics.items()}
        self.y_labels = ([-1] if self.concat else []) + list(range(len(layers)))
        self._ys = _prepare_side(layers, self.normalize, self.concat)
        self._y_sides: dict = {}
        self._y_reports: dict = {}
        self._y_bases: dict = {}
        self._cache_bases()
        for m, (k, opts) in self._plan.items():
            key = _side_key(m, k, opts)
            if key is not None and key not in self._y_sides:
                reps: list = []
                self._y_sides[key] = _search_side(key, self._ys, backend, reps)
                self._y_reports[key] = reps

    def _cache_bases(self) -> None:
        """SVCCA: each reference layer's subspace basis (``layer_basis``), formed once."""
        from prh_fast.metrics._svcca import layer_bases

        if "svcca" not in self._plan:
            return
        r = svcca_rank(self._plan["svcca"][1].get("cca_dim", 10), self.n, self._ys)
        self._y_bases[r] = layer_bases([], self._ys, r)[1]

    @property
    def metrics(self) -> list[str]:
        """The metrics :meth:`score` computes, in order."""
        return list(self._metrics)

    def _layers(self, feats, name: str, *, check: bool = True) -> list:
        """``feats`` as checked layers, clipped as ``prepare_features(feats, q)`` clips that
        structure (one threshold over an ``[N, L, D]`` tensor, one per layer of a list)."""
        feats = _load(feats, name, self.device if check else None)
        layers = as_layers(feats, name)
        if check and layers[0].shape[0] != self.n:
            raise InputError(f"{name}: has N = {layers[0].shape[0]} samples, the probe's "
                             f"reference has N = {self.n} (rows must be the same samples, "
                             f"paired)")
        if check and layers[0].device != self.device:
            raise InputError(f"{name}: on {layers[0].device}, the probe's reference is on "
                             f"{self.device}")
        if self.q is None:
            return layers
        src = layers if isinstance(feats, (list, tuple)) else feats
        try:
            return as_layers(prepare_features(src, q=self.q), name)
        except (InputError, ValueError) as err:
            raise InputError(f"{name}: {err}") from None

    @with_threads
    def score(self, feats: Layers | StrPath, *, null_permutations: int = 0,
              seed: int = 0) -> dict[str, AlignmentResult]:
        """Score a model's features against the reference, every metric of the probe.

        Args:
            feats: the model's ``[N, L, D]`` tensor (or array) or list of ``[N, D_l]``
                layers, the same ``N`` samples in the same order as the reference, on its
                device; or the path of a feature file or store folder.
            null_permutations, seed: random pairings, as in ``prh_fast.align``.

        Returns:
            ``{metric: AlignmentResult}``: ``feats``' layers in rows, the reference's in
            columns; the same numbers as ``prh_fast.align(feats, reference_feats, metric,
            ...)`` with the probe's options.

        Raises:
            InputError: naming ``feats`` (shape, ``N``, device, values) or the null's
                arguments.

        Example:
            >>> import torch
            >>> from prh_fast.probe import Probe
            >>> ref = torch.randn(40, 2, 8, generator=torch.Generator().manual_seed(0))
            >>> res = Probe(ref, metrics=["mutual_knn"], topk=4).score(ref)["mutual_knn"]
            >>> res.best_score, res.best_pair
            (1.0, (0, 0))
        """
        t0 = time.perf_counter()
        raw = self._layers(feats, "feats")
        xs = _prepare_side(raw, self.normalize, self.concat)
        t_prep = time.perf_counter() - t0
        x_labels = ([-1] if self.concat else []) + list(range(len(raw)))
        x_sides: dict = {}
        x_reports: dict = {}
        out = {}
        for m, (k, opts) in self._plan.items():
            t_m = time.perf_counter()
            timings = {"prepare": t_prep}
            key = _side_key(m, k, opts)
            xc = yc = None
            if key is not None:
                t0 = time.perf_counter()
                if key not in x_sides:
                    reps: list = []
                    x_sides[key] = _search_side(key, xs, self.backend, reps)
                    x_reports[key] = reps
                xc, yc = x_sides[key], self._y_sides[key]
                t_search = time.perf_counter() - t0
            if m == "svcca":  # the reference's bases, formed once
                yc = self._y_bases[svcca_rank(opts.get("cca_dim", 10), self.n, self._ys)]
            res = _align_prepared(m, xs, self._ys, x_labels, self.y_labels, k, opts,
                                  self.backend, null_permutations, seed, timings,
                                  x_cache=xc, y_cache=yc)
            if key is not None:
                timings["knn"] = t_search
                res.ann_report = ann_pair_report(
                    m, k, x_reports[key], self._y_reports.get(key, []), x_labels,
                    self.y_labels, opts.get("normalize_lcs", False), log=True) \
                    if any(r is not None for r in x_reports[key]) else None
            timings["total"] = time.perf_counter() - t_m + (t_prep if not out else 0.0)
            _warn_ties(res.ties, m)
            out[m] = res
        return out

    def save(self, folder: StrPath) -> str:
        """Keep the prepared reference in ``folder`` (created if needed) for :meth:`load`.

        Writes ``probe.safetensors`` (the prepared layers and the exact neighbour lists) and
        ``probe.json`` (options, tie diagnostics, CKNNA self-similarities, the tensors file's
        SHA-256), each atomically, under the folder's lock; no pickle. Neighbour data that is
        not plain lists (tie boundaries of ``ties="expected"``, approximate searches with
        their recall reports) is searched again by :meth:`load` from the saved layers.

        Args:
            folder: the folder to write.

        Returns:
            The folder, as a string.

        Raises:
            DestinationLocked: another writer holds the folder.

        Example:
            >>> import tempfile, torch
            >>> from prh_fast.probe import Probe
            >>> ref = torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(0))
            >>> folder = Probe(ref, metrics=["mutual_knn"], topk=3).save(tempfile.mkdtemp())
            >>> sorted(f for f in os.listdir(folder) if not f.startswith("."))
            ['probe.json', 'probe.safetensors']
        """
        from safetensors.torch import save

        from prh_fast._io import atomic_write
        from prh_fast._lock import exclusive_lock

        folder = os.fspath(folder)
        os.makedirs(folder, exist_ok=True)
        tensors = {f"layer.{j}": y.detach().cpu().contiguous() for j, y in enumerate(self._ys)}
        sides = []
        for s, (key, side) in enumerate(self._y_sides.items()):
            entry: dict = {"key": list(key), "stored": False}
            if any(r is not None for r in self._y_reports.get(key, [])):
                pass  # approximate search: load searches again (its recall reports)
            elif key[0] == "knn" and side.boundary is None:
                tensors[f"side.{s}.lists"] = side.lists.cpu().contiguous()
                entry.update(stored=True, ties=side.ties)
            elif key[0] == "cknna":
                lists, self_sims = side
                for j, (idx, vals) in enumerate(lists):
                    tensors[f"side.{s}.idx.{j}"] = idx.cpu().contiguous()
                    tensors[f"side.{s}.vals.{j}"] = vals.cpu().contiguous()
                entry.update(stored=True, self_sims=[float(v) for v in self_sims])
            sides.append(entry)
        meta = {"format": _FORMAT, "n": self.n, "shapes": self.shapes,
                "layers": len(self._ys), "topk": self.topk,
                "metrics": [[m, o] for m, o in self._metrics.items()],
                "normalize": self.normalize, "q": self.q, "concat": self.concat,
                "backend": self.backend, "memory_budget": self.memory_budget,
                "sides": sides}
        blob = save(tensors)
        meta["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        text = json.dumps(meta, indent=1, sort_keys=True).encode()
        with exclusive_lock(folder, folder=True):
            atomic_write(os.path.join(folder, _TENSORS), lambda f: f.write(blob))
            atomic_write(os.path.join(folder, _JSON), lambda f: f.write(text))
        return folder

    @classmethod
    @with_threads
    def load(cls, folder: StrPath, reference_feats: Layers | StrPath | None = None, *,
             device: str | torch.device | None = None, **expected: Any) -> Probe:
        """A probe saved by :meth:`save`, checked against what the caller expects.

        Args:
            folder: the folder :meth:`save` wrote.
            reference_feats: optional: the reference features the probe must have been
                prepared from (they are prepared again with the saved options and compared
                with the saved layers).
            device: where to put the loaded tensors (default CPU).
            **expected: any of ``metrics``, ``topk``, ``normalize``, ``q``, ``concat``,
                ``backend``, ``memory_budget`` and metric options, as given to
                :class:`Probe`: each must equal the saved value.

        Returns:
            The :class:`Probe`, scoring as the saved one did.

        Raises:
            InputError: naming ``folder`` (missing or unreadable files, another format), the
                option that differs from the saved one, or ``reference_feats`` when they do
                not match the saved reference.

        Example:
            >>> import tempfile, torch
            >>> from prh_fast.probe import Probe
            >>> ref = torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(0))
            >>> folder = Probe(ref, metrics=["cka"]).save(tempfile.mkdtemp())
            >>> Probe.load(folder, ref, metrics=["cka"]).metrics
            ['cka']
        """
        from safetensors.torch import load

        folder = os.fspath(folder)
        try:
            with open(os.path.join(folder, _JSON), "rb") as f:
                meta = json.loads(f.read().decode())
            with open(os.path.join(folder, _TENSORS), "rb") as f:
                blob = f.read()
            tensors = load(blob)
        except (OSError, ValueError) as err:
            raise InputError(f"folder: {folder!r} holds no readable saved probe ({err})") \
                from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise InputError(f"folder: {folder!r}: unknown probe format "
                             f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
        if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
            raise InputError(f"folder: {folder!r}: {_TENSORS} does not belong to {_JSON} "
                             f"(rewritten while it was read, or damaged): load it again")
        meta["metrics"] = {m: o for m, o in meta["metrics"]}
        _check_expected(meta, expected)
        probe = cls.__new__(cls)
        probe.n, probe.shapes = int(meta["n"]), list(meta["shapes"])
        probe.topk, probe.normalize = meta["topk"], bool(meta["normalize"])
        probe.q, probe.concat = meta["q"], bool(meta["concat"])
        probe.backend, probe.memory_budget = meta["backend"], meta["memory_budget"]
        probe._metrics = meta["metrics"]
        probe.device = torch.device("cpu" if device is None else device)
        probe._plan = {m: _metric_options(m, probe.n, probe.topk, o, probe.memory_budget)
                       for m, o in probe._metrics.items()}
        probe.y_labels = (([-1] if probe.concat else [])
                          + list(range(len(probe.shapes))))
        probe._ys = [tensors[f"layer.{j}"].to(probe.device) for j in range(meta["layers"])]
        probe._y_sides, probe._y_reports, probe._y_bases = {}, {}, {}
        probe._cache_bases()
        for s, entry in enumerate(meta["sides"]):
            key = tuple(entry["key"])
            if not entry["stored"]:
                reps: list = []
                probe._y_sides[key] = _search_side(key, probe._ys, probe.backend, reps)
                probe._y_reports[key] = reps
                continue
            probe._y_reports[key] = [None] * len(probe._ys)
            if key[0] == "knn":
                probe._y_sides[key] = NeighbourSide(
                    tensors[f"side.{s}.lists"].to(probe.device), entry["ties"])
            else:
                lists = [(tensors[f"side.{s}.idx.{j}"].to(probe.device),
                          tensors[f"side.{s}.vals.{j}"].to(probe.device))
                         for j in range(len(probe._ys))]
                probe._y_sides[key] = (lists, list(entry["self_sims"]))
        if reference_feats is not None:
            layers = _prepare_side(probe._layers(reference_feats, "reference_feats"),
                                   probe.normalize, probe.concat)
            if len(layers) != len(probe._ys) or not all(
                    a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                    for a, b in zip(layers, probe._ys)):
                raise InputError(f"reference_feats: do not match the reference saved in "
                                 f"{folder!r} (its prepared layers differ)")
        return probe

    def __repr__(self) -> str:
        return (f"Probe(n={self.n}, layers={self.shapes}, metrics={self.metrics}, "
                f"topk={self.topk}, normalize={self.normalize}, q={self.q}, "
                f"device={self.device})")


def _load(feats, name: str, device):
    """``feats`` itself, or for a path (a feature file or a store folder) its features, read
    into memory with ``prh_fast.store.load_features`` (on ``device``, default CPU)."""
    if not isinstance(feats, (str, os.PathLike)):
        return feats
    from prh_fast.store import load_features

    try:
        return load_features(os.fspath(feats), map_location=device or "cpu")["feats"]
    except (OSError, ValueError) as err:
        raise InputError(f"{name}: cannot read features from {os.fspath(feats)!r}: {err}") \
            from None


def _check_metrics(metrics, shared: dict) -> dict:
    """``{metric: options}``: each requested metric with the shared options it takes and its
    own; an option that no metric takes is an error naming it."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    own = dict(metrics) if isinstance(metrics, Mapping) else {m: {} for m in metrics}
    if not own:
        raise InputError("metrics: expected at least one metric")
    out = {}
    for m, opts in own.items():
        if m not in SUPPORTED_METRICS:
            raise InputError(f"metrics: unknown metric {m!r}; supported: {SUPPORTED_METRICS}")
        if opts is None:
            opts = {}
        if not isinstance(opts, Mapping):
            raise InputError(f"metrics[{m!r}]: expected a dict of options, got "
                             f"{type(opts).__name__}")
        for a in opts:
            if a not in _OPTIONS[m]:
                raise InputError(f"metrics[{m!r}]: {m} takes no option {a!r}; its options: "
                                 f"{list(_OPTIONS[m])}")
        mine = {a: v for a, v in shared.items() if a in _OPTIONS[m]}
        mine.update(opts)
        if m == "unbiased_cka" and "unbiased" in mine:
            if not mine.pop("unbiased"):
                raise InputError("unbiased: unbiased_cka is always unbiased; unbiased=False "
                                 "conflicts with it (use metric 'cka')")
        out[m] = mine
    unused = sorted(a for a in shared if not any(a in _OPTIONS[m] for m in out))
    if unused:
        raise InputError(f"{unused[0]}: not an option of any requested metric {list(out)}")
    return out


def _check_expected(meta: dict, expected: dict) -> None:
    """Each option the caller expects equals the saved one (an error names the first that
    differs)."""
    named = ("topk", "normalize", "q", "concat", "backend", "memory_budget")
    shared = {a: v for a, v in expected.items() if a not in named and a != "metrics"}
    for a in named:
        if a in expected:
            want = expected[a]
            if a == "q" and want is not None:
                want = _check_q(want)
            if want != meta[a]:
                raise InputError(f"{a}: the saved probe has {a}={meta[a]!r}, expected "
                                 f"{want!r}")
    if "metrics" in expected or shared:
        metrics = expected.get("metrics", list(meta["metrics"]))
        want = _check_metrics(metrics, shared)
        if want != meta["metrics"]:
            raise InputError(f"metrics: the saved probe has metrics and options "
                             f"{meta['metrics']}, expected {want}")
