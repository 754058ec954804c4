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
import shutil
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


TASKS = {"knn": _worker_knn}


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
def test_knn_equals_single_process(tmp_path, world):
    from prh_fast.knn import knn as knn1

    _run_task("knn", tmp_path, world)
    outs = [torch.load(tmp_path / f"knn_rank{r}.pt") for r in range(world)]
    for name, n, d, k, mode, data, dtype, backend, budget in KNN_CASES:
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
    for r, o in enumerate(outs[:-1]):
        assert f"rank {world - 1}" in o["bad"]


if __name__ == "__main__":
    TASKS[sys.argv[1]](sys.argv[2])
