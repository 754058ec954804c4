"""The grouped IVF-Flat scan (prh_fast.knn._ivf_scan) and its native merge (topk_scatter):
equal to a float64 brute-force oracle over the probed cells (ranked by score, ties by the lower
id) and to FAISS's own search of the same index, on clustered features with real
neighbourhoods, duplicated rows and odd shapes; lists that do not depend on the query blocks,
the rows searched or the order of the keys.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prh_fast import _native
from prh_fast.testing import latent, layer_features, with_duplicates

faiss = pytest.importorskip("faiss")
pytestmark = pytest.mark.skipif(not _native.HAS_NATIVE, reason="needs the native module")

from prh_fast.knn._ivf_scan import TILE, IvfFlatScan, tile_mm  # noqa: E402


def _features(n: int, d: int, seed: int = 0) -> torch.Tensor:
    z = latent(n, 12, clusters=40, spread=0.5, seed=seed)
    return torch.nn.functional.normalize(layer_features(z, d, seed=seed + 1), dim=1)


def _index(X: torch.Tensor, nlist: int, seed: int = 0):
    d = X.shape[1]
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    x = X.numpy()
    index.train(x)
    index.add(x)
    return index


def _oracle(scan: IvfFlatScan, Q: torch.Tensor, P: torch.Tensor, kk: int):
    """float64 brute force over each row's probed cells: (scores [r, kk], ids [r, kk]) by
    score desc, id asc; -inf / -1 where fewer than kk vectors were probed."""
    r = Q.shape[0]
    vals = torch.full((r, kk), float("-inf"), dtype=torch.float64)
    ids = torch.full((r, kk), -1, dtype=torch.int64)
    for i in range(r):
        cells = [c for c in P[i].tolist() if scan.vecs[c] is not None]
        if not cells:
            continue
        V = torch.cat([scan.vecs[c] for c in cells]).double()
        I = torch.from_numpy(np.concatenate([scan.ids[c] for c in cells]))
        s = V @ Q[i].double()
        order = sorted(range(len(I)), key=lambda t: (-float(s[t]), int(I[t])))[:kk]
        vals[i, :len(order)] = s[order]
        ids[i, :len(order)] = I[order]
    return vals, ids


# ----------------------------------------------------------------------------- native merge
def _scatter_args(rng, R, b):
    """One batch: integer-valued query and key rows (exact float64 scores, many ties), their
    float32 tile scores disturbed within the margin, random ids and distinct targets."""
    rows = int(rng.integers(1, R + 1))
    cols = int(rng.integers(1, 13))
    q = rng.integers(-2, 3, size=(rows, 5)).astype(np.float32)
    keys = rng.integers(-2, 3, size=(cols, 5)).astype(np.float32)
    exact = q.astype(np.float64) @ keys.astype(np.float64).T
    margin = np.full(rows, 0.25)
    S = (exact + rng.uniform(-0.2, 0.2, size=exact.shape)).astype(np.float32)
    ids = (rng.permutation(1000)[:cols] + 1000 * b).astype(np.int64)
    targets = rng.permutation(R)[:rows].astype(np.int64)
    return S, q, keys, margin, ids, targets, exact


def _scatter_reference(batches, R, k):
    """Running lists from every batch: all candidates sorted by (exact score desc, id asc)."""
    cand: list = [[] for _ in range(R)]
    for S, _q, _keys, _margin, ids, targets, exact in batches:
        for r, t in enumerate(targets.tolist()):
            cand[t] += [(-float(exact[r, c]), int(ids[c])) for c in range(S.shape[1])]
    vals = np.full((R, k), -np.inf)
    idx = np.full((R, k), -1, dtype=np.int64)
    for t in range(R):
        best = sorted(cand[t])[:k]
        vals[t, :len(best)] = [-s for s, _ in best]
        idx[t, :len(best)] = [j for _, j in best]
    return vals, idx


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_topk_scatter_ranks_by_fixed_scores_with_ties(k):
    """Many exact ties, ids in random order, several batches per list, tile scores off by up
    to 0.2 (< margin): the lists are the first k of all candidates by (exact score desc, id
    asc), with the exact scores."""
    rng = np.random.default_rng(k)
    R = 9
    batches = [_scatter_args(rng, R, b) for b in range(6)]
    vals = np.full((R, k), -np.inf)
    idx = np.full((R, k), -1, dtype=np.int64)
    for S, q, keys, margin, ids, targets, _ in batches:
        _native.native().topk_scatter(S, q, keys, margin, ids, targets, vals, idx)
    ev, ei = _scatter_reference(batches, R, k)
    np.testing.assert_array_equal(idx, ei)
    np.testing.assert_array_equal(vals, ev)


def test_topk_scatter_independent_of_arrival_order():
    rng = np.random.default_rng(5)
    S, q, keys, margin, ids, targets, _ = _scatter_args(rng, 4, 0)
    cols = S.shape[1]
    out = []
    for perm in (np.arange(cols), rng.permutation(cols), np.arange(cols)[::-1].copy()):
        vals = np.full((4, 6), -np.inf)
        idx = np.full((4, 6), -1, dtype=np.int64)
        for a in range(0, cols, 3):  # in batches of columns, in the permuted order
            c = perm[a:a + 3]
            _native.native().topk_scatter(np.ascontiguousarray(S[:, c]), q, keys[c], margin,
                                          ids[c], targets, vals, idx)
        out.append((vals, idx))
    for vals, idx in out[1:]:
        np.testing.assert_array_equal(idx, out[0][1])
        np.testing.assert_array_equal(vals, out[0][0])


def test_topk_scatter_rejects_bad_arguments():
    nat = _native.native()
    S = np.zeros((2, 3), dtype=np.float32)
    q, keys = np.zeros((2, 4), dtype=np.float32), np.zeros((3, 4), dtype=np.float32)
    m = np.zeros(2)
    vals = np.full((4, 2), -np.inf)
    idx = np.full((4, 2), -1, dtype=np.int64)
    ids = np.arange(3, dtype=np.int64)
    t = np.array([0, 1])
    with pytest.raises(ValueError, match="targets: list row 4 out of range"):
        nat.topk_scatter(S, q, keys, m, ids, np.array([0, 4]), vals, idx)
    with pytest.raises(ValueError, match="ids: expected one id per column"):
        nat.topk_scatter(S, q, keys, m, ids[:2], t, vals, idx)
    with pytest.raises(ValueError, match="targets: expected one list row per row"):
        nat.topk_scatter(S, q, keys, m, ids, np.array([0]), vals, idx)
    with pytest.raises(ValueError, match="vals: expected dtype float64"):
        nat.topk_scatter(S, q, keys, m, ids, t, vals.astype(np.float32), idx)
    with pytest.raises(ValueError, match="q, keys: expected 2 query rows and 3 key rows"):
        nat.topk_scatter(S, q, keys[:2], m, ids, t, vals, idx)
    with pytest.raises(ValueError, match="margin: must be >= 0"):
        nat.topk_scatter(S, q, keys, np.array([0.0, np.nan]), ids, t, vals, idx)
    with pytest.raises(ValueError, match="NaN"):
        nat.topk_scatter(np.full((2, 3), np.nan, dtype=np.float32), q, keys, m, ids, t,
                         vals, idx)
    with pytest.raises(ValueError, match="unit column stride"):
        nat.topk_scatter(np.zeros((3, 2), dtype=np.float32).T, q, keys, m, ids, t, vals, idx)


# ----------------------------------------------------------------------------- tiled product
def test_tile_mm_rows_do_not_depend_on_the_product():
    """A row's scores are bit-equal whether it is scored alone, in a small block or a large
    one (BLAS takes other paths for products of few rows; the tiles avoid them)."""
    g = torch.Generator().manual_seed(0)
    Q = torch.randn(300, 77, generator=g)
    K = torch.randn(133, 77, generator=g)
    full = tile_mm(Q, K)
    assert torch.allclose(full, Q @ K.T, atol=1e-4)
    for r in [1, 2, 3, 5, 7, 11, TILE - 1, TILE, TILE + 1, 100]:
        rows = torch.randperm(300, generator=g)[:r]
        assert torch.equal(tile_mm(Q[rows], K), full[rows]), r
    scratch = torch.empty(64, 77)
    assert torch.equal(tile_mm(Q[:40], K, scratch), full[:40])


# ----------------------------------------------------------------------------- the scan
@pytest.mark.parametrize("n,d,nlist,nprobe,kk", [(3000, 48, 32, 4, 11), (1200, 37, 16, 16, 5),
                                                (900, 8, 40, 1, 30)])
def test_scan_equals_oracle_over_probed_cells(n, d, nlist, nprobe, kk):
    """Every row's list is the kk best keys of its probed cells (float64 oracle; ids equal
    wherever the oracle's kk-th and (kk+1)-th scores are not rounding-close)."""
    X = _features(n, d, seed=n)
    index = _index(X, nlist)
    scan = IvfFlatScan.of(index)
    assert scan is not None and scan.nlist == nlist
    Q = X[::7].contiguous()
    P = scan.probes(Q, nprobe, 2**24)
    # the probes: the nprobe best centroids, ties by the lower cell
    cs = Q.double() @ scan.centroids.double().T
    top = cs.topk(min(nprobe, nlist), dim=1).values
    got = cs.gather(1, P)
    assert torch.allclose(got, top, atol=1e-5)
    vals, ids = scan.search(Q, nprobe, kk, 2**24)
    ev, ei = _oracle(scan, Q, P, kk)
    assert vals.dtype == torch.float64
    assert torch.allclose(vals[ids >= 0], ev[ids >= 0], rtol=0, atol=1e-12)
    assert torch.equal(ids, ei)


