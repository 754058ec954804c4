"""CKA and HSIC without N x N matrices.

Linear kernels work in feature space. With features centred first (both HSIC estimators are
invariant to a shift of the features, and centring keeps the products well scaled):

- biased:   ``trace(K H L H) = ||Ãᵀ B̃||_F²`` (Ã, B̃ column-centred).
- unbiased (Song et al. 2012), with ``K̃ = K - diag(K)``, ``k_i = ||ã_i||²``:
  ``Σ K̃∘L̃ᵀ = ||ÃᵀB̃||² - Σ k_i l_i``; ``Σ K̃ = ||Ãᵀ1||² - Σ k_i``; ``K̃1 = Ã(Ãᵀ1) - k``.

RBF kernels stream row blocks of both Gram matrices and accumulate the handful of sums the
estimators need (``Σ K∘L``, ``Σ K∘K``, ``Σ L∘L``, row sums, diagonals) in float64; memory is
``O(block · N)``.

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

from prh_fast.knn._tiles import block_rows

#: The reference's constant in ``hsic_kl / (sqrt(hsic_kk · hsic_ll) + 1e-6)``.
CKA_EPS = 1e-6


def _pow2_exponent(x: float) -> int:
    """``e`` with ``x = m · 2**e``, ``0.5 <= m < 1`` (0 for 0)."""
    return math.frexp(x)[1] if x > 0 else 0


def centred(X: torch.Tensor, dtype: torch.dtype):
    """``(C, e)``: ``X`` with its column means removed (in float64), scaled by ``2**-e`` so that
    its largest ``|value|`` lies in ``[0.5, 1)``, then cast to ``dtype``.

    The power-of-two scale is exact, so every product formed from ``C`` is the product of the
    centred features times a known power of two -- nothing overflows (features ~1e20 in
    float32) or underflows (~1e-30) in the compute dtype. Kernel sums of degree 2 in ``K``
    scale by ``2**(-4e)``; callers undo it where the formula is not scale-invariant (the
    ``1e-6`` of the CKA ratio, RBF distances).
    """
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


def _fro2(M: torch.Tensor) -> float:
    M = M.to(torch.float64)
    return float((M * M).sum())


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
    prod = h_kk * h_ll
    if prod == math.inf:  # sqrt(h_kk) sqrt(h_ll) is still finite when each factor is
        root = math.sqrt(h_kk) * math.sqrt(h_ll)
    else:
        root = math.sqrt(prod) if prod >= 0 else float("nan")
    return h_kl / (root + eps)


def cka_eps(a: int, b: int) -> float:
    """The CKA constant for HSIC values whose kernels were scaled by ``2**-a`` and ``2**-b``
    (``hsic(K, L)`` and ``sqrt(hsic(K,K) hsic(L,L))`` both scale by ``2**-(a+b)``): ``1e-6 ·
    2**-(a+b)``, which may round to 0 or inf -- the ratio's limits, both correct."""
    try:
        return math.ldexp(CKA_EPS, -(a + b))
    except OverflowError:
        return math.inf


def linear_cka(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, unbiased: bool) -> float:
    n = A.shape[0]
    (Ac, ea), (Bc, eb) = centred(A, dtype), centred(B, dtype)
    ab = _fro2(Ac.T @ Bc)
    aa = _fro2(Ac.T @ Ac)
    bb = _fro2(Bc.T @ Bc)
    # K = A Aᵀ was scaled by 2**-2ea, L by 2**-2eb
    eps = cka_eps(2 * ea, 2 * eb)
    if not unbiased:
        return cka_ratio(ab, aa, bb, eps)
    ka = (Ac.to(torch.float64) ** 2).sum(dim=1)
    kb = (Bc.to(torch.float64) ** 2).sum(dim=1)
    sa = Ac.to(torch.float64).sum(dim=0)
    sb = Bc.to(torch.float64).sum(dim=0)
    ra = Ac.to(torch.float64) @ sa - ka  # K̃1
    rb = Bc.to(torch.float64) @ sb - kb
    sum_a = float(sa @ sa - ka.sum())
    sum_b = float(sb @ sb - kb.sum())

    def h(s_kl, sk, sl, r1, r2):
        return hsic_from_sums(n, s_kl, sk, sl, float(r1 @ r2), unbiased=True)

    h_ab = h(ab - float(ka @ kb), sum_a, sum_b, ra, rb)
    h_aa = h(aa - float(ka @ ka), sum_a, sum_a, ra, ra)
    h_bb = h(bb - float(kb @ kb), sum_b, sum_b, rb, rb)
    return cka_ratio(h_ab, h_aa, h_bb, eps)


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


def rbf_cka(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, sigma: float,
            unbiased: bool, memory_budget: int) -> float:
    n = A.shape[0]
    # distances are shift-invariant; the scale 2**-e is undone in gamma
    (Ac, ea), (Bc, eb) = centred(A, dtype), centred(B, dtype)
    sqa, sqb = (Ac * Ac).sum(1), (Bc * Bc).sum(1)
    ga, gb = rbf_gamma(sigma, ea), rbf_gamma(sigma, eb)
    rows = min(n, block_rows(n, 8, memory_budget, buffers=6))
    s_kl = s_kk = s_ll = 0.0
    rk = torch.empty(n, dtype=torch.float64, device=A.device)
    rl = torch.empty_like(rk)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        K = rbf_rows(Ac[r0:r1], Ac, sqa[r0:r1], sqa, r0, ga)
        L = rbf_rows(Bc[r0:r1], Bc, sqb[r0:r1], sqb, r0, gb)
        s_kl += float((K * L).sum())
        s_kk += float((K * K).sum())
        s_ll += float((L * L).sum())
        rk[r0:r1] = K.sum(1)
        rl[r0:r1] = L.sum(1)
    sum_k, sum_l = float(rk.sum()), float(rl.sum())
    if not unbiased:
        def h(s, r1, r2, t1, t2):
            return hsic_from_sums(n, s, t1, t2, float(r1 @ r2), unbiased=False)
        return cka_ratio(h(s_kl, rk, rl, sum_k, sum_l), h(s_kk, rk, rk, sum_k, sum_k),
                         h(s_ll, rl, rl, sum_l, sum_l))
    # The diagonal of an RBF kernel is exactly 1: remove it for the unbiased estimator.
    rk_t, rl_t = rk - 1.0, rl - 1.0

    def hu(s, r1, r2, t1, t2):
        return hsic_from_sums(n, s - n, t1 - n, t2 - n, float(r1 @ r2), unbiased=True)

    return cka_ratio(hu(s_kl, rk_t, rl_t, sum_k, sum_l), hu(s_kk, rk_t, rk_t, sum_k, sum_k),
                     hu(s_ll, rl_t, rl_t, sum_l, sum_l))
