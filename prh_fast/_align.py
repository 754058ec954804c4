"""Alignment between two models: every layer pair in one pass (docs/metrics.md, "The pipeline").

The reference recomputes both neighbour lists (or both Gram matrices) for every layer pair.
Here each layer is prepared once and all ``Lx x Ly`` pairs are scored from those statistics:

- kNN metrics: one neighbour search per layer (``Lx + Ly`` searches), then one batched native
  call scores every pair (``[Lx, N, k] x [Ly, N, k] -> [Lx, Ly]``).
- CKNNA: one search per layer (lists + similarities), self-similarities once per layer, the
  ``O(N·k)`` cross terms per pair.
- CKA (linear or RBF, biased or unbiased): Gram space or feature space, whichever costs fewer
  flops. Gram space streams row blocks of every layer's kernel and accumulates all pair sums
  ``Σ K_p∘L_q`` with one matrix product per block, never holding an ``N x N`` matrix.
- SVCCA: each layer's top singular subspace once; each pair is an ``r x r`` SVD.

The kernel scorers are the metrics' own (``prh_fast.metrics._kernel.cka_scores``,
``prh_fast.metrics._svcca.svcca_scores``), and the neighbour metrics' values come from the same
``neighbour_scores`` and ``knn_value``: ``prh_fast.metrics`` scores one pair as the ``1 x 1``
case of these grids.

The result keeps the whole score matrix, the best score and pair under the reference's tie
rule (scan ``i`` then ``j``; keep a pair only if strictly greater than the best so far,
starting from 0), and timings. With an approximate neighbour search (``backend="faiss-ivf"``
etc.) it also carries ``ann_report``: each layer's measured recall and, per layer pair, the
error of the metric on the recall sample (``ann_pair_report``).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from prh_fast._threads import map_layers, with_threads
from prh_fast._validate import (
    Layers,
    StrPath,
    as_layer_pair,
    as_layers,
    check_memory_budget,
    check_positive_int,
    check_topk,
    compute_dtype,
    resolve_memory_budget,
)
from prh_fast.errors import InputError
from prh_fast.knn import DEFAULT_MEMORY_BUDGET, knn
from prh_fast.knn._backends import ANN_BACKENDS, resolve, resolve_setops_backend
from prh_fast.knn._faiss_ann import AnnParams
from prh_fast.metrics import KNN_KINDS, SUPPORTED_METRICS, knn_value
from prh_fast.metrics._cknna import cknna_excludes_self, cknna_lists, cknna_sim, cknna_values
from prh_fast.metrics._kernel import check_cka_options, cka_ratio, cka_scores
from prh_fast.metrics._neighbours import neighbour_scores, row_values_torch
from prh_fast.metrics._svcca import layer_bases, svcca_scores
from prh_fast.metrics._ties import (
    check_ties,
    distinct_rows,
    expected_mutual,
    list_ties,
    neighbour_ties,
    relabel_ties,
    tie_warning,
)
from prh_fast.prepare import normalize_rows

__all__ = ["align", "compute_score", "AlignmentResult", "best_pair", "as_layers",
           "ann_pair_report"]

#: The neighbour metrics and their ``neighbour_scores`` kinds (``prh_fast.metrics.KNN_KINDS``).
_KNN_RAW = KNN_KINDS


@dataclass
class AlignmentResult:
    """Scores of every layer pair of two models for one metric (what :func:`align` returns).

    ``scores[i, j]`` is the metric between layer ``i`` of X and layer ``j`` of Y (index
    ``-1``, when ``concat=True``, is all layers concatenated and sits in row/column 0).

    Attributes:
        metric: the metric's name.
        scores: ``[Lx, Ly]`` float64 tensor.
        best_score, best_pair: the best score and its ``(x layer, y layer)`` under the
            reference's tie rule (``(0, None)`` when no score is positive).
        x_layers, y_layers: the layer labels of the rows and columns.
        topk: the neighbours of the "knn" metrics (``None`` for the others).
        timings: seconds per step.

    Example:
        >>> import torch
        >>> import prh_fast
        >>> X = torch.randn(40, 2, 8, generator=torch.Generator().manual_seed(0))
        >>> res = prh_fast.align(X, X, "cka")
        >>> res.best_pair, sorted(res.to_dict())[:3]
        ((0, 0), ['best_pair', 'best_score', 'metric'])
    """

    metric: str
    scores: torch.Tensor
    best_score: float
    best_pair: tuple | None
    x_layers: list
    y_layers: list
    topk: int | None = None
    timings: dict = field(default_factory=dict)
    #: With ``null_permutations=P`` (random pairings: Y's rows shuffled): per layer pair
    #: ``mean``, ``std``, ``p``, ``z`` (``[Lx, Ly]`` tensors); for the best score, from the
    #: maximum over pairs under each shuffle, ``best_mean``, ``best_std``, ``best_low`` /
    #: ``best_high`` (the central 95% of the null), ``best_p`` (``(b + 1) / (P + 1)``) and
    #: ``best_z``; ``permutations`` and ``seed``.
    null: dict | None = None
    #: With an approximate neighbour search: ``ann_pair_report``'s dict (recall of every
    #: layer, and per layer pair the metric from approximate vs exact lists on the sample).
    ann_report: dict | None = None
    #: Neighbour metrics with an exact search: ``mode`` (the ``ties`` option), ``k`` and per
    #: side (``x``, ``y``) one dict per layer: ``layer``, ``n``, ``distinct_rows``,
    #: ``tied_rows`` and ``tied_fraction`` (rows whose ``k``-th neighbour is tied with the
    #: ``(k+1)``-th, so that the tie rule picks part of the list).
    ties: dict | None = None

    def to_dict(self) -> dict:
        d = {"metric": self.metric, "topk": self.topk, "scores": self.scores.tolist(),
             "best_score": self.best_score, "best_pair": self.best_pair,
             "x_layers": self.x_layers, "y_layers": self.y_layers, "timings": self.timings}
        if self.ann_report is not None:
            d["ann_report"] = self.ann_report
        if self.ties is not None:
            d["ties"] = self.ties
        if self.null is not None:
            d["null"] = {a: (v.tolist() if isinstance(v, torch.Tensor) else v)
                         for a, v in self.null.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "AlignmentResult":
        """The result :meth:`to_dict` described (e.g. after ``json.dumps`` / ``json.loads``):
        plain data only, no pickle.

        Args:
            d: a dict as :meth:`to_dict` returns it.

        Returns:
            An :class:`AlignmentResult` equal to the one that was saved (scores and null
            matrices as float64 tensors).

        Raises:
            InputError: ``d`` lacks a field or holds a score matrix of the wrong shape.

        Example:
            >>> import json, torch
            >>> import prh_fast
            >>> X = torch.randn(30, 2, 8, generator=torch.Generator().manual_seed(0))
            >>> res = prh_fast.align(X, X, "mutual_knn", topk=3, null_permutations=4)
            >>> back = AlignmentResult.from_dict(json.loads(json.dumps(res.to_dict())))
            >>> torch.equal(back.scores, res.scores), back.best_pair == res.best_pair
            (True, True)
        """
        try:
            scores = torch.tensor(d["scores"], dtype=torch.float64)
            x_layers, y_layers = list(d["x_layers"]), list(d["y_layers"])
            metric = d["metric"]
        except (KeyError, TypeError, ValueError) as err:
            raise InputError(f"d: not an AlignmentResult dict ({err!r})") from None
        if tuple(scores.shape) != (len(x_layers), len(y_layers)):
            raise InputError(f"d: scores of shape {tuple(scores.shape)} for "
                             f"{len(x_layers)} x {len(y_layers)} layers")
        null = d.get("null")
        if null is not None:
            null = {a: (torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v)
                    for a, v in null.items()}
        pair = d.get("best_pair")
        return cls(metric=metric, scores=scores, best_score=d.get("best_score", 0.0),
                   best_pair=None if pair is None else tuple(pair), x_layers=x_layers,
                   y_layers=y_layers, topk=d.get("topk"), timings=dict(d.get("timings", {})),
                   null=null, ann_report=d.get("ann_report"), ties=d.get("ties"))


def best_pair(scores: torch.Tensor, x_layers=None, y_layers=None):
    """The reference's rule: scan ``i`` then ``j``, keep strictly greater scores, start at 0.

    All non-positive (or NaN) scores give ``(0, None)``.
    """
    best, pair = 0.0, None
    x_layers = list(range(scores.shape[0])) if x_layers is None else x_layers
    y_layers = list(range(scores.shape[1])) if y_layers is None else y_layers
    for a, i in enumerate(x_layers):
        for b, j in enumerate(y_layers):
            s = float(scores[a, b])
            if s > best:
                best, pair = s, (i, j)
    return best, pair


def _prepare_side(layers, normalize, concat):
    out = list(layers)
    if concat:
        out = [torch.cat([x.reshape(x.shape[0], -1) for x in layers], dim=1)] + out
    if normalize:
        cpu = bool(out) and all(x.device.type == "cpu" for x in out)
        out = map_layers(lambda x: normalize_rows(x.to(compute_dtype(x))), out,
                         out[0].shape[0] if out else 0, parallel=cpu)
    return out


# --------------------------------------------------------------------------------------------
# per-metric grid scorers: each takes the two lists of prepared layers and returns [Lx, Ly]


def _relabel(lists: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Neighbour lists of the samples reordered by ``perm`` (``Y'[i] = Y[perm[i]]``):
    ``knn(Y')[i] = perm⁻¹[knn(Y)[perm[i]]]`` — O(N·k), no new search."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    rows = lists.index_select(lists.dim() - 2, perm)
    return inv.take(rows)


@dataclass
class NeighbourSide:
    """One model's neighbour data for the kNN metrics (what :func:`_knn_side` returns).

    Attributes:
        lists: ``[L, N, k]`` int64 neighbour lists (``None`` with ``ties="expected"``, which
            scores from ``boundary`` alone).
        ties: per layer, the tie diagnostics (``prh_fast.metrics._ties.list_ties`` or
            ``NeighbourTies.summary``); ``None`` for an approximate search, whose lists do not
            tell exact ties.
        boundary: with ``ties="expected"``, each layer's ``NeighbourTies``.
    """

    lists: torch.Tensor | None
    ties: list | None = None
    boundary: list | None = None


def _knn_side(xs, topk, backend, reports=None, ties="rule") -> NeighbourSide:
    """One side's neighbour data: one search per layer. ``reports``: a list that receives each
    layer's ``AnnReport`` (``None`` for an exact search).

    An exact search asks for ``topk + 1`` neighbours and keeps ``topk``: the lists are the same
    (one total order), and the extra column tells, exactly, whether the ``k``-th neighbour is
    tied with the ``(k+1)``-th. ``ties="expected"`` finds each layer's full boundary
    (``neighbour_ties``) instead of lists."""
    xs = list(xs)
    n = xs[0].shape[0]
    cpu = all(x.device.type == "cpu" for x in xs)
    if ties == "expected":
        found = map_layers(lambda x: neighbour_ties(x, topk), xs, n, parallel=cpu)
        if reports is not None:
            reports.extend(None for _ in xs)
        return NeighbourSide(None, [t.summary() for t in found], found)
    exact = _exact_search(xs, topk, backend)
    extra = 1 if exact and topk + 1 <= n - 1 else 0

    def one(x):
        if not exact:
            idx, rep = knn(x, topk, backend=backend, return_report=True)
            return idx, rep, None
        from prh_fast.knn import _search

        idx, vals, rep, _ = _search(x, topk + extra, backend=backend)
        return (idx[:, :topk].contiguous(), rep,
                list_ties(idx, vals, topk, distinct_rows(x)))

    found = map_layers(one, xs, n, parallel=_side_by_side(xs, topk, backend))
    if reports is not None:
        reports.extend(rep for _, rep, _ in found)
    return NeighbourSide(torch.stack([idx for idx, _, _ in found]),
                         [t for _, _, t in found] if exact else None)


def _resolved_search(xs, topk, backend) -> str | None:
    """The search ``backend`` resolves to for these layers, ``None`` when it does not resolve
    (the search itself then reports the bad backend, with its own message)."""
    if not xs:
        return None
    try:
        return resolve(backend, xs[0].device, k=topk, dtype=xs[0].dtype).search
    except Exception:
        return None


def _exact_search(xs, topk, backend) -> bool:
    """Whether ``backend`` searches these layers exactly (not an approximate FAISS index)."""
    return _resolved_search(xs, topk, backend) not in ANN_BACKENDS


def _side_by_side(xs, topk, backend) -> bool:
    """Whether one side's layers may be searched side by side (``map_layers``): the exact CPU
    search on CPU tensors (the other backends bring their own threading)."""
    return (bool(xs) and all(x.device.type == "cpu" for x in xs)
            and _resolved_search(xs, topk, backend) == "cpu")


#: A neighbour metric's value from ``neighbour_scores``' raw row mean (the metrics' own rule).
_from_raw = knn_value


def _grid_knn(metric, xs, ys, topk, backend, timings, x_cache=None, y_cache=None, ann=None,
              sides=None, ties="rule", **kw):
    # x_cache / y_cache: NeighbourSides from _knn_side computed earlier (model grids reuse them).
    # ann: a dict that receives both sides' search reports ("x", "y"); sides: a dict that
    # receives both NeighbourSides.
    ann = {} if ann is None else ann
    t0 = time.perf_counter()
    sa = (_knn_side(xs, topk, backend, ann.setdefault("x", []), ties) if x_cache is None
          else x_cache)
    sb = (_knn_side(ys, topk, backend, ann.setdefault("y", []), ties) if y_cache is None
          else y_cache)
    timings["knn"] = time.perf_counter() - t0
    if sides is not None:
        sides.update(x=sa, y=sb)
    if metric == "mutual_knn" and sa.boundary is not None and sb.boundary is not None:
        # both sides' boundaries (ties="expected", or cached ones): either value from them;
        # the rule's lists are fixed before any shuffle, as the searched lists are relabelled
        ba, bb = sa.boundary, sb.boundary
        if ties == "rule":
            ba, bb = [t.rule_lists() for t in ba], [t.rule_lists() for t in bb]

        def from_boundary(perm=None):
            out = torch.empty((len(ba), len(bb)), dtype=torch.float64)
            for j, tb in enumerate(bb):
                tb = tb if perm is None else relabel_ties(tb, perm)
                for i, ta in enumerate(ba):
                    out[i, j] = expected_mutual(ta, tb)
            return out

        return from_boundary
    ka, kb = sa.lists, sb.lists

    def score(perm=None):
        raw = neighbour_scores(_KNN_RAW[metric], ka, kb if perm is None else _relabel(kb, perm),
                               backend=backend)
        return _from_raw(metric, raw, topk, kw.get("normalize_lcs"))

    return score


def _cknna_side(xs, topk, backend, unbiased=True, distance_agnostic=False, reports=None,
                exclude_self=None):
    """One side's ``(lists, self_sims)``: per layer the (indices, similarities) of the search
    and ``sim(K, K)`` (invariant to a relabelling of the samples, so computed once).
    ``reports``: as in ``_knn_side``. The row's own entry competes for the top-k unless
    ``cknna_excludes_self(unbiased, exclude_self)`` (the reference: only when unbiased)."""
    n = xs[0].shape[0]
    excl = cknna_excludes_self(unbiased, exclude_self)

    def lists(x):
        i, s, rep = cknna_lists(x, topk, backend, excl, return_report=True)
        return (i, cknna_values(i, s, unbiased, distance_agnostic)), rep

    found = map_layers(lists, list(xs), n, parallel=_side_by_side(xs, topk, backend))
    if reports is not None:
        reports.extend(rep for _, rep in found)
    la = [p for p, _ in found]
    return la, [cknna_sim(n, p, p, unbiased, backend) for p in la]


def _grid_cknna(xs, ys, topk, backend, timings, unbiased=True, distance_agnostic=False,
                exclude_self=None, x_cache=None, y_cache=None, ann=None):
    n = xs[0].shape[0]
    ann = {} if ann is None else ann
    t0 = time.perf_counter()
    la, self_a = x_cache or _cknna_side(xs, topk, backend, unbiased, distance_agnostic,
                                        ann.setdefault("x", []), exclude_self)
    lb, self_b = y_cache or _cknna_side(ys, topk, backend, unbiased, distance_agnostic,
                                        ann.setdefault("y", []), exclude_self)
    timings["knn"] = time.perf_counter() - t0
    # the set-op implementation, resolved once: a grid (and its null) calls sim per layer pair
    setops = resolve_setops_backend(backend, la[0][0].device, la[0][0].shape[-1])

    def sim(p, q):
        return cknna_sim(n, p, q, unbiased, setops)

    def score(perm=None):
        out = torch.empty((len(xs), len(ys)), dtype=torch.float64)
        for j, q in enumerate(lb):
            if perm is not None:
                q = (_relabel(q[0], perm), q[1][perm])
            for i, p in enumerate(la):
                out[i, j] = cka_ratio(sim(p, q), self_a[i], self_b[j])
        return out

    return score


class _ShuffleScorer:
    """A kernel metric's grid scorer: ``scorer()`` the observed scores (the metric's own
    scorer), ``scorer(perm)`` / ``scorer.many(perms)`` shuffled pairings from a permutation
    scorer (``prh_fast.metrics._permute``) built on first use, which keeps each layer's kernel
    (or SVCCA basis) and recomputes only the cross terms."""

    def __init__(self, observed, make_null):
        self._observed, self._make, self._null = observed, make_null, None

    def _scorer(self, count: int):
        if self._null is None:
            self._null = self._make(count)
        return self._null

    def __call__(self, perm=None):
        return self._observed() if perm is None else self._scorer(1)(perm)

    def many(self, perms) -> list:
        return list(self._scorer(len(perms)).many(perms))


def _grid_cka(xs, ys, timings, kernel_metric="ip", rbf_sigma=1.0, unbiased=False,
              memory_budget=None) -> _ShuffleScorer:
    """CKA of every layer pair (``prh_fast.metrics._kernel.cka_scores``, the scorer of
    ``prh_fast.metrics.cka`` too), in Gram or feature space, whichever costs fewer flops."""
    from prh_fast.metrics._permute import cka_permutation_scorer

    sigma, budget = check_cka_options(xs[0].shape[0], kernel_metric, rbf_sigma, unbiased,
                                      memory_budget, DEFAULT_MEMORY_BUDGET)
    dtype = torch.promote_types(xs[0].dtype, ys[0].dtype)

    def observed():
        out, timings["space"] = cka_scores(xs, ys, dtype, kernel_metric=kernel_metric,
                                           sigma=sigma, unbiased=bool(unbiased), budget=budget,
                                           space="auto")
        return out

    return _ShuffleScorer(observed, lambda count: cka_permutation_scorer(
        xs, ys, dtype, kernel_metric=kernel_metric, sigma=sigma, unbiased=bool(unbiased),
        budget=budget, permutations=count))


def svcca_rank(cca_dim, n: int, layers: list) -> int:
    """SVCCA's ``r`` (``cca_dim``) checked against ``N`` and every layer's width (an
    ``InputError`` naming ``cca_dim``)."""
    return check_positive_int(cca_dim, "cca_dim", minimum=1, maximum=max(1, min(
        [n - 1] + [x.shape[1] for x in layers])))


def _grid_svcca(xs, ys, timings, cca_dim=10, y_bases=None) -> _ShuffleScorer:
    """SVCCA of every layer pair (``prh_fast.metrics._svcca.svcca_scores``, the scorer of
    ``prh_fast.metrics.svcca`` too). ``y_bases``: Y's layer bases formed earlier (a
    ``Probe``'s reference)."""
    from prh_fast.metrics._permute import svcca_permutation_scorer

    r = svcca_rank(cca_dim, xs[0].shape[0], list(xs) + list(ys))
    bases = []  # each layer's basis, formed once for the observed scores and the null

    def shared():
        if not bases:
            if y_bases is None:
                bases.append(layer_bases(xs, ys, r))
            else:
                bases.append((layer_bases(xs, [], r)[0], y_bases))
        return bases[0]

    return _ShuffleScorer(lambda: svcca_scores(xs, ys, r, bases=shared()),
                          lambda count: svcca_permutation_scorer(xs, ys, r, bases=shared()))


