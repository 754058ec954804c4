"""prh_fast.knn.knn against the oracle's lists (prh_fast.reference.knn), every backend.

Exact integer outputs are compared exactly where the backend promises it (float64 input on the
"cpu" and "torch" backends, and exact ties on integer-valued data in any dtype); float32
computation may only swap near-ties, which ``assert_knn_lists_match`` checks row by row.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _data import (
    DTYPES,
    HAS_FAISS,
    HAS_NATIVE,
    KNN_BACKENDS,
    TIE_EXACT_BACKENDS,
    assert_knn_lists_match,
    integer_features,
    paired_features,
    with_duplicates,
)

from prh_fast import reference as R
from prh_fast.knn import knn

# odd shapes: (N, D, ks)
SHAPES = [(2, 3, (1,)), (7, 1, (1, 3, 6)), (7, 5, (1, 3, 6)), (123, 32, (1, 10, 122)),
          (781, 96, (5, 16))]
CASES = [(n, d, k) for n, d, ks in SHAPES for k in ks]


def _rough_features(n, d, seed=0, dtype=torch.float32):
    """Gaussian rows with norms spread over 0.1..10: inner product is not cosine here, and a
    row's best partner is often not itself (self must still be excluded)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X = X * torch.logspace(-1, 1, n, dtype=torch.float64)[torch.randperm(n, generator=g)][:, None]
    return X.to(dtype)


def _exact(dtype, backend):
    return dtype == torch.float64 and backend != "faiss"


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", CASES, ids=lambda v: str(v))
def test_knn_matches_oracle(n, d, k, dtype, backend):
    X = _rough_features(n, d, seed=n * d + k, dtype=dtype)
    idx = knn(X, k, backend=backend)
    assert idx.dtype == torch.int64 and idx.shape == (n, k) and idx.device == X.device
    assert_knn_lists_match(idx, X.double(), exact=_exact(dtype, backend),
                           what=f"knn[N={n}, D={d}, k={k}, {dtype}, {backend}]")


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("n", [2, 7, 123])
def test_k_equals_n_minus_1_lists_every_other_row(n, backend):
    X = _rough_features(n, 8, seed=n)
    idx = knn(X, n - 1, backend=backend)
    for i, row in enumerate(idx.tolist()):
        assert sorted(row) == [j for j in range(n) if j != i]
    assert_knn_lists_match(idx, X.double(), exact=False)


