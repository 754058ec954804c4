"""Streaming from a store equals the in-memory pipeline (prh_fast.store._stream, _moments and
the grid's store path).

- neighbour lists and scores: identical (bit for bit) to ``prh_fast.knn.knn`` on the layer
  prepared in memory, for odd N, odd shard sizes, several k, every store dtype, several query
  panels, clipping modes, and data with many exact ties;
- clipping threshold: bit-equal to a full sort (ties, negatives, -0.0, subnormals), in at most
  three passes;
- linear CKA, unbiased CKA, SVCCA: 1e-9 relative to the in-memory metrics on float64 stores;
- the store cache: a second run searches nothing, a different setting searches again, a write
  that dies half-way (exception or killed process) leaves no readable cache;
- memory_budget errors name the argument.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _data import HAS_NATIVE, assert_knn_lists_match, with_duplicates

from prh_fast._align import _prepare_side, as_layers
from prh_fast.knn import knn
from prh_fast.prepare import prepare_features
from prh_fast.store import StoreWriter, load_features, open_store, save_features
from prh_fast.store import _stream as S
from prh_fast.store._moments import TensorSource, kernel_scores
from prh_fast.store._stream import (
    StreamPrep,
    clip_thresholds,
    knn_plan,
    stream_knn,
)

needs_native = pytest.mark.skipif(not HAS_NATIVE, reason="native prh_fast._C not built")


class _Events:
    """What the streaming computations did during a test: ``events[name]`` sums the
    ``stream_count`` of the DEBUG records whose ``stream_event`` is ``name``
    (``prh_fast.store._stream._note``)."""

    def __init__(self, caplog):
        self._caplog = caplog

    def __getitem__(self, name: str) -> int:
        return sum(r.stream_count for r in self._caplog.records
                   if getattr(r, "stream_event", None) == name)


@pytest.fixture
def events(caplog):
    caplog.set_level(logging.DEBUG, logger="prh_fast.store._stream")
    return _Events(caplog)
STORE_DTYPES = ["bfloat16", "float16", "float32", "float64"]


# ------------------------------------------------------------------------------------------------
# data and helpers
# ------------------------------------------------------------------------------------------------
def structured(n, dims, seed=0, rank=6, noise=0.3, offset=2.0):
    """Layers with real shared structure: a common low-rank latent through a different random
    map and nonlinearity per layer, plus noise and a common offset (so centring matters)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    out = []
    for i, d in enumerate(dims):
        W = torch.randn(rank, d, generator=g, dtype=torch.float64)
        H = Z @ W
        H = torch.tanh(H) if i % 2 == 0 else torch.relu(H)
        out.append(H + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
                   + offset * torch.randn(1, d, generator=g, dtype=torch.float64))
    return out


def write_store(path, layers, dtype="float32", shard_rows=97, layout=None, batch=113):
    w = StoreWriter(path, dtype=dtype, shard_rows=shard_rows, layout=layout)
    n = layers[0].shape[0]
    for a in range(0, n, batch):
        w.append([x[a:a + batch] for x in layers])
    return open_store(w.finish())


def in_memory_layers(path, q=None, exact=False, normalize=True):
    """What prh_fast.grid's model cache prepares for a model in memory."""
    feats = load_features(path)["feats"]
    if q is not None:
        feats = prepare_features(feats, q=q, exact=exact)
    return _prepare_side(as_layers(feats, "feats"), normalize, False)


def budget_for_panel(st, l, k, panels, backend="cpu"):
    """The smallest memory budget whose plan keeps the default tiles with ``panels`` query
    blocks per panel (so the store is read in pieces)."""
    cd = torch.float64 if st.dtype == torch.float64 else torch.float32
    default = knn_plan(st.n, st.dims[l], k, backend=backend, compute_dtype=cd,
                       store_itemsize=st.dtype.itemsize, memory_budget=S.DEFAULT_STREAM_BUDGET)
    shape = [a for a in ("tile", "rows", "cols") if a in default]
    lo, hi = 1, S.DEFAULT_STREAM_BUDGET
    while lo < hi:  # monotone: smaller tiles below some budget, then growing panels
        mid = (lo + hi) // 2
        try:
            p = knn_plan(st.n, st.dims[l], k, backend=backend, compute_dtype=cd,
                         store_itemsize=st.dtype.itemsize, memory_budget=mid)
            ok = p["panel"] >= panels and all(p[a] == default[a] for a in shape)
        except ValueError:
            ok = False
        lo, hi = (lo, mid) if ok else (mid + 1, hi)
    plan = knn_plan(st.n, st.dims[l], k, backend=backend, compute_dtype=cd,
                    store_itemsize=st.dtype.itemsize, memory_budget=lo)
    return lo, plan, default


