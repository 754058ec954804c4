"""CKA and HSIC without N x N matrices.

Linear kernels work in feature space. With features centred first (both HSIC estimators are
invariant to a shift of the features, and centring keeps the products well scaled):

- biased:   ``trace(K H L H) = ||Ãᵀ B̃||_F²`` (Ã, B̃ column-centred).
- unbiased (Song et al. 2012), with ``K̃ = K - diag(K)``, ``k_i = ||ã_i||²``:
  ``Σ K̃∘L̃ᵀ = ||ÃᵀB̃||² - Σ k_i l_i``; ``Σ K̃ = ||Ãᵀ1||² - Σ k_i``; ``K̃1 = Ã(Ãᵀ1) - k``.

RBF kernels (and linear ones when ``N`` is small next to the widths) stream row blocks of
every layer's Gram matrix and accumulate the sums the estimators need (``Σ K∘L`` for every
layer pair with one matrix product per block, ``Σ K∘K``, row sums) in float64; memory is
``O(layers · block · N)``, never ``N x N``.

One scorer, :func:`cka_scores`, serves both the single-pair metrics (``prh_fast.metrics.cka``,
the ``1 x 1`` case) and the layer grids of ``prh_fast.align``; the one-pass store
accumulators (``prh_fast.store._moments``) are its streaming form.

Products run in the compute dtype (float64 for float64 input, float32 otherwise); every
scalar is combined in float64. Features of any scale: the centred features are scaled by a
power of two (exact) before any product, and the scale is undone where the formula is not
scale-invariant -- the ``1e-6`` of the CKA ratio (``cka_eps``) and the RBF's ``1/(2σ²)``
(``rbf_gamma``). RBF distances of near-identical rows are recomputed from differences, so
duplicated rows are at distance exactly 0 and a tiny ``rbf_sigma`` gives the right kernel.
"""
from __future__ import annotations

import math

import torch

from prh_fast._validate import check_memory_budget, check_positive_float
from prh_fast.errors import InputError

#: The reference's constant in ``hsic_kl / (sqrt(hsic_kk · hsic_ll) + 1e-6)``.
CKA_EPS = 1e-6


def _pow2_exponent(x: float) -> int:
    """``e`` with ``x = m · 2**e``, ``0.5 <= m < 1`` (0 for 0)."""
    return math.frexp(x)[1] if x > 0 else 0


def centred(X: torch.Tensor, dtype: torch.dtype):
    """``(C, e)``: ``X`` with its column means removed, scaled by ``2**-e``, in ``dtype``.

    The power-of-two scale is exact, so every product formed from ``C`` is the product of the
    centred features times a known power of two -- nothing overflows (features ~1e20 in
    float32) or underflows (~1e-30) in the compute dtype. Kernel sums of degree 2 in ``K``
    scale by ``2**(-4e)``; callers undo it where the formula is not scale-invariant (the
    ``1e-6`` of the CKA ratio, RBF distances). The largest ``|value|`` of ``C`` lies in
    ``[0.5, 1)``, or ``e = 0`` on the float32 path when it already lies in ``[2**-20, 2**20)``
    (no product can leave float32 there, and a pass is saved).

    Float32 products of features in range are centred in float32, in two passes (the column
    means, then the residual means of the result), without a float64 copy; what is left of the
    column means is of the order of one rounding of the centred values, and the biased HSIC of
    :func:`cka_scores` removes it exactly (``ÃᵀB̃ = AᵀB - s_A s_Bᵀ/N``; the other estimators
    hold for any shift). Elsewhere -- float64, or centred values beyond ``2**±100`` -- the
    centring runs in float64.
    """
    if dtype == torch.float32 and X.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and X.numel():
        C = _centred_float32(X.to(torch.float32))
        if C is not None:
            return C
    X64 = X.to(torch.float64)
    C = X64 - X64.mean(dim=0, keepdim=True)
    if not C.numel():
        return C.to(dtype), 0
    lo, hi = torch.aminmax(C)  # max |value| without an |C| temporary
    e = _pow2_exponent(max(-float(lo), float(hi)))
    if e and -1021 <= -e <= 1023:
        C.mul_(2.0 ** -e)  # a power of two: exact, in place
    elif e:
        C = torch.ldexp(C, torch.tensor(-e, dtype=torch.int64, device=C.device))
    return C.to(dtype), e


