"""The native module against straightforward Python implementations of the same logic."""
import numpy as np
import pytest

_C = pytest.importorskip("prh_fast._C")


def random_lists(rng, layers, n, k, exclude_self=True):
    out = np.empty((layers, n, k), dtype=np.int64)
    for p in range(layers):
        for i in range(n):
            pool = np.array([j for j in range(n) if j != i or not exclude_self])
            out[p, i] = rng.choice(pool, size=k, replace=False)
    return out


def share(src, dst, m):
    """Rows of ``dst`` whose first ``m`` entries come from ``src`` (all entries stay distinct)."""
    out = dst.copy()
    for i in range(dst.shape[0]):
        head = list(src[i, :m])
        rest = [j for j in dst[i] if j not in head]
        out[i] = head + rest[: dst.shape[1] - m]
        if len(set(out[i])) != dst.shape[1]:
            raise AssertionError("test data: duplicate entries")
    return out


def py_lcs(a, b):
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            dp[i][j] = dp[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(dp[i - 1][j],
                                                                             dp[i][j - 1])
    return dp[-1][-1]


def py_lev(a, b):
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        cur = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] != b[j - 1]))
        prev = cur
    return prev[-1]


def py_row(metric, a_layer, b_layer, i):
    a, b = list(a_layer[i]), list(b_layer[i])
    if metric == "mutual":
        return len(set(a) & set(b))
    if metric == "cycle":
        return int(any(i in set(a_layer[j]) for j in b))
    if metric == "lcs":
        return py_lcs(a, b)
    return py_lev(a, b)


CASES = [(n, k) for n in (5, 17, 123, 1000) for k in (1, 3, 10, 40) if k < n]
# beyond the brief's grid: the bit-parallel edit limit (64/65) and the sorted-copy paths (> 128)
CASES += [(200, 64), (200, 65), (400, 150)]


