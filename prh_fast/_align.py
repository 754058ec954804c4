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

import torch

from prh_fast._validate import (as_features, as_tensor, check_memory_budget,
                                check_positive_float, check_positive_int, check_topk,
                                compute_dtype)
from prh_fast.knn import DEFAULT_MEMORY_BUDGET, knn
from prh_fast.metrics import SUPPORTED_METRICS
from prh_fast.metrics._cknna import (cknna_excludes_self, cknna_lists, cknna_terms,
                                     cknna_values)
from prh_fast.metrics._kernel import (CKA_EPS, centred, cka_eps, cka_ratio, hsic_from_sums,
                                      rbf_gamma, rbf_rows)
from prh_fast.metrics._neighbours import neighbour_scores, row_values_torch
from prh_fast.metrics._svcca import _standardised, _top_eig
from prh_fast.prepare import normalize_rows

__all__ = ["align", "compute_score", "AlignmentResult", "best_pair", "as_layers",
           "ann_pair_report"]

_KNN_RAW = {"mutual_knn": "mutual", "cycle_knn": "cycle", "lcs_knn": "lcs",
            "edit_distance_knn": "edit"}


@dataclass
class AlignmentResult:
    """Scores of every layer pair of two models for one metric.

    ``scores[i, j]`` is the metric between layer ``i`` of X and layer ``j`` of Y (index
    ``-1``, when ``concat=True``, is all layers concatenated and sits in row/column 0).
    """

    metric: str
    scores: torch.Tensor
    best_score: float
    best_pair: tuple | None
    x_layers: list
    y_layers: list
    topk: int | None = None
    timings: dict = field(default_factory=dict)
    #: With ``null_permutations=P``: ``mean``, ``std``, ``z`` (``[Lx, Ly]`` tensors),
    #: ``best_mean``, ``best_std``, ``best_z`` (the maximum over pairs under each shuffle).
    null: dict | None = None
    #: With an approximate neighbour search: ``ann_pair_report``'s dict (recall of every
    #: layer, and per layer pair the metric from approximate vs exact lists on the sample).
    ann_report: dict | None = None

    def to_dict(self) -> dict:
        d = {"metric": self.metric, "topk": self.topk, "scores": self.scores.tolist(),
             "best_score": self.best_score, "best_pair": self.best_pair,
             "x_layers": self.x_layers, "y_layers": self.y_layers, "timings": self.timings}
        if self.ann_report is not None:
            d["ann_report"] = self.ann_report
        if self.null is not None:
            d["null"] = {a: (v.tolist() if isinstance(v, torch.Tensor) else v)
                         for a, v in self.null.items()}
        return d


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


def as_layers(feats, name: str) -> list:
    """``[N, L, D]`` tensor/array or a list of ``[N, D_l]`` -> list of 2-D tensors (views)."""
    if isinstance(feats, (list, tuple)):
        if not feats:
            raise ValueError(f"{name}: expected at least one layer, got an empty list")
        layers = [as_features(f, f"{name}[{i}]") for i, f in enumerate(feats)]
    else:
        import numpy as np

        if not isinstance(feats, (torch.Tensor, np.ndarray)):
            raise ValueError(f"{name}: expected a [N, L, D] tensor or a list of [N, D] "
                             f"tensors, got {type(feats).__name__}")
        t = as_tensor(feats, name)
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a [N, L, D] tensor or a list of [N, D] "
                             f"tensors, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")
        layers = [as_features(t[:, i, :], f"{name}[:, {i}]") for i in range(t.shape[1])]
        if not layers:
            raise ValueError(f"{name}: has no layers (shape {tuple(t.shape)})")
    n = layers[0].shape[0]
    for i, x in enumerate(layers):
        if x.shape[0] != n:
            raise ValueError(f"{name}[{i}] has {x.shape[0]} samples, {name}[0] has {n}")
    return layers


def _prepare_side(layers, normalize, concat):
    out = list(layers)
    if concat:
        out = [torch.cat([x.reshape(x.shape[0], -1) for x in layers], dim=1)] + out
    if normalize:
        out = [normalize_rows(x.to(compute_dtype(x))) for x in out]
    return out


# --------------------------------------------------------------------------------------------
# per-metric grid scorers: each takes the two lists of prepared layers and returns [Lx, Ly]


