"""Shared test helpers: the data generators (from :mod:`prh_fast.testing`, re-exported here for
the test modules), the kNN backends as pytest params, and the oracle comparison of neighbour
lists."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from prh_fast.testing import (
    independent_features,
    integer_features,
    paired_features,
    with_duplicates,
)

__all__ = ["paired_features", "independent_features", "with_duplicates", "integer_features",
           "HAS_NATIVE", "HAS_FAISS", "KNN_BACKENDS", "TIE_EXACT_BACKENDS", "DTYPES",
           "compute_is_exact", "assert_knn_lists_match"]


# --------------------------------------------------------------------------------------------
# backends and assertion helpers shared by the test modules
# --------------------------------------------------------------------------------------------

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
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_NATIVE,
                                                  reason="native prh_fast._C not built")),
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
            got_scores = [round(v, 9) for v in G[i, got[i]].tolist()]
            want_scores = [round(v, 9) for v in G[i, ref[i]].tolist()]
            lines.append(
                f"  row {i}: got {got[i].tolist()} (scores {got_scores})"
                f"\n          want {ref[i].tolist()} (scores {want_scores})"
            )
        kind = "exact match required" if exact else f"only near-ties within {tol:g} may flip"
        raise AssertionError(
            f"{what}: {len(diff_rows)}/{n} rows differ from the oracle ({kind}); "
            f"{len(bad)} not explained: rows {bad[:20]}\n" + "\n".join(lines)
        )
    return len(diff_rows)
