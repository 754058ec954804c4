"""Input checks at the Python boundary.

Every public entry point funnels its arguments through these helpers so that bad input gives a
``ValueError`` that names the argument, never a crash deep inside a kernel or a silent wrong
number (validation at the boundary). The native entry points check again.

Features come in three shapes, each with one validator here: one ``[N, D]`` matrix
(:func:`as_features`), a pair of them (:func:`as_pair`, the single-pair metrics), and one
model's layers, a ``[N, L, D]`` tensor or a list of ``[N, D_l]`` (:func:`as_layers`, and
:func:`as_layer_pair` for two models; :func:`layer_feats` and :func:`count_samples` read a model
given to the grid without validating every value).
"""
from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import torch

from prh_fast.errors import InputError

__all__ = [
    "as_features",
    "as_pair",
    "as_layers",
    "as_layer_pair",
    "layer_feats",
    "count_samples",
    "as_tensor",
    "check_topk",
    "check_positive_int",
    "check_positive_float",
    "check_memory_budget",
    "resolve_memory_budget",
    "compute_dtype",
    "Features",
    "Layers",
    "StrPath",
]

#: One ``[N, D]`` matrix of features, as the public entry points accept it.
Features: TypeAlias = "torch.Tensor | np.ndarray"
#: One model's layers: a ``[N, L, D]`` tensor or array, or a sequence of ``[N, D_l]`` ones.
Layers: TypeAlias = "torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]"
#: A file or folder name.
StrPath: TypeAlias = "str | os.PathLike[str]"


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
        raise InputError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    raise InputError(
        f"{name}: expected a torch.Tensor or numpy.ndarray, got {type(x).__name__}"
    )