# --------------------------------------------------------------------------------------------

#: ``align`` on paths (store folders, feature files) runs the model grid's path for one pair,
#: ``prh_fast.grid.align_paths``; the grid sits above this module and registers it when it is
#: imported (``import prh_fast`` imports it).
_PATH_RUNNER: list = []


def set_path_runner(fn) -> None:
    """Register the function ``align`` calls for paths (``prh_fast.grid.align_paths``)."""
    _PATH_RUNNER[:] = [fn]


@with_threads
def align(x_feats: Layers | StrPath, y_feats: Layers | StrPath, metric: str = "mutual_knn",
          topk: int = 10, normalize: bool = True, *, concat: bool = False,
          backend: str | AnnParams | None = None, null_permutations: int = 0,
          seed: int = 0, memory_budget: int | None = None, stream_budget: int | None = None,
          **metric_kwargs: Any) -> AlignmentResult:
    """Score every layer pair of two models' features with one metric.

    Args:
        x_feats, y_feats: ``[N, L, D]`` tensors (or arrays) or lists of ``[N, D_l]``, paired
            by row; or paths of store folders (streamed, not loaded: see
            ``prh_fast._stream_align``; ``stream=`` as in ``align_models``) or feature files.
        metric: one of ``SUPPORTED_METRICS``.
        topk: neighbours for the metrics whose name contains "knn" (cknna included).
        normalize: L2-normalise each layer's rows first (the reference's default).
        concat: also score all layers concatenated, as index ``-1`` (the paper's variant).
        backend: neighbour-search backend (see ``prh_fast.knn``).
        null_permutations: ``P > 0`` also scores ``P`` random pairings of the samples (Y's rows
            shuffled: the same samples, pairing broken) and returns, per pair, the null mean,
            standard deviation and permutation p-value ``(b + 1) / (P + 1)`` (``b``: shuffles
            scoring at least the observed value), plus the same for the best score against
            the maximum over pairs under each shuffle (a maximum over many layer pairs
            inflates raw scores), with the null's central 95% band. The smallest p-value is
            ``1 / (P + 1)``: use hundreds of shuffles. For kNN metrics a shuffle only
            relabels the lists (O(N·k), no new search); the kernel metrics keep each layer's
            kernel (or SVCCA basis) and recompute only the cross terms.
        seed: seed of the shuffles.
        memory_budget: bytes of scratch memory for what is computed in blocks: CKA's kernel
            row blocks in memory (default 256 MiB) and, for store folders, the streamed
            searches and accumulators (default 512 MiB). Same meaning as in
            ``align_models``, ``prh_fast.metrics.cka`` and ``prh_fast.knn``.
        stream_budget: deprecated name of ``memory_budget`` (a ``FutureWarning``).
        **metric_kwargs: the metric's own options (``kernel_metric``, ``rbf_sigma``,
            ``unbiased``, ``distance_agnostic``, ``exclude_self``, ``normalize_lcs``,
            ``cca_dim``), and for the neighbour metrics ``ties``: ``"rule"`` (default, the
            reference's lists: exact ties to the lower index) or, for ``mutual_knn``,
            ``"expected"`` (the exact expectation over uniform random tie breaks,
            ``prh_fast.metrics.neighbour_ties``). Either way ``result.ties`` gives each
            layer's distinct rows and share of rows whose ``k``-th neighbour is tied, and a
            warning is logged when ties decide the lists of 1% of a layer's rows or more.

    Returns:
        An :class:`AlignmentResult`: the ``[Lx, Ly]`` scores, the best pair, timings.

    Raises:
        InputError: naming the argument (shapes, metric, options, budget).

    Example:
        >>> import torch
        >>> import prh_fast
        >>> X = torch.randn(60, 3, 16, generator=torch.Generator().manual_seed(0))
        >>> res = prh_fast.align(X, X[:, :2], "mutual_knn", topk=5)
        >>> tuple(res.scores.shape), res.best_score, res.best_pair
        ((3, 2), 1.0, (0, 0))
    """
    if metric not in SUPPORTED_METRICS:
        raise InputError(f"metric: unknown metric {metric!r}; supported: {SUPPORTED_METRICS}")
    memory_budget = resolve_memory_budget(memory_budget, stream_budget)
    if isinstance(x_feats, (str, os.PathLike)) or isinstance(y_feats, (str, os.PathLike)):
        # store folders (streamed) or feature files: the grid's path for one model pair
        if not _PATH_RUNNER:
            raise RuntimeError("align on paths needs prh_fast.grid: call prh_fast.align (or "
                               "import prh_fast.grid first)")
        return _PATH_RUNNER[0](x_feats, y_feats, metric, topk, normalize, concat=concat,
                               backend=backend, null_permutations=null_permutations, seed=seed,
                               memory_budget=memory_budget, **metric_kwargs)
    t_all = time.perf_counter()
    lx_raw, ly_raw = as_layer_pair(x_feats, y_feats)
    n = lx_raw[0].shape[0]
    timings: dict = {}
    t0 = time.perf_counter()
    xs, ys = _prepare_side(lx_raw, normalize, concat), _prepare_side(ly_raw, normalize, concat)
    timings["prepare"] = time.perf_counter() - t0
    x_idx = ([-1] if concat else []) + list(range(len(lx_raw)))
    y_idx = ([-1] if concat else []) + list(range(len(ly_raw)))
    k, opts = _metric_options(metric, n, topk, metric_kwargs, memory_budget)
    res = _align_prepared(metric, xs, ys, x_idx, y_idx, k, opts, backend, null_permutations,
                          seed, timings)
    timings["total"] = time.perf_counter() - t_all
    _warn_ties(res.ties, metric)
    return res


