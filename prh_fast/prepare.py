"""Outlier clipping of a model's features before alignment (docs/metrics.md, pipeline step 2).

Drop-in for the reference's ``prepare_features`` (``measure_alignment.py``), which calls
``remove_outliers(feats.float(), q=q, exact=exact)``: find a threshold ``t`` from the absolute
values, then clamp every value to ``[-t, t]``.

- exact mode: ``t = sorted(|x|)[int(q * M)]`` over all ``M`` values of the model tensor (all
  layers at once). The reference sorts everything; here the element is *selected*
  (``torch.kthvalue`` up to ``2**24`` values, above that a chunked radix select on the float bit
  patterns that needs O(chunk) extra memory), so there is no size limit.
- approximate mode: ``t = mean_i quantile(|x_i|, q)``, each sample's (row's) q-quantile over its
  ``L * D`` values with linear interpolation, exactly as
  ``torch.quantile(x.abs().flatten(1), q, dim=1).mean()``, but without ``torch.quantile``'s
  ``2**24``-element input cap (the two order statistics around the rank are selected per row, in
  row chunks).

A list of per-layer tensors gets one threshold per layer, as the reference's loop over the list.
"""
from __future__ import annotations

import numbers
from typing import TypeVar

import numpy as np
import torch

from prh_fast._validate import all_finite, as_features, as_tensor
from prh_fast.errors import InputError

#: The structures prepare_features gives back as it gets them.
_LayersT = TypeVar("_LayersT", torch.Tensor, np.ndarray, list, tuple)

__all__ = ["prepare_features", "normalize_rows", "row_norms"]

# Values handled per chunk: bounds the temporary |x| copies (64 MB in float32) and is also the
# largest input torch.quantile accepts, below which kthvalue is the cheapest selection.
_CHUNK = 1 << 24


# --------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------
#: torch.quantile's rank arithmetic changed in 2.14 (see ``_approx_threshold``).
_RANK_IN_FLOAT64 = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)