# ------------------------------------------------------------------------------------------------
# neighbour lists
# ------------------------------------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("dtype", STORE_DTYPES)
@pytest.mark.parametrize("n,shard_rows,prep", [
    (1001, 97, (None, False)),      # odd N, odd shards, no clipping (the grid's default)
    (777, 1000, (0.95, True)),      # a single shard, exact clipping
    (613, 61, (0.9, False)),        # approximate clipping, many shards
], ids=["plain", "exact-clip", "approx-clip"])
@pytest.mark.slow
def test_lists_equal_in_memory(tmp_path, dtype, n, shard_rows, prep):
    q, exact = prep
    st = write_store(tmp_path / "s", structured(n, [24, 17], seed=n), dtype, shard_rows)
    mem = in_memory_layers(st.path, q, exact)
    for l in range(2):
        for k in (1, 7, 30):
            got, gv = stream_knn(st, l, k, q=q, exact=exact, return_scores=True, cache=False)
            want, wv = knn(mem[l], k, return_scores=True)
            assert torch.equal(got, want), f"layer {l}, k={k}: {(got != want).any(1).sum()} rows"
            assert torch.equal(gv, wv)
    # several query panels: the default tiles, the store read in pieces
    budget, plan, default = budget_for_panel(st, 0, 7, 1)
    assert plan["tile"] == default["tile"] and plan["panel"] < plan["blocks"]
    got = stream_knn(st, 0, 7, q=q, exact=exact, memory_budget=budget, cache=False)
    assert torch.equal(got, knn(mem[0], 7))


@needs_native
def test_lists_with_two_block_panels_and_ragged_last_block(tmp_path):
    st = write_store(tmp_path / "s", structured(2100, [9], seed=3), "float32", 211)
    mem = in_memory_layers(st.path)
    budget, plan, default = budget_for_panel(st, 0, 5, 2)
    assert plan["panel"] == 2 and plan["blocks"] > 4 and plan["tile"] == default["tile"]
    assert torch.equal(stream_knn(st, 0, 5, memory_budget=budget, cache=False),
                       knn(mem[0], 5))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float64"])
def test_torch_backend_equals_in_memory_torch(tmp_path, dtype):
    st = write_store(tmp_path / "s", structured(533, [19], seed=5), dtype, 50)
    mem = in_memory_layers(st.path)
    for k in (1, 9):
        got, gv = stream_knn(st, 0, k, backend="torch", return_scores=True, cache=False)
        want, wv = knn(mem[0], k, backend="torch", return_scores=True)
        assert torch.equal(got, want) and torch.equal(gv, wv)
    # a small budget: smaller query blocks (those of the matching in-memory budget), a few
    # per panel, the key tiles streamed past each panel
    def plan_for(b):
        try:
            return knn_plan(st.n, 19, 9, backend="torch", compute_dtype=mem[0].dtype,
                            store_itemsize=st.dtype.itemsize, memory_budget=b)
        except ValueError:
            return None

    budget = next(b for b in range(400_000, 4_000_000, 20_000)
                  if plan_for(b) is not None and 1 < plan_for(b)["panel"] < 6)
    plan = plan_for(budget)
    assert plan["panel"] < plan["blocks"]
    got = stream_knn(st, 0, 9, backend="torch", memory_budget=budget, cache=False)
    assert torch.equal(got, knn(mem[0], 9, backend="torch", memory_budget=plan["tile_budget"]))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_native), "torch"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.slow
def test_many_exact_ties_go_to_the_lower_index(tmp_path, dtype, backend):
    # duplicated small-integer rows: every score is exact, ties everywhere (also at distance 0)
    X, _ = with_duplicates(901, 5, n_unique=60, seed=2)
    st = write_store(tmp_path / "s", [X], dtype, 89)
    for normalize in (False, True):
        mem = in_memory_layers(st.path, normalize=normalize)
        for k in (1, 14, 40):
            got = stream_knn(st, 0, k, normalize=normalize, backend=backend, cache=False)
            assert torch.equal(got, knn(mem[0], k, backend=backend))
            if not normalize:
                assert_knn_lists_match(got, X, exact=True, what=f"ties k={k}")
    budget, plan, _ = budget_for_panel(st, 0, 14, 1, backend=backend)
    got = stream_knn(st, 0, 14, normalize=False, backend=backend, memory_budget=budget,
                     cache=False)
    assert_knn_lists_match(got, X, exact=True, what="ties, one-block panels")


