"""Deterministic test features with real shared structure, and exact-tie constructions."""
from __future__ import annotations

import torch

__all__ = ["paired_features", "independent_features", "with_duplicates", "integer_features"]


def paired_features(n: int, da: int, db: int, latent: int = 8, noise: float = 0.1, seed: int = 0,
                    dtype: torch.dtype = torch.float32):
    """Two views ``A [n, da]``, ``B [n, db]`` of one latent ``Z [n, latent]``.

    A = tanh(Z W1) W2 + noise and B = a sin / relu / square mixture of Z W3, then a linear map,
    plus noise: different nonlinear maps and dimensions of the same samples, so neighbour and
    kernel metrics score well above chance (tests/test_invariants.py checks that). Rows are
    L2-normalised as in the alignment pipeline. Generated in float64, then cast to ``dtype``.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    Z = torch.randn(n, latent, generator=g, dtype=f64)
    W1 = torch.randn(latent, 2 * latent, generator=g, dtype=f64) / latent**0.5
    W2 = torch.randn(2 * latent, da, generator=g, dtype=f64) / (2 * latent) ** 0.5
    W3 = torch.randn(latent, 3 * latent, generator=g, dtype=f64) / latent**0.5
    W4 = torch.randn(3 * latent, db, generator=g, dtype=f64) / (3 * latent) ** 0.5
    A = torch.tanh(Z @ W1) @ W2
    H = Z @ W3
    third = H.shape[1] // 3
    H = torch.cat(
        [torch.sin(H[:, :third]), torch.relu(H[:, third : 2 * third]), 0.5 * H[:, 2 * third :] ** 2],
        dim=1,
    )
    B = H @ W4
    A = A + noise * A.std() * torch.randn(n, da, generator=g, dtype=f64)
    B = B + noise * B.std() * torch.randn(n, db, generator=g, dtype=f64)
    A = A / A.norm(dim=1, keepdim=True)
    B = B / B.norm(dim=1, keepdim=True)
    return A.to(dtype), B.to(dtype)


def independent_features(n: int, da: int, db: int, seed: int = 0,
                         dtype: torch.dtype = torch.float32):
    """Two unrelated Gaussian feature matrices (the chance baseline), rows L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, da, generator=g, dtype=torch.float64)
    B = torch.randn(n, db, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True)
    B = B / B.norm(dim=1, keepdim=True)
    return A.to(dtype), B.to(dtype)


def integer_features(n: int, d: int, seed: int = 0, low: int = -3, high: int = 4,
                     dtype: torch.dtype = torch.float32):
    """Small-integer features: every inner product is an exact integer in any float dtype and
    any summation order, so equal scores are bit-identical ties on every backend."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n, d), generator=g).to(dtype)


def with_duplicates(n: int, d: int, n_unique: int | None = None, seed: int = 0,
                    dtype: torch.dtype = torch.float32):
    """``[n, d]`` integer-valued features whose rows repeat: row i is a copy of unique row
    ``perm[i] % n_unique``, so every row has exact duplicates (ties at distance 0 and ties
    between the duplicates of any other row). Returns ``(X, groups)`` with ``groups[i]`` the
    unique row that row i copies."""
    if n_unique is None:
        n_unique = max(2, n // 3)
    g = torch.Generator().manual_seed(seed)
    U = integer_features(n_unique, d, seed=seed + 1, dtype=torch.float64)
    groups = torch.randperm(n, generator=g) % n_unique
    return U[groups].to(dtype), groups
