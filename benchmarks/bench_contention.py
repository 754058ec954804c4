"""Idle vs contended: the CPU search and a layer grid while busy processes share the cores.

    python -m benchmarks.bench_contention                 # kNN N=16384 and an 8x8 grid N=1024
    python -m benchmarks.bench_contention --busy 4 --repeats 3 --knn-n 8192

Each measurement runs in a fresh child process (the OpenMP runtime reads its wait policy when
it loads, so a policy can only be compared across processes), first on the idle machine, then
while ``--busy`` processes that spin forever (started and stopped by this benchmark) compete
for the same cores. Two ways of starting the child are compared side by side:

- ``prh_fast first``: the child calls ``prh_fast.prefer_passive_wait()`` before importing
  torch, as the CLI does: ``OMP_WAIT_POLICY=PASSIVE`` before the runtime loads
  (``prh_fast._threads``);
- ``torch first``: torch is imported first, so the runtime keeps GNU OpenMP's default (idle
  threads spin for a while before they sleep).

The slowdown is contended time / idle time. With ``T`` compute threads and ``B`` busy processes
on ``C`` cores, a fair share of the machine gives ``(B + T) / T`` when ``T = C`` (3.0 for 2
threads and 4 busy processes): the column ``fair`` shows it. Every child first checks that its
result equals the one of the first child (the lists / scores must not depend on the policy).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks._harness import ROOT, finish

_CHILD = r"""
import json, os, sys, time
first = sys.argv[1]
if first == "prh_fast":
    import prh_fast
    prh_fast.prefer_passive_wait()
    import torch
else:
    import torch
    import prh_fast
from prh_fast._threads import wait_policy
from prh_fast.testing import drifting_layers

work, n, layers, d, repeats = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), int(sys.argv[6])
if work == "knn":
    from prh_fast.knn import knn
    X = torch.nn.functional.normalize(drifting_layers(n, 1, d, seed=1)[:, 0], dim=1)
    fn = lambda: knn(X, 10)
    digest = lambda out: int(out.sum())
else:
    from prh_fast import align
    A, B = drifting_layers(n, layers, d, seed=1), drifting_layers(n, layers, d, seed=2)
    fn = lambda: align(A, B, "mutual_knn", topk=10)
    digest = lambda out: round(float(out.scores.sum()), 12)
out = fn()  # warm-up: lazy imports, thread pool start, allocator growth
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
print(json.dumps({"times": times, "digest": digest(out), "policy": wait_policy()[0],
                  "threads": torch.get_num_threads()}))
"""


def _child(first: str, work: str, n: int, layers: int, d: int, repeats: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    out = subprocess.run([sys.executable, "-c", _CHILD, first, work, str(n), str(layers),
                          str(d), str(repeats)], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child failed ({first}, {work}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Busy:
    """``count`` processes that spin until stopped."""

    def __init__(self, count: int):
        self.count, self.procs = count, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.count)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=4, help="busy processes while contended")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--knn-n", type=int, default=16384)
    p.add_argument("--grid-n", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--work", nargs="+", default=["knn", "grid"], choices=["knn", "grid"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = []
    for work in args.work:
        n = args.knn_n if work == "knn" else args.grid_n
        shape = f"N={n}, D={args.d}" + (f", {args.layers}x{args.layers}" if work == "grid"
                                        else ", k=10")
        res = {}
        for cond in ("idle", "contended"):
            for first in ("prh_fast", "torch"):
                load0 = os.getloadavg()[0]
                if cond == "idle":
                    r = _child(first, work, n, args.layers, args.d, args.repeats)
                else:
                    with Busy(args.busy):
                        r = _child(first, work, n, args.layers, args.d, args.repeats)
                r["load"] = (load0, os.getloadavg()[0])
                res[cond, first] = r
        digests = {r["digest"] for r in res.values()}
        if len(digests) != 1:
            raise SystemExit(f"{work}: results differ between runs: {digests}")
        for first in ("prh_fast", "torch"):
            idle = statistics.median(res["idle", first]["times"])
            cont = statistics.median(res["contended", first]["times"])
            t = res["idle", first]["threads"]
            rows.append({
                "work": work, "shape": shape, "start": f"{first} first",
                "policy": res["idle", first]["policy"], "threads": t,
                "idle_s": idle, "contended_s": cont, "slowdown": cont / idle,
                "fair": (args.busy + t) / t if t >= cores else None,
                "load_idle": res["idle", first]["load"][0],
                "load_contended": res["contended", first]["load"][1],
                "idle_runs": res["idle", first]["times"],
                "contended_runs": res["contended", first]["times"],
            })
    cols = [("work", "work", ""), ("shape", "shape", ""), ("start", "start", ""),
            ("policy", "OpenMP wait", ""), ("idle_s", "idle s", ".3f"),
            ("contended_s", f"{args.busy} busy s", ".3f"), ("slowdown", "slowdown", ".2f"),
            ("fair", "fair", ".1f"), ("load_idle", "load idle", ".2f"),
            ("load_contended", "load busy", ".2f")]
    finish("bench_contention", "contention", args, rows, cols,
           footer=f"{cores} cores; medians of {args.repeats} runs after a warm-up, each setting "
                  f"in a fresh process; busy = {args.busy} spinning processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
