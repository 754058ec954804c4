"""Linear CKA, unbiased CKA and SVCCA of every layer pair of two models in one pass over row
chunks (docs/metrics.md, "Kernel metrics": at scale, from D x D products).

For each layer ``x`` (rows ``x_i``, shifted by a fixed vector ``c``: ``x'_i = x_i - c``, see
below) and each layer pair ``(x, y)`` the pass accumulates, in float64:

- per layer: ``s = Σ x'_i``, ``G = Σ x'_i x'_iᵀ``, and for the unbiased estimator
  ``Σ a_i``, ``Σ a_i²``, ``Σ a_i x'_i`` with ``a_i = ||x'_i||²``;
- per pair: ``C = Σ x'_i y'_iᵀ``, and for the unbiased estimator ``Σ a_i b_i``,
  ``Σ a_i y'_i``, ``Σ b_i x'_i`` (``b_i = ||y'_i||²``).

With ``μ = s/N`` the centred products are ``G̃ = G - s sᵀ/N`` and ``C̃ = C - s_x s_yᵀ/N``:

- biased HSIC (feature space): ``hsic(K, L) = ||C̃||_F²``, ``hsic(K, K) = ||G̃_x||_F²``.
- unbiased HSIC, as ``prh_fast.metrics._kernel.cka_scores`` (centred features,
  ``k_i = ||x̃_i||²``, ``Σ K̃ = -Σ k_i``, ``K̃1 = -k``): it needs ``Σ k_i = Σ a_i - N·|μ|²`` and
  ``Σ k_i l_i``, which expands (``k_i = a_i - 2 x'_i·μ + |μ|²``) into the accumulated sums:
  ``Σ a b - 2 (Σ a y')·ν - 2 (Σ b x')·μ + 4 μᵀ C ν + |ν|² Σ a + |μ|² Σ b - 3 N |μ|² |ν|²``.
- SVCCA, as ``prh_fast.metrics._svcca``: column std ``σ = sqrt(diag(G̃)/(N-1))``, standardised
  Grams ``W G̃ W`` and ``W_x C̃ W_y`` (``W = diag(1/(σ + 1e-8))``), top eigenpairs, the singular
  values of ``Λ_x^{-1/2} V_xᵀ (W_x C̃ W_y) V_y Λ_y^{-1/2}``.

The shift ``c`` is the mean of the first row chunk. All three statistics are invariant to it in
exact arithmetic; it keeps ``G - s sᵀ/N`` from cancelling when the features share a large
common offset (typical of network activations), so float64 accumulation stays within ~1e-12
of the two-pass value. Results equal the in-memory metrics on the same (float64) features to
1e-9 relative; on float32 features they are the float64 evaluation of the stored values (the
in-memory metrics multiply in float32, so they agree to ~1e-6 there).

Memory: ``Σ D_x² + Σ D_y² + Σ_pairs D_x·D_y`` float64 accumulators plus one row chunk. When the
pair accumulators do not fit ``memory_budget``, the layer pairs are split into groups, one pass
per group.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from prh_fast.errors import InputError
from prh_fast.metrics._kernel import cka_ratio, hsic_from_sums
from prh_fast.metrics._svcca import _top_eig

__all__ = ["TensorSource", "kernel_scores", "KERNEL_METRICS"]

#: Metrics this module computes (linear kernel only: an RBF kernel has no feature-space form).
KERNEL_METRICS = ("cka", "unbiased_cka", "svcca")

_F64 = torch.float64


class TensorSource:
    """In-memory prepared layers with the row-source interface of ``StreamPrep``.

    The interface is ``n``, ``dims``, ``name`` and ``rows(l, a, b)``, so a store can be paired
    with a model already in memory.

    Args:
        layers: Per-layer ``[N, D_l]`` tensors, already prepared.
        name: How errors name this source.

    Example:
        >>> import torch
        >>> from prh_fast.store._moments import TensorSource
        >>> src = TensorSource([torch.zeros(5, 3), torch.zeros(5, 4)], name="x")
        >>> src.n, src.dims, tuple(src.rows(1, 0, 2).shape)
        (5, [3, 4], (2, 4))
    """

    def __init__(self, layers: Sequence[torch.Tensor], name: str = "features") -> None:
        self.layers = list(layers)
        self.name = name
        self.n = int(self.layers[0].shape[0])
        self.dims = [int(x.shape[1]) for x in self.layers]

    def rows(self, l: int, a: int, b: int) -> torch.Tensor:
        return self.layers[l][a:b]


class _Side:
    """Accumulators of one layer."""

    def __init__(self, d: int, unbiased: bool, device):
        self.c = None
        self.s = torch.zeros(d, dtype=_F64, device=device)
        self.G = torch.zeros((d, d), dtype=_F64, device=device)
        self.unbiased = unbiased
        if unbiased:
            self.sa = torch.zeros((), dtype=_F64, device=device)
            self.saa = torch.zeros((), dtype=_F64, device=device)
            self.sax = torch.zeros(d, dtype=_F64, device=device)
        self.done = False

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(_F64)
        if self.c is None:
            self.c = x.mean(0)
        return x - self.c

    def add(self, x: torch.Tensor, a: torch.Tensor | None):
        self.s += x.sum(0)
        self.G.addmm_(x.T, x)
        if self.unbiased:
            self.sa += a.sum()
            self.saa += a @ a
            self.sax += a @ x


class _Pair:
    def __init__(self, dx: int, dy: int, unbiased: bool, device):
        self.C = torch.zeros((dx, dy), dtype=_F64, device=device)
        self.unbiased = unbiased
        if unbiased:
            self.sab = torch.zeros((), dtype=_F64, device=device)
            self.say = torch.zeros(dy, dtype=_F64, device=device)
            self.sbx = torch.zeros(dx, dtype=_F64, device=device)

    def add(self, x, y, a, b):
        self.C.addmm_(x.T, y)
        if self.unbiased:
            self.sab += a @ b
            self.say += a @ y
            self.sbx += b @ x


def _plan(dx, dy, budget, chunk_bytes, what):
    """Groups ``[(x layers, y layers)]`` whose accumulators fit ``budget - chunk_bytes``."""
    room = (budget - chunk_bytes) // 8  # float64 values
    side = sum(d * d + 3 * d for d in dx) + sum(d * d + 3 * d for d in dy)
    pairs = sum(a * b + a + b for a in dx for b in dy)
    if side + pairs <= room:
        return [(list(range(len(dx))), list(range(len(dy))))]
    # y groups such that the largest x layer fits against a group, then x groups per y group
    big = max(dx)
    ygroups, cur, used = [], [], 0
    for j, b in enumerate(dy):
        cost = big * b + big + b + b * b + 3 * b
        if cur and used + cost + big * big + 3 * big > room:
            ygroups.append(cur)
            cur, used = [], 0
        cur.append(j)
        used += cost
    ygroups.append(cur)
    out = []
    for yg in ygroups:
        ysum = sum(dy[j] for j in yg)
        ycost = sum(dy[j] * dy[j] + 3 * dy[j] for j in yg)
        cur, used = [], ycost
        for i, a in enumerate(dx):
            cost = a * ysum + a * len(yg) + ysum + a * a + 3 * a
            if cur and used + cost > room:
                out.append((cur, yg))
                cur, used = [], ycost
            cur.append(i)
            used += cost
        out.append((cur, yg))
    small = min(dx) * min(dy) + min(dx) ** 2 + min(dy) ** 2 + 3 * (min(dx) + min(dy))
    if small > room:
        raise InputError(f"memory_budget: {budget} bytes cannot hold the accumulators of one "
                         f"layer pair of {what} (~{8 * small + chunk_bytes} bytes needed)")
    return out


def kernel_scores(x_src: Any, y_src: Any, metric: str, *, unbiased: bool | None = None,
                  cca_dim: int = 10, memory_budget: int | None = None,
                  progress: bool = False, device: str | torch.device | None = None,
                  ) -> torch.Tensor:
    """``[Lx, Ly]`` float64 scores of ``metric`` between every layer of two row sources.

    Args:
        x_src: Prepared row source: ``StreamPrep`` (a store, clipped and normalised chunk by
            chunk) or :class:`TensorSource` (layers in memory).
        y_src: The other model's row source, with the same ``n``.
        metric: ``"cka"`` (``unbiased=True`` for the unbiased estimator), ``"unbiased_cka"`` or
            ``"svcca"`` (``cca_dim`` components).
        unbiased: For ``"cka"``: use the unbiased HSIC estimator.
        cca_dim: Number of SVCCA components.
        memory_budget: Bytes for accumulators and one row chunk (default
            ``DEFAULT_STREAM_BUDGET``); layer pairs are grouped into passes to fit.
        progress: A tqdm bar over rows (rate, ETA).
        device: Where the float64 accumulation runs (default: CPU).

    Returns:
        ``[Lx, Ly]`` float64 tensor.

    Raises:
        ValueError: An unknown metric, different ``n``, too few samples, a bad ``cca_dim``,
            or a ``memory_budget`` too small for one layer pair.

    Example:
        >>> import torch
        >>> from prh_fast.store import kernel_scores
        >>> from prh_fast.store._moments import TensorSource
        >>> g = torch.Generator().manual_seed(0)
        >>> x = TensorSource([torch.randn(200, 8, generator=g) for _ in range(2)])
        >>> scores = kernel_scores(x, x, "cka")
        >>> tuple(scores.shape), round(float(scores[0, 0]), 6), bool(scores[0, 1] < 0.5)
        ((2, 2), 1.0, True)
    """
    from prh_fast._validate import check_memory_budget, check_positive_int
    from prh_fast.store._stream import DEFAULT_STREAM_BUDGET, _bar, _prefetched

    if metric not in KERNEL_METRICS:
        raise InputError(f"metric: the one-pass kernel statistics compute {KERNEL_METRICS}, got "
                         f"{metric!r}")
    unbiased = metric == "unbiased_cka" or (metric == "cka" and bool(unbiased))
    n = x_src.n
    if y_src.n != n:
        raise InputError(f"{y_src.name}: has N = {y_src.n} samples, but {x_src.name} has "
                         f"N = {n}")
    if metric != "svcca" and n < (4 if unbiased else 2):
        raise InputError(f"{'unbiased HSIC' if unbiased else 'cka'} needs N >= "
                         f"{4 if unbiased else 2} samples, got N = {n}")
    dx, dy = list(x_src.dims), list(y_src.dims)
    r = None
    if metric == "svcca":
        r = check_positive_int(cca_dim, "cca_dim", minimum=1,
                               maximum=max(1, min([n - 1] + dx + dy)))
    budget = check_memory_budget(memory_budget, DEFAULT_STREAM_BUDGET)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    # one row chunk: prepared rows of every layer (raw read + compute dtype + float64 shifted
    # copy + row norms) of both sides
    per_row = 24 * (sum(dx) + sum(dy)) + 16
    chunk = max(1, min(n, (budget // 4) // per_row))
    if budget // 4 < per_row:
        raise InputError(f"memory_budget: {budget} bytes cannot hold one row of both models "
                         f"(~{4 * per_row} bytes needed)")
    groups = _plan(dx, dy, budget, chunk * per_row, f"{x_src.name} / {y_src.name}")
    sx = [_Side(d, unbiased, dev) for d in dx]
    sy = [_Side(d, unbiased, dev) for d in dy]
    pairs = {}
    bar = _bar(n * len(groups), f"{metric} {x_src.name} vs {y_src.name}", "row", progress)
    try:
        for xg, yg in groups:
            gp = {(i, j): _Pair(dx[i], dy[j], unbiased, dev) for i in xg for j in yg}

            def read(a, xg=xg, yg=yg):
                b = min(n, a + chunk)
                return ([x_src.rows(i, a, b) for i in xg], [y_src.rows(j, a, b) for j in yg])

            for a, (xr, yr) in _prefetched(read, range(0, n, chunk)):
                xs, na = _shift_chunk(sx, xg, xr, dev, unbiased)
                ys, nb = _shift_chunk(sy, yg, yr, dev, unbiased)
                for u, i in enumerate(xg):
                    for v, j in enumerate(yg):
                        gp[(i, j)].add(xs[u], ys[v], na[u], nb[v])
                bar.update(min(n, a + chunk) - a)
            for i in xg:
                sx[i].done = True
            for j in yg:
                sy[j].done = True
            pairs.update(gp)
    finally:
        bar.close()
    # float64 sums of squares of the features: finite unless the features are ~1e150 or more
    bad = [f"x layer {i}" for i, t in enumerate(sx) if not bool(torch.isfinite(t.G).all())] + \
          [f"y layer {j}" for j, t in enumerate(sy) if not bool(torch.isfinite(t.G).all())]
    if bad:
        raise InputError(f"{x_src.name} / {y_src.name}: the float64 sums of {', '.join(bad)} "
                         f"overflow (features too large to square); normalise the rows")
    out = torch.empty((len(dx), len(dy)), dtype=_F64)
    if metric == "svcca":
        ex = [_svcca_basis(s, n, r, f"x layer {i} ({x_src.name})") for i, s in enumerate(sx)]
        ey = [_svcca_basis(s, n, r, f"y layer {j} ({y_src.name})") for j, s in enumerate(sy)]
        for (i, j), p in pairs.items():
            Cc = p.C - torch.outer(sx[i].s, sy[j].s) / n
            M = ex[i][0].T @ (Cc * ex[i][1][:, None] * ey[j][1][None, :]) @ ey[j][0]
            out[i, j] = float(torch.linalg.svdvals(M).clamp(0.0, 1.0).mean())
        return out
    hx = [_self_hsic(s, n, unbiased) for s in sx]
    hy = [_self_hsic(s, n, unbiased) for s in sy]
    for (i, j), p in pairs.items():
        out[i, j] = cka_ratio(_pair_hsic(sx[i], sy[j], p, n, unbiased), hx[i], hy[j])
    return out


def _centred_gram(s: _Side, n: int) -> torch.Tensor:
    return s.G - torch.outer(s.s, s.s) / n


def _sum_k(s: _Side, n: int):
    """``(μ, |μ|², Σ k_i)`` with ``k_i = ||x̃_i||²``."""
    mu = s.s / n
    m = float(mu @ mu)
    return mu, m, float(s.sa) - n * m


def _self_hsic(s: _Side, n: int, unbiased: bool) -> float:
    Gc = _centred_gram(s, n)
    fro = float((Gc * Gc).sum())
    if not unbiased:
        return fro
    mu, m, sk = _sum_k(s, n)
    skk = (float(s.saa) - 4.0 * float(s.sax @ mu) + 4.0 * float(mu @ s.G @ mu)
           + 2.0 * m * float(s.sa) - 3.0 * n * m * m)
    return hsic_from_sums(n, fro - skk, -sk, -sk, skk, unbiased=True)


def _pair_hsic(sx: _Side, sy: _Side, p: _Pair, n: int, unbiased: bool) -> float:
    Cc = p.C - torch.outer(sx.s, sy.s) / n
    fro = float((Cc * Cc).sum())
    if not unbiased:
        return fro
    mu, m, skx = _sum_k(sx, n)
    nu, e, sky = _sum_k(sy, n)
    skl = (float(p.sab) - 2.0 * float(p.say @ nu) - 2.0 * float(p.sbx @ mu)
           + 4.0 * float(mu @ p.C @ nu) + e * float(sx.sa) + m * float(sy.sa) - 3.0 * n * m * e)
    return hsic_from_sums(n, fro - skl, -skx, -sky, skl, unbiased=True)


def _svcca_basis(s: _Side, n: int, r: int, name: str):
    """``(V Λ^{-1/2} [D, r], w [D])``: the top-``r`` eigenbasis of the standardised Gram and
    the column weights ``1 / (σ + 1e-8)``."""
    Gc = _centred_gram(s, n)
    std = (torch.diagonal(Gc).clamp_min(0.0) / (n - 1)).sqrt()
    w = 1.0 / (std + 1e-8)
    lam, V = _top_eig(Gc * w[:, None] * w[None, :], r, name)
    return V / lam.sqrt(), w


def _shift_chunk(stats, layers, rows, dev, unbiased: bool):
    """One chunk of each layer, shifted, with its squared row norms (unbiased CKA); adds it to
    the layer's own accumulator on the first pass over that layer."""
    ts, norms = [], []
    for i, t in zip(layers, rows):
        t = stats[i].shifted(t.to(dev))
        sq = (t * t).sum(1) if unbiased else None
        if not stats[i].done:
            stats[i].add(t, sq)
        ts.append(t)
        norms.append(sq)
    return ts, norms