def test_tiny_store_and_every_k(tmp_path):
    X = structured(7, [3], seed=9)
    st = write_store(tmp_path / "s", X, "float32", 2)
    mem = in_memory_layers(st.path)
    for k in range(1, 7):
        assert torch.equal(stream_knn(st, 0, k, cache=False), knn(mem[0], k))
    with pytest.raises(ValueError, match="k"):
        stream_knn(st, 0, 7)
    with pytest.raises(ValueError, match="layer"):
        stream_knn(st, 1, 2)


def test_backend_choice(tmp_path):
    st = write_store(tmp_path / "s", structured(40, [4]), "float32", 11)
    with pytest.raises(ValueError, match="backend"):
        stream_knn(st, 0, 3, backend="faiss")
    with pytest.raises(ValueError, match="backend"):
        stream_knn(st, 0, 3, backend="triton")


def test_progress_bar_shows_rate_and_eta(tmp_path, capsys):
    st = write_store(tmp_path / "s", structured(300, [8]), "float32", 31)
    stream_knn(st, 0, 4, progress=True, cache=False, memory_budget=1 << 20)
    err = capsys.readouterr().err
    assert "knn" in err and "tile" in err and "/s" in err and "<" in err  # rate, elapsed<ETA


def test_nan_in_a_store_names_it(tmp_path):
    X = structured(50, [4])
    X[0][17, 2] = float("nan")
    st = write_store(tmp_path / "s", X, "float32", 9)
    with pytest.raises(ValueError, match=r"s: layer 0 contains NaN"):
        stream_knn(st, 0, 3, cache=False)
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        clip_thresholds(st, 0.9, exact=True, cache=False)
    with pytest.raises(ValueError, match=r"NaN or Inf"):
        clip_thresholds(st, 0.9, exact=False, cache=False)


@pytest.mark.cuda
def test_cuda_torch_backend_equals_in_memory(tmp_path):
    st = write_store(tmp_path / "s", structured(1500, [32], seed=4), "bfloat16", 333)
    feats = load_features(st.path)["feats"].cuda()
    X = _prepare_side(as_layers(feats, "f"), True, False)[0]
    got = stream_knn(st, 0, 10, device="cuda", cache=False)
    assert got.device.type == "cuda"
    assert torch.equal(got, knn(X, 10, backend="torch"))


# ------------------------------------------------------------------------------------------------
# clipping threshold
# ------------------------------------------------------------------------------------------------
def awkward_values(n, d, dtype, seed=0):
    """Values with ties, both signs, +-0.0, subnormals of the stored dtype and a wide range."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.logspace(
        -3, 3, d, dtype=torch.float64)
    x = x.to(dtype)
    flat = x.view(-1)
    m = flat.numel()
    idx = torch.randperm(m, generator=g)
    tiny = torch.finfo(dtype).tiny
    sub = torch.tensor([tiny / 2, tiny / 8, tiny / 64], dtype=torch.float64).to(dtype)
    v = float(flat[idx[0]])
    flat[idx[: m // 10]] = v                         # one value repeated: big ties
    flat[idx[m // 10: m // 10 + m // 20]] = -v       # and its negative
    flat[idx[m // 5: m // 5 + 7]] = 0.0
    flat[idx[m // 5 + 7: m // 5 + 14]] = -0.0
    for j, v in enumerate(sub):
        flat[idx[m // 4 + 5 * j: m // 4 + 5 * j + 5]] = v * (1 if j % 2 else -1)
    return x


def sorted_threshold(values: torch.Tensor, q: float) -> torch.Tensor:
    """The reference's exact threshold: a full sort of |x| (float32 cast, float64 kept)."""
    x = values if values.dtype == torch.float64 else values.float()
    a = torch.sort(x.abs().reshape(-1)).values
    m = a.numel()
    return a[min(int(q * m), m - 1)]


def bits(t: torch.Tensor) -> int:
    t = t.reshape(())
    return int(t.view(torch.int64 if t.dtype == torch.float64 else torch.int32))


