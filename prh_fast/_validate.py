"""Input checks at the Python boundary.

Every public entry point funnels its arguments through these helpers so that bad input gives a
``ValueError`` that names the argument, never a crash deep inside a kernel or a silent wrong
number (validation at the boundary). The native entry points check again.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

__all__ = [
    "as_features",
    "as_pair",
    "as_tensor",
    "check_topk",
    "check_positive_int",
    "check_positive_float",
    "check_memory_budget",
    "compute_dtype",
]


def as_tensor(x, name: str, *, detach: bool = True) -> torch.Tensor:
    """``x`` (torch tensor or NumPy array, any rank) as a torch tensor, without a copy when
    possible.

    NumPy arrays are shared when ``torch.from_numpy`` can view them; read-only arrays and
    arrays with negative strides (``x[::-1]``) are copied. ``detach``: a tensor that requires
    grad (features straight from a model) is detached: the metrics and the neighbour search
    are not differentiable, and their in-place / ``out=`` products refuse autograd inputs.
    """
    if isinstance(x, torch.Tensor):
        return x.detach() if detach and x.requires_grad else x
    if isinstance(x, np.ndarray):
        if x.dtype == np.float16 or np.issubdtype(x.dtype, np.floating):
            # torch.from_numpy shares memory and keeps strides; a read-only array is fine
            # because nothing here writes into inputs, but torch refuses negative strides.
            if not x.flags.writeable or any(st < 0 for st in x.strides):
                x = x.copy()
            return torch.from_numpy(x)
        raise ValueError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    raise ValueError(
        f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
    )


#: Kept for callers that validate their own rank (same as ``as_tensor``).
_to_tensor = as_tensor


def as_features(x, name: str, *, check_finite: bool = True, detach: bool = True) -> torch.Tensor:
    """Return ``x`` as a 2-D floating torch tensor ``[N, D]`` (no copy when possible).

    Tensors that require grad are detached (``detach=False`` keeps the graph, for callers
    whose own computation is differentiable); NumPy arrays with negative strides are copied.
    Raises ``ValueError`` naming ``name`` for: a non-array, a non-floating dtype, a rank other
    than 2, an empty dimension, or NaN/Inf values.
    """
    t = as_tensor(x, name, detach=detach)
    if not t.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D array [N, D] of features, got {t.dim()}-D with shape "
            f"{tuple(t.shape)}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name}: expected a non-empty [N, D] array, got shape {tuple(t.shape)}")
    if check_finite and not bool(torch.isfinite(t.detach()).all()):
        bad = int((~torch.isfinite(t.detach())).sum())
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


def check_positive_float(value, name: str) -> float:
    """A positive, finite real number (int or float, NumPy scalars included) as a float;
    ``ValueError`` naming ``name`` for anything else (``None``, strings, bools, NaN, inf,
    zero, negative numbers)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return v


def check_memory_budget(value, default: int) -> int:
    """``memory_budget`` (bytes) as a positive int: ``None`` gives ``default``; ints (NumPy
    included) and integral floats (``256e6``) are accepted; anything else -- strings, bools,
    fractions, zero or negative numbers -- is a ``ValueError`` naming ``memory_budget``."""
    if value is None:
        return int(default)
    ok = isinstance(value, (numbers.Integral, np.integer)) and not isinstance(
        value, (bool, np.bool_))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) \
            and float(value).is_integer():
        ok = True
    if not ok or value <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {value!r}")
    return int(value)


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
