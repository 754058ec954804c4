"""The sharded feature store: round trips, resume after a killed writer, damage detection,
conversion to and from the reference ``.pt`` format, and use wherever a feature file is taken."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from prh_fast.store import (
    INDEX_NAME,
    StoreError,
    StoreWriter,
    check_same_samples,
    feature_info,
    is_store,
    load_features,
    open_store,
    pt_to_store,
    save_features,
    store_to_pt,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _layers(n, dims, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g).to(dtype) for d in dims]


def _write(path, layers, batches, **kw):
    w = StoreWriter(path, **kw)
    a = 0
    for b in batches:
        w.append([t[a:a + b] for t in layers])
        a += b
    assert a == layers[0].shape[0]
    return w


def _assert_same(store, layers):
    assert store.n == layers[0].shape[0] and store.num_layers == len(layers)
    assert store.dims == [t.shape[1] for t in layers]
    for l, t in enumerate(layers):
        got = store.layer(l)
        assert got.dtype == t.dtype and torch.equal(got, t), f"layer {l} differs"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shard_rows", [1, 7, 50, 1000])
def test_round_trip_dtypes_and_shard_sizes(tmp_path, dtype, shard_rows):
    layers = _layers(123, [5, 5, 5], dtype)
    w = _write(tmp_path / "s", layers, [1, 10, 33, 2, 77], shard_rows=shard_rows,
               meta={"model": "m"})
    assert w.rows_done == (123 // shard_rows) * shard_rows  # only whole shards so far
    w.finish({"num_params": 9})
    s = open_store(tmp_path / "s")
    _assert_same(s, layers)
    assert len(s.shards) == -(-123 // shard_rows)
    assert s.meta == {"model": "m", "num_params": 9} and s.layout == "tensor"
    # Row ranges across shard boundaries, empty ranges, negative layer index.
    for a, b in [(0, 1), (5, 60), (49, 51), (122, 123), (30, 30), (0, 123)]:
        for l in range(3):
            assert torch.equal(s.layer(l, slice(a, b)), layers[l][a:b])
    assert torch.equal(s.layer(-1, slice(3, 9)), layers[2][3:9])
    # Memory-mapped reading gives the same rows.
    sm = open_store(tmp_path / "s", mmap=True)
    for a, b in [(0, 123), (7, 14), (100, 123)]:
        assert torch.equal(sm.layer(1, slice(a, b)), layers[1][a:b])
    # iter_rows covers every row once, in order, with and without prefetch.
    for prefetch in (True, False):
        seen = 0
        for start, ts in s.iter_rows(17, prefetch=prefetch):
            assert start == seen
            for l in range(3):
                assert torch.equal(ts[l], layers[l][start:start + 17])
            seen += ts[0].shape[0]
        assert seen == 123
    assert s.verify()["ok"]


def test_list_layout_and_dtype_cast(tmp_path):
    layers = _layers(40, [3, 8, 1], torch.float64)
    _write(tmp_path / "s", layers, [40], dtype="bfloat16", shard_rows=9).finish()
    s = open_store(tmp_path / "s")
    assert s.layout == "list" and s.dtype == torch.bfloat16
    _assert_same(s, [t.to(torch.bfloat16) for t in layers])
    rec = load_features(tmp_path / "s")
    assert isinstance(rec["feats"], list) and [t.shape[1] for t in rec["feats"]] == [3, 8, 1]


def test_writer_infers_everything_from_first_append(tmp_path):
    # The distributed merge opens a writer with a path only.
    layers = _layers(20, [4, 4], torch.float16)
    w = StoreWriter(tmp_path / "s")
    assert w.rows_done == 0 and w.dims is None
    w.append(layers)
    w.finish({})
    s = open_store(tmp_path / "s")
    assert s.dtype == torch.float16 and s.dims == [4, 4]
    _assert_same(s, layers)


def test_shards_are_plain_safetensors(tmp_path):
    from safetensors.torch import load_file

    layers = _layers(30, [6, 2])
    _write(tmp_path / "s", layers, [30], shard_rows=16).finish()
    s = open_store(tmp_path / "s")
    first = load_file(os.path.join(s.path, s.shards[0]["file"]))
    assert torch.equal(first["layer.0"], layers[0][:16])
    assert torch.equal(first["layer.1"], layers[1][:16])


def test_pt_round_trip_keeps_every_key(tmp_path):
    for dtype in DTYPES:
        for as_list in (False, True):
            x = _layers(33, [7, 7, 7], dtype, seed=3)
            feats = x if as_list else torch.stack(x, dim=1)
            pt = tmp_path / f"m_{dtype}_{as_list}.pt"
            mask = torch.rand(33, 5) > 0.5
            save_features(pt, feats, num_params=1234, mask=mask, loss=torch.tensor(2.5),
                          bpb=0.75, name="model/a")
            st = tmp_path / f"s_{dtype}_{as_list}"
            pt_to_store(pt, st, shard_rows=10)
            rec = load_features(st)
            want = load_features(pt)
            assert set(rec) == set(want)
            assert isinstance(rec["feats"], list) == as_list
            if as_list:
                assert all(torch.equal(a, b) for a, b in zip(rec["feats"], want["feats"]))
            else:
                assert rec["feats"].dtype == dtype and torch.equal(rec["feats"], want["feats"])
            assert torch.equal(rec["mask"], mask) and float(rec["loss"]) == 2.5
            assert rec["num_params"] == 1234 and rec["bpb"] == 0.75 and rec["name"] == "model/a"
            back = tmp_path / f"back_{dtype}_{as_list}.pt"
            store_to_pt(st, back)
            rb = load_features(back)
            assert set(rb) == set(want)
            f1, f2 = rb["feats"], want["feats"]
            assert (all(torch.equal(a, b) for a, b in zip(f1, f2)) if as_list
                    else torch.equal(f1, f2))
            assert feature_info(st) == feature_info(pt)


def test_convert_to_other_dtype(tmp_path):
    x = torch.randn(10, 2, 4)
    save_features(tmp_path / "a.pt", x)
    pt_to_store(tmp_path / "a.pt", tmp_path / "s", dtype="float16")
    assert torch.equal(load_features(tmp_path / "s")["feats"], x.half())
    with pytest.raises(ValueError, match="finished store"):
        pt_to_store(tmp_path / "a.pt", tmp_path / "s")
    pt_to_store(tmp_path / "a.pt", tmp_path / "s", overwrite=True)
    assert torch.equal(load_features(tmp_path / "s")["feats"], x)


# ------------------------------------------------------------------------------------------------
# crashes and resume
# ------------------------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import os, sys, time, torch
    import prh_fast.store._sharded as sh
    path, mode = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(100, d, generator=g) for d in (6, 3)]
    w = sh.StoreWriter(path, dims=[6, 3], dtype="float32", shard_rows=8, meta={"job": "j"})
    calls = {"n": 0}
    if mode == "half_shard":
        real = sh._write_bytes
        def slow(f, data):
            calls["n"] += 1
            if calls["n"] == 4:          # the 4th shard: write half, then hang
                f.write(data[: len(data) // 2]); f.flush()
                print("HALF", flush=True); time.sleep(120)
            real(f, data)
        sh._write_bytes = slow
    elif mode == "before_index":         # shard renamed, index not yet updated
        real = sh.StoreWriter._write_index
        def slow(self):
            calls["n"] += 1
            if calls["n"] == 4:
                print("HALF", flush=True); time.sleep(120)
            real(self)
        sh.StoreWriter._write_index = slow
    for a in range(w.rows_done, 100, 5):
        w.append([t[a:a + 5] for t in layers])
    w.finish({"done": True})
    print("FINISHED", flush=True)
""")


