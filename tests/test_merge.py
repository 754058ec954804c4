"""The running top-k merge (prh_fast.knn._merge) against a brute-force oracle.

The oracle sorts each row's (score, id) entries in Python by (score desc, id asc) and keeps the
first k: the tie rule of docs/metrics.md. Lists are compared exactly (ids and score bits), over
ties, duplicated keys, k larger than a tile, odd shapes, every float dtype, tiles in any order
(torch merge) or in increasing key order (native merge), self masks and the fixed-order
payload.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _data import HAS_NATIVE

from prh_fast.knn._merge import EMPTY, TopK, check_filled, fixed_dots, merge_results, select_topk

needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="native prh_fast._C not built")
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SHAPES = [(1, 1, 1), (7, 5, 3), (5, 7, 7), (123, 33, 10), (40, 301, 64)]  # rows, cols, k


def oracle(scores: torch.Tensor, ids: torch.Tensor, k: int, skip=None):
    """``(vals, idx)`` ``[b, k]``: each row's k best entries by (score desc, id asc); ``skip``:
    ``[b]`` ids left out of their row (self). Rows with fewer than k entries are padded with
    (-inf, EMPTY)."""
    vals, idx = [], []
    for r in range(scores.shape[0]):
        ent = sorted((-float(s), int(j)) for s, j in zip(scores[r].tolist(), ids[r].tolist())
                     if skip is None or int(j) != int(skip[r]))[:k]
        ent += [(float("inf"), EMPTY)] * (k - len(ent))
        vals.append([-s for s, _ in ent])
        idx.append([j for _, j in ent])
    return (torch.tensor(vals, dtype=torch.float64), torch.tensor(idx, dtype=torch.int64))


def assert_lists(got_v, got_i, want_v, want_i, what=""):
    """Exact comparison, reporting how many and which rows differ."""
    bad = ((got_i != want_i) | (got_v.double() != want_v)).any(dim=1).nonzero().flatten()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {got_i.shape[0]} rows differ, first "
                              f"{bad[:5].tolist()}: got {got_i[bad[:2]].tolist()} "
                              f"{got_v[bad[:2]].tolist()}, want {want_i[bad[:2]].tolist()} "
                              f"{want_v[bad[:2]].tolist()}")


def tied_scores(rows, cols, dtype, seed, levels=5):
    """Scores drawn from a few values: most rows have ties across the k-th place."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, (rows, cols), generator=g) / 4).to(dtype)


# --------------------------------------------------------------------------------------------
# select_topk and merge_results


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,k", SHAPES, ids=str)
def test_select_topk_equals_oracle_with_ties(rows, cols, k, dtype):
    S = tied_scores(rows, cols, dtype, seed=rows + cols)
    g = torch.Generator().manual_seed(k)
    ids = torch.stack([torch.randperm(cols, generator=g) * 3 for _ in range(rows)])
    v, i = select_topk(S, ids, k)
    assert v.dtype == dtype and i.dtype == torch.int64 and tuple(i.shape) == (rows, k)
    assert_lists(v, i, *oracle(S, ids, k), what=f"select_topk {dtype}")


