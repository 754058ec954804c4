"""Neighbour-set scores between kNN lists: intersection, cycle, LCS and Levenshtein.

``neighbour_scores(metric, knn_a, knn_b)`` takes ``[La, N, k]`` and ``[Lb, N, k]`` lists (one per
layer) and returns the ``[La, Lb]`` matrix of per-row means of the raw quantity:

- ``"mutual"``: ``|set(a_i) ∩ set(b_i)|``
- ``"cycle"``: ``1`` if ``i`` is among the A-neighbours of one of its B-neighbours
- ``"lcs"``: length of the longest common subsequence of the ordered lists
- ``"edit"``: Levenshtein distance between the ordered lists

Which implementation runs is the backend registry's choice (``prh_fast.knn._backends``,
``resolve(..., op="setops")``): on CPU one call into the native OpenMP kernels (the vectorised
torch versions below without them); on a GPU, ``backend="cuda"`` runs every layer pair in one
launch of the CUDA kernel (``csrc/setops/setops_cuda.cu``, the same per-row code as the CPU
kernel), while ``auto`` (and every other backend) uses the torch versions there: the registry
declares the CUDA implementation not verified on hardware, so auto does not pick it.
"""
from __future__ import annotations

import contextlib

import torch

from prh_fast import _native
from prh_fast.errors import BackendUnavailableError, InputError

METRICS = ("mutual", "cycle", "lcs", "edit")

# Rows per chunk in the torch fallbacks: keep [rows, k, k] temporaries around 16M elements.
_CHUNK_ELEMS = 1 << 24


def neighbour_scores(metric: str, knn_a: torch.Tensor, knn_b: torch.Tensor, *,
                     backend=None) -> torch.Tensor:
    """``[La, Lb]`` float64 matrix of mean per-row scores (see module docstring), on the CPU.

    Args:
        metric: ``"mutual"``, ``"cycle"``, ``"lcs"`` or ``"edit"``.
        knn_a: ``[La, N, k]`` (or ``[N, k]``) lists.
        knn_b: ``[Lb, N, k]`` (or ``[N, k]``) lists on ``knn_a``'s device.
        backend: the computation's backend (``None``: the configured one, else auto); the
            registry maps it to the native CPU, torch or CUDA implementation
            (``"cuda"``: the CUDA kernel, for CUDA lists).

    Returns:
        ``[La, Lb]`` float64 CPU tensor.

    Raises:
        InputError: a bad metric, shapes or devices, or a backend that does not take these
            lists (``"cuda"`` with CPU lists or ``k > CUDA_MAX_K``).
        BackendUnavailableError: a backend asked for by name that cannot run here.

    Example:
        >>> a = torch.tensor([[1, 2], [0, 2], [0, 1]])
        >>> neighbour_scores("mutual", a, a, backend="torch")
        tensor([[2.]], dtype=torch.float64)
    """
    from prh_fast.knn._backends import resolve

    knn_a, knn_b = _layer_lists(metric, knn_a, knn_b)
    if knn_a.device != knn_b.device:
        raise InputError(f"knn_b: must be on knn_a's device {knn_a.device}, got {knn_b.device}")
    impl = resolve(backend, knn_a.device, op="setops", k=knn_a.shape[2]).setops
    if impl == "cuda":
        return neighbour_scores_cuda(metric, knn_a, knn_b).cpu()
    if impl == "cpu":
        a = knn_a.to(torch.int64).contiguous().numpy()
        b = knn_b.to(torch.int64).contiguous().numpy()
        return torch.from_numpy(_native.native().neighbour_scores(metric, a, b))
    return _scores_torch(metric, knn_a, knn_b)


def _layer_lists(metric: str, knn_a: torch.Tensor, knn_b: torch.Tensor):
    """Check ``metric`` and the lists: ``[N, k]`` or ``[L, N, k]`` each, sharing ``[N, k]``;
    returns both as ``[L, N, k]``."""
    if metric not in METRICS:
        raise InputError(f"metric: expected one of {METRICS}, got {metric!r}")
    if knn_a.dim() == 2:
        knn_a = knn_a.unsqueeze(0)
    if knn_b.dim() == 2:
        knn_b = knn_b.unsqueeze(0)
    if knn_a.dim() != 3 or knn_a.shape[1:] != knn_b.shape[1:]:
        raise InputError(f"knn_a and knn_b must be [L, N, k] lists sharing [N, k], got "
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
            raise InputError(f"{name}: entries out of range [0, {n}) (min {lo}, max {hi})")


#: Layer pairs per CUDA launch (the kernel's grid.y).
_CUDA_MAX_PAIRS = 65535


@contextlib.contextmanager
def cuda_stream(device: torch.device):
    """Make ``device`` the current CUDA device inside the block and yield the handle (an int)
    of its current stream, which the native launchers take.

    Example:
        >>> callable(cuda_stream)
        True
    """
    with torch.cuda.device(device):
        yield torch.cuda.current_stream(device).cuda_stream


def neighbour_scores_cuda(metric: str, knn_a: torch.Tensor, knn_b: torch.Tensor) -> torch.Tensor:
    """``[La, Lb]`` float64 scores on the lists' CUDA device: one launch for every pair of
    layers (``La·Lb <= 65535``; more are split by rows of ``knn_a``), on the current stream.

    Args:
        metric: ``"mutual"``, ``"cycle"``, ``"lcs"`` or ``"edit"``.
        knn_a, knn_b: ``[La, N, k]`` / ``[Lb, N, k]`` (or ``[N, k]``) lists on one CUDA device,
            ``1 <= k <= CUDA_MAX_K``.

    Returns:
        ``[La, Lb]`` float64 tensor on that device.

    Raises:
        InputError: lists that are not on one CUDA device, a bad metric, shape, ``k`` or entry.
        BackendUnavailableError: ``prh_fast._C`` was built without CUDA kernels.

    Example:
        >>> a = torch.zeros(4, 2, dtype=torch.int64)
        >>> neighbour_scores_cuda("mutual", a, a)  # CPU lists
        Traceback (most recent call last):
        ...
        prh_fast.errors.InputError: knn_a, knn_b: expected lists on one CUDA device, ...
    """
    from prh_fast.knn._backends import CUDA_MAX_K, device_type

    knn_a, knn_b = _layer_lists(metric, knn_a, knn_b)
    if device_type(knn_a.device) != "cuda" or knn_b.device != knn_a.device:
        raise InputError(f"knn_a, knn_b: expected lists on one CUDA device, got {knn_a.device} "
                         f"and {knn_b.device}")
    if not _native.HAS_CUDA_KERNELS:
        raise BackendUnavailableError("prh_fast._C was built without CUDA kernels (rebuild "
                                      "with PRH_FAST_CUDA=1 and nvcc on PATH)")
    la, n, k = knn_a.shape
    lb = knn_b.shape[0]
    if not 1 <= k <= CUDA_MAX_K or n < 1:
        raise InputError(f"k: the CUDA neighbour-set kernels take 1 <= k <= {CUDA_MAX_K} and "
                         f"N >= 1, got k = {k}, N = {n}")
    a = knn_a.to(torch.int64).contiguous()
    b = knn_b.to(torch.int64).contiguous()
    check_lists_in_range(a, n, "knn_a")
    check_lists_in_range(b, n, "knn_b")
    C = _native.native()
    with cuda_stream(a.device) as stream:
        out = torch.empty((la, lb), dtype=torch.float64, device=a.device)
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