def test_scan_matches_faiss_search():
    """The candidates FAISS's own search of the same index returns (scores within float32
    rounding, the same ids on all but rounding-close rows)."""
    X = _features(4000, 64, seed=2)
    index = _index(X, 64)
    index.nprobe = 6
    Q = X[:1000].contiguous()
    D, I = index.search(Q.numpy(), 10)
    vals, ids = IvfFlatScan.of(index).search(Q, 6, 10, 2**24)
    assert torch.allclose(vals.float(), torch.from_numpy(D), atol=1e-5)
    same = (torch.sort(ids, 1).values == torch.sort(torch.from_numpy(I), 1).values).all(1)
    assert same.float().mean() >= 0.99


def test_scan_lists_do_not_depend_on_blocks_or_rows():
    """Bit-equal lists for all rows at once, rows in small blocks (a tight budget), a subset
    searched alone and the rows in another order."""
    X = _features(2500, 40, seed=4)
    scan = IvfFlatScan.of(_index(X, 32))
    vals, ids = scan.search(X, 5, 9, 2**26)
    v2, i2 = scan.search(X, 5, 9, 20_000)  # blocks of a few dozen rows
    assert scan.block_rows(5, 9, 20_000) < 100
    assert torch.equal(v2, vals) and torch.equal(i2, ids)
    rows = torch.randperm(2500, generator=torch.Generator().manual_seed(1))[:333]
    v3, i3 = scan.search(X[rows], 5, 9, 2**26)
    assert torch.equal(v3, vals[rows]) and torch.equal(i3, ids[rows])