def _warn_ties(ties, metric, names=("X", "Y")) -> None:
    """Log :func:`prh_fast.metrics._ties.tie_warning`'s line, if any, as a warning on this
    module's logger (``prh_fast._align``: a caller that reports ties itself may quiet it)."""
    if ties is None:
        return
    msg = tie_warning(ties.get("x"), ties.get("y"), ties["mode"], metric, names)
    if msg:
        import logging

        logging.getLogger(__name__).warning("prh_fast: %s", msg)


def _metric_options(metric, n, topk, metric_kwargs, memory_budget=None):
    """Validate ``topk`` and the metric's options: ``(k, opts)``; ``k`` is None for metrics
    that take no ``topk``. ``opts`` is what ``_align_prepared`` and the ``*_side`` caches take.
    ``memory_budget`` (checked here for every metric) joins the options of the metrics that
    compute in blocks from it (CKA)."""
    kw = dict(metric_kwargs)
    if memory_budget is not None:
        check_memory_budget(memory_budget, 1)
    if metric in _KNN_RAW:
        k = check_topk(topk, n)
        opts = {"normalize_lcs": bool(kw.pop("normalize_lcs", False)),
                "ties": check_ties(kw.pop("ties", "rule"))}
        if opts["ties"] == "expected" and metric != "mutual_knn":
            raise InputError(f"ties: 'expected' is defined for mutual_knn only; {metric} has no "
                             f"closed form over random tie breaks (docs/metrics.md, \"Ties at "
                             f"the list boundary\"); use ties='rule'")
        _no_extra(metric, kw)
        return k, opts
    if "ties" in kw:
        raise InputError(f"ties: only for the neighbour metrics {sorted(_KNN_RAW)}, not {metric}")
    if metric == "cknna":
        opts = {"unbiased": bool(kw.pop("unbiased", True)),
                "distance_agnostic": bool(kw.pop("distance_agnostic", False)),
                "exclude_self": kw.pop("exclude_self", None)}
        cknna_excludes_self(opts["unbiased"], opts["exclude_self"])  # a bad value is an error
        _no_extra(metric, kw)
        if opts["unbiased"] and n < 4:
            raise InputError(f"unbiased HSIC needs N >= 4 samples, got N = {n}")
        return check_topk(n - 1 if topk is None else topk, n, "topk", minimum=2), opts
    if metric in ("cka", "unbiased_cka"):
        if metric == "unbiased_cka":
            kw["unbiased"] = True
        allowed = {"kernel_metric", "rbf_sigma", "unbiased"}
        _no_extra(metric, {a: v for a, v in kw.items() if a not in allowed})
        if memory_budget is not None:
            kw["memory_budget"] = memory_budget
        return None, kw
    _no_extra(metric, {a: v for a, v in kw.items() if a != "cca_dim"})  # svcca
    return None, kw