#: Float32 centring handles centred values below ``2**_F32_RANGE`` in magnitude and scales by
#: at most ``2**±_F32_RANGE`` (neither the values nor their products leave float32).
_F32_RANGE = 100
#: Float32 centred values whose largest magnitude lies in ``[2**-_F32_KEEP, 2**_F32_KEEP)`` are
#: not scaled: products of ``D`` such values stay far inside float32's range.
_F32_KEEP = 20


def _centred_float32(X: torch.Tensor):
    """:func:`centred` of float32 ``X`` in float32 (one ``[N, D]`` temporary, five passes at
    most), or ``None`` when the values or the scale would leave float32's comfortable range."""
    n = X.shape[0]
    # a column mean that overflows, an overflowing difference, NaN or inf all show up in C's
    # extremes: the float64 path takes those
    C = X - X.mean(dim=0)
    lo, hi = torch.aminmax(C)
    big = max(-float(lo), float(hi))
    if not big < 2.0 ** _F32_RANGE:
        return None
    e = _pow2_exponent(big)
    if abs(e) > _F32_RANGE:
        return None
    # the first mean is off by up to one rounding of the mean (large next to the spread when
    # the columns sit far from 0); a second pass removes the residual. Partial sums of centred
    # columns stay near sqrt(N) times their spread, so float32 sums leave a residual far below
    # one rounding of the values.
    C.sub_(C.sum(dim=0).div_(n))
    if -_F32_KEEP < e <= _F32_KEEP:
        return C, 0
    C.mul_(2.0 ** -e)  # a power of two within float32's normal range: exact
    return C, e


def hsic_from_sums(n: int, s_kl: float, sum_k: float, sum_l: float, dot_rows: float,
                   *, unbiased: bool, dot_rows_t: float | None = None) -> float:
    """Combine the sums of HSIC estimators (all in float64).

    ``s_kl = Σ_ij K_ij L_ji``, ``sum_k = 1ᵀK1``, ``sum_l = 1ᵀL1``, ``dot_rows = 1ᵀKL1`` and
    ``dot_rows_t = 1ᵀLK1`` (defaults to ``dot_rows``; they differ only for non-symmetric K, L).
    For ``unbiased`` the inputs must already have zero diagonals.
    """
    if dot_rows_t is None:
        dot_rows_t = dot_rows
    if unbiased:
        return (s_kl + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 * dot_rows / (n - 2)) / (
            n * (n - 3)
        )
    # trace(K H L H) = tr(KL) - (1ᵀKL1 + 1ᵀLK1)/n + (1ᵀK1)(1ᵀL1)/n²
    return s_kl - (dot_rows + dot_rows_t) / n + sum_k * sum_l / (n * n)


def cka_ratio(h_kl: float, h_kk: float, h_ll: float, eps: float = CKA_EPS) -> float:
    """``hsic_kl / (sqrt(hsic_kk · hsic_ll) + eps)`` (``eps = 1e-6`` in the reference), NaN when
    the product is negative (as the reference, whose ``torch.sqrt`` of a negative number is
    NaN). HSIC values from kernels scaled by ``2**-a`` (K) and ``2**-b`` (L) pass
    ``eps = cka_eps(a, b)``: the ratio is then the one of the unscaled kernels."""
    return h_kl / cka_denominator(h_kk, h_ll, eps)


def cka_denominator(h_kk: float, h_ll: float, eps: float = CKA_EPS) -> float:
    """``sqrt(hsic_kk · hsic_ll) + eps``, the denominator of :func:`cka_ratio` (NaN when the
    product is negative).

    Example:
        >>> cka_denominator(4.0, 9.0, 0.0)
        6.0
    """
    prod = h_kk * h_ll
    if prod == math.inf:  # sqrt(h_kk) sqrt(h_ll) is still finite when each factor is
        root = math.sqrt(h_kk) * math.sqrt(h_ll)
    else:
        root = math.sqrt(prod) if prod >= 0 else float("nan")
    return root + eps


def cka_eps(a: int, b: int) -> float:
    """The CKA constant for HSIC values whose kernels were scaled by ``2**-a`` and ``2**-b``
    (``hsic(K, L)`` and ``sqrt(hsic(K,K) hsic(L,L))`` both scale by ``2**-(a+b)``): ``1e-6 ·
    2**-(a+b)``, which may round to 0 or inf -- the ratio's limits, both correct."""
    try:
        return math.ldexp(CKA_EPS, -(a + b))
    except OverflowError:
        return math.inf