#: Kept for callers that validate their own rank (same as ``as_tensor``).
_to_tensor = as_tensor


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite, in one reduction: a NaN or an infinity makes the
    sum NaN or infinite, so a finite sum proves the values finite. Only when the sum is not
    finite (a bad value, or finite values whose sum overflows) is every value tested.

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
        >>> all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows; the values are finite
        True
    """
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def as_features(x, name: str, *, check_finite: bool = True, detach: bool = True) -> torch.Tensor:
    """Return ``x`` as a 2-D floating torch tensor ``[N, D]`` (no copy when possible).

    Tensors that require grad are detached (``detach=False`` keeps the graph, for callers
    whose own computation is differentiable); NumPy arrays with negative strides are copied.
    Raises ``ValueError`` naming ``name`` for: a non-array, a non-floating dtype, a rank other
    than 2, an empty dimension, or NaN/Inf values.
    """
    t = as_tensor(x, name, detach=detach)
    if not t.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != 2:
        raise InputError(
            f"{name}: expected a 2-D array [N, D] of features, got {t.dim()}-D with shape "
            f"{tuple(t.shape)}"
        )
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise InputError(f"{name}: expected a non-empty [N, D] array, got shape {tuple(t.shape)}")
    if check_finite and not all_finite(t.detach()):
        bad = int((~torch.isfinite(t.detach())).sum())
        raise InputError(f"{name}: contains {bad} NaN or Inf value(s)")
    return t


def as_pair(feats_A, feats_B, *, names=("feats_A", "feats_B")):
    """Validate a pair of paired feature matrices: same N, same device."""
    A = as_features(feats_A, names[0])
    B = as_features(feats_B, names[1])
    if A.shape[0] != B.shape[0]:
        raise InputError(
            f"{names[0]} and {names[1]} must have the same number of samples (rows), got "
            f"{A.shape[0]} and {B.shape[0]}"
        )
    if A.device != B.device:
        raise InputError(
            f"{names[0]} and {names[1]} must be on the same device, got {A.device} and {B.device}"
        )
    return A, B


def as_layers(feats, name: str) -> list:
    """One model's layers as a list of 2-D tensors (views, no copies when possible).

    Args:
        feats: a ``[N, L, D]`` tensor or array, or a list (tuple) of ``[N, D_l]`` ones.
        name: the argument's name in errors (``name[i]`` / ``name[:, i]`` for a layer).

    Returns:
        A list of ``[N, D_l]`` floating tensors (each checked by :func:`as_features`).

    Raises:
        InputError: naming ``name`` (or the layer) for an empty list, a wrong rank or type,
            no layers, or layers with different numbers of samples.

    Example:
        >>> import torch
        >>> [tuple(x.shape) for x in as_layers(torch.zeros(5, 2, 3), "feats")]
        [(5, 3), (5, 3)]
    """
    if isinstance(feats, (list, tuple)):
        if not feats:
            raise InputError(f"{name}: expected at least one layer, got an empty list")
        layers = [as_features(f, f"{name}[{i}]") for i, f in enumerate(feats)]
    else:
        if not isinstance(feats, (torch.Tensor, np.ndarray)):
            raise InputError(f"{name}: expected a [N, L, D] tensor or a list of [N, D] "
                             f"tensors, got {type(feats).__name__}")
        t = as_tensor(feats, name)
        if t.dim() != 3:
            raise InputError(f"{name}: expected a [N, L, D] tensor or a list of [N, D] "
                             f"tensors, got a {t.dim()}-D tensor of shape {tuple(t.shape)}")
        layers = [as_features(t[:, i, :], f"{name}[:, {i}]") for i in range(t.shape[1])]
        if not layers:
            raise InputError(f"{name}: has no layers (shape {tuple(t.shape)})")
    n = layers[0].shape[0]
    for i, x in enumerate(layers):
        if x.shape[0] != n:
            raise InputError(f"{name}[{i}] has {x.shape[0]} samples, {name}[0] has {n}")
    return layers


def as_layer_pair(x_feats, y_feats, *, names=("x_feats", "y_feats")) -> tuple:
    """Two models' layers (:func:`as_layers`), checked for the same ``N`` and device.

    Args:
        x_feats, y_feats: each a ``[N, L, D]`` tensor/array or a list of ``[N, D_l]``.
        names: the arguments' names in errors.

    Returns:
        ``(x_layers, y_layers)``, lists of 2-D tensors.

    Raises:
        InputError: naming the argument, as :func:`as_layers`, or both for different ``N`` or
            devices.

    Example:
        >>> import torch
        >>> xs, ys = as_layer_pair(torch.zeros(4, 3, 2), [torch.ones(4, 5)])
        >>> len(xs), len(ys)
        (3, 1)
    """
    xs, ys = as_layers(x_feats, names[0]), as_layers(y_feats, names[1])
    n = xs[0].shape[0]
    if ys[0].shape[0] != n:
        raise InputError(f"{names[0]} and {names[1]} must have the same number of samples, "
                         f"got {n} and {ys[0].shape[0]}")
    if xs[0].device != ys[0].device:
        raise InputError(f"{names[0]} and {names[1]} must be on the same device")
    return xs, ys


def layer_feats(obj):
    """A model's features given in memory: ``obj["feats"]`` for a record dict (the feature
    files' format), else ``obj`` itself.

    Example:
        >>> layer_feats({"feats": [1, 2]})
        [1, 2]
    """
    return obj["feats"] if isinstance(obj, dict) and "feats" in obj else obj


def count_samples(feats, where: str) -> int:
    """``N`` of one model's in-memory features (read from the shape, values unchecked).

    Args:
        feats: a ``[N, L, D]`` tensor/array, a list of ``[N, D_l]``, or a record dict.
        where: how errors name the model.

    Returns:
        The number of samples (rows) of the first layer.

    Raises:
        InputError: naming ``where`` for an empty list or something without a 2-D shape.

    Example:
        >>> import numpy as np
        >>> count_samples(np.zeros((7, 2, 3)), "model 'a'")
        7
    """
    f = layer_feats(feats)
    if isinstance(f, (list, tuple)):
        if not f:
            raise InputError(f"{where}: has no layers")
        f = f[0]
    if not hasattr(f, "shape") or len(f.shape) < 2:
        raise InputError(f"{where}: expected a [N, L, D] tensor or a list of [N, D] tensors, "
                         f"got {type(f).__name__}")
    return int(f.shape[0])


def check_positive_int(value, name: str, *, minimum: int = 1, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name}: expected an integer, got {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        hi = "" if maximum is None else f" and <= {maximum}"
        raise InputError(f"{name}: expected an integer >= {minimum}{hi}, got {value}")
    return value


def check_positive_float(value, name: str) -> float:
    """A positive, finite real number (int or float, NumPy scalars included) as a float;
    ``ValueError`` naming ``name`` for anything else (``None``, strings, bools, NaN, inf,
    zero, negative numbers)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InputError(f"{name}: expected a positive finite number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{name}: expected a positive finite number, got {value!r}")
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
        raise InputError(f"memory_budget: expected a positive number of bytes, got {value!r}")
    return int(value)


def resolve_memory_budget(memory_budget=None, stream_budget=None, *, stacklevel: int = 3):
    """The ``memory_budget`` keyword, accepting its deprecated alias ``stream_budget``.

    ``memory_budget`` is the one name for "bytes of scratch memory" across prh_fast (the
    neighbour search's tiles, CKA's kernel row blocks, the streamed store computations).

    Args:
        memory_budget: bytes, or ``None`` for the computation's own default.
        stream_budget: the former name; still accepted with a ``FutureWarning``.
        stacklevel: the warning's ``stacklevel`` (3: the caller of the function that calls
            this one).

    Returns:
        The value given (unchecked beyond the aliasing; ``None`` when neither was given).

    Raises:
        InputError: both names were given.

    Example:
        >>> resolve_memory_budget(1 << 20)
        1048576
    """
    if stream_budget is None:
        return memory_budget
    if memory_budget is not None:
        raise InputError("memory_budget: pass memory_budget only (stream_budget is its former, "
                         "deprecated name), not both")
    import warnings

    warnings.warn("stream_budget is deprecated: use memory_budget (the same bytes of scratch "
                  "memory)", FutureWarning, stacklevel=stacklevel)
    return stream_budget


def check_topk(topk, n: int, name: str = "topk", *, minimum: int = 1) -> int:
    """``minimum <= topk <= n - 1`` (a point is never its own neighbour)."""
    if n - 1 < minimum:
        raise InputError(
            f"{name}: needs at least {minimum + 1} samples for {name} >= {minimum}, got N = {n}"
        )
    return check_positive_int(topk, name, minimum=minimum, maximum=n - 1)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