def test_select_topk_carries_the_payload():
    S = tied_scores(30, 17, torch.float32, seed=3)
    ids = torch.arange(17).expand(30, -1).flip(1).contiguous()
    pay = ids.double() * 10 + 0.5
    v, i, p = select_topk(S, ids, 6, pay)
    assert torch.equal(p, i.double() * 10 + 0.5)
    assert_lists(v, i, *oracle(S, ids, 6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_results_of_shards_equals_the_oracle_of_the_union(dtype):
    S = tied_scores(50, 90, dtype, seed=4)
    ids = torch.arange(90).expand(50, -1)
    # strided shards (key j in shard j mod 3), each reduced to its own top-k first
    parts = [select_topk(S[:, s::3].contiguous(), ids[:, s::3].contiguous(), 12)
             for s in range(3)]
    v, i = merge_results(parts, 12)
    assert_lists(v, i, *oracle(S, ids, 12), what="merge_results")
    # one part of the right width comes back as it is
    assert merge_results(parts[:1], 12)[0] is parts[0][0]
    with pytest.raises(ValueError, match="parts"):
        merge_results([], 3)


def test_check_filled_names_the_argument():
    check_filled(torch.tensor([[1, 2]]), "X")
    with pytest.raises(ValueError, match=r"^layer 3: neighbour search produced empty slots"):
        check_filled(torch.tensor([[1, EMPTY]]), "layer 3")


# --------------------------------------------------------------------------------------------
# TopK: the torch merge


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,cols,k", SHAPES, ids=str)
def test_topk_torch_tiles_in_any_order_equal_the_oracle(rows, cols, k, dtype):
    S = tied_scores(rows, cols, dtype, seed=rows * cols)
    ids = torch.arange(cols).expand(rows, -1)
    g = torch.Generator().manual_seed(1)
    width = max(1, k // 3)  # tiles narrower than the lists
    starts = list(range(0, cols, width))
    top = TopK(rows, k, dtype)
    for p in torch.randperm(len(starts), generator=g).tolist():
        c0 = starts[p]
        rb = max(1, rows // 2)  # and row blocks
        for r0 in range(0, rows, rb):
            top.add(S[r0:r0 + rb, c0:c0 + width], c0, row0=r0)
    v, i, f = top.result()
    assert f is None and v.dtype == dtype
    assert_lists(v, i, *oracle(S, ids, k), what=f"TopK torch {dtype}")


@pytest.mark.parametrize("ids_as_tensor", [False, True])
def test_topk_self_mask_by_global_id(ids_as_tensor):
    n, k = 37, 9
    q0 = 11  # these rows are rows 11.. of a larger matrix; keys are rows 0.. of it
    keys = 60
    S = tied_scores(n, keys, torch.float32, seed=6)
    qids = torch.arange(q0, q0 + n)
    top = TopK(n, k, torch.float32, ids=qids if ids_as_tensor else q0)
    for c0 in range(0, keys, 7):
        top.add(S[:, c0:c0 + 7], c0, exclude_self=True)
    v, i, _ = top.result("X")
    want = oracle(S, torch.arange(keys).expand(n, -1), k, skip=qids)
    assert_lists(v, i, *want, what="self mask")
    assert not bool((i == qids.unsqueeze(1)).any())


def test_topk_duplicated_keys_keep_the_lower_index():
    # ten copies of one key row among noise: equal products, the lower indices win
    g = torch.Generator().manual_seed(7)
    K = torch.randn(80, 6, generator=g)
    K[5::8] = K[5]
    Q = K[5:6] * 3
    top = TopK(1, 4, torch.float64)
    for c0 in range(0, 80, 16):
        top.add((Q.double() @ K[c0:c0 + 16].double().T), c0)
    _, i, _ = top.result()
    assert i.tolist() == [[5, 13, 21, 29]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_topk_fixed_payload_is_the_fixed_order_score(dtype):
    g = torch.Generator().manual_seed(8)
    # half-integer features: every product is exact whatever the tile, so ties are exact
    X = (torch.randn(45, 13, generator=g, dtype=dtype) * 2).round() / 2
    X[::4] = X[1]
    top = TopK(45, 10, dtype, with_fixed=True)
    for r0 in range(0, 45, 16):
        for c0 in range(0, 45, 6):
            top.add_product(X[r0:r0 + 16], X[c0:c0 + 6], row0=r0, col0=c0, exclude_self=True)
    v, i, f = top.result("X")
    rows = torch.arange(45).repeat_interleave(10)
    assert torch.equal(f, fixed_dots(X, X, rows, i.reshape(-1)).view(45, 10))
    want = oracle(X.double() @ X.double().T, torch.arange(45).expand(45, -1), 10,
                  skip=torch.arange(45))
    assert_lists(v, i, *want, what="payload search")


def test_topk_empty_slots_and_bad_arguments():
    top = TopK(2, 5, torch.float32)
    top.add(torch.ones(2, 3), 0)
    v, i, _ = top.result()
    assert i[:, 3:].eq(EMPTY).all() and v[:, 3:].eq(float("-inf")).all()
    with pytest.raises(ValueError, match="^X: neighbour search produced empty slots"):
        top.result("X")
    with pytest.raises(ValueError, match="k:"):
        TopK(3, 0, torch.float32)
    with pytest.raises(ValueError, match="q, keys"):
        TopK(3, 2, torch.float32, with_fixed=True).add(torch.ones(3, 4), 0)
    with pytest.raises(ValueError, match="native"):
        TopK(3, 2, torch.float16, native=True)
    with pytest.raises(ValueError, match="ids"):
        TopK(3, 2, torch.float32, native=True, ids=torch.arange(3))


# --------------------------------------------------------------------------------------------
# TopK: the native merge


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows,cols,k", SHAPES, ids=str)
def test_topk_native_increasing_tiles_equal_the_oracle(rows, cols, k, dtype):
    S = tied_scores(rows, cols, dtype, seed=rows + 2 * cols)
    width = max(1, k // 2)
    top = TopK(rows, k, dtype, native=True)
    for c0 in range(0, cols, width):  # each row sees its keys in increasing order
        top.add(S[:, c0:c0 + width], c0)
    v, i, _ = top.result()
    assert_lists(v, i, *oracle(S, torch.arange(cols).expand(rows, -1), k),
                 what=f"TopK native {dtype}")


@needs_native
def test_topk_native_runs_merged_by_merge_results():
    # keys visited as two increasing runs (a ring: r.., then ..r), one list per run
    S = tied_scores(33, 70, torch.float32, seed=9)
    runs = []
    for lo, hi in ((40, 70), (0, 40)):
        top = TopK(33, 8, torch.float32, native=True)
        for c0 in range(lo, hi, 9):
            top.add(S[:, c0:min(hi, c0 + 9)], c0)
        runs.append(top.result()[:2])
    v, i = merge_results(runs, 8)
    assert_lists(v, i, *oracle(S, torch.arange(70).expand(33, -1), 8), what="two runs")


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_symmetric_native_search_equals_the_torch_merge_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(10)
    X = (torch.randn(157, 9, generator=g) * 2).round().to(dtype) / 2  # many exact ties
    X[3::10] = X[3]
    n, k, b = X.shape[0], 12, 40
    nat = TopK(n, k, dtype, native=True, with_fixed=True)
    for i0 in range(0, n, b):
        for j0 in range(i0, n, b):  # each tile once, its transpose feeds block j0
            nat.add_product(X[i0:i0 + b], X[j0:j0 + b], row0=i0, col0=j0, exclude_self=True,
                            symmetric=j0 != i0)
    tor = TopK(n, k, dtype, with_fixed=True)
    for c0 in reversed(range(0, n, 64)):  # any order, another tiling
        tor.add_product(X, X[c0:c0 + 64], col0=c0, exclude_self=True)
    a, t = nat.result("X"), tor.result("X")
    # half-integer features: the products are exact in any tiling, so both merges see the
    # oracle's scores; the fixed-order payloads do not depend on the tiling at all
    rows = torch.arange(n).repeat_interleave(k)
    for _, i, f in (a, t):
        assert torch.equal(f, fixed_dots(X, X, rows, i.reshape(-1)).view(n, k))
    want = oracle((X.double() @ X.double().T), torch.arange(n).expand(n, -1), k,
                  skip=torch.arange(n))
    assert_lists(a[0], a[1], *want, what="native symmetric")
    assert_lists(t[0], t[1], *want, what="torch")
    assert np.array_equal(a[2].numpy(), t[2].numpy())