def _align_prepared(metric, xs, ys, x_idx, y_idx, k, opts, backend, null_permutations, seed,
                    timings, x_cache=None, y_cache=None) -> AlignmentResult:
    """Score prepared (clipped, normalised) layers. ``x_cache`` / ``y_cache``: each side's
    neighbour data from ``_knn_side`` / ``_cknna_side`` (same ``k`` and options), so a grid of
    models searches each model's layers once (a grid keeps their search reports itself:
    ``ann_report`` covers only the searches made here)."""
    n = xs[0].shape[0]
    ann: dict = {}
    sides: dict = {}
    if metric in _KNN_RAW:
        scorer = _grid_knn(metric, xs, ys, k, backend, timings, x_cache=x_cache,
                           y_cache=y_cache, ann=ann, sides=sides, **opts)
    elif metric == "cknna":
        scorer = _grid_cknna(xs, ys, k, backend, timings, x_cache=x_cache, y_cache=y_cache,
                             ann=ann, **opts)
    elif metric in ("cka", "unbiased_cka"):
        scorer = _grid_cka(xs, ys, timings, **opts)
    else:  # svcca; y_cache: Y's layer bases, when the caller keeps them
        scorer = _grid_svcca(xs, ys, timings, y_bases=y_cache, **opts)
    t0 = time.perf_counter()
    scores = scorer()
    timings["score"] = time.perf_counter() - t0
    best, pair = best_pair(scores, x_idx, y_idx)
    null = None
    P = check_positive_int(null_permutations, "null_permutations", minimum=0)
    if P:
        t0 = time.perf_counter()
        null = _null_stats(scorer, scores, best, n, P, seed, xs[0].device)
        timings["null"] = time.perf_counter() - t0
    ann_report = None
    if ann.get("x") and ann.get("y"):
        ann_report = ann_pair_report(metric, k, ann["x"], ann["y"], x_idx, y_idx,
                                     opts.get("normalize_lcs", False), log=True)
    for r in ann.get("x", []) + ann.get("y", []):
        if r is not None:
            r.release()  # the reports' searches (features, lists) are not kept
    ties = None
    if sides and sides["x"].ties is not None and sides["y"].ties is not None:
        ties = {"mode": opts.get("ties", "rule"), "k": k,
                "x": _labelled(sides["x"].ties, x_idx), "y": _labelled(sides["y"].ties, y_idx)}
    return AlignmentResult(metric=metric, scores=scores, best_score=best, best_pair=pair,
                           x_layers=x_idx, y_layers=y_idx,
                           topk=k if "knn" in metric else None, timings=timings, null=null,
                           ann_report=ann_report, ties=ties)