def _relabel(lists: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Neighbour lists of the samples reordered by ``perm`` (``Y'[i] = Y[perm[i]]``):
    ``knn(Y')[i] = perm⁻¹[knn(Y)[perm[i]]]`` — O(N·k), no new search."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv[lists[..., perm, :]]


def _knn_side(xs, topk, backend, reports=None):
    """One side's neighbour lists, ``[L, N, k]``: one search per layer. ``reports``: a list
    that receives each layer's ``AnnReport`` (``None`` for an exact search)."""
    out = []
    for x in xs:
        idx, rep = knn(x, topk, backend=backend, return_report=True)
        out.append(idx)
        if reports is not None:
            reports.append(rep)
    return torch.stack(out)


def _from_raw(metric, raw, topk, normalize_lcs=False):
    """A neighbour metric's value from ``neighbour_scores``' raw per-row mean."""
    if metric == "mutual_knn":
        return raw / topk
    if metric == "edit_distance_knn":
        return 1.0 - raw / topk
    if metric == "lcs_knn" and normalize_lcs:
        return raw / topk
    return raw


def _grid_knn(metric, xs, ys, topk, backend, timings, x_cache=None, y_cache=None, ann=None,
              **kw):
    # x_cache / y_cache: lists from _knn_side computed earlier (model grids reuse them).
    # ann: a dict that receives both sides' search reports ("x", "y").
    ann = {} if ann is None else ann
    t0 = time.perf_counter()
    ka = _knn_side(xs, topk, backend, ann.setdefault("x", [])) if x_cache is None else x_cache
    kb = _knn_side(ys, topk, backend, ann.setdefault("y", [])) if y_cache is None else y_cache
    timings["knn"] = time.perf_counter() - t0

    def score(perm=None):
        raw = neighbour_scores(_KNN_RAW[metric], ka, kb if perm is None else _relabel(kb, perm))
        return _from_raw(metric, raw, topk, kw.get("normalize_lcs"))

    return score


def _cknna_sim(n, p, q, unbiased):
    t, sp, sq, pq, qp = cknna_terms(p[0], p[1], q[0], q[1])
    return hsic_from_sums(n, t, sp, sq, pq, unbiased=unbiased, dot_rows_t=qp)


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
        if reports is not None:
            reports.append(rep)
        return i, cknna_values(i, s, unbiased, distance_agnostic)

    la = [lists(x) for x in xs]
    return la, [_cknna_sim(n, p, p, unbiased) for p in la]


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

    def sim(p, q):
        return _cknna_sim(n, p, q, unbiased)

    def score(perm=None):
        out = torch.empty((len(xs), len(ys)), dtype=torch.float64)
        for j, q in enumerate(lb):
            if perm is not None:
                q = (_relabel(q[0], perm), q[1][perm])
            for i, p in enumerate(la):
                out[i, j] = cka_ratio(sim(p, q), self_a[i], self_b[j])
        return out

    return score


def _kernel_block(x, sq, r0, r1, kernel, gamma, zero_diag):
    """Rows ``r0:r1`` of one layer's kernel: ip (features pre-centred and scaled) or RBF
    (``prh_fast.metrics._kernel.rbf_rows``, ``gamma`` for the scaled features)."""
    rows = torch.arange(r1 - r0, device=x.device)
    if kernel == "rbf":
        g = rbf_rows(x[r0:r1], x, sq[r0:r1], sq, r0, gamma).to(x.dtype)
    else:
        g = x[r0:r1] @ x.T
    if zero_diag:
        g[rows, rows + r0] = 0.0
    return g


def _grid_cka_gram(xs, ys, ex, ey, kernel, sigma, unbiased, budget):
    """All pair sums from streamed kernel row blocks; O((Lx+Ly)·block·N) memory. ``ex``,
    ``ey``: each layer's power-of-two scale (``centred``)."""
    n = xs[0].shape[0]
    gx = [rbf_gamma(sigma, e) for e in ex] if kernel == "rbf" else [None] * len(xs)
    gy = [rbf_gamma(sigma, e) for e in ey] if kernel == "rbf" else [None] * len(ys)
    sqx = [(x * x).sum(1) for x in xs]
    sqy = [(y * y).sum(1) for y in ys]
    lx, ly = len(xs), len(ys)
    item = 8 if kernel == "rbf" else xs[0].element_size()  # RBF rows are formed in float64
    rows = max(1, min(n, budget // (max(1, (lx + ly) * n) * item * 2)))
    S = torch.zeros((lx, ly), dtype=torch.float64)
    sxx = torch.zeros(lx, dtype=torch.float64)
    syy = torch.zeros(ly, dtype=torch.float64)
    rx = torch.empty((lx, n), dtype=torch.float64)
    ry = torch.empty((ly, n), dtype=torch.float64)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        X = torch.stack([_kernel_block(x, s, r0, r1, kernel, g, unbiased)
                         for x, s, g in zip(xs, sqx, gx)]).reshape(lx, -1)
        Y = torch.stack([_kernel_block(y, s, r0, r1, kernel, g, unbiased)
                         for y, s, g in zip(ys, sqy, gy)]).reshape(ly, -1)
        S += (X @ Y.T).double().cpu()
        sxx += (X.double() ** 2).sum(1).cpu()
        syy += (Y.double() ** 2).sum(1).cpu()
        rx[:, r0:r1] = X.view(lx, r1 - r0, n).double().sum(2).cpu()
        ry[:, r0:r1] = Y.view(ly, r1 - r0, n).double().sum(2).cpu()
        del X, Y
    tx, ty = rx.sum(1), ry.sum(1)

    def h(s, ra, rb, ta, tb):
        return hsic_from_sums(n, float(s), float(ta), float(tb), float(ra @ rb),
                              unbiased=unbiased)

    hx = [h(sxx[i], rx[i], rx[i], tx[i], tx[i]) for i in range(lx)]
    hy = [h(syy[j], ry[j], ry[j], ty[j], ty[j]) for j in range(ly)]
    out = torch.empty((lx, ly), dtype=torch.float64)
    for i in range(lx):
        for j in range(ly):
            # linear kernels of scaled features: the CKA constant scales with them
            eps = cka_eps(2 * ex[i], 2 * ey[j]) if kernel == "ip" else CKA_EPS
            out[i, j] = cka_ratio(h(S[i, j], rx[i], ry[j], tx[i], ty[j]), hx[i], hy[j], eps)
    return out


def _grid_cka_features(xs, ys, ex, ey, unbiased):
    """Linear CKA pair by pair in feature space (cheaper when N >> D)."""
    n = xs[0].shape[0]

    def stats(x):
        x64 = x.double()
        k = (x64 * x64).sum(1)
        s = x64.sum(0)
        r = x64 @ s - k
        return {"x": x, "k": k, "sum": float(s @ s - k.sum()), "r": r}

    def h(cross_fro2, a, b):
        if not unbiased:
            return cross_fro2
        return hsic_from_sums(n, cross_fro2 - float(a["k"] @ b["k"]), a["sum"], b["sum"],
                              float(a["r"] @ b["r"]), unbiased=True)

    sx, sy = [stats(x) for x in xs], [stats(y) for y in ys]
    fro = lambda a, b: float((a["x"].T @ b["x"]).double().pow(2).sum())  # noqa: E731
    hx = [h(fro(a, a), a, a) for a in sx]
    hy = [h(fro(b, b), b, b) for b in sy]
    out = torch.empty((len(xs), len(ys)), dtype=torch.float64)
    for i, a in enumerate(sx):
        for j, b in enumerate(sy):
            out[i, j] = cka_ratio(h(fro(a, b), a, b), hx[i], hy[j], cka_eps(2 * ex[i], 2 * ey[j]))
    return out


def _grid_cka(xs, ys, timings, kernel_metric="ip", rbf_sigma=1.0, unbiased=False,
              memory_budget=None):
    if kernel_metric not in ("ip", "rbf"):
        raise ValueError(f"kernel_metric: expected 'ip' or 'rbf', got {kernel_metric!r}")
    n = xs[0].shape[0]
    if unbiased and n < 4:
        raise ValueError(f"unbiased HSIC needs N >= 4 samples, got N = {n}")
    budget = check_memory_budget(memory_budget, DEFAULT_MEMORY_BUDGET)
    sigma = check_positive_float(rbf_sigma, "rbf_sigma") if kernel_metric == "rbf" else 1.0
    dtype = torch.promote_types(xs[0].dtype, ys[0].dtype)
    # Centre once per layer (both estimators are shift-invariant; RBF distances too), scaled
    # by a power of two so that no product leaves the dtype's range (undone exactly).
    cx, cy = [centred(x, dtype) for x in xs], [centred(y, dtype) for y in ys]
    xs, ex = [c for c, _ in cx], [e for _, e in cx]
    ys, ey = [c for c, _ in cy], [e for _, e in cy]
    dx, dy = [x.shape[1] for x in xs], [y.shape[1] for y in ys]
    gram_cost = n * n * (sum(dx) + sum(dy) + len(xs) * len(ys))
    feat_cost = n * (sum(a * b for a in dx for b in dy) + sum(a * a for a in dx)
                     + sum(b * b for b in dy))
    if kernel_metric == "rbf" or gram_cost <= feat_cost:
        out = _grid_cka_gram(xs, ys, ex, ey, kernel_metric, sigma, bool(unbiased), budget)
        timings["space"] = "gram"
    else:
        out = _grid_cka_features(xs, ys, ex, ey, bool(unbiased))
        timings["space"] = "feature"
    return out


def _grid_svcca(xs, ys, timings, cca_dim=10):
    n = xs[0].shape[0]
    r = check_positive_int(cca_dim, "cca_dim", minimum=1, maximum=max(1, min(
        [n - 1] + [x.shape[1] for x in xs] + [y.shape[1] for y in ys])))

    def basis(x, name):
        xs_ = _standardised(x, x.dtype)
        lam, V = _top_eig((xs_.T @ xs_).double(), r, name)
        return (xs_.double() @ V) / lam.sqrt()  # [N, r] orthonormal, centred columns

    ux = [basis(x, f"x layer {i}") for i, x in enumerate(xs)]
    uy = [basis(y, f"y layer {j}") for j, y in enumerate(ys)]
    out = torch.empty((len(xs), len(ys)), dtype=torch.float64)
    for i, a in enumerate(ux):
        for j, b in enumerate(uy):
            out[i, j] = float(torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0).mean())
    return out


# --------------------------------------------------------------------------------------------

#: ``align`` on paths (store folders, feature files) runs the model grid's path for one pair,
#: ``prh_fast.grid.align_paths``; the grid sits above this module and registers it when it is
#: imported (``import prh_fast`` imports it).
_PATH_RUNNER: list = []


def set_path_runner(fn) -> None:
    """Register the function ``align`` calls for paths (``prh_fast.grid.align_paths``)."""
    _PATH_RUNNER[:] = [fn]


def align(x_feats, y_feats, metric: str = "mutual_knn", topk: int = 10, normalize: bool = True,
          *, concat: bool = False, backend: str | None = None, null_permutations: int = 0,
          seed: int = 0, **metric_kwargs) -> AlignmentResult:
    """Score every layer pair of two models' features with one metric.

    Args:
        x_feats, y_feats: ``[N, L, D]`` tensors (or arrays) or lists of ``[N, D_l]``, paired
            by row; or paths of store folders (streamed, not loaded: see
            ``prh_fast._stream_align``; ``stream=`` / ``stream_budget=`` as in
            ``align_models``) or feature files.
        metric: one of ``SUPPORTED_METRICS``.
        topk: neighbours for the metrics whose name contains "knn" (cknna included).
        normalize: L2-normalise each layer's rows first (the reference's default).
        concat: also score all layers concatenated, as index ``-1`` (the paper's variant).
        backend: neighbour-search backend (see ``prh_fast.knn``).
        null_permutations: ``P > 0`` also scores ``P`` random pairings of the samples (Y's rows
            shuffled) and returns, per pair, the null mean, standard deviation and z-score,
            plus the same for the best score (the maximum over pairs under each shuffle) —
            a maximum over many layer pairs inflates raw scores. For kNN metrics a shuffle only
            relabels the lists (O(N·k) per shuffle, no new search); kernel metrics rescore.
        seed: seed of the shuffles.
        **metric_kwargs: the metric's own options (``kernel_metric``, ``rbf_sigma``,
            ``unbiased``, ``distance_agnostic``, ``cca_dim``, ``memory_budget``).
    """
    if metric not in SUPPORTED_METRICS:
        raise ValueError(f"metric: unknown metric {metric!r}; supported: {SUPPORTED_METRICS}")
    if isinstance(x_feats, (str, os.PathLike)) or isinstance(y_feats, (str, os.PathLike)):
        # store folders (streamed) or feature files: the grid's path for one model pair
        return _PATH_RUNNER[0](x_feats, y_feats, metric, topk, normalize, concat=concat,
                               backend=backend, null_permutations=null_permutations, seed=seed,
                               **metric_kwargs)
    t_all = time.perf_counter()
    lx_raw, ly_raw = as_layers(x_feats, "x_feats"), as_layers(y_feats, "y_feats")
    n = lx_raw[0].shape[0]
    if ly_raw[0].shape[0] != n:
        raise ValueError(f"x_feats and y_feats must have the same number of samples, got "
                         f"{n} and {ly_raw[0].shape[0]}")
    if lx_raw[0].device != ly_raw[0].device:
        raise ValueError("x_feats and y_feats must be on the same device")
    timings: dict = {}
    t0 = time.perf_counter()
    xs, ys = _prepare_side(lx_raw, normalize, concat), _prepare_side(ly_raw, normalize, concat)
    timings["prepare"] = time.perf_counter() - t0
    x_idx = ([-1] if concat else []) + list(range(len(lx_raw)))
    y_idx = ([-1] if concat else []) + list(range(len(ly_raw)))
    k, opts = _metric_options(metric, n, topk, metric_kwargs)
    res = _align_prepared(metric, xs, ys, x_idx, y_idx, k, opts, backend, null_permutations,
                          seed, timings)
    timings["total"] = time.perf_counter() - t_all
    return res


def _metric_options(metric, n, topk, metric_kwargs):
    """Validate ``topk`` and the metric's options: ``(k, opts)``; ``k`` is None for metrics
    that take no ``topk``. ``opts`` is what ``_align_prepared`` and the ``*_side`` caches take."""
    kw = dict(metric_kwargs)
    if metric in _KNN_RAW:
        k = check_topk(topk, n)
        opts = {"normalize_lcs": bool(kw.pop("normalize_lcs", False))}
        _no_extra(metric, kw)
        return k, opts
    if metric == "cknna":
        opts = {"unbiased": bool(kw.pop("unbiased", True)),
                "distance_agnostic": bool(kw.pop("distance_agnostic", False)),
                "exclude_self": kw.pop("exclude_self", None)}
        cknna_excludes_self(opts["unbiased"], opts["exclude_self"])  # a bad value is an error
        _no_extra(metric, kw)
        if opts["unbiased"] and n < 4:
            raise ValueError(f"unbiased HSIC needs N >= 4 samples, got N = {n}")
        return check_topk(n - 1 if topk is None else topk, n, "topk", minimum=2), opts
    if metric in ("cka", "unbiased_cka"):
        if metric == "unbiased_cka":
            kw["unbiased"] = True
        allowed = {"kernel_metric", "rbf_sigma", "unbiased", "memory_budget"}
        _no_extra(metric, {a: v for a, v in kw.items() if a not in allowed})
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
    if metric in _KNN_RAW:
        scorer = _grid_knn(metric, xs, ys, k, backend, timings, x_cache=x_cache,
                           y_cache=y_cache, ann=ann, **opts)
    elif metric == "cknna":
        scorer = _grid_cknna(xs, ys, k, backend, timings, x_cache=x_cache, y_cache=y_cache,
                             ann=ann, **opts)
    elif metric in ("cka", "unbiased_cka"):
        scorer = lambda perm=None: _grid_cka(  # noqa: E731
            xs, _permuted(ys, perm), timings, **opts)
    else:  # svcca
        scorer = lambda perm=None: _grid_svcca(  # noqa: E731
            xs, _permuted(ys, perm), timings, **opts)
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
    return AlignmentResult(metric=metric, scores=scores, best_score=best, best_pair=pair,
                           x_layers=x_idx, y_layers=y_idx,
                           topk=k if "knn" in metric else None, timings=timings, null=null,
                           ann_report=ann_report)


def ann_pair_report(metric, k, x_reports, y_reports, x_layers=None, y_layers=None,
                    normalize_lcs=False, log=False):
    """What approximate neighbour lists did to a grid of layer pairs (``None`` when every
    search was exact).

    ``x_reports`` / ``y_reports``: the ``AnnReport`` of each layer's search. All share the
    sample rows (they depend on ``N`` and the seed only), so for every layer pair the metric
    is computed on those rows twice, from the approximate and from the exact lists:
    ``mutual_knn`` always, and the pipeline's own metric too when it is row-local
    (``lcs_knn``, ``edit_distance_knn``). ``cycle_knn`` follows neighbours of neighbours,
    which the sample's exact lists do not cover, and ``cknna`` needs every row's
    similarities, so for those the report gives ``mutual_knn``'s error as the proxy.

    Returns a JSON-ready dict: ``backend``, ``params``, ``k``, ``sample_size``, per layer
    (``x_layers`` / ``y_layers``) the ``AnnReport`` summary with its ``layer`` label,
    ``recall_min``, and ``metrics``: ``{name: {"approx", "exact", "error" ([Lx][Ly], error
    = |approx - exact|), "error_max"}}``.
    """
    reps = list(x_reports) + list(y_reports)
    if not reps or all(r is None for r in reps):
        return None
    if any(r is None for r in reps) or not x_reports or not y_reports:
        raise ValueError("ann report: every layer of both sides must come from an approximate "
                         "search with the same parameters")
    r0 = reps[0]
    for r in reps[1:]:
        if r.k != r0.k or r.n != r0.n or not torch.equal(r.sample, r0.sample):
            raise ValueError("ann report: the layers' recall samples differ (same N, k and "
                             "seed are needed to compare them)")
    x_layers = list(range(len(x_reports))) if x_layers is None else list(x_layers)
    y_layers = list(range(len(y_reports))) if y_layers is None else list(y_layers)
    names = ["mutual_knn"] + ([metric] if metric in ("lcs_knn", "edit_distance_knn") else [])
    ax = torch.stack([r.approx for r in x_reports])
    ex = torch.stack([r.exact for r in x_reports])
    ay = torch.stack([r.approx for r in y_reports])
    ey = torch.stack([r.exact for r in y_reports])

    def raw(kind, a, b):
        # Row-local values on the sample rows (the lists hold indices of all N rows, which
        # the native kernels would reject as out of range for S rows).
        out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.float64)
        for p in range(a.shape[0]):
            for q in range(b.shape[0]):
                out[p, q] = row_values_torch(kind, a[p], b[q]).double().mean()
        return out

    out_metrics = {}
    for name in names:
        kind = _KNN_RAW[name]
        approx = _from_raw(name, raw(kind, ax, ay), r0.k, normalize_lcs)
        exact = _from_raw(name, raw(kind, ex, ey), r0.k, normalize_lcs)
        err = (approx - exact).abs()
        out_metrics[name] = {"approx": approx.tolist(), "exact": exact.tolist(),
                             "error": err.tolist(), "error_max": float(err.max())}

    def layer(r, label):
        return {"layer": label, **{a: v for a, v in r.to_dict().items()
                                   if a not in ("backend", "params")}}

    rep = {"backend": r0.backend, "params": r0.params, "k": r0.k,
           "sample_size": int(r0.sample.numel()),
           "x_layers": [layer(r, i) for r, i in zip(x_reports, x_layers)],
           "y_layers": [layer(r, j) for r, j in zip(y_reports, y_layers)],
           "recall_min": min(r.recall for r in reps), "metrics": out_metrics}
    if log:
        from prh_fast._backend import logger

        m = out_metrics["mutual_knn"]
        logger.warning("prh_fast: %s approximate lists, %d x %d layer pairs, on %d sampled "
                       "rows: recall@%d >= %.4f, max |mutual_knn(approx) - mutual_knn(exact)| "
                       "= %.4f", r0.backend, len(x_reports), len(y_reports),
                       rep["sample_size"], r0.k, rep["recall_min"], m["error_max"])
    return rep


def _permuted(layers, perm):
    return layers if perm is None else [x[perm] for x in layers]


def _null_stats(scorer, scores, best, n, P, seed, device):
    g = torch.Generator().manual_seed(int(seed))
    draws = []
    for _ in range(P):
        perm = torch.randperm(n, generator=g).to(device)
        draws.append(scorer(perm))
    d = torch.stack(draws)  # [P, Lx, Ly]
    mean = d.mean(0)
    std = d.std(0, unbiased=True) if P > 1 else torch.zeros_like(mean)
    maxes = d.flatten(1).max(1).values
    bmean = float(maxes.mean())
    bstd = float(maxes.std(unbiased=True)) if P > 1 else 0.0
    with torch.no_grad():
        z = (scores - mean) / std
    return {"permutations": P, "seed": int(seed), "mean": mean, "std": std, "z": z,
            "best_mean": bmean, "best_std": bstd,
            "best_z": (best - bmean) / bstd if bstd > 0 else float("nan")}


def _no_extra(metric, extra):
    if extra:
        raise ValueError(f"{metric}: unexpected keyword argument(s) {sorted(extra)}")


def compute_score(x_feats, y_feats, metric: str = "mutual_knn", topk: int = 10,
                  normalize: bool = True):
    """The reference's ``compute_score``: ``(best_score, (i, j))`` over all layer pairs.

    ``topk`` is passed to exactly the metrics whose name contains "knn" (cknna included), as
    the reference does; all-non-positive scores give ``(0, None)``.
    """
    res = align(x_feats, y_feats, metric=metric, topk=topk, normalize=normalize)
    return res.best_score, res.best_pair
