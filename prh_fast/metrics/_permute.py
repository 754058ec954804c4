"""Kernel-metric scores of shuffled pairings, with the per-layer work paid once.

A permutation null scores ``Y' = Y[perm]`` (the rows of every ``y`` layer reordered) against
the unchanged ``x`` layers, many times. Everything that depends on one layer alone is invariant
or permutation-equivariant, so it is computed once:

- **CKA / unbiased CKA.** A kernel of the permuted rows is the permuted kernel,
  ``L' = P L Pᵀ``, and centring commutes with it (``H P L Pᵀ H = P (H L H) Pᵀ``). In the HSIC
  sums of :func:`prh_fast.metrics._kernel.hsic_from_sums` the self terms ``HSIC(K, K)``,
  ``HSIC(L, L)`` and the totals ``1ᵀK1``, ``1ᵀL1`` do not change; only ``Σ_ij K_ij L_p(i)p(j)``
  and ``1ᵀK L' 1 = r_K · r_L[perm]`` (``r`` the row sums) do. With every layer's kernel cached
  (as its packed upper triangle: kernels are symmetric), a permutation costs a gather of the
  kernels of the side with fewer layers and one product ``[Lx, T] x [T, Ly]``,
  ``T = N(N+1)/2``. Permuting the x side by the inverse permutation gives the same sums
  (``Σ K_q(a)q(b) L_ab`` with ``q = perm⁻¹``), so the side with fewer layers is the one
  gathered; the result is always the one for permuting ``Y``.
- **SVCCA.** Each layer's orthonormal basis of its top singular subspace (after
  standardisation) is permutation-equivariant, so the bases are formed once and a permutation
  costs one product of the stacked bases and one batched ``r x r`` SVD per layer pair.

Which CKA path runs (:class:`CkaPermutationScorer`, attribute ``path``):

- ``"gram"``: the kernels of all layers are cached (``(Lx + Ly) · N(N+1)/2`` values, in the
  compute dtype for linear kernels and in float64 for RBF kernels, as the streamed scorer forms
  them, plus ``~2 N²`` int32 indices) when they fit in ``budget`` together with 1024 packed
  columns of the gathered kernels; the gathered kernels are formed a block of packed columns
  at a time within the rest of the budget. While the cache is built, one layer's full ``N x
  N`` kernel and its row-block temporaries are held as well.
- ``"feature"`` (linear kernels only): the centred features and their self terms are cached;
  a permutation costs one ``[D_x, N] x [N, D_y]`` product per pair (cheapest for narrow
  layers, and what runs when the kernels do not fit).
- ``"recompute"``: :func:`prh_fast.metrics._kernel.cka_scores` of the permuted layers (RBF
  kernels that do not fit in the budget, or wherever it costs fewer flops).

The choice is by estimated cost per permutation (the cached kernels' one-time cost spread over
``permutations``), among the paths that fit in memory.
"""
from __future__ import annotations

import torch

from prh_fast.errors import InputError
from prh_fast.metrics._kernel import (
    CKA_EPS,
    _kernel_block,
    _row_sq_norms,
    _sym_fro2,
    centred,
    cka_denominator,
    cka_eps,
    cka_ratio,
    cka_scores,
    hsic_from_sums,
    rbf_gamma,
)
from prh_fast.metrics._svcca import layer_bases

#: A gathered kernel value costs about this many multiply-adds of the product (the gather is
#: bound by memory traffic, the product by arithmetic).
_GATHER_WEIGHT = 8


def _check_perm(perm, n: int, device) -> torch.Tensor | None:
    """``perm`` as an int64 tensor on ``device``, or ``None`` for the identity.

    Raises:
        InputError: ``perm`` is not a permutation of ``range(n)``.
    """
    if perm is None:
        return None
    p = torch.as_tensor(perm)
    if p.ndim != 1 or p.numel() != n or p.dtype.is_floating_point or p.dtype == torch.bool:
        raise InputError(f"perm: expected a permutation of {n} integer indices, got "
                         f"{tuple(p.shape)} {p.dtype}")
    p = p.to(device=device, dtype=torch.int64)
    if not torch.equal(torch.sort(p).values, torch.arange(n, device=device)):
        raise InputError(f"perm: expected a permutation of range({n})")
    return p