def _labelled(summaries, labels) -> list:
    """Per-layer tie summaries with their layer labels (``-1``: the concatenated layers)."""
    return [{"layer": lab, **t} for t, lab in zip(summaries, labels)]


#: The half-width of the 95% interval at which a metric's error counts as resolved.
DEFAULT_ERROR_TOLERANCE = 0.005
#: The largest recall sample ``ann_pair_report`` grows to (also at most N).
MAX_ERROR_SAMPLE = 32_000


def _common_sample(reps: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every report's ``(approx, exact)`` lists on one common set of sample rows: the largest
    sample when the others can grow to it (samples are nested), else the rows all share."""
    size = max(int(r.sample.numel()) for r in reps)
    for r in reps:
        if r.sample.numel() < size and r.can_grow:
            r.grow(size)
    s0 = reps[0].sample
    if all(torch.equal(r.sample, s0) for r in reps):
        return [(r.approx, r.exact) for r in reps]
    common = s0
    for r in reps[1:]:
        common = common[torch.isin(common, r.sample)]
    if common.numel() == 0:
        raise InputError("ann report: the layers' recall samples share no row (same N, k and "
                         "seed are needed to compare them)")
    out = []
    for r in reps:
        keep = torch.isin(r.sample, common)
        out.append((r.approx[keep], r.exact[keep]))
    return out


def ann_pair_report(metric: str, k: int, x_reports: list, y_reports: list,
                    x_layers: list | None = None, y_layers: list | None = None,
                    normalize_lcs: bool = False, log: bool = False,
                    error_tolerance: float = DEFAULT_ERROR_TOLERANCE,
                    max_sample: int | None = None) -> dict | None:
    """What approximate neighbour lists did to a grid of layer pairs (``None`` when every
    search was exact), with the sampling uncertainty of each metric error.

    ``x_reports`` / ``y_reports``: the ``AnnReport`` of each layer's search. All share the
    sample rows (they depend on ``N`` and the seed only), so for every layer pair the metric
    is computed on those rows twice, from the approximate and from the exact lists:
    ``mutual_knn`` always, and the pipeline's own metric too when it is row-local
    (``lcs_knn``, ``edit_distance_knn``). ``cycle_knn`` follows neighbours of neighbours,
    which the sample's exact lists do not cover, and ``cknna`` needs every row's
    similarities, so for those the report gives ``mutual_knn``'s error as the proxy.

    The uncertainty: each sample row ``i`` gives a paired difference ``d_i = v_i(approx) -
    v_i(exact)`` of the metric's row value (the metric is the mean of ``v_i`` over all
    ``N`` rows), so the error over all rows is estimated by ``mean(d)`` with the standard
    error ``sd(d) / sqrt(S)`` times the finite-population factor ``sqrt((N - S) / (N - 1))``
    (``prh_fast.knn._faiss_ann.mean_ci``: zero when the sample is every row) and the 95%
    interval ``mean(d) ± 1.96·se``. A pair's error is **resolved** when that interval's
    half-width is at most ``error_tolerance`` (the error is known to ``± error_tolerance``),
    or when the whole interval lies beyond ``± error_tolerance`` (the error certainly exceeds
    the tolerance; more rows would only say by how much). It is **biased** when the
    interval excludes 0 (the approximate lists shift the metric; otherwise the difference is
    within sampling noise). While some pair's error is not resolved the sample is doubled
    (every layer's report grows to the same nested rows, which costs the exact search of the
    added rows) up to ``min(N, max_sample)`` rows.

    Args:
        metric: the pipeline's metric.
        k: neighbours.
        x_reports, y_reports: each layer's ``AnnReport`` (or ``None`` for exact searches).
        x_layers, y_layers: the layers' labels (default ``0..L-1``).
        normalize_lcs: ``lcs_knn``'s option.
        log: log one line with the largest error and its resolution.
        error_tolerance: the half-width that resolves an error (default 0.005).
        max_sample: the largest sample rows (default ``MAX_ERROR_SAMPLE`` = 32,000).

    Returns:
        A JSON-ready dict: ``backend``, ``params``, ``k``, ``sample_size`` (the rows used,
        after any growth), ``sample_initial``, ``sample_max``, ``error_tolerance``, per layer
        (``x_layers`` / ``y_layers``) the ``AnnReport`` summary with its ``layer`` label,
        ``recall_min``, ``resolved`` (every error of every metric), and ``metrics``:
        ``{name: {"approx", "exact", "error" ([Lx][Ly], error = |approx - exact|),
        "error_max", "error_se" ([Lx][Ly]), "error_ci" ([Lx][Ly] ``[low, high]`` of the signed
        ``approx - exact``), "error_bound" ([Lx][Ly], the 95% upper bound of the error:
        ``max(|low|, |high|)``), "error_bound_max", "resolved" ([Lx][Ly] bool),
        "resolved_all", "biased" ([Lx][Ly] bool)}}``.

    Raises:
        InputError: some layers have no report, or the reports' samples share no row.

    Example:
        >>> ann_pair_report("mutual_knn", 10, [None], [None]) is None
        True
    """
    from prh_fast.knn._faiss_ann import _Z95, mean_ci

    reps = list(x_reports) + list(y_reports)
    if not reps or all(r is None for r in reps):
        return None
    if any(r is None for r in reps) or not x_reports or not y_reports:
        raise InputError("ann report: every layer of both sides must come from an approximate "
                         "search with the same parameters")
    r0 = reps[0]
    for r in reps[1:]:
        if r.k != r0.k or r.n != r0.n or r.params.get("seed") != r0.params.get("seed"):
            raise InputError("ann report: the layers' recall samples differ (same N, k and "
                             "seed are needed to compare them)")
    if isinstance(error_tolerance, bool) or not isinstance(error_tolerance, (int, float)) \
            or not error_tolerance > 0:
        raise InputError(f"error_tolerance: expected a number > 0, got {error_tolerance!r}")
    cap = min(r0.n, MAX_ERROR_SAMPLE if max_sample is None
              else check_positive_int(max_sample, "max_sample"))
    x_layers = list(range(len(x_reports))) if x_layers is None else list(x_layers)
    y_layers = list(range(len(y_reports))) if y_layers is None else list(y_layers)
    names = ["mutual_knn"] + ([metric] if metric in ("lcs_knn", "edit_distance_knn") else [])
    nx = len(x_reports)
    initial = max(int(r.sample.numel()) for r in reps)

    def measure():
        lists = _common_sample(reps)
        ax = [a for a, _ in lists[:nx]]
        ex = [e for _, e in lists[:nx]]
        ay = [a for a, _ in lists[nx:]]
        ey = [e for _, e in lists[nx:]]
        out = {}
        for name in names:
            kind = _KNN_RAW[name]
            shape = (len(ax), len(ay))
            approx = torch.empty(shape, dtype=torch.float64)
            exact = torch.empty(shape, dtype=torch.float64)
            se = torch.empty(shape, dtype=torch.float64)
            for p in range(shape[0]):
                for q in range(shape[1]):
                    # row values on the sample rows (the lists hold indices of all N rows,
                    # which the native kernels would reject as out of range for S rows)
                    va = _from_raw(name, row_values_torch(kind, ax[p], ay[q]).double(),
                                   r0.k, normalize_lcs)
                    ve = _from_raw(name, row_values_torch(kind, ex[p], ey[q]).double(),
                                   r0.k, normalize_lcs)
                    approx[p, q], exact[p, q] = va.mean(), ve.mean()
                    se[p, q] = mean_ci(va - ve, r0.n)[1]
            diff = approx - exact
            half = _Z95 * se
            low, high = diff - half, diff + half
            resolved = ((half <= error_tolerance) | (low > error_tolerance)
                        | (high < -error_tolerance))
            err = diff.abs()
            bound = torch.maximum(low.abs(), high.abs())
            out[name] = {"approx": approx.tolist(), "exact": exact.tolist(),
                         "error": err.tolist(), "error_max": float(err.max()),
                         "error_se": se.tolist(),
                         "error_ci": torch.stack([low, high], dim=-1).tolist(),
                         "error_bound": bound.tolist(), "error_bound_max": float(bound.max()),
                         "resolved": resolved.tolist(), "resolved_all": bool(resolved.all()),
                         "biased": ((low > 0) | (high < 0)).tolist()}
        return out, int(lists[0][0].shape[0])

    out_metrics, size = measure()
    while (not all(m["resolved_all"] for m in out_metrics.values()) and size < cap
           and all(r.can_grow for r in reps)):
        grown = min(cap, 2 * size)
        for r in reps:
            r.grow(grown)
        out_metrics, size = measure()

    def layer(r, label):
        return {"layer": label, **{a: v for a, v in r.to_dict().items()
                                   if a not in ("backend", "params")}}

    resolved = all(m["resolved_all"] for m in out_metrics.values())
    rep = {"backend": r0.backend, "params": r0.params, "k": r0.k, "sample_size": size,
           "sample_initial": initial, "sample_max": cap, "error_tolerance": error_tolerance,
           "x_layers": [layer(r, i) for r, i in zip(x_reports, x_layers)],
           "y_layers": [layer(r, j) for r, j in zip(y_reports, y_layers)],
           "recall_min": min(r.recall for r in reps), "resolved": resolved,
           "metrics": out_metrics}
    if log:
        from prh_fast._log import logger

        m = out_metrics["mutual_knn"]
        n_un = sum(not v for row in m["resolved"] for v in row)
        logger.warning("prh_fast: %s approximate lists, %d x %d layer pairs, on %d sampled "
                       "rows: recall@%d >= %.4f, max |mutual_knn(approx) - mutual_knn(exact)| "
                       "= %.4f (95%% bound %.4f; %s)", r0.backend, len(x_reports),
                       len(y_reports), size, r0.k, rep["recall_min"], m["error_max"],
                       m["error_bound_max"],
                       "every error resolved" if n_un == 0 else
                       f"{n_un} pair(s) not resolved to ±{error_tolerance:g}")
    return rep


#: The best-score null statistics a grid keeps per model pair (``AlignmentResult.null``'s
#: ``best_*`` entries): the null mean and standard deviation, the central 95% band of the null's
#: best score, the permutation p-value, and the z-score (kept for comparison; p is the test).
NULL_FIELDS = ("best_mean", "best_std", "best_low", "best_high", "best_p", "best_z")


def permutation_p(observed, draws) -> torch.Tensor | float:
    """The permutation p-value ``(b + 1) / (P + 1)``, ``b`` the draws at least as large as
    ``observed`` (``draws``: ``[P, ...]``, ``observed`` broadcast against one draw). It is never
    0: with ``P`` shuffles the smallest p-value is ``1 / (P + 1)``.

    Example:
        >>> import torch
        >>> permutation_p(0.9, torch.tensor([0.1, 0.95, 0.3, 0.2]))
        0.4
    """
    P = draws.shape[0]
    b = (draws >= torch.as_tensor(observed, dtype=draws.dtype)).sum(0)
    p = (b.to(torch.float64) + 1.0) / (P + 1.0)
    return float(p) if p.dim() == 0 else p


def _null_stats(scorer, scores, best, n, P, seed, device):
    """Scores of ``P`` random pairings (Y's rows shuffled; the same permutations for every
    layer pair): per pair the null mean, std, p-value and z; and for the best score the
    maximum over pairs under each shuffle, compared with the observed best (a max-statistic
    test: its p-value accounts for choosing the best of ``Lx x Ly`` pairs)."""
    g = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(n, generator=g).to(device) for _ in range(P)]
    many = getattr(scorer, "many", None)
    if many is not None:  # scorers that score a group of permutations in one pass
        draws = [d for g0 in range(0, P, 32) for d in many(perms[g0:g0 + 32])]
    else:
        draws = [scorer(perm) for perm in perms]
    d = torch.stack(draws).to(torch.float64)  # [P, Lx, Ly]
    mean = d.mean(0)
    std = d.std(0, unbiased=True) if P > 1 else torch.zeros_like(mean)
    maxes = d.flatten(1).max(1).values
    bmean = float(maxes.mean())
    bstd = float(maxes.std(unbiased=True)) if P > 1 else 0.0
    lo, hi = (float(v) for v in torch.quantile(maxes, torch.tensor([0.025, 0.975],
                                                                   dtype=torch.float64)))
    with torch.no_grad():
        z = (scores.to(torch.float64) - mean) / std
    return {"permutations": P, "seed": int(seed), "mean": mean, "std": std, "z": z,
            "p": permutation_p(scores.to(torch.float64), d),
            "best_mean": bmean, "best_std": bstd, "best_low": lo, "best_high": hi,
            "best_p": permutation_p(best, maxes),
            "best_z": (best - bmean) / bstd if bstd > 0 else float("nan")}


def _no_extra(metric, extra):
    if extra:
        raise InputError(f"{metric}: unexpected keyword argument(s) {sorted(extra)}")


@with_threads
def compute_score(x_feats: Layers, y_feats: Layers, metric: str = "mutual_knn", topk: int = 10,
                  normalize: bool = True) -> tuple[float, tuple[int, int] | None]:
    """The reference's ``compute_score``: ``(best_score, (i, j))`` over all layer pairs.

    ``topk`` is passed to exactly the metrics whose name contains "knn" (cknna included), as
    the reference does; all-non-positive scores give ``(0, None)``.

    Args:
        x_feats, y_feats: as in :func:`align`.
        metric: one of ``SUPPORTED_METRICS``.
        topk: neighbours for the "knn" metrics.
        normalize: L2-normalise each layer's rows first.

    Returns:
        ``(best_score, (i, j))``, or ``(0, None)`` when no score is positive.

    Raises:
        InputError: as :func:`align`.

    Example:
        >>> import torch
        >>> import prh_fast
        >>> X = torch.randn(40, 3, 8, generator=torch.Generator().manual_seed(0))
        >>> prh_fast.compute_score(X, X[:, 1:], "mutual_knn", topk=5)
        (1.0, (1, 0))
    """
    res = align(x_feats, y_feats, metric=metric, topk=topk, normalize=normalize)
    return res.best_score, res.best_pair
