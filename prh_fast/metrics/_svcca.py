"""Exact, deterministic SVCCA (docs/metrics.md, "svcca").

Columns are standardised (mean 0, divided by the unbiased std + 1e-8). The top ``r`` left
singular vectors of the standardised ``A_s`` are ``U_A = A_s V_A Λ_A^{-1/2}`` with ``(Λ_A, V_A)``
the top eigenpairs of ``G_A = A_sᵀA_s``. ``U_A`` is orthonormal with centred columns, so the
canonical correlations between ``U_A`` and ``U_B`` are the singular values of ``U_Aᵀ U_B``; the
score is their mean. Each layer's ``[N, r]`` basis is formed once (in float64), so a grid of
layers costs one eigendecomposition per layer and one ``r x r`` SVD per pair; nothing of size
``N x N`` is formed. :func:`svcca_scores` is the one scorer: ``prh_fast.metrics.svcca`` is its
``1 x 1`` case, ``prh_fast.align`` its grid; the store accumulators
(``prh_fast.store._moments``) are its streaming form.
"""
from __future__ import annotations

import math

import torch

from prh_fast.errors import InputError


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


def _scaled(Z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Z`` scaled by the power of two that puts its largest ``|value|`` in ``[0.5, 1)``
    (exact), then cast to ``dtype``. The basis ``Z V Λ^{-1/2}`` does not depend on the scale,
    and the scaled Gram matrix cannot underflow: standardised columns of features far below the
    ``1e-8`` of the standardisation (~1e-30) are themselves tiny (~1e-22), and their products
    would be float32 subnormals."""
    top = float(Z.abs().max()) if Z.numel() else 0.0
    if top > 0:
        Z = torch.ldexp(Z, torch.tensor(-math.frexp(top)[1], dtype=torch.int64, device=Z.device))
    return Z.to(dtype)


def _top_eig(G: torch.Tensor, r: int, name: str):
    evals, evecs = torch.linalg.eigh(G)  # ascending
    evals, evecs = evals.flip(0)[:r], evecs.flip(1)[:, :r]
    # relative to the largest eigenvalue: standardised columns of features far below the 1e-8
    # of the standardisation (~1e-30) have tiny but well-defined spectra
    tol = float(evals[0]) * G.shape[0] * torch.finfo(torch.float64).eps * 16
    if not float(evals[0]) > 0 or float(evals[-1]) <= tol:
        raise InputError(
            f"cca_dim: {r} exceeds the numerical rank of {name} after standardisation "
            f"(its {r}-th singular value is ~0)"
        )
    return evals, evecs


def svcca_scores(xs: list, ys: list, cca_dim: int, dtype: torch.dtype | None = None, *,
                 x_names=None, y_names=None) -> torch.Tensor:
    """SVCCA of every layer pair, ``[Lx, Ly]`` float64: the one SVCCA scorer.

    Each layer's top ``cca_dim`` left singular vectors are formed once as the ``[N, r]``
    orthonormal basis ``U = X_s V Λ^{-1/2}`` (the product in float64); each pair's score is
    the mean of the singular values of ``U_xᵀ U_y`` (an ``r x r`` SVD), clipped to
    ``[0, 1]``.

    Args:
        xs, ys: lists of ``[N, D]`` tensors (the same ``N``).
        cca_dim: ``r``, at most ``min(N - 1, D)`` of every layer (checked by the caller).
        dtype: the dtype of the standardised features and their Gram matrices; ``None``:
            each layer's own dtype.
        x_names, y_names: how errors name each layer (default ``"x layer i"``,
            ``"y layer j"``).

    Returns:
        The ``[Lx, Ly]`` float64 tensor of scores.

    Raises:
        InputError: ``cca_dim`` exceeds a layer's numerical rank.

    Example:
        >>> import torch
        >>> from prh_fast.metrics._svcca import svcca_scores
        >>> x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> round(float(svcca_scores([x], [2 * x], 3)[0, 0]), 3)
        1.0
    """
    x_names = x_names or [f"x layer {i}" for i in range(len(xs))]
    y_names = y_names or [f"y layer {j}" for j in range(len(ys))]

    def basis(x, name):
        xs_ = _scaled(_standardised(x, torch.float64), x.dtype if dtype is None else dtype)
        lam, V = _top_eig((xs_.T @ xs_).double(), cca_dim, name)
        return (xs_.double() @ V) / lam.sqrt()  # [N, r] orthonormal, centred columns

    ux = [basis(x, name) for x, name in zip(xs, x_names)]
    uy = [basis(y, name) for y, name in zip(ys, y_names)]
    out = torch.empty((len(xs), len(ys)), dtype=torch.float64)
    for i, a in enumerate(ux):
        for j, b in enumerate(uy):
            out[i, j] = float(torch.linalg.svdvals(a.T @ b).clamp(0.0, 1.0).mean())
    return out