@pytest.mark.parametrize("dtype", STORE_DTYPES)
def test_exact_threshold_is_the_sorted_element_bit_for_bit(tmp_path, dtype, events):
    td = getattr(torch, dtype)
    layers = [awkward_values(401, 13, td, seed=1), awkward_values(401, 13, td, seed=2)]
    st = write_store(tmp_path / "s", layers, dtype, 37)
    whole = torch.stack(layers, dim=1)
    for q in (1e-9, 0.2, 0.5, 0.9, 0.95, 0.999, 0.9999999):
        before = events["threshold_passes"]
        ts = clip_thresholds(st, q, exact=True, cache=False)
        passes = events["threshold_passes"] - before
        assert passes == {"bfloat16": 1, "float16": 1, "float32": 2, "float64": 3}[dtype]
        want = sorted_threshold(whole, q)
        assert len(ts) == 2 and all(bits(t) == bits(want) for t in ts), (q, ts, want)
        # and what prepare_features uses in memory
        from prh_fast.prepare import _exact_threshold

        mem = whole if td == torch.float64 else whole.float()
        assert bits(_exact_threshold(mem, q)) == bits(ts[0])


def test_exact_threshold_of_a_list_store_is_per_layer(tmp_path):
    layers = [awkward_values(211, 7, torch.float32, seed=3),
              awkward_values(211, 11, torch.float32, seed=4) * 10]
    st = write_store(tmp_path / "s", layers, "float32", 50)
    assert st.layout == "list"
    ts = clip_thresholds(st, 0.9, exact=True, cache=False)
    assert [bits(t) for t in ts] == [bits(sorted_threshold(x, 0.9)) for x in layers]


def test_threshold_negative_zero_and_subnormals_only(tmp_path):
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor([[-0.0, 0.0, tiny / 4, -tiny / 4], [tiny / 2, -0.0, -tiny / 2, 0.0]])
    st = write_store(tmp_path / "s", [x], "float32", 1)
    for q in (0.1, 0.3, 0.5, 0.6, 0.8, 0.99):
        (t,) = clip_thresholds(st, q, exact=True, cache=False)
        assert bits(t) == bits(sorted_threshold(x, q))
    (t,) = clip_thresholds(st, 0.1, exact=True, cache=False)
    assert bits(t) == 0  # |-0.0| is +0.0, as torch.abs gives it


@pytest.mark.parametrize("dtype", STORE_DTYPES)
@pytest.mark.parametrize("exact", [True, False])
def test_prepared_rows_equal_prepare_features(tmp_path, dtype, exact):
    td = getattr(torch, dtype)
    layers = [awkward_values(257, 9, td, seed=5), awkward_values(257, 9, td, seed=6)]
    st = write_store(tmp_path / "s", layers, dtype, 29)
    for normalize in (False, True):
        mem = in_memory_layers(st.path, 0.9, exact, normalize)
        prep = StreamPrep(st, q=0.9, exact=exact, normalize=normalize, cache=False)
        for l in range(2):
            for a, b in ((0, 257), (3, 40), (250, 257)):
                got = prep.rows(l, a, b)
                assert got.dtype == mem[l].dtype and torch.equal(got, mem[l][a:b])


def test_threshold_is_cached(tmp_path, events):
    st = write_store(tmp_path / "s", structured(300, [6, 6]), "float32", 40)
    for exact in (True, False):
        t1 = clip_thresholds(st, 0.95, exact=exact)
        passes, hits = events["threshold_passes"], events["threshold_cache_hits"]
        t2 = clip_thresholds(st, 0.95, exact=exact)
        assert events["threshold_passes"] == passes
        assert events["threshold_cache_hits"] == hits + 1
        assert [bits(a) for a in t1] == [bits(b) for b in t2]
    assert clip_thresholds(st, 1.0) == [None, None]
    with pytest.raises(ValueError, match="q"):
        clip_thresholds(st, 1.5)


# ------------------------------------------------------------------------------------------------
# kernel metrics
# ------------------------------------------------------------------------------------------------
def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


@pytest.mark.parametrize("normalize", [False, True])
def test_kernel_metrics_equal_in_memory_on_float64(tmp_path, normalize):
    from prh_fast import metrics

    sx = write_store(tmp_path / "x", structured(1003, [21, 33, 8], seed=1, offset=5.0),
                     "float64", 101)
    sy = write_store(tmp_path / "y", structured(1003, [17, 12], seed=1, noise=0.6), "float64",
                     67)
    px, py = (StreamPrep(s, normalize=normalize, q=0.95, exact=True) for s in (sx, sy))
    mx = in_memory_layers(sx.path, 0.95, True, normalize)
    my = in_memory_layers(sy.path, 0.95, True, normalize)
    cases = [("cka", {}), ("unbiased_cka", {}), ("svcca", {"cca_dim": 6})]
    for metric, kw in cases:
        want = [[metrics.measure(metric, a, b, **kw) for b in my] for a in mx]
        got = kernel_scores(px, py, metric, **kw)
        assert got.dtype == torch.float64 and got.shape == (3, 2)
        assert rel(got, want) < 1e-9, (metric, got, want)
        # a budget that forces several passes (layer pairs in groups) and small row chunks
        got2 = kernel_scores(px, py, metric, memory_budget=40_000, **kw)
        assert rel(got2, want) < 1e-9
        # a store against layers already in memory
        got3 = kernel_scores(px, TensorSource(my), metric, **kw)
        assert rel(got3, want) < 1e-9
    assert rel(kernel_scores(px, py, "cka", unbiased=True),
               kernel_scores(px, py, "unbiased_cka")) == 0