def rbf_gamma(sigma: float, e: int) -> float:
    """``1 / (2 σ²)`` for features scaled by ``2**-e`` (distances scale by ``4**-e``), in
    float64; ``inf`` when it does not fit (then every positive distance gives a kernel value of
    exactly 0, the limit)."""
    try:
        return math.ldexp(1.0 / (2.0 * sigma * sigma), 2 * e) if sigma * sigma > 0 else math.inf
    except OverflowError:
        return math.inf


def rbf_rows(Xq: torch.Tensor, X: torch.Tensor, sq_q: torch.Tensor, sq: torch.Tensor, r0: int,
             gamma: float) -> torch.Tensor:
    """``exp(-gamma · ||x_i - x_j||²)`` for the block of rows ``Xq = X[r0:r0+b]``, ``[b, N]``
    float64.

    Distances come from ``|x_i|² + |x_j|² - 2 <x_i, x_j>`` (one product in the compute dtype),
    whose rounding error is below ``4 γ_D (|x_i|² + |x_j|²)``. Pairs whose computed distance is
    within that bound of zero -- the diagonal, duplicated rows, near-duplicates -- are
    recomputed as ``Σ (x_i - x_j)²`` in float64, so equal rows are at distance exactly 0 and a
    tiny ``rbf_sigma`` still gives the right values. The exponent is formed in float64 (``gamma``
    may exceed the float32 range) and a zero distance always gives 1 (``gamma = inf`` included).
    """
    d = X.shape[1]
    u = torch.finfo(X.dtype).eps / 2
    tol = 4.0 * d * u / max(1e-300, 1.0 - d * u)
    s = sq_q.to(torch.float64).unsqueeze(1) + sq.to(torch.float64).unsqueeze(0)
    d2 = s - 2.0 * (Xq @ X.T).to(torch.float64)
    near = d2 <= tol * s
    d2.clamp_min_(0.0)
    if bool(near.any()):
        r, c = near.nonzero(as_tuple=True)
        step = max(1, (1 << 22) // max(1, d))
        for p0 in range(0, r.numel(), step):
            rr, cc = r[p0:p0 + step], c[p0:p0 + step]
            diff = Xq[rr].to(torch.float64) - X[cc].to(torch.float64)
            d2[rr, cc] = (diff * diff).sum(dim=1)
    rows = torch.arange(Xq.shape[0], device=X.device)
    d2[rows, rows + r0] = 0.0
    zero = d2 == 0.0
    K = torch.exp(d2.mul_(-gamma).masked_fill_(zero, 0.0))
    return K


def check_cka_options(n: int, kernel_metric, rbf_sigma, unbiased, memory_budget,
                      default_budget: int, where: str = "") -> tuple:
    """Validate CKA's options for ``n`` samples: ``(sigma, budget)``.

    Args:
        n: number of samples.
        kernel_metric: ``"ip"`` or ``"rbf"``.
        rbf_sigma: the RBF width (checked only for ``"rbf"``; ``1.0`` is returned otherwise).
        unbiased: the unbiased estimator needs ``n >= 4``.
        memory_budget: bytes of scratch memory for the Gram row blocks, or ``None``.
        default_budget: the budget ``None`` stands for.
        where: appended to the sample-count errors (which inputs they are about).

    Returns:
        ``(sigma, budget)``: the RBF width as a float and the budget in bytes.

    Raises:
        InputError: naming the bad argument.
    """
    if kernel_metric not in ("ip", "rbf"):
        raise InputError(f"kernel_metric: expected 'ip' or 'rbf', got {kernel_metric!r}")
    if unbiased and n < 4:
        raise InputError(f"unbiased HSIC needs N >= 4 samples, got N = {n}{where}")
    if n < 2:
        raise InputError(f"cka needs at least 2 samples, got N = {n}{where}")
    budget = check_memory_budget(memory_budget, default_budget)
    sigma = check_positive_float(rbf_sigma, "rbf_sigma") if kernel_metric == "rbf" else 1.0
    return sigma, budget


def cka_scores(xs: list, ys: list, dtype: torch.dtype, *, kernel_metric: str = "ip",
               sigma: float = 1.0, unbiased: bool = False, budget: int,
               space: str = "auto") -> tuple:
    """CKA of every layer pair, ``[Lx, Ly]`` float64: the one CKA scorer.

    Each layer is centred once (both estimators are shift-invariant, RBF distances too) and
    scaled by a power of two so that no product leaves ``dtype``'s range (undone exactly).

    Args:
        xs, ys: lists of ``[N, D]`` tensors (the same ``N`` and device; options checked by
            :func:`check_cka_options`).
        dtype: the compute dtype of the products.
        kernel_metric: ``"ip"`` (linear) or ``"rbf"``.
        sigma: the RBF width.
        unbiased: the unbiased HSIC estimator (Song et al. 2012).
        budget: bytes of scratch memory for the Gram row blocks.
        space: ``"feature"`` or ``"gram"`` for a linear kernel, or ``"auto"``: whichever costs
            fewer flops (RBF kernels are always scored in Gram space).

    Returns:
        ``(scores, space)``: the ``[Lx, Ly]`` float64 tensor and the space used.

    Example:
        >>> import torch
        >>> from prh_fast.metrics._kernel import cka_scores
        >>> x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
        >>> s, space = cka_scores([x], [x], torch.float64, budget=1 << 20)
        >>> round(float(s[0, 0]), 3), space
        (1.0, 'feature')
    """
    n = xs[0].shape[0]
    cx, cy = [centred(x, dtype) for x in xs], [centred(y, dtype) for y in ys]
    xs, ex = [c for c, _ in cx], [e for _, e in cx]
    ys, ey = [c for c, _ in cy], [e for _, e in cy]
    if space == "auto" and kernel_metric == "ip":
        dx, dy = [x.shape[1] for x in xs], [y.shape[1] for y in ys]
        gram_cost = n * n * (sum(dx) + sum(dy) + len(xs) * len(ys))
        feat_cost = n * (sum(a * b for a in dx for b in dy) + sum(a * a for a in dx)
                         + sum(b * b for b in dy))
        space = "gram" if gram_cost <= feat_cost else "feature"
    if kernel_metric == "rbf" or space == "gram":
        return _cka_gram(xs, ys, ex, ey, kernel_metric, sigma, bool(unbiased), budget), "gram"
    return _cka_features(xs, ys, ex, ey, bool(unbiased)), "feature"


def _kernel_block(x, sq, r0, r1, kernel, gamma, zero_diag):
    """Rows ``r0:r1`` of one layer's kernel: linear (features pre-centred and scaled, in their
    dtype) or RBF (:func:`rbf_rows`, float64; ``gamma`` for the scaled features)."""
    rows = torch.arange(r1 - r0, device=x.device)
    if kernel == "rbf":
        g = rbf_rows(x[r0:r1], x, sq[r0:r1], sq, r0, gamma)
    else:
        g = x[r0:r1] @ x.T
    if zero_diag:
        g[rows, rows + r0] = 0.0
    return g


def _cka_gram(xs, ys, ex, ey, kernel, sigma, unbiased, budget):
    """All pair sums from streamed kernel row blocks; ``O((Lx+Ly)·block·N)`` memory. ``ex``,
    ``ey``: each layer's power-of-two scale (:func:`centred`)."""
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
    if kernel == "ip":  # column sums and squared row norms for the kernels' row sums
        colx = [(x, x.sum(0, dtype=torch.float64)) for x in xs]
        coly = [(y, y.sum(0, dtype=torch.float64)) for y in ys]
        sqx64, sqy64 = [_row_sq_norms(x) for x in xs], [_row_sq_norms(y) for y in ys]
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        X = torch.stack([_kernel_block(x, s, r0, r1, kernel, g, unbiased)
                         for x, s, g in zip(xs, sqx, gx)]).reshape(lx, -1)
        Y = torch.stack([_kernel_block(y, s, r0, r1, kernel, g, unbiased)
                         for y, s, g in zip(ys, sqy, gy)]).reshape(ly, -1)
        S += (X @ Y.T).double().cpu()
        # ||K block||² accumulated in float64 without a float64 copy of the block
        sxx += torch.linalg.vector_norm(X, dim=1, dtype=torch.float64).square_().cpu()
        syy += torch.linalg.vector_norm(Y, dim=1, dtype=torch.float64).square_().cpu()
        if kernel == "ip":  # K's row sums from the features: x_r · (xᵀ1), in float64
            for rr, zs, zq in ((rx, colx, sqx64), (ry, coly, sqy64)):
                for i, (z, c) in enumerate(zs):
                    rr[i, r0:r1] = (z[r0:r1].double() @ c).cpu()
                    if unbiased:  # the zeroed diagonal
                        rr[i, r0:r1] -= zq[i][r0:r1].cpu()
        else:
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


def _cka_features(xs, ys, ex, ey, unbiased):
    """Linear CKA pair by pair in feature space (cheaper when ``N >> D``).

    Biased: ``||ÃᵀB̃||_F²`` with ``ÃᵀB̃ = AᵀB - s_A s_Bᵀ / N`` (``s`` the column sums: the
    residual means that :func:`centred` leaves); unbiased: the module docstring's sums of the
    zero-diagonal kernels, which hold for uncentred columns as well. Products in the features'
    dtype (a layer with itself: the blocks on and above the diagonal of the symmetric ``AᵀA``
    only, :func:`_sym_fro2`), their squares summed in float64."""
    n = xs[0].shape[0]

    def stats(x):
        # k = diag(K) in float64: the unbiased estimator subtracts Σ k_i l_i from ||AᵀB||²,
        # which nearly cancel when the layers are unrelated. The columns are centred, so the
        # column sums s are tiny (a float32 sum suffices) and so is A(Aᵀ1) next to k in
        # K̃1 = A(Aᵀ1) - k.
        s = x.sum(0).double()
        k = _row_sq_norms(x)
        r = (x @ s.to(x.dtype)).double().sub_(k)
        return {"x": x, "s": s, "k": k, "sum": float(s @ s - k.sum()), "r": r}

    def h(fro2, a, b):
        if not unbiased:
            return fro2
        return hsic_from_sums(n, fro2 - float(a["k"] @ b["k"]), a["sum"], b["sum"],
                              float(a["r"] @ b["r"]), unbiased=True)

    def fro(a, b):
        P = (a["x"].T @ b["x"]).double()
        if not unbiased:
            P.sub_(torch.outer(a["s"], b["s"]).div_(n))
        return float(P.pow_(2).sum())

    sx, sy = [stats(x) for x in xs], [stats(y) for y in ys]
    hx = [h(_sym_fro2(a["x"], a["s"] if not unbiased else None, n), a, a) for a in sx]
    hy = [h(_sym_fro2(b["x"], b["s"] if not unbiased else None, n), b, b) for b in sy]
    out = torch.empty((len(xs), len(ys)), dtype=torch.float64)
    for i, a in enumerate(sx):
        for j, b in enumerate(sy):
            # K = A Aᵀ was scaled by 2**-2ex, L by 2**-2ey
            out[i, j] = cka_ratio(h(fro(a, b), a, b), hx[i], hy[j], cka_eps(2 * ex[i], 2 * ey[j]))
    return out


def _row_sq_norms(x: torch.Tensor, rows: int = 128) -> torch.Tensor:
    """``||x_i||²`` of every row, accumulated in float64, ``rows`` rows at a time on the CPU
    (the float64 copy of a block stays in cache instead of doubling the whole matrix in
    memory; accelerators take all rows in one call).

    Example:
        >>> x = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> _row_sq_norms(x).tolist()
        [25.0, 1.0]
    """
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    if x.device.type != "cpu":
        rows = max(1, x.shape[0])
    for r0 in range(0, x.shape[0], rows):
        torch.linalg.vector_norm(x[r0:r0 + rows], dim=1, dtype=torch.float64,
                                 out=out[r0:r0 + rows])
    return out.square_()


#: Column-block width of :func:`_sym_fro2`: narrow enough that skipping the blocks below the
#: diagonal saves most of the lower half, wide enough for BLAS to run at full rate.
SYM_BLOCK = 128


def _sym_fro2(x: torch.Tensor, s: torch.Tensor | None, n: int) -> float:
    """``||xᵀx - s sᵀ/n||_F²`` (``s = None``: ``||xᵀx||_F²``) in float64, from the column
    blocks on and above the diagonal of the symmetric ``xᵀx`` (an off-diagonal block counts
    twice): about ``(1 + 1/b)/2`` of the full product's flops for ``b`` blocks.

    Example:
        >>> x = torch.randn(64, 300, dtype=torch.float64)
        >>> abs(_sym_fro2(x, None, 64) - float((x.T @ x).pow(2).sum())) < 1e-6 * 64 * 300**2
        True
    """
    d = x.shape[1]
    if d <= SYM_BLOCK * 3 // 2:
        blocks = [(0, d)]
    else:
        nb = round(d / SYM_BLOCK)
        edges = [d * i // nb for i in range(nb + 1)]
        blocks = list(zip(edges[:-1], edges[1:]))
    total = 0.0
    for c0, c1 in blocks:
        G = (x[:, c0:c1].T @ x[:, c0:]).double()
        if s is not None:
            G.sub_(torch.outer(s[c0:c1], s[c0:]).div_(n))
        G.pow_(2)
        w = c1 - c0
        total += float(G[:, :w].sum()) + 2.0 * float(G[:, w:].sum())
    return total
