"""Approximate search of store folders (prh_fast.store._ann): equal to the in-memory approximate
search with the same parameters and seed, the index and the lists cached in the store (and
invalidated by other parameters, preparation or content), the memory budget's errors, and the
reports reaching align / align_models on store folders.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

pytest.importorskip("faiss")

from test_stream import in_memory_layers, structured, write_store  # noqa: E402

import prh_fast  # noqa: E402
from prh_fast.errors import InputError  # noqa: E402
from prh_fast.knn import AnnParams, knn  # noqa: E402
from prh_fast.store import _ann  # noqa: E402
from prh_fast.store._stream import stream_knn  # noqa: E402

K = 8
# small indexes (fast to train) with the default target (tuned on the sample)
SPECS = {
    "faiss-ivf": "faiss-ivf:nlist=16",
    "faiss-ivfpq": "faiss-ivfpq:nlist=16,pq_m=8,pq_nbits=6",
    "faiss-hnsw": "faiss-hnsw:M=12,efConstruction=32",
}


class _Events:
    """Sums of the ``stream_count`` of ``prh_fast.store._stream._note``'s DEBUG records."""

    def __init__(self, caplog):
        self._caplog = caplog

    def __getitem__(self, name: str) -> int:
        return sum(r.stream_count for r in self._caplog.records
                   if getattr(r, "stream_event", None) == name)

    def clear(self) -> None:
        self._caplog.clear()


@pytest.fixture
def events(caplog):
    caplog.set_level(logging.DEBUG, logger="prh_fast.store._stream")
    return _Events(caplog)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ann") / "feats")
    write_store(path, structured(1500, [32, 24], seed=3), dtype="float32", shard_rows=211)
    return path


def _least_budget(p, n, d, itemsize):
    """The smallest memory budget the plan of ``p`` accepts (bisection on ``ann_plan``)."""
    lo, hi = 1, 1 << 30
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            _ann.ann_plan(p, n, d, K, itemsize, mid)
            hi = mid
        except InputError:
            lo = mid + 1
    return lo


def _same_report(a, b):
    assert a.backend == b.backend and a.params == b.params
    assert torch.equal(a.sample, b.sample)
    assert torch.equal(a.exact, b.exact)
    assert torch.equal(a.approx, b.approx)
    assert a.recall == b.recall and a.rows_equal == b.rows_equal
    assert a.recall_ci == b.recall_ci
    assert a.target_recall == b.target_recall
    assert a.rows_completed == b.rows_completed
    if a.tuning is None:
        assert b.tuning is None
    else:
        assert a.tuning["trials"] == b.tuning["trials"]
        assert a.tuning["chosen"] == b.tuning["chosen"]


# ------------------------------------------------------------------------------------------------
# equal to the in-memory approximate search
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_equal_in_memory(store_dir, name):
    spec = SPECS[name]
    X = in_memory_layers(store_dir)
    for layer in range(2):
        idx, vals, rep = knn(X[layer], K, backend=spec, return_scores=True,
                             return_report=True)
        s_idx, s_vals, s_rep = stream_knn(store_dir, layer, K, backend=spec, cache=False,
                                          return_scores=True, return_report=True)
        # HNSW: FAISS inserts vertices from several threads; the graphs have been identical
        # here run to run, so the lists are compared exactly for all three indexes
        assert torch.equal(idx, s_idx)
        assert torch.equal(vals, s_vals)
        _same_report(rep, s_rep)
        assert rep.tuning is not None and rep.recall >= 0.95


@pytest.mark.parametrize("name", ["faiss-ivf", "faiss-ivfpq"])
def test_equal_in_memory_chunked(tmp_path, name):
    """A budget that holds a fraction of the rows: the training rows, the adds, the searches
    and IVF-PQ's candidate re-scores are read chunk by chunk (clipped, float16 store)."""
    path = str(tmp_path / "f16")
    write_store(path, structured(1100, [40], seed=5), dtype="float16", shard_rows=97)
    spec = SPECS[name] + ",nprobe=3"
    p = AnnParams.parse(spec).resolved(1100, 40, K)
    budget = _least_budget(p, 1100, 40, 2)
    plan = _ann.ann_plan(p, 1100, 40, K, 2, budget)
    assert plan.chunk < 1100 and plan.key_block < 1100
    assert plan.search_chunk(K, p.refine) < 1100
    X = in_memory_layers(path, q=0.95, exact=True)[0]
    idx, rep = knn(X, K, backend=spec, return_report=True)
    s_idx, s_rep = stream_knn(path, 0, K, backend=spec, q=0.95, exact=True, cache=False,
                              memory_budget=budget, return_report=True)
    assert torch.equal(idx, s_idx)
    _same_report(rep, s_rep)