def test_kernel_metrics_on_float32_are_the_float64_values(tmp_path):
    from prh_fast import metrics

    layers = structured(800, [16, 16], seed=2, offset=30.0)  # a large common offset
    sx = write_store(tmp_path / "x", layers[:1], "float32", 99)
    sy = write_store(tmp_path / "y", layers[1:], "bfloat16", 99)
    px, py = StreamPrep(sx, normalize=False), StreamPrep(sy, normalize=False)
    a, b = in_memory_layers(sx.path, normalize=False)[0], in_memory_layers(sy.path,
                                                                           normalize=False)[0]
    for metric in ("cka", "unbiased_cka", "svcca"):
        got = float(kernel_scores(px, py, metric)[0, 0])
        exact64 = metrics.measure(metric, a.double(), b.double())
        fp32 = metrics.measure(metric, a, b)
        assert rel(got, exact64) < 1e-9
        assert rel(got, fp32) < 1e-3  # the in-memory metric multiplies in float32


def test_kernel_budget_and_argument_errors(tmp_path):
    sx = write_store(tmp_path / "x", structured(60, [40]), "float32", 9)
    px = StreamPrep(sx)
    with pytest.raises(ValueError, match="memory_budget"):
        kernel_scores(px, px, "cka", memory_budget=2000)
    with pytest.raises(ValueError, match="metric"):
        kernel_scores(px, px, "cknna")
    with pytest.raises(ValueError, match="cca_dim"):
        kernel_scores(px, px, "svcca", cca_dim=41)
    sy = write_store(tmp_path / "y", structured(61, [4]), "float32", 9)
    with pytest.raises(ValueError, match="N = 61"):
        kernel_scores(px, StreamPrep(sy), "cka")


# ------------------------------------------------------------------------------------------------
# memory budget
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -5, "1GB", True, 1.5, [1]])
def test_memory_budget_must_be_a_positive_number_of_bytes(tmp_path, bad):
    st = write_store(tmp_path / "s", structured(40, [4]), "float32", 11)
    with pytest.raises(ValueError, match="memory_budget"):
        stream_knn(st, 0, 3, memory_budget=bad)


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_native), "torch"])
def test_memory_budget_too_small_is_a_clear_error(tmp_path, backend, events):
    st = write_store(tmp_path / "s", structured(500, [64]), "float32", 100)
    with pytest.raises(ValueError, match=r"memory_budget: 4096 bytes is too small .* at least"):
        stream_knn(st, 0, 3, memory_budget=4096, backend=backend)
    with pytest.raises(ValueError, match="memory_budget"):
        clip_thresholds(st, 0.9, exact=True, memory_budget=100, cache=False)
    # refused before any search or pass
    assert events["knn_searches"] == 0 and events["threshold_passes"] == 0


def test_scratch_stays_within_the_budget(tmp_path):
    st = write_store(tmp_path / "s", structured(3000, [48]), "float32", 300)
    for budget in (2 << 20, 8 << 20, 64 << 20):
        plan = knn_plan(st.n, 48, 10, backend="cpu", compute_dtype=torch.float32,
                        store_itemsize=4, memory_budget=budget)
        assert plan["scratch_bytes"] <= budget