def _inverse(p: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), device=p.device)
    return inv


class _PermutationScorer:
    """What both scorers share: ``scorer(perm)`` is ``scorer.many([perm])[0]``."""

    def __call__(self, perm=None) -> torch.Tensor:
        """The ``[Lx, Ly]`` float64 scores with ``y``'s rows in the order ``perm``.

        Args:
            perm: a permutation of ``range(N)`` (tensor or sequence), or ``None`` (identity).

        Returns:
            The ``[Lx, Ly]`` float64 CPU tensor.

        Raises:
            InputError: ``perm`` is not a permutation of ``range(N)``.
        """
        return self.many([perm])[0]


class CkaPermutationScorer(_PermutationScorer):
    """CKA of every layer pair for any pairing of the samples: ``scorer(perm)`` equals
    ``cka_scores(xs, [y[perm] for y in ys], ...)[0]`` up to rounding (see the module
    docstring for the paths). Built by :func:`cka_permutation_scorer`.

    Attributes:
        path: ``"gram"``, ``"feature"`` or ``"recompute"``.

    Example:
        >>> import torch
        >>> x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
        >>> score = cka_permutation_scorer([x], [x], torch.float32, budget=1 << 20)
        >>> round(float(score()[0, 0]), 3)
        1.0
    """

    def __init__(self, xs, ys, dtype, kernel_metric, sigma, unbiased, budget, permutations,
                 path="auto"):
        self._args = (xs, ys, dtype, kernel_metric, sigma, bool(unbiased), budget)
        self.n = n = xs[0].shape[0]
        self.device = xs[0].device
        lx, ly = len(xs), len(ys)
        dx, dy = [x.shape[1] for x in xs], [y.shape[1] for y in ys]
        ip = kernel_metric == "ip"
        item = torch.tensor([], dtype=dtype).element_size() if ip else 8
        tri = n * (n + 1) // 2
        index_bytes = (2 * tri + n * n) * (4 if n * n < 2**31 else 8)
        cache = (lx + ly) * tri * item + index_bytes
        # one packed column of the gathered kernels for one permutation, with its indices
        col = min(lx, ly) * item + 24
        sd = sum(dx) + sum(dy)
        per = max(1, int(permutations))
        costs = {}
        if cache + col * min(tri, 1024) <= budget:
            costs["gram"] = tri * (lx * ly + _GATHER_WEIGHT * min(lx, ly)) + n * n * sd / per
        if ip:
            costs["feature"] = n * sum(dx) * sum(dy)
            costs["recompute"] = min(
                n * n * (sd + lx * ly),
                n * (sum(a * b for a in dx for b in dy) + sum(a * a for a in dx)
                     + sum(b * b for b in dy)))
        else:
            costs["recompute"] = n * n * (sd + lx * ly)
        if path != "auto" and path not in costs:
            raise InputError(f"path: expected 'auto' or one of {sorted(costs)} (what fits "
                             f"these layers, kernel and budget), got {path!r}")
        self.path = min(costs, key=costs.get) if path == "auto" else path
        if self.path == "gram":
            self._spare, self._col = budget - cache, col
            self._setup_gram()
        elif self.path == "feature":
            self._setup_features()

    def many(self, perms) -> torch.Tensor:
        """The scores of several permutations, ``[P, Lx, Ly]`` float64: ``scorer(perm)`` for each
        (the same values), faster on the ``"gram"`` path, where a group of permutations
        shares one pass over the cached kernels.

        Args:
            perms: a sequence of permutations of ``range(N)`` (``None``: the identity).

        Returns:
            The ``[P, Lx, Ly]`` float64 CPU tensor.

        Raises:
            InputError: a permutation is not one of ``range(N)``.
        """
        ps = [_check_perm(p, self.n, self.device) for p in perms]
        if self.path == "gram":
            out = []
            group = max(1, min(16, self._spare // (self._col * min(self._tri, 1 << 16))))
            for g0 in range(0, len(ps), group):
                out.extend(self._score_gram(ps[g0:g0 + group]))
        elif self.path == "feature":
            out = [self._score_features(p) for p in ps]
        else:
            xs, ys, dtype, kernel, sigma, unbiased, budget = self._args
            out = [cka_scores(xs, ys if p is None else [y[p] for y in ys], dtype,
                              kernel_metric=kernel, sigma=sigma, unbiased=unbiased,
                              budget=budget, space="auto")[0] for p in ps]
        if not out:
            return torch.empty((0, len(self._args[0]), len(self._args[1])), dtype=torch.float64)
        return torch.stack(out)

    # -- Gram space -------------------------------------------------------------------------
    #
    # Kernels are symmetric: each is kept as its packed upper triangle (diagonal included,
    # row-major, ``N(N+1)/2`` values). ``Σ_ab K_ab G_ab`` is the packed product with the
    # off-diagonal entries of one side counted twice; that side (the one not gathered) is
    # stored with its off-diagonal entries doubled, which is exact. A permutation ``p`` maps the
    # packed entry ``(a, b)``, ``a <= b``, of the gathered side to its packed entry
    # ``(min, max)(p(a), p(b))``, read from a table of packed positions.

    def _packed(self, layers, scales, doubled):
        """Packed kernels ``[L, N(N+1)/2]`` (zero diagonal for the unbiased estimator;
        off-diagonal entries doubled if ``doubled``), their row sums ``[L, N]``, totals ``[L]``
        and ``Σ K∘K`` ``[L]`` (float64, CPU)."""
        _, _, _, kernel, sigma, unbiased, _ = self._args
        n = self.n
        item = layers[0].dtype if kernel == "ip" else torch.float64
        flat = self._I.long() * n + self._J.long()
        K = torch.empty((len(layers), self._tri), dtype=item, device=self.device)
        rows = torch.empty((len(layers), n), dtype=torch.float64, device=self.device)
        kk = torch.empty(len(layers), dtype=torch.float64)
        step = max(1, min(n, (1 << 22) // max(1, n)))
        full = torch.empty((n, n), dtype=item, device=self.device)
        for i, (x, e) in enumerate(zip(layers, scales)):
            sq = (x * x).sum(1)
            g = rbf_gamma(sigma, e) if kernel == "rbf" else None
            for r0 in range(0, n, step):
                r1 = min(n, r0 + step)
                full[r0:r1] = _kernel_block(x, sq, r0, r1, kernel, g, unbiased)
            k = full.double()  # ``full`` itself when it is float64: read only
            rows[i] = k.sum(1)
            kk[i] = float(torch.dot(k.view(-1), k.view(-1)))
            del k
            if doubled:
                full.mul_(2.0).diagonal().mul_(0.5)  # powers of two: exact
            torch.index_select(full.view(-1), 0, flat, out=K[i])
        return K, rows.cpu(), rows.sum(1).cpu(), kk

    def _setup_gram(self):
        xs, ys, dtype, _, _, _, _ = self._args
        n = self.n
        self._tri = n * (n + 1) // 2
        idx = torch.int32 if n * n < 2**31 else torch.int64
        I, J = torch.triu_indices(n, n, device=self.device)
        self._I, self._J = I.to(idx), J.to(idx)
        del I, J
        a = torch.arange(n, device=self.device)
        start = a * n - a * (a - 1) // 2 - a  # packed position of (a, b) is start[a] + b
        lo = torch.minimum(a[:, None], a[None, :])
        self._table = (start[lo] + torch.maximum(a[:, None], a[None, :])).to(idx).view(-1)
        del lo
        cx, cy = [centred(x, dtype) for x in xs], [centred(y, dtype) for y in ys]
        self._ex, self._ey = [e for _, e in cx], [e for _, e in cy]
        # gather the side with fewer layers; the other is stored with doubled off-diagonals
        self._gather_y = len(ys) <= len(xs)
        KX, self._rx, self._tx, sxx = self._packed(
            [c for c, _ in cx], self._ex, doubled=self._gather_y)
        del cx
        KY, self._ry, self._ty, syy = self._packed(
            [c for c, _ in cy], self._ey, doubled=not self._gather_y)
        del cy
        # F [Lf, T]: the fixed side; M [Lm, T]: the gathered side
        self._F, self._M = (KX, KY) if self._gather_y else (KY, KX)
        del KX, KY
        hx = [self._h(sxx[i], self._rx[i] @ self._rx[i], self._tx[i], self._tx[i])
              for i in range(len(xs))]
        hy = [self._h(syy[j], self._ry[j] @ self._ry[j], self._ty[j], self._ty[j])
              for j in range(len(ys))]
        # the CKA denominators do not depend on the pairing: cka_ratio(h, hx, hy, eps) is
        # h / cka_denominator(hx, hy, eps)
        ip = self._args[3] == "ip"
        self._denom = torch.tensor(
            [[cka_denominator(hx[i], hy[j],
                              cka_eps(2 * self._ex[i], 2 * self._ey[j]) if ip else CKA_EPS)
              for j in range(len(ys))] for i in range(len(xs))], dtype=torch.float64)

    def _h(self, s, dot_rows, ta, tb):
        return hsic_from_sums(self.n, float(s), float(ta), float(tb), float(dot_rows),
                              unbiased=self._args[5])

    def _combine(self, S, D):
        """CKA from the cross sums ``S = Σ K∘L'`` and ``D = r_K · r_L'`` (``[..., Lx, Ly]``
        float64): :func:`hsic_from_sums` and :func:`cka_ratio` elementwise."""
        n = self.n
        tk, tl = self._tx[:, None], self._ty[None, :]
        if self._args[5]:
            h = (S + tk * tl / ((n - 1) * (n - 2)) - 2.0 * D / (n - 2)) / (n * (n - 3))
        else:
            h = S - (D + D) / n + tk * tl / (n * n)
        return h / self._denom

    def _cross(self, perms):
        """``S[b, i, j] = Σ_(a<=c) F[i]_ac M[j]_(p_b(a), p_b(c))`` over the packed entries,
        ``[B, Lf, Lm]`` float64 (CPU), in blocks of packed columns within the spare budget."""
        F, M = self._F, self._M
        n, tri, lf, lm, B = self.n, self._tri, F.shape[0], M.shape[0], len(perms)
        cols = max(1, min(tri, self._spare // (self._col * B)))
        P = torch.stack(perms)  # [B, N]
        Q = P * n
        S = torch.zeros((lf, lm * B), dtype=torch.float64, device=self.device)
        for t0 in range(0, tri, cols):
            t1 = min(tri, t0 + cols)
            I, J = self._I[t0:t1], self._J[t0:t1]
            # packed positions of (p(a), p(c)) for every permutation, [B·c] (permutation-major)
            pos = self._table.index_select(
                0, Q.index_select(1, I).add_(P.index_select(1, J)).view(-1))
            # the gathered kernels [Lm, B·c], read as [Lm·B, c] (row (l, b): layer l under
            # permutation b); one contiguous gather per layer
            g = torch.empty((lm, pos.numel()), dtype=M.dtype, device=self.device)
            for i in range(lm):
                torch.index_select(M[i], 0, pos, out=g[i])
            S += (F[:, t0:t1] @ g.view(lm * B, t1 - t0).T).double()
        return S.cpu().view(lf, lm, B).permute(2, 0, 1)

    def _score_gram(self, ps):
        n = self.n
        ident = torch.arange(n, device=self.device)
        ps = [ident if p is None else p for p in ps]
        if self._gather_y:
            S = self._cross(ps)
        else:
            S = self._cross([_inverse(p) for p in ps]).transpose(1, 2)
        # D[b] = rx · ry[:, p_b]ᵀ, one gather and one product for the group
        at = torch.cat([p.cpu() for p in ps])
        ry = self._ry.index_select(1, at).view(-1, len(ps), n).transpose(0, 1)  # [B, Ly, N]
        D = (self._rx @ ry.reshape(-1, n).T).view(-1, len(ps), ry.shape[1]).transpose(0, 1)
        return list(self._combine(S, D))

    # -- feature space (linear kernels) -----------------------------------------------------

    def _setup_features(self):
        xs, ys, dtype, _, _, unbiased, _ = self._args
        n = self.n

        def stats(x):
            c, e = centred(x, dtype)
            s = c.sum(0).double()
            k = _row_sq_norms(c)
            r = (c @ s.to(c.dtype)).double().sub_(k)
            st = {"x": c, "e": e, "s": s, "k": k, "sum": float(s @ s - k.sum()), "r": r}
            fro2 = _sym_fro2(c, None if unbiased else s, n)
            st["h"] = self._hf(fro2, st, st)
            return st

        self._sx, self._sy = [stats(x) for x in xs], [stats(y) for y in ys]

    def _hf(self, fro2, a, b):
        if not self._args[5]:
            return fro2
        return hsic_from_sums(self.n, fro2 - float(a["k"] @ b["k"]), a["sum"], b["sum"],
                              float(a["r"] @ b["r"]), unbiased=True)

    def _score_features(self, p):
        unbiased, n = self._args[5], self.n
        sy = self._sy
        if p is not None:
            sy = [dict(b, x=b["x"][p], k=b["k"][p], r=b["r"][p]) for b in sy]
        out = torch.empty((len(self._sx), len(sy)), dtype=torch.float64)
        for j, b in enumerate(sy):
            for i, a in enumerate(self._sx):
                P = (a["x"].T @ b["x"]).double()
                if not unbiased:
                    P.sub_(torch.outer(a["s"], b["s"]).div_(n))
                h = self._hf(float(P.pow_(2).sum()), a, b)
                out[i, j] = cka_ratio(h, a["h"], b["h"], cka_eps(2 * a["e"], 2 * b["e"]))
        return out


def cka_permutation_scorer(xs: list, ys: list, dtype: torch.dtype, *, kernel_metric: str = "ip",
                           sigma: float = 1.0, unbiased: bool = False, budget: int,
                           permutations: int = 100, path: str = "auto") -> CkaPermutationScorer:
    """A scorer of CKA for shuffled pairings: ``score(perm)`` is ``[Lx, Ly]`` float64 and
    equals ``cka_scores(xs, [y[perm] for y in ys], dtype, kernel_metric=..., sigma=...,
    unbiased=..., budget=..., space="auto")[0]`` up to rounding.

    The per-layer work (kernels or centred features, self terms, row sums) is done here, once;
    each call pays only for the cross terms. See the module docstring for the three paths and
    how memory decides between them.

    Args:
        xs, ys: lists of ``[N, D]`` tensors (the same ``N`` and device; options already checked
            by :func:`prh_fast.metrics._kernel.check_cka_options`).
        dtype: the compute dtype of the products.
        kernel_metric: ``"ip"`` (linear) or ``"rbf"``.
        sigma: the RBF width.
        unbiased: the unbiased HSIC estimator.
        budget: bytes of memory for the cached kernels and the gathered row blocks.
        permutations: how many permutations the caller means to score; it only spreads the
            cached kernels' one-time cost in the choice of path.
        path: ``"auto"`` (the cheapest that fits), or ``"gram"``, ``"feature"``,
            ``"recompute"`` to force one (tests, benchmarks).

    Returns:
        A :class:`CkaPermutationScorer` (callable; ``None`` scores the given pairing).

    Raises:
        InputError: ``path`` names a path that does not fit (the kernels beyond ``budget``,
            ``"feature"`` with an RBF kernel) or is unknown.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(40, 6, generator=g), torch.randn(40, 5, generator=g)
        >>> score = cka_permutation_scorer([x], [y], torch.float64, budget=1 << 20)
        >>> perm = torch.randperm(40, generator=g)
        >>> want = cka_scores([x], [y[perm]], torch.float64, budget=1 << 20)[0]
        >>> bool(torch.allclose(score(perm), want, rtol=1e-10, atol=0))
        True
    """
    return CkaPermutationScorer(xs, ys, dtype, kernel_metric, sigma, unbiased, budget,
                                permutations, path)


class SvccaPermutationScorer(_PermutationScorer):
    """SVCCA of every layer pair for any pairing of the samples: ``scorer(perm)`` equals
    ``svcca_scores(xs, [y[perm] for y in ys], cca_dim, dtype)`` up to rounding. Built by
    :func:`svcca_permutation_scorer`.

    Example:
        >>> import torch
        >>> x = torch.randn(30, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> score = svcca_permutation_scorer([x], [2 * x], 3)
        >>> round(float(score()[0, 0]), 3)
        1.0
    """

    def __init__(self, xs, ys, cca_dim, dtype=None, x_names=None, y_names=None, bases=None):
        self.n, self.r = xs[0].shape[0], cca_dim
        self.device = xs[0].device
        self.lx, self.ly = len(xs), len(ys)
        ux, uy = bases if bases is not None else layer_bases(xs, ys, cca_dim, dtype, x_names,
                                                             y_names)
        self._ux, self._uy = torch.cat(ux, dim=1), torch.cat(uy, dim=1)

    def many(self, perms) -> torch.Tensor:
        """The scores of several permutations, ``[P, Lx, Ly]`` float64: ``scorer(perm)`` for
        each.

        Args:
            perms: a sequence of permutations of ``range(N)`` (``None``: the identity).

        Returns:
            The ``[P, Lx, Ly]`` float64 CPU tensor.

        Raises:
            InputError: a permutation is not one of ``range(N)``.
        """
        ps = [_check_perm(p, self.n, self.device) for p in perms]
        if not ps:
            return torch.empty((0, self.lx, self.ly), dtype=torch.float64)
        return torch.stack([self._score(p) for p in ps])

    def _score(self, p):
        ux, uy = self._ux, self._uy
        if p is not None:
            # Ux' (Uy[p]) = (Ux[p⁻¹])' Uy: gather the side with fewer columns
            if self.ly <= self.lx:
                uy = uy[p]
            else:
                ux = ux[_inverse(p)]
        r = self.r
        M = (ux.T @ uy).reshape(self.lx, r, self.ly, r).permute(0, 2, 1, 3)
        return torch.linalg.svdvals(M).clamp(0.0, 1.0).mean(-1).cpu()


def svcca_permutation_scorer(xs: list, ys: list, cca_dim: int, dtype: torch.dtype | None = None,
                             *, x_names=None, y_names=None,
                             bases=None) -> SvccaPermutationScorer:
    """A scorer of SVCCA for shuffled pairings: ``score(perm)`` is ``[Lx, Ly]`` float64 and
    equals ``svcca_scores(xs, [y[perm] for y in ys], cca_dim, dtype)`` up to rounding.

    Every layer's ``[N, r]`` orthonormal basis is formed once
    (:func:`prh_fast.metrics._svcca.layer_basis`, as :func:`~prh_fast.metrics._svcca.svcca_scores`
    forms it); a permutation costs a gather of the bases of the side with fewer layers, one
    ``[Lx·r, N] x [N, Ly·r]`` product and a batched ``r x r`` SVD per layer pair.

    Args:
        xs, ys: lists of ``[N, D]`` tensors (the same ``N``).
        cca_dim: ``r``, at most ``min(N - 1, D)`` of every layer (checked by the caller).
        dtype: as in :func:`~prh_fast.metrics._svcca.svcca_scores`.
        x_names, y_names: how errors name each layer.
        bases: ``(ux, uy)``, the layers' bases when the caller already formed them
            (``prh_fast.metrics._svcca.layer_bases``), shared with its observed scores.

    Returns:
        A :class:`SvccaPermutationScorer` (callable; ``None`` scores the given pairing).

    Raises:
        InputError: ``cca_dim`` exceeds a layer's numerical rank.

    Example:
        >>> import torch
        >>> from prh_fast.metrics._svcca import svcca_scores
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = (torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2))
        >>> perm = torch.randperm(40, generator=g)
        >>> score = svcca_permutation_scorer([x], [y], 3)
        >>> bool(torch.allclose(score(perm), svcca_scores([x], [y[perm]], 3), atol=1e-10))
        True
    """
    return SvccaPermutationScorer(xs, ys, cca_dim, dtype, x_names, y_names, bases)