def test_scan_duplicates_tie_by_lower_id():
    """Exact duplicates tie exactly; the lists keep the lower ids among tied keys."""
    X, groups = with_duplicates(1500, 12, n_unique=200, seed=3)
    X = torch.nn.functional.normalize(X, dim=1)
    scan = IvfFlatScan.of(_index(X, 16))
    vals, ids = scan.search(X[:200], 16, 6, 2**24)  # all cells probed: the exact search
    S = X[:200].double() @ X.double().T
    for i in range(200):
        order = sorted(range(1500), key=lambda j: (-float(S[i, j]), j))[:6]
        assert ids[i].tolist() == order


def test_scan_short_lists_and_odd_shapes():
    """Cells holding fewer vectors than kk leave -inf / -1 slots; nprobe above nlist is
    clipped; fewer rows than a tile."""
    X = _features(300, 9, seed=6)
    index = _index(X, 20)
    scan = IvfFlatScan.of(index)
    vals, ids = scan.search(X[:5], 1, 200, 2**20)
    sizes = torch.tensor([0 if v is None else v.shape[0] for v in scan.vecs])
    P = scan.probes(X[:5], 1, 2**20).view(-1)
    assert torch.equal((ids >= 0).sum(1), sizes[P])
    assert torch.isinf(vals[ids < 0]).all()
    v_all, i_all = scan.search(X[:5], 10_000, 299, 2**20)  # every cell: all keys
    assert (i_all >= 0).all() and torch.equal(torch.sort(i_all[0]).values[:3], torch.arange(3))


def test_of_only_cpu_ivf_flat_inner_product():
    X = _features(600, 16, seed=8).numpy()
    pq = faiss.IndexIVFPQ(faiss.IndexFlatIP(16), 16, 8, 4, 4, faiss.METRIC_INNER_PRODUCT)
    pq.train(X)
    l2 = faiss.IndexIVFFlat(faiss.IndexFlatL2(16), 16, 8)
    l2.train(X)
    untrained = faiss.IndexIVFFlat(faiss.IndexFlatIP(16), 16, 8, faiss.METRIC_INNER_PRODUCT)
    for index in (pq, l2, untrained, faiss.IndexHNSWFlat(16, 8)):
        assert IvfFlatScan.of(index) is None


def test_in_memory_and_store_searches_use_the_scan(tmp_path, monkeypatch):
    """faiss-ivf in memory and from a store goes through the scan, and the two give equal
    lists and scores (chunked store searches: tests/test_store_ann.py)."""
    from test_stream import in_memory_layers, structured, write_store

    from prh_fast.knn import knn
    from prh_fast.store._stream import stream_knn

    calls = []
    real = IvfFlatScan.search

    def counted(self, Q, nprobe, kk, budget):
        calls.append(Q.shape[0])
        return real(self, Q, nprobe, kk, budget)

    monkeypatch.setattr(IvfFlatScan, "search", counted)
    path = str(tmp_path / "feats")
    write_store(path, structured(900, [24], seed=5), dtype="float32", shard_rows=97)
    X = in_memory_layers(path)[0]
    spec = "faiss-ivf:nlist=16,nprobe=3"
    idx, vals = knn(X, 6, backend=spec, return_scores=True)
    n_mem = len(calls)
    assert n_mem >= 1 and sum(calls) >= 900
    s_idx, s_vals = stream_knn(path, 0, 6, backend=spec, cache=False, return_scores=True)
    assert len(calls) > n_mem
    assert torch.equal(idx, s_idx) and torch.equal(vals, s_vals)