@pytest.mark.parametrize("mode", ["half_shard", "before_index"])
def test_killed_writer_resumes(tmp_path, mode):
    path = str(tmp_path / "s")
    child = tmp_path / "child.py"
    child.write_text(_CHILD)
    p = subprocess.Popen([sys.executable, str(child), path, mode], stdout=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert line.strip() == "HALF"
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
        p.stdout.close()
    names = os.listdir(path)
    if mode == "half_shard":
        assert any(n.endswith(".tmp") for n in names)  # the shard in flight, half-written
    # The index names only complete shards; an incomplete store is not opened by default.
    with pytest.raises(StoreError, match="unfinished"):
        open_store(path)
    part = open_store(path, allow_partial=True)
    done = part.n
    # Three whole shards made it in both modes: half_shard dies writing the 4th shard's bytes;
    # before_index dies after renaming the 4th shard but before the index names it (the patch
    # is installed after the writer made its initial index, so the 4th call is shard 4's).
    assert done == 24
    if mode == "before_index":
        assert "shard-000003.safetensors" in names  # renamed but never indexed: debris
    assert part.verify()["ok"]
    # Resume: debris is removed, the writer continues at rows_done, and the result is whole.
    with pytest.raises(ValueError, match="different meta"):
        StoreWriter(path, dims=[6, 3], dtype="float32", shard_rows=8, meta={"job": "other"})
    out = subprocess.run([sys.executable, str(child), path, "resume"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FINISHED" in out.stdout
    s = open_store(path)
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(100, d, generator=g) for d in (6, 3)]
    _assert_same(s, layers)
    assert s.meta == {"job": "j", "done": True}
    assert s.verify()["ok"]
    assert sorted(os.listdir(path)) == sorted([INDEX_NAME] + [x["file"] for x in s.shards])


def test_resume_in_process_and_mismatches(tmp_path):
    layers = _layers(50, [4, 4])
    w = StoreWriter(tmp_path / "s", dims=[4, 4], shard_rows=10)
    w.append([t[:25] for t in layers])  # 20 rows on disk, 5 buffered (lost on a crash)
    assert w.rows_done == 20 and w.rows_buffered == 5
    del w
    for bad, match in [({"dims": [4, 5]}, "dims"), ({"dtype": "float16"}, "dtype"),
                       ({"shard_rows": 3}, "shard_rows")]:
        kw = {"dims": [4, 4], "shard_rows": 10, **bad}
        with pytest.raises(ValueError, match=match):
            StoreWriter(tmp_path / "s", **kw)
    w = StoreWriter(tmp_path / "s", dims=[4, 4], shard_rows=10)
    assert w.rows_done == 20
    w.append([t[20:] for t in layers])
    w.finish()
    _assert_same(open_store(tmp_path / "s"), layers)
    with pytest.raises(ValueError, match="finished"):
        StoreWriter(tmp_path / "s").append([t[:1] for t in layers])


def test_writer_argument_errors(tmp_path):
    w = StoreWriter(tmp_path / "s", dims=[3, 2])
    with pytest.raises(ValueError, match=r"layers\[1\]: expected width 2"):
        w.append([torch.zeros(2, 3), torch.zeros(2, 5)])
    with pytest.raises(ValueError, match="expected 2 layers"):
        w.append([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match=r"layers\[1\]: has 3 rows"):
        w.append([torch.zeros(2, 3), torch.zeros(3, 2)])
    with pytest.raises(ValueError, match=r"layers\[0\]: expected a 2-D floating-point"):
        w.append([torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="nothing was written"):
        w.finish()
    with pytest.raises(ValueError, match="dtype"):
        StoreWriter(tmp_path / "t", dims=[3], dtype="int8")
    with pytest.raises(ValueError, match="shard_rows"):
        StoreWriter(tmp_path / "t", dims=[3], shard_rows=0)
    with pytest.raises(ValueError, match="layout"):
        StoreWriter(tmp_path / "t", dims=[3, 4], layout="tensor")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a store"):
        StoreWriter(tmp_path / "other", dims=[3])
    with pytest.raises(ValueError, match="not a store"):
        StoreWriter(tmp_path / "other", dims=[3], overwrite=True)
    assert (tmp_path / "other" / "notes.txt").exists()  # never deleted


# ------------------------------------------------------------------------------------------------
# damage
# ------------------------------------------------------------------------------------------------
def _small_store(path):
    layers = _layers(40, [5, 3])
    _write(path, layers, [40], shard_rows=16).finish({"x": 1})
    return open_store(path)


def test_corrupt_shard_named_by_verify(tmp_path):
    s = _small_store(tmp_path / "s")
    victim = os.path.join(s.path, s.shards[1]["file"])
    data = bytearray(open(victim, "rb").read())
    data[-3] ^= 0xFF  # a flipped bit in the data: same size, header fine
    open(victim, "wb").write(bytes(data))
    s2 = open_store(tmp_path / "s")  # sizes are fine: opens
    with pytest.raises(StoreError, match=r"shard-000001\.safetensors: checksum mismatch"):
        s2.verify()
    assert s2.verify(checksums=False)["ok"]


def test_truncated_missing_and_bad_header(tmp_path):
    s = _small_store(tmp_path / "s")
    victim = os.path.join(s.path, s.shards[2]["file"])
    data = open(victim, "rb").read()
    open(victim, "wb").write(data[:-10])
    with pytest.raises(StoreError, match=r"shard-000002\.safetensors: shard is .*truncated"):
        open_store(tmp_path / "s")
    os.remove(victim)
    with pytest.raises(StoreError, match=r"shard-000002\.safetensors: shard missing"):
        open_store(tmp_path / "s")
    open(victim, "wb").write(b"\xff" * len(data))  # right size, garbage header
    with pytest.raises(StoreError, match=r"shard-000002\.safetensors: corrupt shard"):
        open_store(tmp_path / "s").layer(0)
    ipath = os.path.join(s.path, INDEX_NAME)
    open(ipath, "w").write("{not json")
    with pytest.raises(StoreError, match=INDEX_NAME):
        open_store(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="no such store"):
        open_store(tmp_path / "nope")
    with pytest.raises(StoreError, match="not a store folder"):
        open_store(tmp_path)


def test_store_reader_argument_errors(tmp_path):
    s = _small_store(tmp_path / "s")
    with pytest.raises(ValueError, match="l: expected a layer index"):
        s.layer(2)
    with pytest.raises(ValueError, match="rows: expected a contiguous slice"):
        s.layer(0, slice(0, 10, 2))
    with pytest.raises(ValueError, match="rows: expected a slice"):
        s.layer(0, [1, 2])
    with pytest.raises(ValueError, match="chunk"):
        next(s.iter_rows(0))


# ------------------------------------------------------------------------------------------------
# CLI and use as a feature file
# ------------------------------------------------------------------------------------------------
def test_cli_verify_and_convert(tmp_path, capsys):
    from prh_fast.cli import main

    x = torch.randn(30, 3, 4)
    save_features(tmp_path / "a.pt", x, num_params=3)
    assert main(["store", "convert", str(tmp_path / "a.pt"), str(tmp_path / "s"),
                 "--shard-rows", "7", "--no-progress"]) == 0
    assert is_store(tmp_path / "s")
    assert main(["store", "verify", str(tmp_path / "s"), "--no-progress"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["store", "info", str(tmp_path / "s")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == 30 and info["shards"] == 5
    assert main(["store", "convert", str(tmp_path / "s"), str(tmp_path / "b.pt")]) == 0
    assert torch.equal(load_features(tmp_path / "b.pt")["feats"], x)
    assert main(["store", "convert", str(tmp_path / "s"), str(tmp_path / "b.pt")]) == 2
    s = open_store(tmp_path / "s")
    victim = os.path.join(s.path, s.shards[0]["file"])
    data = bytearray(open(victim, "rb").read())
    data[-1] ^= 1
    open(victim, "wb").write(bytes(data))
    assert main(["store", "verify", str(tmp_path / "s"), "--no-progress"]) == 1
    assert "shard-000000.safetensors: checksum mismatch" in capsys.readouterr().err


def test_align_models_accepts_store_folders(tmp_path):
    from prh_fast.grid import align_models

    g = torch.Generator().manual_seed(1)
    shared = torch.randn(60, 6, generator=g)
    files, stores = [], []
    for i in range(3):
        f = torch.stack([shared @ torch.randn(6, 8, generator=g)
                         + 0.3 * torch.randn(60, 8, generator=g) for _ in range(3)], dim=1)
        save_features(tmp_path / f"m{i}.pt", f, num_params=i)
        pt_to_store(tmp_path / f"m{i}.pt", tmp_path / "stores" / f"m{i}", shard_rows=11)
        files.append(str(tmp_path / f"m{i}.pt"))
        stores.append(str(tmp_path / "stores" / f"m{i}"))
    assert check_same_samples(stores + files) == 60
    for metric in ("mutual_knn", "cka"):
        a = align_models(files[:1], files[1:], metric, topk=5, q=0.95, progress=False)
        b = align_models(stores[:1], stores[1:], metric, topk=5, q=0.95, progress=False)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_distributed_merge_into_a_real_store(tmp_path):
    from prh_fast.distributed import merge_parts

    layers = _layers(30, [4, 2])
    parts = []
    for i, (a, b) in enumerate([(0, 13), (13, 30)]):
        p = str(tmp_path / f"p{i}")
        _write(p, [t[a:b] for t in layers], [b - a], shard_rows=5).finish({"model": "m"})
        parts.append(p)
    merge_parts(parts, str(tmp_path / "merged"), {"n": 30})
    s = open_store(tmp_path / "merged")
    _assert_same(s, layers)
    assert s.meta == {"model": "m", "n": 30}