@pytest.mark.parametrize("metric", ["mutual", "cycle", "lcs", "edit"])
@pytest.mark.parametrize("n,k", CASES)
def test_neighbour_scores_match_python(metric, n, k):
    rng = np.random.default_rng(n * 100 + k)
    a = random_lists(rng, 3, n, k)
    # B shares structure with A (half the entries copied, some reordered) so counts are not ~0
    b = random_lists(rng, 2, n, k)
    b[0] = share(a[1], b[0], k // 2 + 1)
    rows = min(n, 60 if k < 100 else 6)  # the Python reference is slow: check a subset of rows
    got = _C.neighbour_scores(metric, a, b)
    assert got.shape == (3, 2) and got.dtype == np.float64
    for p in range(3):
        for q in range(2):
            vals = _C.neighbour_row_values(metric, np.ascontiguousarray(a[p]),
                                           np.ascontiguousarray(b[q]))
            expect = [py_row(metric, a[p], b[q], i) for i in range(rows)]
            assert vals[:rows].tolist() == expect
            assert got[p, q] == pytest.approx(vals.mean(), rel=1e-15)


def py_cknna(ia, sa, ib, sb):
    n = ia.shape[0]
    P, Q = np.zeros((n, n)), np.zeros((n, n))
    for i in range(n):
        common = set(ia[i]) & set(ib[i])
        for t, j in enumerate(ia[i]):
            if j in common:
                P[i, j] = sa[i, t]
        for t, j in enumerate(ib[i]):
            if j in common:
                Q[i, j] = sb[i, t]
    one = np.ones(n)
    return (np.sum(P * Q.T), P.sum(), Q.sum(), one @ P @ Q @ one, one @ Q @ P @ one)


@pytest.mark.parametrize("ka,kb", [(3, 3), (10, 7), (45, 40)])
def test_cknna_terms_match_dense(ka, kb):
    rng = np.random.default_rng(ka)
    n = 50
    ia = random_lists(rng, 1, n, ka)[0]
    ib = random_lists(rng, 1, n, kb)[0]
    ib = share(ia, ib, min(ka, kb) // 2 + 1)
    # make some pairs mutual in both lists so the transpose term is exercised
    for i in range(0, n, 3):
        j = ia[i, 0]
        if i not in ia[j]:
            ia[j, -1] = i
        if i not in ib[j]:
            ib[j, -1] = i
    sa = rng.standard_normal((n, ka))
    sb = rng.standard_normal((n, kb))
    got = _C.cknna_terms(ia, sa, ib, sb)
    want = py_cknna(ia, sa, ib, sb)
    assert want[0] != 0.0
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_topk_update_tiles_ties_and_transposed_view():
    rng = np.random.default_rng(0)
    n, k = 40, 6
    S = rng.integers(0, 5, size=(n, n)).astype(np.float64)  # many exact ties
    S = (S + S.T) / 2
    vals = np.full((n, k), -np.inf)
    idx = np.full((n, k), -1, dtype=np.int64)
    for c0 in range(0, n, 7):  # key tiles in increasing index order
        tile = np.ascontiguousarray(S[:, c0 : c0 + 7].T).T  # a transposed (F-order) view
        assert not tile.flags.c_contiguous
        _C.topk_update(tile, 0, c0, vals, idx, True)
    for i in range(n):
        order = sorted((j for j in range(n) if j != i), key=lambda j: (-S[i, j], j))[:k]
        assert idx[i].tolist() == order
        assert vals[i].tolist() == [S[i, j] for j in order]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_update_row_offset_and_self(dtype):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((30, 4)).astype(dtype)
    S = X @ X.T
    vals = np.full((10, 3), -np.inf, dtype=dtype)
    idx = np.full((10, 3), -1, dtype=np.int64)
    _C.topk_update(S[10:20], 10, 0, vals, idx, True)
    for r in range(10):
        i = r + 10
        order = sorted((j for j in range(30) if j != i), key=lambda j: (-S[i, j], j))[:3]
        assert idx[r].tolist() == order


def test_bad_inputs_raise_value_error_naming_argument():
    a = np.zeros((1, 5, 2), dtype=np.int64)
    a[0, :, 1] = 1
    with pytest.raises(ValueError, match="metric"):
        _C.neighbour_scores("jaccard", a, a)
    with pytest.raises(ValueError, match="knn_a"):
        _C.neighbour_scores("mutual", a[0], a)
    with pytest.raises(ValueError, match="knn_b"):
        _C.neighbour_scores("mutual", a, a.astype(np.int32))
    with pytest.raises(ValueError, match="N and k"):
        _C.neighbour_scores("mutual", a, np.zeros((1, 4, 2), dtype=np.int64))
    bad = a.copy()
    bad[0, 2, 0] = 5
    with pytest.raises(ValueError, match="out of range"):
        _C.neighbour_scores("cycle", bad, a)
    bad[0, 2, 0] = -1
    with pytest.raises(ValueError, match="out of range"):
        _C.neighbour_row_values("mutual", a[0], bad[0])
    with pytest.raises(ValueError, match="k"):
        _C.neighbour_scores("mutual", np.zeros((1, 5, 0), np.int64), np.zeros((1, 5, 0), np.int64))
    s = np.zeros((5, 2))
    with pytest.raises(ValueError, match="score_a"):
        _C.cknna_terms(a[0], s.astype(np.float32), a[0], s)
    with pytest.raises(ValueError, match="score_b"):
        _C.cknna_terms(a[0], s, a[0], np.zeros((5, 3)))
    vals = np.full((3, 2), -np.inf, dtype=np.float32)
    idx = np.full((3, 2), -1, dtype=np.int64)
    with pytest.raises(ValueError, match="vals"):
        _C.topk_update(np.zeros((3, 4), np.float64), 0, 0, vals, idx, True)
    with pytest.raises(ValueError, match="scores"):
        _C.topk_update(np.zeros((3, 4), np.int64), 0, 0, vals, idx, True)
    with pytest.raises(ValueError, match="one row per row"):
        _C.topk_update(np.zeros((4, 4), np.float32), 0, 0, vals, idx, True)
    with pytest.raises(ValueError, match="NaN"):
        _C.topk_update(np.full((3, 4), np.nan, np.float32), 0, 0, vals, idx, True)


def test_build_info_records_the_build():
    info = _C.build_info()
    assert {"version", "cuda", "cuda_archs", "openmp", "omp_max_threads", "compiler",
            "cxx_flags", "build_type"} <= set(info)
    assert isinstance(_C.has_cuda_kernels, bool) and _C.has_cuda_kernels == info["cuda"]
    import prh_fast

    assert info["version"] == prh_fast.__version__


def test_results_do_not_depend_on_thread_count():
    rng = np.random.default_rng(7)
    n = 300
    a = random_lists(rng, 3, n, 40)
    b = random_lists(rng, 2, n, 40)
    b[1] = share(a[0], b[1], 25)
    ia, ib = a[0], share(a[0], b[0][:, :33], 20)
    sa, sb = rng.standard_normal((n, 40)), rng.standard_normal((n, 33))
    before = _C.build_info()["omp_max_threads"]
    try:
        got = {}
        for threads in (1, 2, 3):
            _C.set_num_threads(threads)
            assert _C.build_info()["omp_max_threads"] == threads or not _C.build_info()["openmp"]
            got[threads] = ([_C.neighbour_scores(m, a, b)
                             for m in ("mutual", "cycle", "lcs", "edit")],
                            _C.cknna_terms(ia, sa, ib, sb))
    finally:
        _C.set_num_threads(before)
    for threads in (2, 3):
        for x, y in zip(got[1][0], got[threads][0]):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_allclose(got[threads][1], got[1][1], rtol=1e-12, atol=0)


def test_topk_update_all_ties_keeps_lowest_indices_across_tiles():
    n, k = 23, 5
    S = np.ones((n, n), dtype=np.float32)
    vals = np.full((n, k), -np.inf, dtype=np.float32)
    idx = np.full((n, k), -1, dtype=np.int64)
    for c0 in range(0, n, 4):
        _C.topk_update(S.T[:, c0 : c0 + 4], 0, c0, vals, idx, True)  # a genuine transposed view
    for i in range(n):
        assert idx[i].tolist() == [j for j in range(n) if j != i][:k]
    assert (vals == 1).all()


def test_topk_update_partial_lists_and_strict_insert():
    # fewer keys than k: the tail keeps its empty slots (-inf, -1); -inf scores never enter
    vals = np.full((2, 4), -np.inf)
    idx = np.full((2, 4), -1, dtype=np.int64)
    tile = np.array([[0.5, -np.inf, 0.5], [3.0, 2.0, 1.0]])
    _C.topk_update(tile, 0, 0, vals, idx, True)
    assert idx.tolist() == [[2, -1, -1, -1], [0, 2, -1, -1]]
    assert vals[0, 0] == 0.5 and vals[1, :2].tolist() == [3.0, 1.0] and np.isneginf(vals[1, 2])
    # a later tile with an equal score goes after the existing equal entry
    _C.topk_update(np.array([[0.5], [3.0]]), 0, 3, vals, idx, False)
    assert idx.tolist() == [[2, 3, -1, -1], [0, 3, 2, -1]]


def test_more_bad_inputs():
    a = np.zeros((5, 2), dtype=np.int64)
    a[:, 0], a[:, 1] = (np.arange(5) + 1) % 5, (np.arange(5) + 2) % 5
    s = np.ones((5, 2))
    with pytest.raises(ValueError, match="knn_a.*C-contiguous"):
        _C.neighbour_scores("mutual", np.asfortranarray(np.stack([a, a])), np.stack([a, a]))
    with pytest.raises(ValueError, match="knn_b"):
        _C.neighbour_row_values("lcs", a, a[:, :1].copy())
    with pytest.raises(ValueError, match="rows N"):
        _C.cknna_terms(a, s, a[:4].copy(), s[:4].copy())
    bad = a.copy()
    bad[3, 1] = -7
    with pytest.raises(ValueError, match="knn_b.*out of range"):
        _C.cknna_terms(a, s, bad, s)
    bad[3, 1] = 1 << 40
    with pytest.raises(ValueError, match="knn_a.*out of range"):
        _C.cknna_terms(bad, s, a, s)
    with pytest.raises(ValueError, match="k"):
        _C.cknna_terms(a[:, :0].copy(), s[:, :0].copy(), a, s)
    with pytest.raises(ValueError, match="knn_a"):
        _C.cknna_terms(a.astype(np.float64), s, a, s)
    with pytest.raises(ValueError, match="3-D"):
        _C.neighbour_scores("edit", a, a)
    with pytest.raises(ValueError, match="idx"):
        _C.topk_update(np.zeros((5, 3)), 0, 0, np.zeros((5, 2)), np.zeros((5, 2), np.int32), True)
    with pytest.raises(ValueError, match="k"):
        _C.topk_update(np.zeros((5, 3)), 0, 0, np.zeros((5, 0)), np.zeros((5, 0), np.int64), True)
    with pytest.raises(ValueError, match="vals"):
        _C.topk_update(np.zeros((5, 3)), 0, 0, np.zeros((2, 5)).T, np.zeros((5, 2), np.int64), True)


def test_cuda_entry_points_validate_before_touching_the_device():
    if not _C.has_cuda_kernels:
        assert not hasattr(_C, "cuda_neighbour_scores")
        return
    info = _C.build_info()
    assert info["cuda_archs"] and info["cuda_version"]
    assert _C.cuda_cknna_workspace_bytes(10) == 4 * 10 * 8
    # sizes and pointers are checked first, so these raise without any GPU or driver
    with pytest.raises(ValueError, match="metric"):
        _C.cuda_neighbour_scores("nope", 1, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="k"):
        _C.cuda_neighbour_scores("mutual", 1, 1, 1, 1, 1, 0, 1, 0)
    with pytest.raises(ValueError, match="knn_a"):
        _C.cuda_neighbour_scores("mutual", 0, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="N"):
        _C.cuda_cknna_terms(1, 1, 1, 1, 0, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="workspace"):
        _C.cuda_cknna_terms(1, 1, 1, 1, 4, 1, 1, 1, 0, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_topk_update_column_major_tiles_match_row_major(dtype):
    # > 64 rows: several row blocks on the column-major path, a row offset, ties, self excluded
    rng = np.random.default_rng(3)
    n, rows, row0, k = 200, 150, 30, 7
    S = rng.integers(0, 20, size=(n, n)).astype(dtype)
    ST = np.ascontiguousarray(S.T)  # ST.T is S as a column-major view
    out = []
    for source in (S, ST.T):
        vals = np.full((rows, k), -np.inf, dtype=dtype)
        idx = np.full((rows, k), -1, dtype=np.int64)
        for c0 in range(0, n, 33):
            _C.topk_update(source[row0 : row0 + rows, c0 : c0 + 33], row0, c0, vals, idx, True)
        out.append((vals, idx))
    np.testing.assert_array_equal(out[0][1], out[1][1])
    np.testing.assert_array_equal(out[0][0], out[1][0])
    for r in range(rows):
        i = row0 + r
        assert out[0][1][r].tolist() == sorted((j for j in range(n) if j != i),
                                               key=lambda j: (-S[i, j], j))[:k]