# ------------------------------------------------------------------------------------------------
# the store cache
# ------------------------------------------------------------------------------------------------
def cache_files(st):
    d = os.path.join(st.path, "cache")
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_second_run_reads_the_cache(tmp_path, events):
    st = write_store(tmp_path / "s", structured(400, [12, 12]), "float32", 70)
    idx1, v1 = stream_knn(st, 1, 6, q=0.95, return_scores=True)
    names = [f for f in cache_files(st) if f.startswith("knn-")]
    assert len(names) == 1
    mtime = os.stat(os.path.join(st.path, "cache", names[0])).st_mtime_ns
    searches, hits = events["knn_searches"], events["knn_cache_hits"]
    idx2, v2 = stream_knn(open_store(st.path), 1, 6, q=0.95, return_scores=True)
    assert events["knn_searches"] == searches and events["knn_cache_hits"] == hits + 1
    assert torch.equal(idx1, idx2) and torch.equal(v1, v2)
    assert os.stat(os.path.join(st.path, "cache", names[0])).st_mtime_ns == mtime
    # another k, layer, clipping or normalisation is another result
    for kw in ({"layer": 1, "k": 5, "q": 0.95}, {"layer": 0, "k": 6, "q": 0.95},
               {"layer": 1, "k": 6, "q": 0.9}, {"layer": 1, "k": 6, "q": 0.95, "exact": True},
               {"layer": 1, "k": 6, "q": 0.95, "normalize": False}):
        before = events["knn_searches"]
        stream_knn(st, **kw)
        assert events["knn_searches"] == before + 1, kw


def test_cache_follows_the_store_content(tmp_path, events):
    X = structured(300, [8])
    st = write_store(tmp_path / "s", X, "float32", 70)
    a = stream_knn(st, 0, 4)
    X2 = [X[0].flip(0)]
    st2 = StoreWriter(st.path, dtype="float32", shard_rows=70, overwrite=True)
    st2.append(X2)
    st2 = open_store(st2.finish())
    before = events["knn_searches"]
    b = stream_knn(st2, 0, 4)
    assert events["knn_searches"] == before + 1
    assert torch.equal(b, knn(in_memory_layers(st2.path)[0], 4)) and not torch.equal(a, b)