@pytest.mark.parametrize("backend", TIE_EXACT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,k", [(30, 4, 29), (123, 6, 10), (781, 3, 16)], ids=str)
def test_ties_go_to_the_lower_index(n, d, k, dtype, backend):
    # duplicated integer rows: every inner product is exact in any dtype, so ties are exact
    X, _ = with_duplicates(n, d, dtype=dtype)
    idx = knn(X, k, backend=backend)
    assert_knn_lists_match(idx, X.double(), exact=True, what=f"ties[{dtype}, {backend}]")


@pytest.mark.parametrize("backend", TIE_EXACT_BACKENDS)
def test_all_equal_scores_list_ascending_indices(backend):
    X = torch.zeros(7, 3)
    want = [[j for j in range(7) if j != i][:4] for i in range(7)]
    assert knn(X, 4, backend=backend).tolist() == want
    X = torch.ones(9, 2, dtype=torch.float64)
    want = [[j for j in range(9) if j != i] for i in range(9)]
    assert knn(X, 8, backend=backend).tolist() == want


@pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
def test_faiss_ties_have_the_right_scores():
    # FAISS does not promise the lower-index rule at ties, only the right scores.
    X, _ = with_duplicates(123, 6)
    idx = knn(X, 10, backend="faiss")
    assert_knn_lists_match(idx, X.double(), exact=False, tol=0.0, what="faiss ties")


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("budget", [1, 4096, 64 * 1024])
def test_tiny_memory_budget_gives_identical_results(budget, dtype, backend):
    X = _rough_features(781, 32, seed=1, dtype=dtype)
    ref_idx, ref_val = knn(X, 12, backend=backend, return_scores=True)
    idx, val = knn(X, 12, backend=backend, memory_budget=budget, return_scores=True)
    assert torch.equal(idx, ref_idx)
    # another tiling may sum in another order; the lists must not change, scores barely
    torch.testing.assert_close(val, ref_val, rtol=1e-6 if dtype == torch.float32 else 1e-13,
                               atol=1e-6 if dtype == torch.float32 else 1e-13)
    assert_knn_lists_match(idx, X.double(), exact=_exact(dtype, backend))


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_return_scores_are_the_inner_products(dtype, backend):
    X = _rough_features(123, 32, seed=2, dtype=dtype)
    idx, val = knn(X, 10, backend=backend, return_scores=True)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    if backend == "faiss":
        compute = torch.float32 if dtype != torch.float64 else val.dtype
    assert val.dtype == compute and val.shape == (123, 10)
    X64 = X.double()
    want = (X64.unsqueeze(1) * X64[idx]).sum(-1)  # <x_i, x_j> for the returned j
    tol = 1e-12 if val.dtype == torch.float64 and backend != "faiss" else 1e-5
    scale = float((X64 * X64).sum(1).max())
    torch.testing.assert_close(val.double(), want, rtol=tol, atol=tol * scale)
    assert bool((val[:, :-1] >= val[:, 1:]).all()), "scores must be non-increasing along a row"


@pytest.mark.parametrize("backend", KNN_BACKENDS)
@pytest.mark.parametrize("np_dtype", [np.float16, np.float32, np.float64], ids=str)
def test_numpy_input_returns_torch(np_dtype, backend):
    X = _rough_features(123, 16, seed=3, dtype=torch.float64).numpy().astype(np_dtype)
    idx = knn(X, 7, backend=backend)
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64
    assert torch.equal(idx, knn(torch.from_numpy(X), 7, backend=backend))
    exact = np_dtype == np.float64 and backend != "faiss"
    assert_knn_lists_match(idx, torch.from_numpy(X.astype(np.float64)), exact=exact)
    assert torch.equal(knn(np.asfortranarray(X), 7, backend=backend), idx)


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_non_contiguous_input(backend):
    X = _rough_features(123, 16, seed=4, dtype=torch.float64)
    big = torch.zeros(246, 48, dtype=torch.float64)
    big[::2, ::3] = X
    view = big[::2, ::3]
    assert not view.is_contiguous()
    assert torch.equal(knn(view, 9, backend=backend), knn(X, 9, backend=backend))
    assert torch.equal(knn(X.T.contiguous().T, 9, backend=backend), knn(X, 9, backend=backend))


def test_backends_agree_on_structured_data():
    A, _ = paired_features(781, 96, 8, dtype=torch.float64)
    names = ["torch"] + (["cpu"] if HAS_NATIVE else [])
    lists = {name: knn(A, 10, backend=name) for name in names}
    want = R.knn(A, 10)
    for name, idx in lists.items():
        assert torch.equal(idx, want), name


def test_auto_backend_is_exact():
    X = integer_features(123, 5, dtype=torch.float32)
    assert torch.equal(knn(X, 10), R.knn(X, 10))
    assert torch.equal(knn(X, 10, backend="auto"), R.knn(X, 10))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_oracle(dtype):
    X = _rough_features(781, 96, seed=5, dtype=dtype)
    idx = knn(X.cuda(), 16)
    assert idx.device.type == "cuda"
    assert_knn_lists_match(idx.cpu(), X.double(), exact=dtype == torch.float64)
    Xt, _ = with_duplicates(781, 3, dtype=dtype)
    assert torch.equal(knn(Xt.cuda(), 16).cpu(), R.knn(Xt, 16))


def test_list_helper_accepts_near_ties_and_rejects_wrong_lists():
    # rows 1 and 2 are near-tied partners of row 0 (scores 1.0 and 1.0 + 1e-9)
    X = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0 + 1e-9, 0.0, 0.0], [0.0, 1.0, 0.0],
                      [0.0, 0.6, 0.8]], dtype=torch.float64)
    ref = R.knn(X, 2)
    flipped = ref.clone()
    flipped[0] = torch.tensor([1, 2])  # swaps the near-tie in row 0
    assert assert_knn_lists_match(ref, X, exact=True) == 0
    assert assert_knn_lists_match(flipped, X, exact=False) == 1
    with pytest.raises(AssertionError, match=r"1/5 rows differ.*rows \[0\]"):
        assert_knn_lists_match(flipped, X, exact=True)
    assert ref[3].tolist() == [4, 0]
    wrong = ref.clone()
    wrong[3] = torch.tensor([0, 4])  # rank 1 holds a 0.0-score row instead of the 0.6 one
    with pytest.raises(AssertionError, match=r"rows \[3\]"):
        assert_knn_lists_match(wrong, X, exact=False)
    selfish = ref.clone()
    selfish[4, 0] = 4  # lists itself
    with pytest.raises(AssertionError, match=r"rows \[4\]"):
        assert_knn_lists_match(selfish, X, exact=False)
