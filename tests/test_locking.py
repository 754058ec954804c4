"""One writer at a time, with real processes: a second writer of a store, an extraction output
or a grid output fails at once naming the holder; a writer killed with SIGKILL leaves nothing
locked; concurrent writers never leave a store that mixes their rows."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import prh_fast
from prh_fast._lock import DestinationLocked, acquire, exclusive_lock, lock_path, release
from prh_fast.store import StoreWriter, open_store

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX advisory locks")


def _feats(seed, n=64, layers=2, d=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, layers, d, generator=g)


class _Holder:
    """A child process that opens a writer of ``what`` on ``path``, says 'ready', then waits
    (holding the lock) until killed."""

    CODE = {
        "store": "from prh_fast.store import StoreWriter\n"
                 "w = StoreWriter(PATH, dims=[8, 8], shard_rows=4)\n"
                 "import torch\nw.append([torch.ones(6, 8), torch.ones(6, 8)])\n",
        "pt": "from prh_fast.extract._writer import PtWriter\nimport torch\n"
              "w = PtWriter(PATH, fingerprint={'job': 1})\n"
              "w.append([torch.ones(3, 8), torch.ones(3, 8)])\n",
        "grid": "from prh_fast.grid import output_lock\n"
                "ctx = output_lock(PATH, 'cka', 10)\nctx.__enter__()\n",
    }

    def __init__(self, what, path):
        code = f"PATH = {str(path)!r}\n" + self.CODE[what] + textwrap.dedent("""
            import sys, time
            print("ready", flush=True)
            while True:
                time.sleep(1)
            """)
        self.p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert line.strip() == "ready", self.p.stderr.read()

    def kill9(self):
        self.p.send_signal(signal.SIGKILL)
        self.p.wait(timeout=60)


def test_lock_in_one_process(tmp_path):
    dest = tmp_path / "out.pt"
    held = acquire(dest, folder=False)
    assert os.path.exists(lock_path(dest, folder=False))
    with pytest.raises(DestinationLocked, match=r"out\.pt: another writer is using it \(this "
                                                r"process\)"):
        acquire(dest, folder=False)
    release(held)
    assert not os.path.exists(lock_path(dest, folder=False))  # removed on release
    with exclusive_lock(dest, folder=False):
        pass
    assert isinstance(DestinationLocked("x", "y"), OSError)


def test_store_second_writer_is_refused_then_resumes_after_kill9(tmp_path):
    path = tmp_path / "store"
    holder = _Holder("store", path)
    try:
        with pytest.raises(DestinationLocked, match=rf"{path}: another writer.*process "
                                                    rf"{holder.p.pid} on"):
            StoreWriter(path, dims=[8, 8], shard_rows=4)
        # the CLI: one line naming the destination and the holder, non-zero exit
        src = tmp_path / "src.pt"
        prh_fast.save_features(src, _feats(1), num_params=1)
        r = subprocess.run([sys.executable, "-m", "prh_fast.cli", "store", "convert", str(src),
                            str(path), "--overwrite"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        assert "another writer" in r.stderr and str(holder.p.pid) in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        holder.kill9()
    # SIGKILL left no lock behind: a new writer resumes the rows the dead one made durable
    w = StoreWriter(path, dims=[8, 8], shard_rows=4)
    assert w.rows_done == 4
    w.append([torch.zeros(2, 8), torch.zeros(2, 8)])
    w.finish()
    s = open_store(path)
    assert s.n == 6 and s.verify()["ok"]
    assert sorted(os.listdir(path)) == ["prh_store.json", "shard-000000.safetensors",
                                        "shard-000001.safetensors"]


def test_extraction_writer_is_exclusive_and_survives_kill9(tmp_path):
    from prh_fast.extract._writer import PtWriter

    out = tmp_path / "feats.pt"
    holder = _Holder("pt", out)
    try:
        with pytest.raises(DestinationLocked, match=rf"feats\.pt: another writer.*"
                                                    rf"{holder.p.pid}"):
            PtWriter(out, fingerprint={"job": 1})
        with pytest.raises(DestinationLocked):
            PtWriter(out, fingerprint={"job": 1}, overwrite=True)  # must not delete its parts
        assert len([f for f in os.listdir(str(out) + ".partial") if f.startswith("part-")]) == 1
    finally:
        holder.kill9()
    w = PtWriter(out, fingerprint={"job": 1})
    assert w.rows_done == 3
    w.append([torch.zeros(2, 8), torch.zeros(2, 8)])
    w.finish({"num_params": 1})
    assert prh_fast.load_features(out)["feats"].shape == (5, 2, 8)


def test_grid_output_is_exclusive_per_metric(tmp_path):
    from prh_fast.grid import align_models

    out = tmp_path / "out"
    xs, ys = {"a": _feats(0)}, {"b": _feats(1)}
    holder = _Holder("grid", out)
    try:
        with pytest.raises(DestinationLocked, match=rf"cka: another writer.*{holder.p.pid}"):
            align_models(xs, ys, "cka", progress=False, output_dir=out)
        # another metric into the same folder is another output: not blocked
        align_models(xs, ys, "mutual_knn", topk=5, progress=False, output_dir=out)
        assert not (out / "cka.json").exists()
    finally:
        holder.kill9()
    res = align_models(xs, ys, "cka", progress=False, output_dir=out)
    assert (out / "cka.json").exists() and np.isfinite(res.scores).all()


@pytest.mark.slow
def test_concurrent_overwriting_converts_never_mix_sources(tmp_path):
    """Four `prh-fast store convert --overwrite` runs at once into one folder, each from its
    own source: every run either finishes or fails naming the other writer, and the store left
    behind holds exactly one source's rows and passes verify."""
    srcs = []
    for i in range(4):
        p = tmp_path / f"src{i}.pt"
        prh_fast.save_features(p, torch.full((400, 2, 16), float(i)), num_params=i)
        srcs.append(p)
    dest = tmp_path / "store"
    procs = [subprocess.Popen([sys.executable, "-m", "prh_fast.cli", "store", "convert",
                               str(s), str(dest), "--overwrite", "--shard-rows", "7"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in srcs]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    ok = [i for i, (rc, _) in enumerate(results) if rc == 0]
    for rc, err in results:
        assert "Traceback" not in err, err
        if rc != 0:
            assert "another writer" in err, err
    assert ok, results
    s = open_store(dest)
    assert s.verify()["ok"] and s.n == 400
    values = {float(v) for l in range(2) for v in s.layer(l).unique()}
    assert len(values) == 1 and int(values.pop()) in ok


def test_held_lock_file_names_the_holder(tmp_path):
    holder = _Holder("grid", tmp_path / "o")
    try:
        with open(lock_path(tmp_path / "o" / "cka", folder=False)) as f:
            text = f.read()
        assert f'"pid": {holder.p.pid}' in text
    finally:
        holder.kill9()
    # the stale file of the killed holder does not block the next writer (no waiting: it
    # would raise at once if it did)
    with exclusive_lock(tmp_path / "o" / "cka", folder=False) as held:
        assert held.fd >= 0