def test_failed_cache_write_leaves_no_cache(tmp_path, monkeypatch, events):
    import prh_fast.store._sharded as sharded

    st = write_store(tmp_path / "s", structured(300, [8]), "float32", 70)
    real = sharded.atomic_write

    def dying(path, write):
        def half(f):
            class Half:
                def write(self, data):
                    f.write(data[: len(data) // 2])
                    raise OSError(28, "No space left on device")
            write(Half())
        return real(path, half)

    monkeypatch.setattr(sharded, "atomic_write", dying)
    got = stream_knn(st, 0, 4)  # the lists are still returned
    assert torch.equal(got, knn(in_memory_layers(st.path)[0], 4))
    assert cache_files(st) == []  # no file, no temporary left
    monkeypatch.setattr(sharded, "atomic_write", real)
    before = events["knn_searches"]
    assert torch.equal(stream_knn(st, 0, 4), got)
    assert events["knn_searches"] == before + 1
    assert len(cache_files(st)) == 1


def test_crash_during_the_search_writes_nothing(tmp_path, monkeypatch):
    st = write_store(tmp_path / "s", structured(600, [8]), "float32", 70)
    calls = {"n": 0}
    real = StreamPrep.rows

    def flaky(self, l, a, b):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, l, a, b)

    monkeypatch.setattr(StreamPrep, "rows", flaky)
    budget, _, _ = budget_for_panel(st, 0, 4, 1) if HAS_NATIVE else (None, None, None)
    with pytest.raises(KeyboardInterrupt):
        stream_knn(st, 0, 4, memory_budget=budget)
    assert [f for f in cache_files(st) if f.startswith("knn-")] == []


def test_killed_writer_leaves_no_readable_cache(tmp_path, events):
    """A process killed half-way through writing a cached result leaves at most a temporary
    file: the next run does not read it, searches again and writes a good cache."""
    st = write_store(tmp_path / "s", structured(400, [8]), "float32", 70)
    child = r"""
import os, sys
import prh_fast.store._sharded as sharded
from prh_fast.store._stream import stream_knn
real = sharded.atomic_write
def killed(path, write):
    def half(f):
        class Half:
            def write(self, data):
                f.write(data[: len(data) // 2]); f.flush()
                os._exit(9)  # no cleanup, as a kill -9
        write(Half())
    return real(path, half)
sharded.atomic_write = killed
stream_knn(sys.argv[1], 0, 4)
"""
    r = subprocess.run([sys.executable, "-c", child, st.path], capture_output=True)
    assert r.returncode == 9, r.stderr.decode()
    left = cache_files(st)
    assert left and all(f.endswith(".tmp") for f in left)  # debris only, no cache file
    before = events["knn_searches"]
    got = stream_knn(st, 0, 4)
    assert events["knn_searches"] == before + 1
    assert torch.equal(got, knn(in_memory_layers(st.path)[0], 4))
    hits = events["knn_cache_hits"]
    assert torch.equal(stream_knn(st, 0, 4), got) and events["knn_cache_hits"] == hits + 1


def test_truncated_cache_file_is_recomputed(tmp_path, events):
    st = write_store(tmp_path / "s", structured(300, [8]), "float32", 70)
    want = stream_knn(st, 0, 4)
    (name,) = cache_files(st)
    full = os.path.join(st.path, "cache", name)
    with open(full, "r+b") as f:
        f.truncate(os.path.getsize(full) // 3)
    before = events["knn_searches"]
    assert torch.equal(stream_knn(st, 0, 4), want)
    assert events["knn_searches"] == before + 1


# ------------------------------------------------------------------------------------------------
# the grid from store folders
# ------------------------------------------------------------------------------------------------
def make_models(tmp_path, dtype="float64", n=501):
    """Two models as .pt files and as stores (odd shards), sharing structure."""
    pts, stores = [], []
    for i, (dims, seed) in enumerate([([14, 14, 14], 1), ([9, 9], 2)]):
        layers = structured(n, dims, seed=seed, noise=0.4 + 0.2 * i)
        feats = torch.stack(layers, dim=1).to(getattr(torch, dtype))
        pt = str(tmp_path / f"m{i}.pt")
        save_features(pt, feats, num_params=i)
        write_store(tmp_path / f"m{i}", [f for f in feats.unbind(1)], dtype, 53 + 10 * i)
        pts.append(pt)
        stores.append(str(tmp_path / f"m{i}"))
    return pts, stores


@pytest.mark.parametrize("prep", [(None, False), (0.95, True), (0.95, False)],
                         ids=["plain", "exact-clip", "approx-clip"])
def test_grid_from_stores_equals_in_memory(tmp_path, prep):
    from prh_fast.grid import align_models

    q, exact = prep
    pts, stores = make_models(tmp_path)
    for metric in ("mutual_knn", "cycle_knn", "lcs_knn", "edit_distance_knn", "cknna"):
        a = align_models(pts[:1], pts, metric, topk=7, q=q, exact=exact, progress=False,
                         stream=False)
        b = align_models(stores[:1], stores, metric, topk=7, q=q, exact=exact,
                         progress=False, stream=True)
        assert b.timings["loads"] == 0 and b.timings["streamed_models"] == 2
        for key, mat in a.pair_scores.items():
            np.testing.assert_array_equal(b.pair_scores[key], mat, err_msg=metric)
        np.testing.assert_array_equal(a.indices, b.indices)
    for metric, kw in (("cka", {}), ("unbiased_cka", {}), ("svcca", {"cca_dim": 5})):
        a = align_models(pts[:1], pts, metric, q=q, exact=exact, progress=False, stream=False,
                         **kw)
        b = align_models(stores[:1], stores, metric, q=q, exact=exact, progress=False,
                         stream=True, **kw)
        assert b.timings["loads"] == 0
        for key, mat in a.pair_scores.items():
            assert rel(b.pair_scores[key], mat) < 1e-9, metric
        # (a model against itself scores ~1 on every diagonal pair: its pick is a near-tie)
        np.testing.assert_array_equal(a.indices[0, 1], b.indices[0, 1])


def test_grid_second_run_searches_nothing(tmp_path, events):
    from prh_fast.grid import align_models

    _, stores = make_models(tmp_path, "bfloat16", n=301)
    align_models(stores, stores, "mutual_knn", topk=5, q=0.95, progress=False)
    before = events["knn_searches"]
    r = align_models(stores, stores, "mutual_knn", topk=5, q=0.95, progress=False)
    assert events["knn_searches"] == before  # every layer's lists came from the cache
    assert r.timings["streamed_models"] == 2
    align_models(stores, stores, "cknna", topk=5, q=0.95, progress=False)
    assert events["knn_searches"] == before  # cknna reuses the same cached lists


def test_grid_stream_modes(tmp_path, monkeypatch):
    from prh_fast import _stream_align
    from prh_fast.grid import align_models

    pts, stores = make_models(tmp_path, "float32", n=203)
    # auto: small stores are loaded for the kernel metrics, streamed when large
    r = align_models(stores[:1], stores[1:], "cka", progress=False)
    assert r.timings["loads"] == 2 and r.options["stream"] == "auto"
    monkeypatch.setattr(_stream_align, "STREAM_AUTO_BYTES", 0)
    r = align_models(stores[:1], stores[1:], "cka", progress=False)
    assert r.timings["loads"] == 0
    # auto falls back to loading where a metric cannot stream; True refuses
    r = align_models(stores[:1], stores[1:], "cka", kernel_metric="rbf", progress=False)
    assert r.timings["loads"] == 2
    with pytest.raises(ValueError, match="stream: cannot stream cka.*rbf"):
        align_models(stores[:1], stores[1:], "cka", kernel_metric="rbf", progress=False,
                     stream=True)
    with pytest.raises(ValueError, match="null_permutations"):
        align_models(stores[:1], stores[1:], "cka", null_permutations=2, progress=False,
                     stream=True)
    # a .pt model against a streamed store
    a = align_models(pts[:1], pts[1:], "unbiased_cka", progress=False, stream=False)
    b = align_models(pts[:1], stores[1:], "unbiased_cka", progress=False, stream=True)
    assert b.timings["loads"] == 1
    assert rel(b.scores, a.scores) < 1e-5  # float32 features: float64 vs float32 products
    # off: everything loaded
    r = align_models(stores[:1], stores[1:], "mutual_knn", topk=3, progress=False, stream=False)
    assert r.timings["loads"] == 2 and r.timings["streamed_models"] == 0
    with pytest.raises(ValueError, match="stream"):
        align_models(stores[:1], stores[1:], "mutual_knn", progress=False, stream="sometimes")
    monkeypatch.setenv("PRH_FAST_STREAM", "off")
    r = align_models(stores[:1], stores[1:], "mutual_knn", topk=3, progress=False)
    assert r.timings["streamed_models"] == 0
    # kNN null permutations relabel the streamed lists
    monkeypatch.setenv("PRH_FAST_STREAM", "on")
    a = align_models(pts[:1], pts[1:], "mutual_knn", topk=3, progress=False, stream=False,
                     null_permutations=3)
    b = align_models(stores[:1], stores[1:], "mutual_knn", topk=3, progress=False,
                     null_permutations=3)
    for s in ("best_mean", "best_std", "best_z"):
        np.testing.assert_array_equal(a.null[s], b.null[s])


def test_cli_align_on_store_folders(tmp_path, capsys):
    import json

    from prh_fast.cli import main

    pts, stores = make_models(tmp_path, "float32", n=203)
    out1, out2 = str(tmp_path / "o1"), str(tmp_path / "o2")
    assert main(["align", "--x", pts[0], "--y", pts[1], "--output_dir", out1, "--topk", "4",
                 "--no-progress", "--stream", "off"]) == 0
    assert main(["align", "--x", stores[0], "--y", stores[1], "--output_dir", out2, "--topk",
                 "4", "--no-progress", "--stream", "on", "--stream-budget",
                 str(64 << 20)]) == 0
    capsys.readouterr()
    a = json.load(open(os.path.join(out1, "mutual_knn_k4.json")))
    b = json.load(open(os.path.join(out2, "mutual_knn_k4.json")))
    assert a["pair_scores"][0]["scores"] == b["pair_scores"][0]["scores"]
    assert b["options"]["stream"] == "on" and "PRH_FAST_STREAM" not in os.environ
    # discovery finds store folders too
    d = tmp_path / "feats"
    os.makedirs(d)
    for i, s in enumerate(stores):
        os.rename(s, d / f"m{i}_pool-avg_prompt-False")
    assert main(["align", "--input_dir", str(d), "--pool_x", "avg", "--pool_y", "avg",
                 "--output_dir", str(tmp_path / "o3"), "--topk", "4", "--no-progress"]) == 0
    assert "2 x model(s) vs 2 y model(s)" in capsys.readouterr().out


def test_align_takes_store_folders(tmp_path):
    from prh_fast import align

    pts, stores = make_models(tmp_path, "float64", n=211)
    fx, fy = (load_features(p)["feats"] for p in pts)
    for metric, kw in (("mutual_knn", {"topk": 5}), ("cknna", {"topk": 5}), ("cka", {}),
                       ("svcca", {"cca_dim": 4})):
        a = align(fx, fy, metric, **kw)
        b = align(stores[0], stores[1], metric, stream=True, **kw)
        c = align(stores[0], fy, metric, stream=True, **kw)  # a store against a tensor
        assert b.scores.shape == a.scores.shape == (3, 2) and b.topk == a.topk
        for r in (b, c):
            assert rel(r.scores.numpy(), a.scores.numpy()) < 1e-9, metric
            assert r.best_pair == a.best_pair and r.x_layers == a.x_layers
    with pytest.raises(ValueError, match="concat"):
        align(stores[0], stores[1], concat=True)
    with pytest.raises(ValueError, match="null_permutations"):
        align(stores[0], stores[1], null_permutations=2)
