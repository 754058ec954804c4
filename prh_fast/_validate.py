"""Input checks at the Python boundary.

Every public entry point funnels its arguments through these helpers so that bad input gives a
``ValueError`` that names the argument, never a crash deep inside a kernel or a silent wrong
number (STYLE: "validate at the boundary"). The native entry points check again.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

__all__ = [
    "as_features",
    "as_pair",
    "check_topk",
    "check_positive_int",
    "compute_dtype",
]


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == np.float16 or np.issubdtype(x.dtype, np.floating):
            # torch.from_numpy shares memory and keeps strides; a read-only array is fine
            # because nothing here writes into inputs.
            if not x.flags.writeable:
                x = x.copy()
            return torch.from_numpy(x)
        raise ValueError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    raise ValueError(
        f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
    )


def as_features(x, name: str, *, check_finite: bool = True) -> torch.Tensor:
    """Return ``x`` as a 2-D floating torch tensor ``[N, D]`` (no copy when possible).

    Raises ``ValueError`` naming ``name`` for: a non-array, a non-floating dtype, a rank other
    than 2, an empty dimension, or NaN/Inf values.
    """
    t = _to_tensor(x, name)
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D array [N, D] of features, got {t.dim()}-D with shape "
            f"{tuple(t.shape)}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] array, got shape {tuple(t.shape)}")
    if check_finite and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name}: contains {bad} NaN or Inf value(s)")
    return t


def as_pair(feats_A, feats_B, *, names=("feats_A", "feats_B")):
    """Validate a pair of paired feature matrices: same N, same device."""
    A = as_features(feats_A, names[0])
    B = as_features(feats_B, names[1])
    if A.shape[0] != B.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of samples (rows), got "
            f"{A.shape[0]} and {B.shape[0]}"
        )
    if A.device != B.device:
        raise ValueError(
            f"{names[0]} and {names[1]} must be on the same device, got {A.device} and {B.device}"
        )
    return A, B


def check_positive_int(value, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name}: expected an integer >= {minimum}{hi}, got {value}")
    return value


def check_topk(topk, n: int, name: str = "topk", *, minimum: int = 1) -> int:
    """``minimum <= topk <= n - 1`` (a point is never its own neighbour)."""
    if n - 1 < minimum:
        raise ValueError(
            f"{name}: needs at least {minimum + 1} samples for {name} >= {minimum}, got N = {n}"
        )
    return check_positive_int(topk, name, minimum=minimum, maximum=n - 1)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
