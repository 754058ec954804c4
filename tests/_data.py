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


# --------------------------------------------------------------------------------------------
# backends and assertion helpers shared by the test modules
# --------------------------------------------------------------------------------------------
import importlib.util  # noqa: E402

import pytest  # noqa: E402


def _has_native() -> bool:
    try:
        from prh_fast import _native
    except Exception:
        return False
    return bool(getattr(_native, "HAS_NATIVE", False))


HAS_NATIVE = _has_native()
HAS_FAISS = importlib.util.find_spec("faiss") is not None

#: Every kNN backend, as pytest params skipped where unavailable.
KNN_BACKENDS = [
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_NATIVE, reason="native prh_fast._C not built")),
    pytest.param("torch"),
    pytest.param("faiss", marks=pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")),
]
#: Backends that promise the lower-index tie rule (FAISS follows its own order at ties).
TIE_EXACT_BACKENDS = [p for p in KNN_BACKENDS if p.values[0] != "faiss"]

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def compute_is_exact(dtype) -> bool:
    """float64 input is computed in float64, so the lists must equal the oracle's exactly."""
    return dtype == torch.float64


def assert_knn_lists_match(got, X, *, exact: bool, tol: float = 1e-5, what: str = "knn"):
    """Compare fast neighbour lists ``got [N, k]`` with the float64 oracle's lists of ``X``.

    ``exact``: the lists must be identical (float64 computation, lower-index ties).
    Otherwise the fast path ran in float32 and a near-tie may legitimately flip: every row that
    differs must list, at each rank, a neighbour whose float64 score is within ``tol`` (times the
    largest squared row norm) of the oracle's score at that rank (so only near-equal scores
    swapped), no self and no repeats. Returns the number of differing rows. On failure the message
    says how many and which rows differ, with their lists and scores.
    """
    from prh_fast import reference

    got = torch.as_tensor(got).detach().cpu().long()
    X64 = torch.as_tensor(X).detach().cpu().double()
    n = X64.shape[0]
    k = got.shape[1]
    assert got.shape == (n, k), f"{what}: shape {tuple(got.shape)}, expected ({n}, {k})"
    ref = reference.knn(X64, k)
    diff_rows = (got != ref).any(dim=1).nonzero().flatten().tolist()
    if not diff_rows:
        return 0
    G = X64 @ X64.T
    scale = float((X64 * X64).sum(dim=1).max())
    bad = []
    for i in diff_rows:
        row = got[i].tolist()
        ok = (not exact and len(set(row)) == k and i not in row
              and all(0 <= j < n for j in row))
        if ok:
            dev = (G[i, got[i]] - G[i, ref[i]]).abs().max().item()
            ok = dev <= tol * scale
        if not ok:
            bad.append(i)
    if bad:
        lines = []
        for i in bad[:5]:
            lines.append(
                f"  row {i}: got {got[i].tolist()} (scores {[round(v, 9) for v in G[i, got[i]].tolist()]})"
                f"\n          want {ref[i].tolist()} (scores {[round(v, 9) for v in G[i, ref[i]].tolist()]})"
            )
        kind = "exact match required" if exact else f"only near-ties within {tol:g} may flip"
        raise AssertionError(
            f"{what}: {len(diff_rows)}/{n} rows differ from the oracle ({kind}); "
            f"{len(bad)} not explained: rows {bad[:20]}\n" + "\n".join(lines)
        )
    return len(diff_rows)