def _row_chunks(x: torch.Tensor, chunk: int):
    """Yield ``x`` (first dim = rows) as flat contiguous pieces of about ``chunk`` values."""
    per_row = max(1, x[0].numel())
    rows = max(1, chunk // per_row)
    for r0 in range(0, x.shape[0], rows):
        yield x[r0:r0 + rows].reshape(-1)


def _kth_abs_radix(x: torch.Tensor, k: int, chunk: int = _CHUNK) -> torch.Tensor:
    """0-based ``k``-th smallest ``|x|`` of a float32/float64 tensor, as a 0-d tensor.

    MSB-first radix select on the bit patterns: for non-negative IEEE floats the integer bit
    pattern is monotone in the value, so stripping the sign bit gives ``|x|`` as an integer key.
    Each pass histograms the next 16-bit digit of the keys that share the prefix found so far
    (2 passes for float32, 4 for float64) and keeps the bucket holding rank ``k``. Memory is one
    chunk plus a 65536-bin histogram; the result is the exact element, ties included.
    """
    if x.dtype == torch.float32:
        itype, nbits = torch.int32, 32
    elif x.dtype == torch.float64:
        itype, nbits = torch.int64, 64
    else:
        raise TypeError(f"_kth_abs_radix: expected float32 or float64, got {x.dtype}")
    absmask = (1 << (nbits - 1)) - 1  # clears the sign bit (so -0.0 and 0.0 are both key 0)
    prefix, rank, hi = 0, int(k), nbits
    for shift in range(nbits - 16, -1, -16):
        counts = torch.zeros(1 << 16, dtype=torch.int64, device=x.device)
        for piece in _row_chunks(x, chunk):
            keys = piece.view(itype) & absmask
            if hi < nbits:
                keys = keys[(keys >> hi) == prefix]
            counts += torch.bincount(((keys >> shift) & 0xFFFF).long(), minlength=1 << 16)
        cum = counts.cumsum(0)
        digit = int((cum <= rank).sum())  # first bucket whose cumulative count exceeds rank
        if digit > 0:
            rank -= int(cum[digit - 1])
        prefix = (prefix << 16) | digit
        hi = shift
    return torch.tensor(prefix, dtype=itype, device=x.device).view(x.dtype)


def _exact_threshold(x: torch.Tensor, q: float) -> torch.Tensor:
    m = x.numel()
    # The reference indexes the sorted values with int(q * feats.numel()) (a Python float
    # product); reproduce that expression, clamped so q close to 1 cannot run off the end.
    k = min(int(q * m), m - 1)
    if m <= _CHUNK:
        return x.abs().reshape(-1).kthvalue(k + 1).values
    return _kth_abs_radix(x, k)


def _approx_threshold(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x.abs().flatten(1), q, dim=1).mean()`` without the input-size cap
    (the mean of :func:`_approx_per_sample`)."""
    return _approx_per_sample(x, q).mean()


def _approx_per_sample(x: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(x.abs().flatten(1), q, dim=1)``: each sample's q-quantile, ``[N]``.

    Each value depends on its own row only, so row chunks of a large store give the same
    values (the streaming threshold, ``prh_fast.store._stream``, relies on that).

    Mirrors ATen's quantile arithmetic so results are bit-identical where torch.quantile works:
    ``rank = q * (P - 1)`` with ``q`` a tensor of the input dtype, ``below = v[floor(rank)]``,
    ``above = v[ceil(rank)]``, ``lerp(below, above, rank - floor(rank))``. When a row has more
    than ``2**24`` values a float32 rank can no longer address every position, so the rank is
    then computed in float64 (torch.quantile cannot be compared there: it refuses such inputs).
    torch >= 2.14 multiplies ``q`` (rounded to the input dtype) by ``P - 1`` in float64 and
    casts the weight back to the input dtype; older releases multiply in the input dtype. Both
    are followed, by version, so results stay bit-identical to the installed torch.quantile.
    """
    n = x.shape[0]
    p = x[0].numel()
    last = p - 1
    if p > _CHUNK:
        ranks = torch.full((), q, dtype=torch.float64, device=x.device) * last
    elif _RANK_IN_FLOAT64:
        ranks = torch.full((), q, dtype=x.dtype, device=x.device).double() * last
    else:
        ranks = torch.full((), q, dtype=x.dtype, device=x.device) * last
    r_below = int(ranks.long())
    r_above = int(ranks.ceil().long())
    weight = (ranks - r_below).to(x.dtype)
    rows = max(1, _CHUNK // max(1, p))
    per_sample = []
    for r0 in range(0, n, rows):
        a = x[r0:r0 + rows].reshape(-1, p).abs()
        below = a.kthvalue(r_below + 1, dim=1).values
        above = below if r_above == r_below else a.kthvalue(r_above + 1, dim=1).values
        per_sample.append(torch.lerp(below, above, weight))
    return torch.cat(per_sample)


def _clip(x: torch.Tensor, q: float, exact: bool = False) -> torch.Tensor:
    """Clamp one float tensor (rows = samples) to ``[-t, t]``; see the module docstring.

    ``x`` must already be float32/float64 and validated; returns a new tensor (or ``x`` itself
    when ``q == 1``, as the reference).
    """
    if q == 1:
        return x
    t = _exact_threshold(x, q) if exact else _approx_threshold(x, q)
    return torch.clamp(x, -t, t)


# --------------------------------------------------------------------------------------------
# row norms and L2 normalisation (docs/metrics.md, pipeline step 3), safe at any scale
# --------------------------------------------------------------------------------------------
#: Rows whose plain norm is below this (or not finite) are normalised through a power-of-two
#: rescale. It is also F.normalize's eps: above it the plain formula is exact and unclamped.
_NORM_SAFE_MIN = 1e-12


def _pow2_exponents(maxabs: torch.Tensor) -> torch.Tensor:
    """Per entry the exponent ``e`` with ``maxabs = m · 2**e``, ``0.5 <= m < 1`` (0 for 0)."""
    return torch.frexp(maxabs.to(torch.float64)).exponent.to(torch.int64)


def _scale_pow2(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``x · 2**-e`` in float64, exactly (two steps, so ``2**-e`` itself never leaves the float64
    range even for subnormal or huge ``x``); ``e`` broadcasts against ``x``."""
    a = torch.div(-e, 2, rounding_mode="floor")
    one = torch.ones(e.shape, dtype=torch.float64, device=x.device)
    return x.to(torch.float64) * torch.ldexp(one, a) * torch.ldexp(one, -e - a)


def row_norms(X: torch.Tensor, chunk_values: int = 1 << 24) -> torch.Tensor:
    """``[N]`` float64 Euclidean norms of the rows of ``X`` (any float dtype), safe at any scale.

    Squares are summed in float64, which holds every float32 value's square; float64 rows whose
    norm leaves a safe range (``1e200``, ``1e-200``) are scaled by the power of two of their
    largest ``|x|`` (exact) first, and the result is scaled back. Row chunks keep the float64
    copy to ``chunk_values`` values.

    Args:
        X: ``[N, D]`` floating-point tensor, any device.
        chunk_values: Values converted to float64 at a time.

    Returns:
        ``[N]`` float64 tensor on ``X``'s device.

    Example:
        >>> import torch
        >>> from prh_fast.prepare import row_norms
        >>> X = torch.tensor([[3.0, 4.0], [3e200, 4e200]], dtype=torch.float64)
        >>> [f"{v:.6g}" for v in row_norms(X).tolist()]  # the squares would overflow
        ['5', '5e+200']
    """
    n = X.shape[0]
    out = torch.empty(n, dtype=torch.float64, device=X.device)
    rows = max(1, chunk_values // max(1, X.shape[1]))
    for r0 in range(0, n, rows):
        x = X[r0:r0 + rows]
        nr = torch.linalg.vector_norm(x.to(torch.float64), dim=1)
        if x.dtype == torch.float64:
            # float32 (or narrower) values square safely in float64; float64 ones may not
            bad = ~(torch.isfinite(nr) & (nr > 1e-150) & (nr < 1e150)) & x.ne(0).any(dim=1)
            if bool(bad.any()):
                xb = x[bad]
                e = _pow2_exponents(xb.abs().amax(dim=1)).unsqueeze(1)
                nr[bad] = torch.ldexp(torch.linalg.vector_norm(_scale_pow2(xb, e), dim=1),
                                      e.squeeze(1))
        out[r0:r0 + rows] = nr
    return out


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` divided by their L2 norm (zero rows stay zero), in ``x``'s dtype.

    Scale-free: ``normalize_rows(c · x)`` equals ``normalize_rows(x)`` for every ``c > 0`` that
    keeps ``c · x`` finite (bit for bit when ``c`` is a power of two). Rows whose norm is
    representable and at least ``1e-12`` get exactly ``F.normalize(x, p=2, dim=-1)`` (the
    reference's step); the others -- squares that overflow (``|x| ~ 1e20`` in float32) or
    underflow (``|x| ~ 1e-30``), where ``F.normalize`` returns zeros or ``x / 1e-12`` -- are
    first scaled by the power of two of their largest ``|x|``, which is exact and puts the norm
    in range, and then divided by it.

    Args:
        x: Floating-point tensor whose last dimension holds the rows' values.

    Returns:
        A tensor of ``x``'s shape, dtype and device.

    Example:
        >>> import torch
        >>> from prh_fast.prepare import normalize_rows
        >>> x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [3e-30, 4e-30]])
        >>> [[round(v, 4) for v in row] for row in normalize_rows(x).tolist()]
        [[0.6, 0.8], [0.0, 0.0], [0.6, 0.8]]
    """
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    bad = ~(torch.isfinite(norm) & (norm >= _NORM_SAFE_MIN)).squeeze(-1)
    y = x / norm.clamp_min(_NORM_SAFE_MIN)
    if bool(bad.any()):
        bad &= x.ne(0).any(dim=-1)  # all-zero rows: F.normalize keeps them zero
    if bool(bad.any()):
        rows = bad.nonzero().squeeze(1)
        xb = x[rows]
        e = _pow2_exponents(xb.abs().amax(dim=-1, keepdim=True))
        xs = _scale_pow2(xb, e).to(x.dtype)  # largest |x| now in [0.5, 1)
        y[rows] = xs / torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
    return y


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def _check_q(q) -> float:
    if isinstance(q, bool) or not isinstance(q, numbers.Real):
        raise InputError(f"q: expected a number in (0, 1], got {q!r}")
    q = float(q)
    if not (0.0 < q <= 1.0):  # also rejects NaN
        raise InputError(f"q: expected a number in (0, 1], got {q}")
    return q


def _cast(t: torch.Tensor) -> torch.Tensor:
    # The reference casts with .float(); float64 is kept as float64 here (more precision, never
    # less: docs/metrics.md: "computation is float32 or better").
    return t if t.dtype == torch.float64 else t.float()


def _as_3d(feats, name: str) -> torch.Tensor:
    if not isinstance(feats, (torch.Tensor, np.ndarray)):
        raise InputError(f"{name}: expected a [N, L, D] tensor/array or a list of [N, D] "
                         f"tensors, got {type(feats).__name__}")
    feats = as_tensor(feats, name)
    if not feats.is_floating_point():
        raise InputError(f"{name}: expected a floating-point tensor, got dtype {feats.dtype}")
    if feats.dim() != 3:
        raise InputError(f"{name}: expected a [N, L, D] tensor or a list of [N, D] tensors, got "
                         f"a {feats.dim()}-D tensor of shape {tuple(feats.shape)}")
    if feats.numel() == 0:
        raise InputError(f"{name}: expected a non-empty [N, L, D] tensor, got shape "
                         f"{tuple(feats.shape)}")
    if not all_finite(feats):
        bad = int((~torch.isfinite(feats)).sum())
        raise InputError(f"{name}: contains {bad} NaN or Inf value(s)")
    return feats


def prepare_features(feats: _LayersT, q: float = 0.95, exact: bool = False) -> _LayersT:
    """Clip a model's features to the ``q`` outlier threshold (reference ``prepare_features``).

    Args:
        feats: A ``[N, L, D]`` tensor (one threshold over all ``N * L * D`` values) or a
            list/tuple of per-layer ``[N, D_l]`` tensors (one threshold per layer). Torch
            tensors (any device, any float dtype, any strides; detached if they require grad) or
            NumPy arrays (negative strides are copied).
        q: The quantile, in ``(0, 1]``; ``q = 1`` means no clipping.
        exact: Exact mode ``t = sorted(|x|)[int(q * M)]``; otherwise the mean over samples of
            each sample's linear-interpolation q-quantile of ``|x|``.

    Returns:
        The same structure (tensor -> tensor on the same device, NumPy array -> NumPy array,
        list -> list, tuple -> tuple), clamped to ``[-t, t]``, in float32 like the reference's
        ``.float()`` -- except that float64 input stays float64. With ``q = 1`` the cast input is
        returned (the input object itself when it is already float32/float64), as the reference.

    Raises:
        ValueError: Naming ``q`` or ``feats``: ``q`` outside ``(0, 1]``; NaN/Inf values; a
            rank other than 3 (tensor) or 2 (list items); an empty tensor or list; list layers
            with different numbers of samples.

    Example:
        >>> import torch
        >>> import prh_fast
        >>> feats = torch.randn(64, 3, 16, generator=torch.Generator().manual_seed(0))
        >>> clipped = prh_fast.prepare_features(feats, q=0.95, exact=True)
        >>> clipped.shape, clipped.dtype
        (torch.Size([64, 3, 16]), torch.float32)
        >>> t = torch.sort(feats.abs().flatten()).values[int(0.95 * feats.numel())]
        >>> bool(clipped.abs().max() == t)
        True
    """
    q = _check_q(q)
    exact = bool(exact)
    if isinstance(feats, (list, tuple)):
        if len(feats) == 0:
            raise InputError("feats: expected at least one layer, got an empty list")
        was_numpy = [isinstance(f, np.ndarray) for f in feats]
        layers = [as_features(f, f"feats[{i}]") for i, f in enumerate(feats)]
        n = layers[0].shape[0]
        for i, x in enumerate(layers):
            if x.shape[0] != n:
                raise InputError(f"feats[{i}] has {x.shape[0]} samples, feats[0] has {n}")
        out = [_clip(_cast(x), q, exact) for x in layers]
        out = [o.numpy() if np_in else o for o, np_in in zip(out, was_numpy)]
        return tuple(out) if isinstance(feats, tuple) else out
    was_numpy = isinstance(feats, np.ndarray)
    x = _clip(_cast(_as_3d(feats, "feats")), q, exact)
    return x.numpy() if was_numpy else x
