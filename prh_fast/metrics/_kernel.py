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
scalar is combined in float64.
"""
from __future__ import annotations

import math

import torch

from prh_fast.knn._tiles import block_rows


def _centred(X: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    mean = X.to(torch.float64).mean(dim=0, keepdim=True)
    return (X.to(torch.float64) - mean).to(dtype)


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


def cka_ratio(h_kl: float, h_kk: float, h_ll: float) -> float:
    """``hsic_kl / (sqrt(hsic_kk · hsic_ll) + 1e-6)``, NaN when the product is negative (as the
    reference, whose ``torch.sqrt`` of a negative number is NaN)."""
    prod = h_kk * h_ll
    root = math.sqrt(prod) if prod >= 0 else float("nan")
    return h_kl / (root + 1e-6)


def linear_cka(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, unbiased: bool) -> float:
    n = A.shape[0]
    Ac, Bc = _centred(A, dtype), _centred(B, dtype)
    ab = _fro2(Ac.T @ Bc)
    aa = _fro2(Ac.T @ Ac)
    bb = _fro2(Bc.T @ Bc)
    if not unbiased:
        return cka_ratio(ab, aa, bb)
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
    return cka_ratio(h_ab, h_aa, h_bb)


def _rbf_block(Xq, X, sq_q, sq, r0, gamma):
    """``exp(-gamma · ||x_i - x_j||²)`` for a block of rows; the diagonal distance is exactly 0."""
    d2 = (sq_q.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (Xq @ X.T)).clamp_min_(0.0)
    rows = torch.arange(Xq.shape[0], device=X.device)
    d2[rows, rows + r0] = 0.0
    return torch.exp(d2.mul_(-gamma))


def rbf_cka(A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype, sigma: float,
            unbiased: bool, memory_budget: int) -> float:
    n = A.shape[0]
    Ac, Bc = _centred(A, dtype), _centred(B, dtype)  # distances are shift-invariant
    sqa, sqb = (Ac * Ac).sum(1), (Bc * Bc).sum(1)
    gamma = 1.0 / (2.0 * sigma**2)
    rows = min(n, block_rows(n, Ac.element_size(), memory_budget, buffers=4))
    s_kl = s_kk = s_ll = 0.0
    rk = torch.empty(n, dtype=torch.float64, device=A.device)
    rl = torch.empty_like(rk)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        K = _rbf_block(Ac[r0:r1], Ac, sqa[r0:r1], sqa, r0, gamma).to(torch.float64)
        L = _rbf_block(Bc[r0:r1], Bc, sqb[r0:r1], sqb, r0, gamma).to(torch.float64)
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
