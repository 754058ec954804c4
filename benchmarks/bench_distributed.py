"""Distributed exact kNN on CPU processes (gloo over 127.0.0.1) against one process.

    python -m benchmarks.bench_distributed                 # N in {4096, 16384}, D = 256
    python -m benchmarks.bench_distributed --n 8192 --d 768 --world 1 2

What this measures on a small machine: the *overhead* of the distributed path (process group,
shard exchange, merge of two runs, gathering the lists) next to the plain single-process
search, with the same cores in total (one process with all threads vs P processes with
cores / P threads each). It says nothing about GPUs, NCCL or networks between machines.

Correctness first: rank 0's gathered lists are compared with ``prh_fast.knn.knn`` on the same
matrix (the number of differing rows is reported; 0 expected).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._harness import ROOT, finish, timeit
from benchmarks.bench_knn import features


def _worker(spec_path: str) -> None:
    """One rank: time ``distributed.knn`` (a barrier before each run), rank 0 writes results."""
    import torch.distributed as dist

    from prh_fast.distributed import init_from_env, knn, shard

    spec = json.loads(Path(spec_path).read_text())
    init_from_env()
    rank = dist.get_rank()
    X = features(spec["n"], spec["d"])
    mine = shard(X)

    def run():
        dist.barrier()
        return knn(mine, spec["k"], mode=spec["mode"], gather="rank0")

    idx, t = timeit(run, repeats=spec["repeats"], warmup=1, max_seconds=60)
    if rank == 0:
        torch.save({"idx": idx, "t": t}, spec["out"])
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, n: int, d: int, k: int, mode: str, repeats: int, threads: int):
    with tempfile.TemporaryDirectory() as tmp:
        spec = {"n": n, "d": d, "k": k, "mode": mode, "repeats": repeats,
                "out": os.path.join(tmp, "out.pt")}
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec))
        port = _free_port()
        procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS=str(threads), PRH_FAST_DIST_BACKEND="gloo",
                       PRH_FAST_DIST_TIMEOUT="600")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.bench_distributed", "--worker", spec_path],
                env=env, cwd=ROOT))
        for p in procs:
            if p.wait(timeout=1800) != 0:
                raise RuntimeError(f"a rank exited with code {p.returncode}")
        return torch.load(spec["out"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--world", type=int, nargs="+", default=[2])
    p.add_argument("--modes", nargs="+", default=["ring", "allgather"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for the JSON (default results/)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(args.worker)
        return 0
    from prh_fast.knn import knn

    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    rows = []
    for n in args.n:
        X = features(n, args.d)
        ref, t1 = timeit(lambda: knn(X, args.k), repeats=args.repeats, max_seconds=60)
        rows.append({"n": n, "d": args.d, "k": args.k, "world": 1, "mode": "single process",
                     "threads": torch.get_num_threads(), "p50_s": t1["p50"],
                     "vs_single": 1.0, "rows_differing": 0, "load_1min": os.getloadavg()[0]})
        for world in args.world:
            for mode in args.modes:
                threads = max(1, cores // world)
                t0 = time.perf_counter()
                got = run_world(world, n, args.d, args.k, mode, args.repeats, threads)
                wall = time.perf_counter() - t0
                diff = int((got["idx"] != ref).any(dim=1).sum())
                rows.append({"n": n, "d": args.d, "k": args.k, "world": world, "mode": mode,
                             "threads": threads, "p50_s": got["t"]["p50"],
                             "vs_single": got["t"]["p50"] / t1["p50"],
                             "rows_differing": diff, "launch_wall_s": wall,
                             "load_1min": os.getloadavg()[0]})
    cols = [("n", "N", "d"), ("d", "D", "d"), ("world", "procs", "d"), ("mode", "mode", "s"),
            ("threads", "threads/proc", "d"), ("p50_s", "p50 s", ".4f"),
            ("vs_single", "time / single", ".2f"), ("rows_differing", "rows != single", "d"),
            ("load_1min", "load avg", ".1f")]
    finish("bench_distributed", "distributed kNN overhead, CPU gloo, loopback", args, rows,
           cols, footer=f"(machine: {cores} cores; same cores in total for every row; measures "
                        f"overhead, not scaling; 1-min load average {load_before:.2f} before, "
                        f"{os.getloadavg()[0]:.2f} after: other jobs on the machine skew rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
