"""The certified error bound of a fast inner product: one implementation for every exact search
that ranks candidates by a product computed in a lower or tiled precision (the CPU search with
float32, float64 or bfloat16 products in ``prh_fast.knn._exact``, the Triton kernels in
``prh_fast.knn._triton``).

A product score ``a`` of two rows ``q, k`` (``D`` values each) is computed in four steps, each
with its own rounding; :class:`ProductFormat` names them:

1. **input rounding**: ``q, k`` are rounded to the product format (bf16, tf32, or nothing),
   relative error ``u_in`` per value. Then
   ``|sum q'_d k'_d - sum q_d k_d| <= (2 u_in + u_in^2) * sum |q_d k_d| <= (2 u_in + u_in^2)
   * |q| |k|`` (Cauchy-Schwarz);
2. **accumulation**: the products of the converted values are summed in a format of unit
   ``u_acc``. Any summation order of ``n`` terms errs by at most ``gamma(n - 1, u_acc) *
   sum |terms|`` with ``gamma(n, v) = n v / (1 - n v)``; ``acc_terms`` terms beyond ``D``
   and a factor ``acc_scale`` leave room for hardware that aligns or truncates several terms at
   once (tensor cores, ``dpbf16ps``-style pair sums): ``acc_scale * gamma(D + acc_terms,
   u_acc) * (1 + u_in)^2 * |q| |k|``;
3. **output rounding**: the sum is rounded to the output format (bf16 output of a CPU bf16
   ``torch.mm``), relative ``u_out`` of a value at most ``(1 + c_p) |q| |k|`` where ``c_p`` is
   the bound of steps 1-2;
4. **the re-score**: the exact search compares ``a`` with the fixed-order re-score, itself
   within ``gamma(D + 1, u_rescore) * |q| |k|`` of the exact inner product (float64: ``u =
   2^-53``).

Measured input rounding: with ``rho >= |q' - q| / |q|`` for every row (:func:`input_rounding`,
the rows' actual rounding to the product format, about ``0.48 u_in`` for bf16 copies of real
features), ``|q'.k' - q.k| = |dq.k + q.dk + dq.dk| <= (2 rho + rho^2) |q| |k|`` and ``|q'|
|k'| <= (1 + rho)^2 |q| |k|``: step 1 holds with ``rho`` in place of ``u_in``, so a search that
measures ``rho`` passes ``dataclasses.replace(fmt, u_in=rho)``.

So ``|a - fixed(q, k)| <= c * |q| * |k| + eta`` with ``c`` from :func:`coefficient`. ``eta``
covers underflow: :func:`eta_products` (at most one smallest-normal unit per product and per
addition, flushed subnormals included, in the product and in the float64 re-score) and
:func:`eta_conversion` (values flushed to zero when converted to the product format: at most
``2^-126 * |other value|`` per term, summed by Cauchy-Schwarz, with a factor 4 of room).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from prh_fast.errors import InputError

__all__ = ["U_BF16", "U_TF32", "U_FP32", "U_FP64", "ProductFormat", "TENSOR_CORE", "BF16_CPU",
           "gamma", "coefficient", "eta_products", "eta_conversion", "input_rounding"]

#: Unit roundoff (round to nearest) of the formats a product can use.
U_BF16 = 2.0**-8
#: tf32 conversion may truncate: one unit of its 10-bit fraction.
U_TF32 = 2.0**-10
U_FP32 = 2.0**-24
U_FP64 = 2.0**-53


@dataclasses.dataclass(frozen=True)
class ProductFormat:
    """How a product score is computed (module docstring, steps 1-3).

    Attributes:
        u_in: relative rounding of each input value to the product format (0: exact).
        u_acc: unit of the accumulation.
        acc_terms: terms allowed beyond ``D`` in the accumulation bound.
        acc_scale: factor on the accumulation bound.
        u_out: relative rounding of the sum to the output format (0: output in the
            accumulation format).

    Example:
        >>> ProductFormat(u_in=U_BF16, u_acc=U_FP32).u_out
        0.0
    """

    u_in: float
    u_acc: float
    acc_terms: int = 2
    acc_scale: float = 1.0
    u_out: float = 0.0


#: Matrix units with float32 accumulation that may align or truncate several terms at once
#: (GPU tensor cores; CPU ``dpbf16ps`` / AMX tiles): twice the recursive-summation bound of
#: ``D + 32`` terms with a one-ulp unit. ``u_in`` is set per input format.
TENSOR_CORE = ProductFormat(u_in=0.0, u_acc=2.0**-23, acc_terms=32, acc_scale=2.0)

#: A CPU ``torch.mm`` of bfloat16 copies of float32 rows: bf16 inputs, float32 accumulation in
#: the matrix unit (oneDNN), the result rounded to bfloat16 (torch's CPU ``mm`` has no float32
#: output for bfloat16 inputs).
BF16_CPU = ProductFormat(u_in=U_BF16, u_acc=2.0**-23, acc_terms=32, acc_scale=2.0, u_out=U_BF16)


def gamma(n: float, v: float) -> float:
    """``n v / (1 - n v)``: the summation error bound of ``n`` terms in unit ``v``.

    Raises:
        InputError: ``n v >= 1/2`` (no useful bound: the dimension is too large).

    Example:
        >>> gamma(1, 0.25)
        0.3333333333333333
    """
    nv = n * v
    if nv >= 0.5:
        raise InputError(f"X: dimension {n} too large for a certified error bound")
    return nv / (1.0 - nv)


def coefficient(d: int, fmt: ProductFormat, rescore_dtype: torch.dtype = torch.float64) -> float:
    """``c``: ``|product score - re-score| <= c * |q| * |k| + eta`` for rows of ``d`` values.

    Args:
        d: the dimension (terms of each inner product).
        fmt: how the product score is computed.
        rescore_dtype: accumulation dtype of the re-score the product is compared with
            (float64: the fixed-order score; float32 otherwise).

    Returns:
        The coefficient ``c`` per unit ``|q| |k|`` (not yet rounded up for the arithmetic
        that applies it).

    Example:
        >>> c = coefficient(768, ProductFormat(u_in=U_BF16, u_acc=2.0**-23, acc_terms=32,
        ...                                     acc_scale=2.0, u_out=U_BF16))
        >>> 0.01 < c < 0.02
        True
    """
    u = fmt.u_in
    acc = fmt.acc_scale * gamma(d + fmt.acc_terms, fmt.u_acc) * (1.0 + u) ** 2
    prod = 2.0 * u + u * u + acc
    if fmt.u_out:
        prod = prod + fmt.u_out * (1.0 + prod)
    ur = U_FP64 if rescore_dtype == torch.float64 else U_FP32
    return prod + gamma(d + 1, ur)


def eta_products(d: int, dtype: torch.dtype) -> float:
    """Absolute underflow allowance of a ``d``-term product accumulated in ``dtype`` and of its
    float64 re-score: one smallest normal of each per product and per addition, times 2 (the
    two sides), times 2 of room.

    Example:
        >>> eta_products(8, torch.float64) > 0
        True
    """
    return 4.0 * (d + 2) * (torch.finfo(dtype).tiny + torch.finfo(torch.float64).tiny)


def eta_conversion(d: int, qmax: float, kmax: float) -> float:
    """Absolute allowance for values flushed to zero when converted to a product format with
    float32's exponent range (bf16, tf32): ``2^-124 * (d + sqrt(d) * (qmax + kmax))`` for row
    norms up to ``qmax`` (queries) and ``kmax`` (keys).

    Example:
        >>> eta_conversion(4, 1.0, 1.0) == 2.0**-124 * 8
        True
    """
    return 2.0**-124 * (d + math.sqrt(d) * (qmax + kmax))


def input_rounding(X: torch.Tensor, Xs: torch.Tensor, norms: torch.Tensor) -> float:
    """``rho``: the largest relative rounding ``|x' - x| / |x|`` of a row of ``X`` converted to
    ``Xs`` (its copy in the product format), rounded up; rows of norm 0 convert exactly.

    Args:
        X: ``[N, D]`` rows.
        Xs: ``[N, D]`` the same rows in the product format.
        norms: ``[N]`` float64 norms of ``X``'s rows.

    Returns:
        ``rho`` (0.0 when every row converts exactly).

    Example:
        >>> X = torch.tensor([[1.0, 1.0 / 3.0], [0.5, 0.25]])
        >>> rho = input_rounding(X, X.to(torch.bfloat16), X.double().norm(dim=1))
        >>> 0 < rho < 2.0**-8
        True
    """
    rho = 0.0
    step = max(1, (1 << 22) // max(1, X.shape[1]))
    for r0 in range(0, X.shape[0], step):
        dx = (Xs[r0:r0 + step].to(torch.float64) - X[r0:r0 + step].to(torch.float64))
        dn = torch.linalg.vector_norm(dx, dim=1)
        n = norms[r0:r0 + step].to(torch.float64)
        ok = n > 0
        if bool(ok.any()):
            rho = max(rho, float((dn[ok] / n[ok]).max()))
    return rho * (1.0 + 2.0**-20)