def test_equal_in_memory_out_of_range(tmp_path):
    """Rows that are not normalised, with inner products beyond float32: searched scaled by a
    power of two, as in memory (same lists, scores scaled back)."""
    path = str(tmp_path / "big")
    write_store(path, [x * 1e20 for x in structured(700, [16], seed=9)], shard_rows=100)
    X = in_memory_layers(path, normalize=False)[0]
    spec = SPECS["faiss-ivf"]
    from prh_fast.knn import _search
    from prh_fast.store._stream import _stream_knn

    idx, vals, _, _ = _search(X, K, backend=spec)  # float64 scores, scaled back
    s_idx, s_vals, _ = _stream_knn(path, 0, K, backend=spec, normalize=False, cache=False)
    assert torch.equal(idx, s_idx)
    assert torch.equal(vals, s_vals)


def test_hnsw_chunked_adds_recall(tmp_path):
    """HNSW rows added in several batches (the budget does not hold them all): the graph
    differs from the one-batch graph, so only the recall is compared."""
    path = str(tmp_path / "h")
    write_store(path, structured(1200, [24], seed=7), shard_rows=300)
    spec = SPECS["faiss-hnsw"] + ",efSearch=48"
    p = AnnParams.parse(spec).resolved(1200, 24, K)
    budget = _least_budget(p, 1200, 24, 4)
    assert not _ann.ann_plan(p, 1200, 24, K, 4, budget).hnsw_batches
    X = in_memory_layers(path)[0]
    _, rep = knn(X, K, backend=spec, return_report=True)
    s_idx, s_rep = stream_knn(path, 0, K, backend=spec, cache=False, memory_budget=budget,
                              return_report=True)
    assert torch.equal(rep.exact, s_rep.exact)
    assert abs(rep.recall - s_rep.recall) < 0.02 and s_rep.recall > 0.9
    assert not bool((s_idx == torch.arange(1200).view(-1, 1)).any())


def test_include_self_and_device_lists(store_dir):
    X = in_memory_layers(store_dir)[1]
    spec = SPECS["faiss-ivf"]
    from prh_fast.knn import _search

    idx, vals, _, _ = _search(X, K, backend=spec, include_self=True)
    s_idx, s_vals = stream_knn(store_dir, 1, K, backend=spec, include_self=True, cache=False,
                               return_scores=True)
    assert torch.equal(idx, s_idx) and torch.equal(vals.float(), s_vals)


# ------------------------------------------------------------------------------------------------
# the cache
# ------------------------------------------------------------------------------------------------
def test_cache_hits_and_invalidation(tmp_path, events):
    path = str(tmp_path / "c")
    layers = structured(900, [24], seed=11)
    write_store(path, layers, shard_rows=128)
    spec = SPECS["faiss-ivf"] + ",recall_sample=300"
    first, rep1 = stream_knn(path, 0, K, backend=spec, return_report=True)
    assert events["ann_searches"] == 1 and events["ann_index_builds"] == 1
    files = sorted(os.listdir(os.path.join(path, "cache")))
    index_file = [f for f in files if f.endswith(".faiss")]
    assert len(index_file) == 1
    with open(os.path.join(path, "cache", index_file[0]), "rb") as f:
        assert f.read(len(_ann._MAGIC)) == _ann._MAGIC  # our format, not a pickle

    # the same search: the lists (and the report) come from the cache
    events.clear()
    again, rep2 = stream_knn(path, 0, K, backend=spec, return_report=True)
    assert events["ann_cache_hits"] == 1 and events["ann_searches"] == 0
    assert torch.equal(first, again)
    _same_report(rep1, rep2)
    # the cached report can still enlarge its sample (exact lists streamed from the store)
    assert rep2.can_grow
    rep1.grow(500)
    rep2.grow(500)
    _same_report(rep1, rep2)
    X = in_memory_layers(path)[0]
    _, mem = knn(X, K, backend=spec, return_report=True)
    mem.grow(500)
    _same_report(mem, rep2)

    # another k / target: new lists from the cached index (no build)
    events.clear()
    stream_knn(path, 0, K - 2, backend=spec)
    stream_knn(path, 0, K, backend=spec + ",target_recall=0.9")
    assert events["ann_searches"] == 2 and events["ann_index_cache_hits"] == 2
    assert events["ann_index_builds"] == 0

    # other build parameters, another preparation: a new index
    events.clear()
    stream_knn(path, 0, K, backend="faiss-ivf:nlist=8,recall_sample=300")
    stream_knn(path, 0, K, backend=spec, q=0.9)
    assert events["ann_index_builds"] == 2 and events["ann_index_cache_hits"] == 0

    # a damaged index file is ignored (rebuilt), with a warning
    events.clear()
    full = os.path.join(path, "cache", index_file[0])
    data = bytearray(open(full, "rb").read())
    data[len(data) // 2] ^= 0xFF  # inside the payload
    open(full, "wb").write(bytes(data))
    stream_knn(path, 0, K - 1, backend=spec)
    assert events["ann_index_builds"] == 1
    assert any("unreadable index file" in r.getMessage() for r in events._caplog.records)

    # new content in the store folder: nothing cached applies
    import shutil

    shutil.rmtree(path)
    write_store(path, [x.flip(0) for x in layers], shard_rows=128)
    events.clear()
    stream_knn(path, 0, K, backend=spec)
    assert events["ann_searches"] == 1 and events["ann_index_builds"] == 1


def test_index_file_round_trip(tmp_path):
    """The cached index answers as the index it was built as (same lists from a cache hit of
    the index alone)."""
    path = str(tmp_path / "r")
    write_store(path, structured(800, [16], seed=2), shard_rows=100)
    spec = SPECS["faiss-ivfpq"]
    a = stream_knn(path, 0, K, backend=spec)
    for f in os.listdir(os.path.join(path, "cache")):
        if f.startswith("annlists"):
            os.unlink(os.path.join(path, "cache", f))
    b = stream_knn(path, 0, K, backend=spec)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# memory budget
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["faiss-ivf", "faiss-hnsw"])
def test_flat_index_over_budget(store_dir, name):
    with pytest.raises(InputError, match=r"memory_budget.*faiss-ivfpq"):
        stream_knn(store_dir, 0, K, backend=SPECS[name], memory_budget=100_000, cache=False)


