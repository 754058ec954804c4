"""prh_fast.distributed on 2 and 3 CPU processes (gloo over 127.0.0.1), against one process.

Each multi-process test launches real processes the way torchrun does (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT`` in the environment); this file is
also the worker script (``python test_distributed.py <task> <folder>``). Every launch has a
hard wall-clock limit, and the workers run with a short collective timeout, so a bug can fail
a test but never hang the suite. Workers write what they computed to the folder; the asserts
run here, against single-process results.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

HERE = os.path.abspath(__file__)
LAUNCH_TIMEOUT = 120  # seconds for a whole multi-process launch (normally a few seconds)


# --------------------------------------------------------------------------------------------
# launching
# --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, extra=None) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1", PRH_FAST_DIST_TIMEOUT="30", PRH_FAST_DIST_BACKEND="gloo")
    env.pop("PRH_FAST_BACKEND", None)
    env.update(extra or {})
    return env


def _launch(cmd_of_rank, world: int, *, extra_env=None, timeout=LAUNCH_TIMEOUT, cwd=None):
    """Start ``world`` processes, wait for all (hard limit), return ``[(rc, out, err)]``."""
    port = _free_port()
    procs = [subprocess.Popen(cmd_of_rank(r), env=_env(r, world, port, extra_env), cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    out = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            out.append((p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


def _run_task(task: str, folder, world: int, *, extra_env=None, check=True):
    res = _launch(lambda r: [sys.executable, HERE, task, str(folder)], world,
                  extra_env=extra_env)
    if check:
        for r, (rc, o, e) in enumerate(res):
            assert rc == 0, f"rank {r} exited {rc}\nstdout:\n{o}\nstderr:\n{e[-4000:]}"
    return res


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def _tied(n: int, d: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Small integers: every inner product is exact in float32 whatever the summation order,
    and scores tie a lot (duplicated rows on top)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(-2, 3, (n, d), generator=g).to(dtype)
    if n >= 6:
        X[n // 2] = X[1]
        X[n - 1] = X[2]
    return X


def _structured(n: int, d: int, seed: int) -> torch.Tensor:
    """Float features with shared structure (clusters), L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(max(2, n // 20), d, generator=g)
    X = c[torch.randint(0, c.shape[0], (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(X, dim=1)


#: (name, N, D, k, mode, data, dtype, backend, budget)
KNN_CASES = [
    ("ring_tied", 101, 8, 5, "ring", "tied", "float32", None, None),
    ("ring_tied_small_tiles", 97, 6, 9, "ring", "tied", "float32", None, 3000),
    ("ring_tied_torch", 53, 5, 6, "ring", "tied", "float32", "torch", None),
    ("allgather_tied", 64, 7, 4, "allgather", "tied", "float32", None, None),
    ("auto_f64", 47, 9, 3, "auto", "tied", "float64", None, None),
    ("ring_f16_input", 40, 4, 5, "ring", "tied", "float16", None, None),
    ("ring_structured", 230, 24, 10, "ring", "structured", "float32", None, None),
    ("ring_n2", 2, 3, 1, "ring", "tied", "float32", None, None),  # N < world for 3 ranks
    ("ring_n_is_k_plus_1", 4, 3, 3, "ring", "tied", "float32", None, None),
]


def _case_data(name, n, d, data, dtype):
    X = _tied(n, d, seed=len(name)) if data == "tied" else _structured(n, d, seed=len(name))
    return X.to(getattr(torch, dtype))


# --------------------------------------------------------------------------------------------
# workers (run in the launched processes)
# --------------------------------------------------------------------------------------------
def _worker_knn(folder):
    import torch.distributed as dist

    from prh_fast.distributed import init_from_env, knn, shard, shard_range, world

    init_from_env()
    rank, P = world()
    out = {}
    for name, n, d, k, mode, data, dtype, backend, budget in KNN_CASES:
        X = _case_data(name, n, d, data, dtype)
        idx, vals = knn(shard(X), k, mode=mode, backend=backend, memory_budget=budget,
                        return_scores=True)
        r0 = knn(shard(X), k, mode=mode, backend=backend, memory_budget=budget, gather="rank0")
        loc = knn(shard(X), k, mode=mode, backend=backend, memory_budget=budget, gather="none")
        out[name] = {"idx": idx, "vals": vals, "rank0": r0, "local": loc,
                     "range": shard_range(n, rank, P)}
    # An uneven split that is not shard_range's: rank r holds 1 + 3 r rows.
    X = _tied(sum(1 + 3 * r for r in range(P)), 5, seed=7)
    start = sum(1 + 3 * r for r in range(rank))
    out["custom_split"] = {"idx": knn(X[start: start + 1 + 3 * rank], 4, mode="ring")}
    # Bad input on one rank only: every rank must raise the same ValueError (no hang).
    X = _tied(20, 4, seed=3)
    mine = shard(X).clone()
    if rank == P - 1:
        mine[0, 0] = float("nan")
    try:
        knn(mine, 3)
        out["bad"] = None
    except ValueError as err:
        out["bad"] = str(err)
    try:
        knn(shard(X), 20)  # k > N - 1 on the global N
        out["bad_k"] = None
    except ValueError as err:
        out["bad_k"] = str(err)
    torch.save(out, os.path.join(folder, f"knn_rank{rank}.pt"))
    dist.destroy_process_group()


def _grid_models(n=60, seed=11):
    """Three models sharing a latent: an [N, L, D] tensor, a list of layers of different widths
    and a record dict, as align_models takes them."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g)

    def layer(d):
        return torch.tanh(z @ torch.randn(6, d, generator=g)) + 0.4 * torch.randn(n, d, generator=g)

    return {"m0": torch.stack([layer(12) for _ in range(3)], dim=1),
            "m1": [layer(8), layer(10)],
            "m2": {"feats": torch.stack([layer(6) for _ in range(4)], dim=1), "num_params": 1}}


#: (metric, options) run by the grid workers; x = all three models, y = a permutation of them.
GRID_CASES = [
    ("mutual_knn", {"topk": 5}),
    ("cycle_knn", {"topk": 4}),
    ("cka", {}),
    ("cknna", {"topk": 6, "null_permutations": 2}),
    ("svcca", {"cca_dim": 3}),
]


def _y_of(models):
    return {"m2": models["m2"], "m0": models["m0"], "m1": models["m1"]}


def _grid_summary(res):
    return {"scores": res.scores, "indices": res.indices, "pairs": dict(res.pair_scores),
            "null": res.null, "timings": res.timings, "x": res.x_names, "y": res.y_names,
            "ann": res.options.get("ann")}


def _worker_grid(folder):
    import torch.distributed as dist

    from prh_fast.distributed import align_models, init_from_env, world

    init_from_env()
    rank, _ = world()
    models = _grid_models()
    out = {}
    for metric, opts in GRID_CASES:
        res = align_models(models, _y_of(models), metric=metric, progress=False, **opts)
        out[metric] = _grid_summary(res)
    # approximate lists: the recall / metric-error report is gathered from every rank
    res = align_models(models, _y_of(models), metric="mutual_knn", topk=5, progress=False,
                       backend="faiss-ivf")
    out["ann"] = _grid_summary(res)
    torch.save(out, os.path.join(folder, f"grid_rank{rank}.pt"))
    dist.destroy_process_group()


def _grid_files(folder):
    from prh_fast.store import save_features

    models = _grid_models()
    files = []
    for name, f in models.items():
        path = os.path.join(folder, "feats", f"{name}.pt")
        if not os.path.exists(path):
            save_features(path, f["feats"] if isinstance(f, dict) else f)
        files.append(path)
    return files


def _worker_grid_resume(folder):
    """cycle_knn over feature files into folder/out; rank DIE_RANK dies (os._exit) when it
    starts its pair number DIE_AT (environment), leaving the pairs done so far as parts."""
    import prh_fast.grid as g
    from prh_fast.distributed import DistributedError, align_models, init_from_env, world

    init_from_env()
    rank, _ = world()
    die_rank = int(os.environ.get("DIE_RANK", "-1"))
    die_at = int(os.environ.get("DIE_AT", "0"))
    real, calls = g._score_pair, [0]

    def counted(*a, **kw):
        calls[0] += 1
        if rank == die_rank and calls[0] == die_at:
            os._exit(3)  # a rank killed mid-job: no cleanup, no goodbye
        return real(*a, **kw)

    g._score_pair = counted  # test instrumentation only
    files = _grid_files(folder)
    try:
        res = align_models(files, files[::-1], metric="cycle_knn", topk=4, progress=False,
                           output_dir=os.path.join(folder, "out"))
    except DistributedError as err:
        with open(os.path.join(folder, f"error_rank{rank}.txt"), "w") as f:
            f.write(str(err))
        os._exit(7)
    torch.save({"summary": _grid_summary(res), "calls": calls[0]},
               os.path.join(folder, f"resume_rank{rank}.pt"))
    import torch.distributed as dist

    dist.destroy_process_group()  # (left to the interpreter's exit, gloo may abort)


def _expected_rows(start, stop, layers=3, d=4):
    r = torch.arange(start, stop, dtype=torch.float32).unsqueeze(1)
    return [r * (l + 1) + torch.arange(d, dtype=torch.float32) / 10 for l in range(layers)]


def _worker_extract(folder):
    """Extraction of 23 samples split by range with the real PtWriter; rank DIE_RANK dies after
    writing its first batch (environment)."""
    from prh_fast.distributed import init_from_env, run_sharded, world
    from prh_fast.extract._writer import PtWriter

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        init_from_env()
    rank, _ = world()
    die_rank = int(os.environ.get("DIE_RANK", "-1"))
    called = []

    def extract_range(start, stop, path):
        called.append((start, stop))
        w = PtWriter(path, fingerprint={"model": "stand-in", "rows": [start, stop]})
        for a in range(start + w.rows_done, stop, 3):
            b = min(stop, a + 3)
            w.append(_expected_rows(a, b), {"loss": torch.arange(a, b, dtype=torch.float64)})
            if rank == die_rank:
                os._exit(3)
        w.finish({"num_params": 5, "loss": w.extras()["loss"]})

    out = run_sharded(23, extract_range, os.path.join(folder, "feats.pt"))
    with open(os.path.join(folder, f"extract_rank{rank}.json"), "w") as f:
        json.dump({"out": out, "called": called}, f)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


TASKS = {"knn": _worker_knn, "grid": _worker_grid, "grid_resume": _worker_grid_resume,
         "extract": _worker_extract}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------
def test_shard_range_covers_rows_in_order():
    from prh_fast.distributed import shard_range

    for n in (0, 1, 2, 5, 7, 64, 101):
        for P in (1, 2, 3, 4, 8):
            ranges = [shard_range(n, r, P) for r in range(P)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 3, 3)
    with pytest.raises(ValueError, match="world_size"):
        shard_range(10, 0, 0)
    with pytest.raises(ValueError, match="n:"):
        shard_range(-1, 0, 2)


def test_single_process_falls_back_to_plain_knn():
    from prh_fast.distributed import knn
    from prh_fast.knn import knn as knn1

    X = _tied(40, 6, seed=1)
    assert torch.equal(knn(X, 5), knn1(X, 5))
    with pytest.raises(ValueError, match="gather"):
        knn(X, 5, gather="some")
    with pytest.raises(ValueError, match="backend"):
        knn(X, 5, backend="faiss")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_knn_equals_single_process(tmp_path, world):
    from prh_fast.knn import knn as knn1

    _run_task("knn", tmp_path, world)
    outs = [torch.load(tmp_path / f"knn_rank{r}.pt") for r in range(world)]
    for name, n, d, k, _mode, data, dtype, _backend, _budget in KNN_CASES:
        X = _case_data(name, n, d, data, dtype)
        ref_i, ref_v = knn1(X, k, return_scores=True)
        for r, o in enumerate(outs):
            got = o[name]
            assert torch.equal(got["idx"], ref_i), (name, r)
            assert torch.equal(got["vals"], ref_v), (name, r)
            a, b = got["range"]
            assert torch.equal(got["local"], ref_i[a:b]), (name, r)
            if r == 0:
                assert torch.equal(got["rank0"], ref_i), name
            else:
                assert got["rank0"] is None
    X = _tied(sum(1 + 3 * r for r in range(world)), 5, seed=7)
    for o in outs:
        assert torch.equal(o["custom_split"]["idx"], knn1(X, 4))
    # One rank's NaN: the same ValueError on every rank, naming that rank.
    for o in outs:
        assert o["bad"] is not None and "NaN" in o["bad"]
        assert "k:" in o["bad_k"]
    for o in outs[:-1]:
        assert f"rank {world - 1}" in o["bad"]


def _assert_grid_equal(got, ref, what):
    assert got["x"] == ref.x_names and got["y"] == ref.y_names, what
    np.testing.assert_array_equal(got["scores"], ref.scores, err_msg=what)
    np.testing.assert_array_equal(got["indices"], ref.indices, err_msg=what)
    assert list(got["pairs"]) == list(ref.pair_scores), what
    for key, mat in ref.pair_scores.items():
        np.testing.assert_array_equal(got["pairs"][key], mat, err_msg=f"{what} {key}")
    if ref.null is None:
        assert got["null"] is None
    else:
        for key, v in ref.null.items():
            np.testing.assert_array_equal(got["null"][key], v, err_msg=f"{what} null {key}")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.slow
def test_grid_equals_single_process(tmp_path, world):
    from prh_fast.grid import align_models

    _run_task("grid", tmp_path, world)
    outs = [torch.load(tmp_path / f"grid_rank{r}.pt", weights_only=False) for r in range(world)]
    models = _grid_models()
    torch.set_num_threads(1)  # the workers' thread count (OMP_NUM_THREADS=1)
    try:
        for metric, opts in GRID_CASES:
            ref = align_models(models, _y_of(models), metric=metric, progress=False, **opts)
            for r, o in enumerate(outs):
                _assert_grid_equal(o[metric], ref, f"{metric} rank {r}")
                assert o[metric]["timings"]["world_size"] == world
        ref = align_models(models, _y_of(models), metric="mutual_knn", topk=5, progress=False,
                           backend="faiss-ivf")
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    for r, o in enumerate(outs):
        got, want = o["ann"]["ann"], ref.options["ann"]
        assert got is not None, f"rank {r} lost the approximate-search report"
        assert got["pairs"] == want["pairs"]

        def untimed(models):  # the reports' search timings differ from run to run
            return {m: [{a: v for a, v in rep.items() if a != "timings"} for rep in reps]
                    for m, reps in models.items()}

        assert untimed(got["models"]) == untimed(want["models"])
        assert got["recall_min"] == want["recall_min"]
    # The symmetric metric computed each unordered pair once, over all ranks together.
    t = outs[0]["mutual_knn"]["timings"]
    assert t["computed"] == 6 and t["mirrored"] == 3
    assert outs[0]["cycle_knn"]["timings"]["computed"] == 9


@pytest.mark.slow
def test_killed_rank_fails_loudly_and_restart_resumes(tmp_path):
    from prh_fast.grid import align_models

    files = _grid_files(str(tmp_path))  # written once, so both runs see the same files
    # Rank 1 of 2 dies when it starts its second pair (of 4; rank 0 has 5).
    res = _run_task("grid_resume", tmp_path, 2, extra_env={"DIE_RANK": "1", "DIE_AT": "2"},
                    check=False)
    assert res[1][0] == 3
    assert res[0][0] == 7, res[0]
    msg = (tmp_path / "error_rank0.txt").read_text()
    assert "rank 0 of 2" in msg and "[1]" in msg and "resumes" in msg, msg
    parts = sorted(os.listdir(tmp_path / "out" / ".cycle_knn_k4.parts"))
    assert len(parts) == 6, parts  # rank 0's five pairs and rank 1's first
    assert not (tmp_path / "out" / "cycle_knn_k4.npy").exists()
    # The same command again: only the three missing pairs are computed.
    _run_task("grid_resume", tmp_path, 2)
    outs = [torch.load(tmp_path / f"resume_rank{r}.pt", weights_only=False) for r in range(2)]
    assert outs[0]["calls"] == 0 and outs[1]["calls"] == 3
    assert outs[0]["summary"]["timings"]["resumed"] == 6
    assert not (tmp_path / "out" / ".cycle_knn_k4.parts").exists()
    torch.set_num_threads(1)
    try:
        ref = align_models(files, files[::-1], metric="cycle_knn", topk=4, progress=False)
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    for o in outs:
        _assert_grid_equal(o["summary"], ref, "resumed cycle_knn")
    saved = np.load(tmp_path / "out" / "cycle_knn_k4.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(saved["scores"], ref.scores)


def _cli_args(files, out):
    return ["align", "--x", *files, "--y", *files, "--metric", "mutual_knn", "--topk", "5",
            "--output_dir", out, "--no-progress"]


@pytest.mark.slow
def test_cli_align_under_torchrun_environment(tmp_path):
    from prh_fast.cli import main

    files = _grid_files(str(tmp_path))
    res = _launch(lambda r: [sys.executable, "-m", "prh_fast.cli",
                             *_cli_args(files, str(tmp_path / "dist"))], 2)
    for rc, _out, e in res:
        assert rc == 0, e[-3000:]
    assert "wrote:" in res[0][1] and res[1][1] == ""  # one report, from rank 0
    assert main(_cli_args(files, str(tmp_path / "one"))) == 0
    a = np.load(tmp_path / "dist" / "mutual_knn_k5.npy", allow_pickle=True).item()
    b = np.load(tmp_path / "one" / "mutual_knn_k5.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(a["scores"], b["scores"])
    np.testing.assert_array_equal(a["indices"], b["indices"])
    assert (tmp_path / "dist" / "mutual_knn_k5.csv").read_text() == \
        (tmp_path / "one" / "mutual_knn_k5.csv").read_text()
    # A bad argument is reported by every rank the same way (exit 2), no hang.
    res = _launch(lambda r: [sys.executable, "-m", "prh_fast.cli", *_cli_args(
        files + [str(tmp_path / "missing.pt")], str(tmp_path / "bad"))], 2)
    assert [rc for rc, _, _ in res] == [2, 2]
    assert all("missing.pt" in e for _, _, e in res)


_DYING_CLI = """
import os, sys
import prh_fast.grid as g
real, calls = g._score_pair, [0]
def counted(*a, **kw):  # rank 1 is killed when it starts its second pair
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 2 and os.environ.get("DIE"):
        os._exit(3)
    return real(*a, **kw)
g._score_pair = counted
from prh_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_cli_killed_rank_message_and_resume(tmp_path):
    files = _grid_files(str(tmp_path))
    script = tmp_path / "dying_cli.py"
    script.write_text(_DYING_CLI)
    args = ["align", "--x", *files, "--y", *files[::-1], "--metric", "cycle_knn", "--topk",
            "4", "--output_dir", str(tmp_path / "out"), "--no-progress"]
    res = _launch(lambda r: [sys.executable, str(script), *args], 2, extra_env={"DIE": "1"})
    assert res[1][0] == 3
    rc, out, err = res[0]
    assert rc == 1, err[-3000:]
    assert "prh-fast align: error: rank 0 of 2" in err and "[1]" in err, err[-3000:]
    assert "Traceback" not in err
    res = _launch(lambda r: [sys.executable, str(script), *args], 2)
    assert [r[0] for r in res] == [0, 0], res[0][2][-3000:]
    assert "3 pair(s) scored" in res[0][1]  # the six finished pairs were not redone


@pytest.mark.slow
def test_real_torchrun_launch(tmp_path):
    files = _grid_files(str(tmp_path))
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "prh_fast.cli",
           *_cli_args(files, str(tmp_path / "out"))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PRH_FAST_DIST_TIMEOUT="30",
               PRH_FAST_DIST_BACKEND="gloo")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert p.returncode == 0, p.stderr[-3000:]
    saved = np.load(tmp_path / "out" / "mutual_knn_k5.npy", allow_pickle=True).item()
    assert saved["scores"].shape == (3, 3)
    np.testing.assert_array_equal(np.diag(saved["scores"]), np.ones(3))


@pytest.mark.slow
def test_extraction_by_range_resumes_and_merges(tmp_path):
    from prh_fast.store import load_features

    res = _run_task("extract", tmp_path, 3, extra_env={"DIE_RANK": "1"}, check=False)
    assert res[1][0] == 3 and res[0][0] != 0 and res[2][0] != 0
    assert "rank" in res[0][2] and "[1]" in res[0][2], res[0][2][-2000:]
    assert not (tmp_path / "feats.pt").exists()
    _run_task("extract", tmp_path, 3)
    runs = [json.loads((tmp_path / f"extract_rank{r}.json").read_text()) for r in range(3)]
    # Ranks 0 and 2 had finished their parts: not extracted again. Rank 1 resumed its own.
    assert runs[0]["called"] == [] and runs[2]["called"] == [] and runs[1]["called"] == [[8, 16]]
    rec = load_features(tmp_path / "feats.pt")
    want = torch.stack(_expected_rows(0, 23), dim=1)
    assert torch.equal(rec["feats"], want)
    assert torch.equal(rec["loss"], torch.arange(23, dtype=torch.float64))
    assert rec["num_params"] == 5
    assert not (tmp_path / "feats.pt.ranges").exists()
    # One process (no process group): the whole range, same file.
    one = tmp_path / "one"
    one.mkdir()
    _launch(lambda r: [sys.executable, HERE, "extract", str(one)], 1)
    assert torch.equal(load_features(one / "feats.pt")["feats"], want)


class _FakeStore:
    """Stand-in for the sharded store's reader, over a folder holding ``rows.pt``."""

    def __init__(self, path):
        rec = torch.load(os.path.join(path, "rows.pt"))
        self.layers, self.meta = rec["layers"], rec["meta"]
        self.n, self.num_layers = self.layers[0].shape[0], len(self.layers)
        self.dims = [t.shape[1] for t in self.layers]

    def layer(self, l, rows=slice(None)):
        return self.layers[l][rows]


class _FakeWriter:
    """Stand-in for ``StoreWriter``: appends go to disk at once, so a new writer on the same
    path resumes (``rows_done``)."""

    def __init__(self, path):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.chunks = sorted(f for f in os.listdir(path) if f.startswith("chunk-"))

    @property
    def rows_done(self):
        return sum(torch.load(os.path.join(self.path, f))[0].shape[0] for f in self.chunks)

    def append(self, layers):
        name = f"chunk-{len(self.chunks):04d}.pt"
        torch.save(layers, os.path.join(self.path, name))
        self.chunks.append(name)

    def finish(self, meta):
        parts = [torch.load(os.path.join(self.path, f)) for f in self.chunks]
        layers = [torch.cat([p[l] for p in parts]) for l in range(len(parts[0]))]
        torch.save({"layers": layers, "meta": meta}, os.path.join(self.path, "rows.pt"))


def test_merge_parts_pt_and_store(tmp_path, monkeypatch):
    import prh_fast.store as store
    from prh_fast.distributed import _store as adapter
    from prh_fast.distributed import merge_parts
    from prh_fast.store import load_features, save_features

    # .pt parts: [n, L, D] and per-layer lists, per-sample extras concatenated.
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    save_features(a, torch.stack(_expected_rows(0, 4), dim=1), num_params=3,
                  mask=torch.ones(4, 2))
    save_features(b, _expected_rows(4, 9), num_params=3, mask=torch.zeros(5, 2))
    merge_parts([str(a), str(b)], str(tmp_path / "ab.pt"), {"note": "x"})
    rec = load_features(tmp_path / "ab.pt")
    assert torch.equal(rec["feats"], torch.stack(_expected_rows(0, 9), dim=1))
    assert torch.equal(rec["mask"], torch.cat([torch.ones(4, 2), torch.zeros(5, 2)]))
    assert rec["num_params"] == 3 and rec["note"] == "x"
    with pytest.raises(ValueError, match="no parts"):
        merge_parts([], str(tmp_path / "none.pt"))
    with pytest.raises(FileNotFoundError, match="missing"):
        merge_parts([str(a), str(tmp_path / "gone.pt")], str(tmp_path / "x.pt"))
    # Store parts through the store's public API (a stand-in here), in chunks, resumable.
    for name, (s0, s1) in {"p0": (0, 7), "p1": (7, 10)}.items():
        os.makedirs(tmp_path / name)
        torch.save({"layers": _expected_rows(s0, s1), "meta": {"model": "m"}},
                   tmp_path / name / "rows.pt")
    monkeypatch.setattr(store, "open_store", _FakeStore, raising=False)
    monkeypatch.setattr(store, "StoreWriter", _FakeWriter, raising=False)
    monkeypatch.setattr(adapter, "MERGE_CHUNK", 3)
    out = str(tmp_path / "merged")
    w = _FakeWriter(out)  # an interrupted earlier merge had copied the first chunk
    w.append([t[:3] for t in _expected_rows(0, 7)])
    merge_parts([str(tmp_path / "p0"), str(tmp_path / "p1")], out, {"n": 10})
    got = _FakeStore(out)
    assert [torch.equal(x, y) for x, y in zip(got.layers, _expected_rows(0, 10))] == [True] * 3
    assert got.meta == {"model": "m", "n": 10}


if __name__ == "__main__":
    TASKS[sys.argv[1]](sys.argv[2])
