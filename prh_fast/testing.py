"""Synthetic features with real shared structure, for tests, benchmarks and examples.

Representational-alignment metrics need inputs whose answer is known in kind: two "models" that
see the same samples through different maps score well above chance, unrelated features score
at chance, and exact ties must be exact in every dtype. The generators here build such inputs
deterministically from a seed (CPU ``torch.Generator`` unless a device is given), so a test or a
benchmark gets the same numbers on every run:

* :func:`paired_features`: two views of one low-rank latent through different nonlinear maps.
* :func:`independent_features`: the chance baseline (unrelated Gaussian rows).
* :func:`integer_features`, :func:`with_duplicates`: small-integer rows whose inner products are
  exact in any dtype and summation order (bit-identical ties on every backend).
* :func:`latent`, :func:`layer_features`: large structured layers built in row chunks on any
  device (the benchmarks' data at up to millions of rows).
* :func:`drifting_layers`: ``[n, layers, d]`` stacks whose nearby layers resemble each other.

Example:
    >>> import torch
    >>> from prh_fast.testing import paired_features
    >>> A, B = paired_features(200, 32, 48, seed=0)
    >>> A.shape, B.shape, A.dtype
    (torch.Size([200, 32]), torch.Size([200, 48]), torch.float32)
"""
from __future__ import annotations

import math

import torch

from prh_fast.errors import InputError

__all__ = [
    "paired_features",
    "independent_features",
    "integer_features",
    "with_duplicates",
    "latent",
    "layer_features",
    "drifting_layers",
]


