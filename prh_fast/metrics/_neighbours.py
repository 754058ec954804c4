"""Neighbour-set scores between kNN lists: intersection, cycle, LCS and Levenshtein.

``neighbour_scores(metric, knn_a, knn_b)`` takes ``[La, N, k]`` and ``[Lb, N, k]`` lists (one per
layer) and returns the ``[La, Lb]`` matrix of per-row means of the raw quantity:

- ``"mutual"``: ``|set(a_i) ∩ set(b_i)|``
- ``"cycle"``: ``1`` if ``i`` is among the A-neighbours of one of its B-neighbours
- ``"lcs"``: length of the longest common subsequence of the ordered lists
- ``"edit"``: Levenshtein distance between the ordered lists

On CPU this is one call into the native OpenMP kernels; without them the vectorised torch
versions below run instead. On a GPU, ``backend="cuda"`` runs every layer pair in one launch of
the CUDA kernel (``csrc/setops/setops_cuda.cu``, the same per-row code as the CPU kernel);
``auto`` stays on the torch versions there until those kernels have passed
``tests/test_cuda.py`` on hardware (``_backend.CUDA_SETOPS_AUTO``).
"""
from __future__ import annotations

import torch

from prh_fast import _native

METRICS = ("mutual", "cycle", "lcs", "edit")

# Rows per chunk in the torch fallbacks: keep [rows, k, k] temporaries around 16M elements.
_CHUNK_ELEMS = 1 << 24


def neighbour_scores(metric: str, knn_a: torch.Tensor, knn_b: torch.Tensor, *,
                     backend: str | None = None) -> torch.Tensor:
    """``[La, Lb]`` float64 matrix of mean per-row scores (see module docstring), on the CPU.

    ``backend``: ``None`` (the native kernels on CPU, torch on other devices), or a name for
    ``_backend.resolve_setops_backend`` (``"cuda"`` for the CUDA kernel on CUDA lists)."""
    knn_a, knn_b = _layer_lists(metric, knn_a, knn_b)
    if knn_a.device != knn_b.device:
        raise ValueError(f"knn_b: must be on knn_a's device {knn_a.device}, got {knn_b.device}")
    if backend is not None:
        from prh_fast._backend import resolve_setops_backend

        name = resolve_setops_backend(backend, knn_a.device, knn_a.shape[2])
        if name == "cuda":
            return neighbour_scores_cuda(metric, knn_a, knn_b).cpu()
        if name == "torch":
            return _scores_torch(metric, knn_a, knn_b)
    if knn_a.device.type == "cpu" and _native.HAS_NATIVE:
        a = knn_a.to(torch.int64).contiguous().numpy()
        b = knn_b.to(torch.int64).contiguous().numpy()
        return torch.from_numpy(_native.native().neighbour_scores(metric, a, b))
    return _scores_torch(metric, knn_a, knn_b)


def _layer_lists(metric: str, knn_a: torch.Tensor, knn_b: torch.Tensor):
    """Check ``metric`` and the lists: ``[N, k]`` or ``[L, N, k]`` each, sharing ``[N, k]``;
    returns both as ``[L, N, k]``."""
    if metric not in METRICS:
        raise ValueError(f"metric: expected one of {METRICS}, got {metric!r}")
    if knn_a.dim() == 2:
        knn_a = knn_a.unsqueeze(0)
    if knn_b.dim() == 2:
        knn_b = knn_b.unsqueeze(0)
    if knn_a.dim() != 3 or knn_a.shape[1:] != knn_b.shape[1:]:
        raise ValueError(f"knn_a and knn_b must be [L, N, k] lists sharing [N, k], got "
                         f"{tuple(knn_a.shape)} and {tuple(knn_b.shape)}")
    return knn_a, knn_b


def _scores_torch(metric, knn_a, knn_b):
    out = torch.empty((knn_a.shape[0], knn_b.shape[0]), dtype=torch.float64)
    for p in range(knn_a.shape[0]):
        for q in range(knn_b.shape[0]):
            out[p, q] = row_values_torch(metric, knn_a[p], knn_b[q]).double().mean().cpu()
    return out


def check_lists_in_range(lists: torch.Tensor, n: int, name: str) -> None:
    """Every entry of ``lists`` must index a row (the GPU kernels read rows ``lists[i, t]``)."""
    if lists.numel():
        lo, hi = torch.aminmax(lists)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= n:
            raise ValueError(f"{name}: entries out of range [0, {n}) (min {lo}, max {hi})")


#: Layer pairs per CUDA launch (the kernel's grid.y).
_CUDA_MAX_PAIRS = 65535


def neighbour_scores_cuda(metric: str, knn_a: torch.Tensor, knn_b: torch.Tensor) -> torch.Tensor:
    """``[La, Lb]`` float64 scores on the lists' CUDA device: one launch for every pair of
    layers (``La·Lb <= 65535``; more are split by rows of ``knn_a``), on the current stream."""
    from prh_fast._backend import CUDA_MAX_K

    knn_a, knn_b = _layer_lists(metric, knn_a, knn_b)
    if knn_a.device.type != "cuda" or knn_b.device != knn_a.device:
        raise ValueError(f"knn_a, knn_b: expected lists on one CUDA device, got {knn_a.device} "
                         f"and {knn_b.device}")
    if not _native.HAS_CUDA_KERNELS:
        raise RuntimeError("prh_fast._C was built without CUDA kernels (rebuild with "
                           "PRH_FAST_CUDA=1 and nvcc on PATH)")
    la, n, k = knn_a.shape
    lb = knn_b.shape[0]
    if not 1 <= k <= CUDA_MAX_K or n < 1:
        raise ValueError(f"k: the CUDA neighbour-set kernels take 1 <= k <= {CUDA_MAX_K} and "
                         f"N >= 1, got k = {k}, N = {n}")
    a = knn_a.to(torch.int64).contiguous()
    b = knn_b.to(torch.int64).contiguous()
    check_lists_in_range(a, n, "knn_a")
    check_lists_in_range(b, n, "knn_b")
    C = _native.native()
    with torch.cuda.device(a.device):
        out = torch.empty((la, lb), dtype=torch.float64, device=a.device)
        stream = torch.cuda.current_stream(a.device).cuda_stream
        rows = max(1, _CUDA_MAX_PAIRS // lb)
        for p0 in range(0, la, rows):
            p1 = min(la, p0 + rows)
            C.cuda_neighbour_scores(metric, a[p0:p1].data_ptr(), b.data_ptr(), p1 - p0, lb, n,
                                    k, out[p0:p1].data_ptr(), stream)
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