def test_pq_fits_where_flat_does_not(store_dir):
    budget = _least_budget(AnnParams.parse(SPECS["faiss-ivfpq"]).resolved(1500, 32, K),
                           1500, 32, 4)
    with pytest.raises(InputError, match="memory_budget"):
        stream_knn(store_dir, 0, K, backend=SPECS["faiss-ivf"], memory_budget=budget,
                   cache=False)
    idx = stream_knn(store_dir, 0, K, backend=SPECS["faiss-ivfpq"], memory_budget=budget,
                     cache=False)
    assert idx.shape == (1500, K)


# ------------------------------------------------------------------------------------------------
# align / align_models on store folders
# ------------------------------------------------------------------------------------------------
def test_align_store_ann_report(store_dir, tmp_path):
    spec = SPECS["faiss-ivf"]
    other = str(tmp_path / "y")
    write_store(other, structured(1500, [20], seed=4), shard_rows=500)
    res = prh_fast.align(store_dir, other, "mutual_knn", topk=K, backend=spec)
    assert res.ann_report is not None
    X = in_memory_layers(store_dir)
    Y = in_memory_layers(other)
    mem = prh_fast.align(X, Y, "mutual_knn", topk=K, backend=spec)
    assert torch.equal(res.scores, mem.scores)
    assert res.ann_report["recall_min"] == mem.ann_report["recall_min"]
    assert res.ann_report["metrics"]["mutual_knn"]["error"] == \
        mem.ann_report["metrics"]["mutual_knn"]["error"]

    g = prh_fast.align_models({"x": store_dir}, {"y": other}, "cknna", topk=K, backend=spec,
                              progress=False)
    from prh_fast.store import load_features

    gm = prh_fast.align_models({"x": load_features(store_dir)["feats"]},
                               {"y": load_features(other)["feats"]}, "cknna", topk=K,
                               backend=spec, progress=False)
    def untimed(reports):
        return [{a: v for a, v in r.items() if a not in ("timings", "tuning")}
                for r in reports]

    assert untimed(g.options["ann"]["models"]["x"]) == untimed(gm.options["ann"]["models"]["x"])
    assert untimed(g.options["ann"]["models"]["y"]) == untimed(gm.options["ann"]["models"]["y"])
    assert g.pair_scores[("x", "y")].tolist() == gm.pair_scores[("x", "y")].tolist()


def test_stream_on_with_spec_string(store_dir):
    res = prh_fast.align(store_dir, store_dir, "mutual_knn", topk=K,
                         backend=AnnParams.parse(SPECS["faiss-hnsw"]), stream=True)
    assert res.ann_report is not None and res.ann_report["recall_min"] >= 0.95


def test_grid_second_metric_searches_nothing(tmp_path, events):
    """A grid's second neighbour metric on the same stores reads every layer's lists from the
    store's cache (no index built, no search)."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_store(a, structured(600, [16, 12], seed=1), shard_rows=150)
    write_store(b, structured(600, [10], seed=2), shard_rows=150)
    spec = SPECS["faiss-hnsw"]
    first = prh_fast.align_models([a], [b], "mutual_knn", topk=K, backend=spec, progress=False)
    assert events["ann_index_builds"] == 3 and events["ann_searches"] == 3
    events.clear()
    second = prh_fast.align_models([a], [b], "cknna", topk=K, backend=spec, progress=False)
    assert events["ann_cache_hits"] == 3
    assert events["ann_searches"] == 0 and events["ann_index_builds"] == 0
    assert first.options["ann"]["models"] == second.options["ann"]["models"]