def _count(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int of at least ``minimum``, else an InputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


def _scale(name: str, value) -> float:
    """``value`` as a finite float >= 0, else an InputError naming ``name``."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out) or out < 0:
        raise InputError(f"{name}: expected a finite number >= 0, got {value!r}")
    return out


def _generator(seed: int, device=None) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed: expected an integer, got {seed!r}")
    return torch.Generator(device=device or "cpu").manual_seed(seed)


def paired_features(n: int, d_a: int, d_b: int, *, latent: int = 8, noise: float = 0.1,
                    seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views ``A [n, d_a]`` and ``B [n, d_b]`` of one latent ``Z [n, latent]``.

    ``A = tanh(Z W1) W2`` and ``B`` is a sin / relu / square mixture of ``Z W3`` mapped by
    ``W4``, each plus Gaussian noise of ``noise`` times its own standard deviation: different
    nonlinear maps and widths of the same samples, so neighbour and kernel metrics score well
    above chance (and above :func:`independent_features`). Rows are L2-normalised, as in the
    alignment pipeline. Everything is drawn in float64 on the CPU, then cast to ``dtype``.

    Args:
        n: Number of samples (rows), at least 1.
        d_a: Width of ``A``.
        d_b: Width of ``B``.
        latent: Rank of the shared latent.
        noise: Noise level relative to each view's standard deviation (0: noiseless).
        seed: Seed of the generator; equal arguments give bit-identical outputs.
        dtype: Floating dtype of the returned tensors.

    Returns:
        ``(A, B)``: CPU tensors of shapes ``[n, d_a]`` and ``[n, d_b]``, unit rows.

    Raises:
        InputError: A size is not a positive integer, ``noise`` is negative or not finite, or
            ``seed`` is not an integer.

    Example:
        >>> from prh_fast import metrics
        >>> A, B = paired_features(300, 32, 48, seed=5)
        >>> metrics.measure("mutual_knn", A, B, topk=10) > 0.2
        True
    """
    n, d_a, d_b = _count("n", n), _count("d_a", d_a), _count("d_b", d_b)
    latent, noise = _count("latent", latent), _scale("noise", noise)
    g = _generator(seed)
    f64 = torch.float64
    Z = torch.randn(n, latent, generator=g, dtype=f64)
    W1 = torch.randn(latent, 2 * latent, generator=g, dtype=f64) / latent**0.5
    W2 = torch.randn(2 * latent, d_a, generator=g, dtype=f64) / (2 * latent) ** 0.5
    W3 = torch.randn(latent, 3 * latent, generator=g, dtype=f64) / latent**0.5
    W4 = torch.randn(3 * latent, d_b, generator=g, dtype=f64) / (3 * latent) ** 0.5
    A = torch.tanh(Z @ W1) @ W2
    H = Z @ W3
    third = H.shape[1] // 3
    H = torch.cat([torch.sin(H[:, :third]), torch.relu(H[:, third:2 * third]),
                   0.5 * H[:, 2 * third:] ** 2], dim=1)
    B = H @ W4
    A = A + noise * A.std() * torch.randn(n, d_a, generator=g, dtype=f64)
    B = B + noise * B.std() * torch.randn(n, d_b, generator=g, dtype=f64)
    A = A / A.norm(dim=1, keepdim=True)
    B = B / B.norm(dim=1, keepdim=True)
    return A.to(dtype), B.to(dtype)


def independent_features(n: int, d_a: int, d_b: int, *, seed: int = 0,
                         dtype: torch.dtype = torch.float32,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two unrelated Gaussian feature matrices: the chance baseline of every metric.

    Args:
        n: Number of samples (rows), at least 1.
        d_a: Width of the first matrix.
        d_b: Width of the second matrix.
        seed: Seed of the generator.
        dtype: Floating dtype of the returned tensors.

    Returns:
        ``(A, B)``: CPU tensors ``[n, d_a]`` and ``[n, d_b]`` with L2-normalised rows.

    Raises:
        InputError: A size is not a positive integer or ``seed`` is not an integer.

    Example:
        >>> I, J = independent_features(100, 8, 12, seed=1)
        >>> I.shape, J.shape
        (torch.Size([100, 8]), torch.Size([100, 12]))
    """
    n, d_a, d_b = _count("n", n), _count("d_a", d_a), _count("d_b", d_b)
    g = _generator(seed)
    A = torch.randn(n, d_a, generator=g, dtype=torch.float64)
    B = torch.randn(n, d_b, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True)
    B = B / B.norm(dim=1, keepdim=True)
    return A.to(dtype), B.to(dtype)


def integer_features(n: int, d: int, *, seed: int = 0, low: int = -3, high: int = 4,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Small-integer features: every inner product is an exact integer in any float dtype and
    any summation order, so equal scores are bit-identical ties on every backend.

    Args:
        n: Number of rows, at least 1.
        d: Width, at least 1.
        seed: Seed of the generator.
        low: Smallest value (inclusive).
        high: Largest value (exclusive); must exceed ``low``.
        dtype: Dtype of the result.

    Returns:
        A CPU tensor ``[n, d]`` of integers in ``[low, high)``.

    Raises:
        InputError: A size is not a positive integer, ``high <= low``, or ``seed`` is not an
            integer.

    Example:
        >>> X = integer_features(5, 3, seed=2)
        >>> bool((X == X.round()).all())
        True
    """
    n, d = _count("n", n), _count("d", d)
    if not (isinstance(low, int) and isinstance(high, int)) or high <= low:
        raise InputError(f"low, high: expected integers with high > low, got {low!r}, {high!r}")
    g = _generator(seed)
    return torch.randint(low, high, (n, d), generator=g).to(dtype)


def with_duplicates(n: int, d: int, *, n_unique: int | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, d]`` integer-valued rows that repeat: every row has exact duplicates.

    Row ``i`` copies unique row ``perm[i] % n_unique``, so there are ties at distance 0 and ties
    between the duplicates of every other row.

    Args:
        n: Number of rows, at least 1.
        d: Width, at least 1.
        n_unique: Number of distinct rows (default ``max(2, n // 3)``).
        seed: Seed of the generator.
        dtype: Dtype of the features.

    Returns:
        ``(X, groups)``: ``X [n, d]`` and ``groups [n]`` (int64), ``groups[i]`` the unique row
        that row ``i`` copies.

    Raises:
        InputError: A size is not a positive integer or ``seed`` is not an integer.

    Example:
        >>> X, groups = with_duplicates(12, 4, n_unique=3)
        >>> bool(torch.equal(X[0], X[(groups == groups[0]).nonzero()[-1, 0]]))
        True
    """
    n, d = _count("n", n), _count("d", d)
    n_unique = max(2, n // 3) if n_unique is None else _count("n_unique", n_unique)
    g = _generator(seed)
    U = integer_features(n_unique, d, seed=seed + 1, dtype=torch.float64)
    groups = torch.randperm(n, generator=g) % n_unique
    return U[groups].to(dtype), groups


def latent(n: int, rank: int, *, clusters: int = 0, spread: float = 1.0, seed: int = 0,
           generator: torch.Generator | None = None,
           device: str | torch.device | None = None) -> torch.Tensor:
    """``[n, rank]`` float32 latent codes: the structure that every layer built on them shares.

    With ``clusters = 0`` the codes are standard Gaussian rows. Otherwise each row is one of
    ``clusters`` Gaussian centres plus ``spread`` times Gaussian noise, which gives real
    neighbourhoods (as in embeddings of natural data).

    Args:
        n: Number of rows, at least 1.
        rank: Width of the latent.
        clusters: Number of cluster centres (0: no clusters).
        spread: Scale of the noise around a centre (used only with clusters).
        seed: Seed of a fresh generator on ``device`` (ignored when ``generator`` is given).
        generator: Draw from this generator instead (continues its stream, for callers that
            draw more from the same stream).
        device: Device of the result (default: the generator's device, else CPU).

    Returns:
        A float32 tensor ``[n, rank]`` on ``device``.

    Raises:
        InputError: A size is not a positive integer (``clusters`` may be 0), ``spread`` is
            negative or not finite, or ``seed`` is not an integer.

    Example:
        >>> z = latent(1000, 32, clusters=256, spread=0.6, seed=0)
        >>> z.shape
        torch.Size([1000, 32])
    """
    n, rank = _count("n", n), _count("rank", rank)
    clusters, spread = _count("clusters", clusters, minimum=0), _scale("spread", spread)
    if generator is None:
        generator = _generator(seed, device)
    device = generator.device if device is None else device
    if not clusters:
        return torch.randn(n, rank, generator=generator, device=device)
    centres = torch.randn(clusters, rank, generator=generator, device=device)
    labels = torch.randint(0, clusters, (n,), generator=generator, device=device)
    return centres[labels] + spread * torch.randn(n, rank, generator=generator, device=device)


_NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu}


def layer_features(z: torch.Tensor, d: int, *, seed: int = 0,
                   generator: torch.Generator | None = None, noise: float = 0.5,
                   nonlinearity: str = "tanh", gain: float | None = 2.0,
                   dtype: torch.dtype = torch.float32, chunk_rows: int = 65536,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """One layer ``[n, d]`` of unit rows ``normalize(f(z W) + noise * eps)`` seen from ``z``.

    Built on ``z``'s device in row chunks, so peak memory is about the result plus one chunk.
    Layers made from the same ``z`` with different seeds, nonlinearities or noise share its
    neighbourhoods partly: their alignment is above chance and below one.

    Args:
        z: Latent codes ``[n, r]`` (see :func:`latent`).
        d: Width of the layer.
        seed: Seed of a fresh generator on ``z``'s device for ``W`` and ``eps`` (ignored when
            ``generator`` is given).
        generator: Draw ``W`` and then ``eps`` from this generator instead.
        noise: Scale of the Gaussian noise added after the nonlinearity.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        gain: ``W`` has entries ``N(0, gain^2 / r)``; None: unscaled standard normal entries.
        dtype: Dtype of the result (computed in ``z``'s dtype, then cast).
        chunk_rows: Rows generated at a time.
        out: Write into this ``[n, d]`` tensor instead of allocating one.

    Returns:
        The ``[n, d]`` tensor (``out`` when given) with L2-normalised rows.

    Raises:
        InputError: ``z`` is not a 2-D floating tensor, ``d`` or ``chunk_rows`` is not a
            positive integer, ``noise`` is negative, ``nonlinearity`` is unknown, or ``out``
            has the wrong shape.

    Example:
        >>> z = latent(500, 16, clusters=32, spread=0.6, seed=1)
        >>> X = layer_features(z, 64, seed=2)
        >>> Y = layer_features(z, 48, seed=3, nonlinearity="relu", noise=0.8)
        >>> X.shape, Y.shape
        (torch.Size([500, 64]), torch.Size([500, 48]))
    """
    if not isinstance(z, torch.Tensor) or z.ndim != 2 or not z.is_floating_point():
        raise InputError(f"z: expected a 2-D floating tensor, got {type(z).__name__}"
                         + (f" {tuple(z.shape)} {z.dtype}" if isinstance(z, torch.Tensor) else ""))
    d, chunk_rows = _count("d", d), _count("chunk_rows", chunk_rows)
    noise = _scale("noise", noise)
    if nonlinearity not in _NONLINEARITIES:
        raise InputError(f"nonlinearity: expected one of {sorted(_NONLINEARITIES)}, "
                         f"got {nonlinearity!r}")
    act = _NONLINEARITIES[nonlinearity]
    n, r = z.shape
    dev = z.device
    if out is not None and tuple(out.shape) != (n, d):
        raise InputError(f"out: expected shape {(n, d)}, got {tuple(out.shape)}")
    g = generator if generator is not None else _generator(seed, dev)
    W = torch.randn(r, d, generator=g, device=dev, dtype=z.dtype)
    if gain is not None:
        W = W / math.sqrt(r) * _scale("gain", gain)
    X = out if out is not None else torch.empty((n, d), dtype=dtype, device=dev)
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        x = act(z[r0:r1] @ W)
        x += noise * torch.randn(r1 - r0, d, generator=g, device=dev, dtype=z.dtype)
        X[r0:r1] = torch.nn.functional.normalize(x, dim=1).to(X.dtype)
    return X


def drifting_layers(n: int, layers: int, d: int, *, seed: int, latent_seed: int = 0,
                    rank: int = 32) -> torch.Tensor:
    """``[n, layers, d]`` float32 features of one model whose layers drift from each other.

    A latent shared by every model made with the same ``latent_seed`` enters through a random
    map; each next layer is ``tanh(previous + 0.4 * noise)`` and is stored with extra noise
    (0.3), so nearby layers resemble each other and far ones less (no ``d x d`` products: wide
    models stay cheap).

    Args:
        n: Number of samples, at least 1.
        layers: Number of layers, at least 1.
        d: Width of every layer.
        seed: Seed of this model's maps and noise.
        latent_seed: Seed of the shared latent: models with equal ``latent_seed`` align.
        rank: Width of the shared latent.

    Returns:
        A float32 CPU tensor ``[n, layers, d]`` (rows not normalised).

    Raises:
        InputError: A size is not a positive integer or a seed is not an integer.

    Example:
        >>> X = drifting_layers(256, 4, 32, seed=1)
        >>> Y = drifting_layers(256, 3, 16, seed=2)
        >>> X.shape, Y.shape
        (torch.Size([256, 4, 32]), torch.Size([256, 3, 16]))
    """
    n, layers, d, rank = (_count("n", n), _count("layers", layers), _count("d", d),
                          _count("rank", rank))
    g = _generator(latent_seed)
    z = torch.randn(n, rank, generator=g)
    g = _generator(seed)
    out = torch.empty(n, layers, d)
    h = z @ torch.randn(rank, d, generator=g) / 4
    for i in range(layers):
        h = torch.tanh(h + 0.4 * torch.randn(n, d, generator=g))
        out[:, i] = h + 0.3 * torch.randn(n, d, generator=g)
    return out
