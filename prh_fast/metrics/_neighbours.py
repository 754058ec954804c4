"""Neighbour-set scores between kNN lists: intersection, cycle, LCS and Levenshtein.

``neighbour_scores(metric, knn_a, knn_b)`` takes ``[La, N, k]`` and ``[Lb, N, k]`` lists (one per
layer) and returns the ``[La, Lb]`` matrix of per-row means of the raw quantity:

- ``"mutual"``: ``|set(a_i) ∩ set(b_i)|``
- ``"cycle"``: ``1`` if ``i`` is among the A-neighbours of one of its B-neighbours
- ``"lcs"``: length of the longest common subsequence of the ordered lists
- ``"edit"``: Levenshtein distance between the ordered lists

On CPU this is one call into the native OpenMP kernels; without them (or on a GPU, until the
CUDA kernels are verified on hardware) the vectorised torch versions below run instead.
"""
from __future__ import annotations

import torch

from prh_fast import _native

METRICS = ("mutual", "cycle", "lcs", "edit")

# Rows per chunk in the torch fallbacks: keep [rows, k, k] temporaries around 16M elements.
_CHUNK_ELEMS = 1 << 24


def neighbour_scores(metric: str, knn_a: torch.Tensor, knn_b: torch.Tensor) -> torch.Tensor:
    """``[La, Lb]`` float64 matrix of mean per-row scores (see module docstring)."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if knn_a.dim() == 2:
        knn_a = knn_a.unsqueeze(0)
    if knn_b.dim() == 2:
        knn_b = knn_b.unsqueeze(0)
    if knn_a.shape[1:] != knn_b.shape[1:]:
        raise ValueError(
            f"knn_a and knn_b must share [N, k], got {tuple(knn_a.shape)} and {tuple(knn_b.shape)}"
        )
    if knn_a.device.type == "cpu" and _native.HAS_NATIVE:
        a = knn_a.to(torch.int64).contiguous().numpy()
        b = knn_b.to(torch.int64).contiguous().numpy()
        return torch.from_numpy(_native.native().neighbour_scores(metric, a, b))
    out = torch.empty((knn_a.shape[0], knn_b.shape[0]), dtype=torch.float64)
    for p in range(knn_a.shape[0]):
        for q in range(knn_b.shape[0]):
            out[p, q] = row_values_torch(metric, knn_a[p], knn_b[q]).double().mean().cpu()
    return out


def row_values_torch(metric: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row raw values ``[N]`` (int64) computed with torch ops, on the lists' device."""
    n, k = a.shape
    rows = max(1, _CHUNK_ELEMS // (k * k))
    out = torch.empty(n, dtype=torch.int64, device=a.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        ac, bc = a[r0:r1], b[r0:r1]
        if metric == "mutual":
            out[r0:r1] = row_membership(ac, bc).sum(dim=1)
        elif metric == "cycle":
            me = torch.arange(r0, r1, device=a.device).view(-1, 1, 1)
            out[r0:r1] = (a[bc] == me).flatten(1).any(dim=1).long()
        elif metric == "lcs":
            out[r0:r1] = _lcs_rows(ac, bc)
        else:
            out[r0:r1] = _levenshtein_rows(ac, bc)
    return out


def row_membership(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N, kx]`` bool: ``x[i, t]`` occurs in row ``i`` of ``y`` (O(N·k log k), O(N·k) memory)."""
    ys = y.sort(dim=1).values.contiguous()
    pos = torch.searchsorted(ys, x.contiguous()).clamp_max_(ys.shape[1] - 1)
    return ys.gather(1, pos) == x


def _lcs_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Classic O(k^2) LCS dynamic programme, vectorised across rows."""
    r, k = a.shape
    prev = torch.zeros((r, k + 1), dtype=torch.int64, device=a.device)
    for t in range(k):
        cur = torch.zeros_like(prev)
        eq = a[:, t : t + 1] == b  # [r, k]
        for s in range(1, k + 1):
            cur[:, s] = torch.where(
                eq[:, s - 1], prev[:, s - 1] + 1, torch.maximum(prev[:, s], cur[:, s - 1])
            )
        prev = cur
    return prev[:, k]


def _levenshtein_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Levenshtein distance (unit costs) between row-aligned lists, vectorised across rows."""
    r, k = a.shape
    prev = torch.arange(k + 1, device=a.device).expand(r, -1).clone()
    for t in range(1, k + 1):
        cur = torch.empty_like(prev)
        cur[:, 0] = t
        eq = a[:, t - 1 : t] == b
        for s in range(1, k + 1):
            sub = prev[:, s - 1] + (~eq[:, s - 1]).long()
            cur[:, s] = torch.minimum(torch.minimum(prev[:, s] + 1, cur[:, s - 1] + 1), sub)
        prev = cur
    return prev[:, k]
