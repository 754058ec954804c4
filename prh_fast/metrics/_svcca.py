"""Exact, deterministic SVCCA from D x D products (docs/metrics.md, "svcca").

Columns are standardised (mean 0, divided by the unbiased std + 1e-8). The top ``r`` left
singular vectors of the standardised ``A_s`` are ``U_A = A_s V_A Λ_A^{-1/2}`` with ``(Λ_A, V_A)``
the top eigenpairs of ``G_A = A_sᵀA_s``. ``U_A`` is orthonormal with centred columns, so the
canonical correlations between ``U_A`` and ``U_B`` are the singular values of
``U_Aᵀ U_B = Λ_A^{-1/2} V_Aᵀ (A_sᵀ B_s) V_B Λ_B^{-1/2}``; the score is their mean. Nothing of size
``N x N`` (or ``N x r``) is formed: only ``Da x Da``, ``Db x Db`` and ``Da x Db`` products.
"""
from __future__ import annotations

import torch


def _standardised(X: torch.Tensor, dtype: torch.dtype):
    """``(X - mean) / (std + 1e-8)`` per column (unbiased std, as ``torch.std`` in the
    reference), in float64, then cast to ``dtype``. The std is computed on each column scaled
    by the power of two of its largest ``|x - mean|`` (exact, undone after the square root), so
    it neither overflows (columns ~1e200) nor underflows (~1e-200)."""
    X64 = X.to(torch.float64)
    C = X64 - X64.mean(dim=0, keepdim=True)
    e = torch.frexp(C.abs().amax(dim=0, keepdim=True)).exponent
    std = torch.ldexp(torch.ldexp(C, -e).std(dim=0, keepdim=True), e)
    return (C / (std + 1e-8)).to(dtype)


def _top_eig(G: torch.Tensor, r: int, name: str):
    evals, evecs = torch.linalg.eigh(G)  # ascending
    evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
    # relative to the largest eigenvalue: standardised columns of features far below the 1e-8
    # of the standardisation (~1e-30) have tiny but well-defined spectra
    tol = float(evals[0]) * G.shape[0] * torch.finfo(torch.float64).eps * 16
    if not float(evals[0]) > 0 or float(evals[-1]) <= tol:
        raise ValueError(
            f"cca_dim: {r} exceeds the numerical rank of {name} after standardisation "
            f"(its {r}-th singular value is ~0)"
        )
    return evals, evecs


def svcca(A: torch.Tensor, B: torch.Tensor, cca_dim: int, dtype: torch.dtype) -> float:
    As, Bs = _standardised(A, dtype), _standardised(B, dtype)
    Ga = (As.T @ As).to(torch.float64)
    Gb = (Bs.T @ Bs).to(torch.float64)
    Cab = (As.T @ Bs).to(torch.float64)
    la, Va = _top_eig(Ga, cca_dim, "feats_A")
    lb, Vb = _top_eig(Gb, cca_dim, "feats_B")
    M = (Va / la.sqrt()).T @ Cab @ (Vb / lb.sqrt())
    rho = torch.linalg.svdvals(M).clamp(0.0, 1.0)
    return float(rho.mean())
