"""Alignment out of core: a 4 x 4 layer grid of mutual_knn (k = 10) and linear CKA between two
models whose features live in stores on disk, on the CPU, with peak memory measured.

    python -m benchmarks.bench_scale             # N = 200,000, D = 256 (long on 2 cores)
    python -m benchmarks.bench_scale --small     # N = 20,000: a quick run
    python -m benchmarks.bench_scale --faiss-ivf # also FAISS IVF-Flat against the exact lists

Steps, each in a fresh process (peak resident memory, ``VmHWM``, is per process):

1. correctness first: on a small store, the streamed lists equal the in-memory ``knn`` lists
   and the streamed CKA equals the in-memory metric (1e-9 on float64 features);
2. generate: two models' features (shared low-rank latent, a different nonlinear map per layer
   and model, noise, a common offset) written row batch by row batch into two stores in a
   temporary folder; the whole features never exist in memory;
3. the grid, in one process: ``align_models(store_x, store_y, "mutual_knn", topk=10, q=0.95,
   stream=True)`` (clipping threshold pass, one exact streamed search per layer: 8 searches,
   lists cached in the stores), then ``"cka"`` (one float64 pass over both stores), then
   ``mutual_knn`` again (every layer's lists from the stores' caches: no search). Wall time of
   each phase and the process's peak RSS are recorded;
4. optional (``--faiss-ivf``): ``prh_fast.knn``'s approximate ``faiss-ivf`` backend on each
   prepared layer of model x, recall@k against the exact streamed lists of *all* rows.

The machine is recorded with its load average: on the shared 2-core development machine other
jobs ran at the same time, so times are an upper bound, not a speed claim.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks._harness import ROOT, finish

HERE = str(ROOT)  # the children put it on sys.path to import benchmarks._harness

# --------------------------------------------------------------------------------------------
# child programs (fresh processes)
# --------------------------------------------------------------------------------------------
CHECK = r"""
import json, sys, tempfile, torch
from prh_fast._align import _prepare_side, as_layers
from prh_fast import metrics
from prh_fast.knn import knn
from prh_fast.prepare import prepare_features
from prh_fast.store import StoreWriter, load_features
from prh_fast.store._stream import StreamPrep, stream_knn
from prh_fast.store._moments import kernel_scores
g = torch.Generator().manual_seed(0)
n, d = 3001, 64
z = torch.randn(n, 8, generator=g, dtype=torch.float64)
out = {}
with tempfile.TemporaryDirectory() as tmp:
    for dtype in ("bfloat16", "float64"):
        layers = [torch.tanh(z @ torch.randn(8, d, generator=g, dtype=torch.float64))
                  + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(2)]
        w = StoreWriter(f"{tmp}/{dtype}", dtype=dtype, shard_rows=777)
        w.append(layers)
        w.finish()
        feats = prepare_features(load_features(f"{tmp}/{dtype}")["feats"], q=0.95)
        mem = _prepare_side(as_layers(feats, "f"), True, False)
        same = all(torch.equal(stream_knn(f"{tmp}/{dtype}", l, 10, q=0.95, cache=False),
                               knn(mem[l], 10)) for l in range(2))
        p = StreamPrep(f"{tmp}/{dtype}", q=0.95)
        got = float(kernel_scores(p, p, "cka")[0, 1])
        want = metrics.cka(mem[0], mem[1])
        out[dtype] = {"lists_equal": same, "cka_stream": got, "cka_memory": want,
                      "cka_rel_diff": abs(got - want) / abs(want)}
print(json.dumps(out))
"""

GENERATE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[6])
from benchmarks._harness import peak_rss_mib
from prh_fast.store import StoreWriter
path, dtype = sys.argv[1], sys.argv[5]
n, d, layers = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rank, batch = 32, 8192
t0 = time.perf_counter()
for m, name in enumerate(("x", "y")):
    g = torch.Generator().manual_seed(100 + m)
    maps = [(torch.randn(rank, d, generator=g) / rank**0.5,
             torch.randn(d, d, generator=g) / d**0.5,
             3.0 * torch.randn(1, d, generator=g)) for _ in range(layers)]
    w = StoreWriter(f"{path}/{name}", dtype=dtype, layers=layers, dims=[d] * layers,
                    meta={"model": name, "generator": "bench_scale"})
    for a in range(0, n, batch):
        b = min(n, a + batch)
        zg = torch.Generator().manual_seed(a)          # the same latent rows for both models
        z = torch.randn(b - a, rank, generator=zg)
        ng = torch.Generator().manual_seed(10_000_000 * (m + 1) + a)
        rows = []
        for l, (W, M, off) in enumerate(maps):
            h = torch.tanh(z @ W) if (l + m) % 2 == 0 else torch.relu(z @ W)
            h = h @ M + (0.2 + 0.1 * l) * torch.randn(b - a, d, generator=ng) + off
            rows.append(h)
        w.append(rows)
    w.finish()
dt = time.perf_counter() - t0
size = sum(f.stat().st_size for f in __import__("pathlib").Path(path).rglob("*") if f.is_file())
print(json.dumps({"seconds": dt, "bytes": size, "peak_mib": peak_rss_mib()}))
"""

GRID = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[5])
from benchmarks._harness import peak_rss_mib
import torch
from prh_fast.grid import align_models
import collections, logging
COUNTERS = collections.Counter()  # what the streamed computations did: their DEBUG records
class _Count(logging.Handler):
    def emit(self, record):
        if hasattr(record, "stream_event"):
            COUNTERS[record.stream_event] += record.stream_count
_events = logging.getLogger("prh_fast.store._stream")
_events.setLevel(logging.DEBUG)
_events.addHandler(_Count())
path, topk, q, budget = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
exact = sys.argv[6] == "1"
metrics = sys.argv[7].split(",")
x, y = f"{path}/x", f"{path}/y"
def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
rows = []
base = peak_rss_mib()
phases = [(m, m) for m in metrics]
if "mutual_knn" in metrics:
    phases.append(("mutual_knn again (cached lists)", "mutual_knn"))
for phase, metric in phases:
    before = dict(COUNTERS)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = align_models({"x": x}, {"y": y}, metric, topk=topk, q=q, exact=exact, progress=False,
                     stream=True, stream_budget=budget, reference_order=False)
    dt = time.perf_counter() - t0
    mat = r.pair_scores[("x", "y")]
    rows.append({"phase": phase, "metric": metric, "seconds": dt,
                 "peak_mib": peak_rss_mib(), "rss_mib": rss(),
                 "searches": COUNTERS["knn_searches"] - before.get("knn_searches", 0),
                 "cache_hits": COUNTERS["knn_cache_hits"] - before.get("knn_cache_hits", 0),
                 "threshold_passes": COUNTERS["threshold_passes"]
                 - before.get("threshold_passes", 0),
                 "best": r.scores[0, 0], "best_pair": r.indices[0, 0].tolist(),
                 "diagonal": [float(mat[i, i]) for i in range(min(mat.shape))],
                 "timings": {a: v for a, v in r.timings.items() if isinstance(v, (int, float))},
                 "load_avg_start": load0, "load_avg_end": os.getloadavg()[0]})
print(json.dumps({"baseline_mib": base, "rows": rows}, default=float))
"""

# ---- FAISS IVF (part 4 of the issue, prh_fast/knn/_faiss_ann.py) -----------------------------
# Kept as its own clearly marked child program so the approximate-search owners can extend it:
# it reads the prepared layers from the store (the same preparation as the exact search) and
# scores the approximate lists against the exact streamed lists of every row.
FAISS_IVF = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[5])
from benchmarks._harness import peak_rss_mib
from prh_fast.knn import AnnParams, knn
from prh_fast.store._stream import StreamPrep, stream_knn
path, topk, q, nprobe = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
exact = sys.argv[6] == "1"
prep = StreamPrep(f"{path}/x", q=q, exact=exact)
rows = []
for l in range(prep.store.num_layers):
    X = torch.cat([prep.rows(l, a, min(prep.n, a + 65536)) for a in range(0, prep.n, 65536)])
    want = stream_knn(prep.store, l, topk, q=q, exact=exact)  # cached by the grid run
    t0 = time.perf_counter()
    got, rep = knn(X, topk, backend=AnnParams("faiss-ivf", nprobe=nprobe), return_report=True)
    dt = time.perf_counter() - t0
    hit = (got.unsqueeze(2) == want.unsqueeze(1)).any(2).float().mean().item()
    rows.append({"layer": l, "seconds": dt, "recall_all_rows": hit,
                 "recall_sample": rep.recall if rep is not None else None,
                 "params": rep.params if rep is not None else None,
                 "timings": rep.timings if rep is not None else None,
                 "peak_mib": peak_rss_mib()})
    del X
print(json.dumps(rows, default=str))
"""


def run_child(code: str, *args, env=None) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"child failed with exit code {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--q", type=float, default=0.95, help="clipping quantile (1: none)")
    p.add_argument("--precise", action="store_true", help="exact clipping threshold")
    p.add_argument("--dtype", default="float32", help="store dtype")
    p.add_argument("--budget", type=int, default=512 << 20, help="stream_budget (bytes)")
    p.add_argument("--small", action="store_true", help="N = 20,000: a quick run")
    p.add_argument("--faiss-ivf", action="store_true",
                   help="also FAISS IVF-Flat on model x's layers, recall vs the exact lists")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--keep", default=None, help="write the stores here and keep them")
    p.add_argument("--metrics", nargs="+", default=["mutual_knn", "cka"],
                   choices=["mutual_knn", "cka", "unbiased_cka", "svcca", "cycle_knn",
                            "lcs_knn", "edit_distance_knn", "cknna"],
                   help="grid metrics, in order (a neighbour metric is re-run from the cache)")
    p.add_argument("--name", default=None, help="results file name (default bench_scale)")
    p.add_argument("--note", default="", help="free text stored with the results")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.small:
        args.n = 20_000
    name = args.name or ("bench_scale_small" if args.small else "bench_scale")

    t_all = time.perf_counter()
    check = run_child(CHECK)
    for dt, c in check.items():
        print(f"check {dt}: streamed lists equal in-memory: {c['lists_equal']}; cka rel diff "
              f"{c['cka_rel_diff']:.1e}", flush=True)
        if not c["lists_equal"]:
            raise SystemExit("correctness check failed: streamed lists differ")
    if check["float64"]["cka_rel_diff"] > 1e-9:
        raise SystemExit("correctness check failed: streamed CKA differs")

    tmp = args.keep or tempfile.mkdtemp(prefix="prh_bench_scale_")
    rows = []
    try:
        g = run_child(GENERATE, tmp, args.n, args.d, args.layers, args.dtype, HERE)
        print(f"generated 2 stores: {g['bytes'] / 2**30:.2f} GiB in {g['seconds']:.1f} s "
              f"(peak {g['peak_mib']:.0f} MiB)", flush=True)
        rows.append({"phase": "generate 2 stores", "seconds": g["seconds"],
                     "peak_mib": g["peak_mib"], "store_gib": g["bytes"] / 2**30})
        grid = run_child(GRID, tmp, args.topk, args.q, args.budget, HERE,
                         int(args.precise), ",".join(args.metrics))
        for r in grid["rows"]:
            print(f"{r['phase']}: {r['seconds']:.1f} s, peak RSS {r['peak_mib']:.0f} MiB, "
                  f"searches {r['searches']}, cache hits {r['cache_hits']}, load "
                  f"{r['load_avg_start']:.1f}->{r['load_avg_end']:.1f}", flush=True)
            rows.append({"phase": f"grid {args.layers}x{args.layers} {r['phase']}", **r})
        if args.faiss_ivf and "mutual_knn" in args.metrics:
            for r in run_child(FAISS_IVF, tmp, args.topk, args.q, args.nprobe, HERE,
                               int(args.precise)):
                rows.append({"phase": f"faiss-ivf layer {r['layer']} (nprobe {args.nprobe})",
                             **r})
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t_all
    for r in rows:
        r.update(N=args.n, D=args.d, layers=args.layers, dtype=args.dtype)
    peak = max(r["peak_mib"] for r in rows)
    footer = (f"N = {args.n}, D = {args.d}, {args.layers} x {args.layers} layers, k = "
              f"{args.topk}, q = {args.q}{' (exact)' if args.precise else ''}, store "
              f"{args.dtype}; peak RSS of any process {peak:.0f} MiB (limit 2048); total "
              f"{total / 60:.1f} min. CPU only; {os.cpu_count()} cores shared with other "
              f"jobs (load averages in the rows). {args.note}")
    args.check = check
    args.total_seconds = total
    finish(name, "scale (out-of-core store, streaming)", args, rows, [
        ("phase", "phase", ""), ("seconds", "time (s)", ".1f"), ("peak_mib", "peak MiB", ".0f"),
        ("searches", "searches", "d"), ("cache_hits", "cache hits", "d"),
        ("best", "best", ".4f"), ("load_avg_start", "load", ".1f"),
    ], footer=footer)
    return 0 if peak < 2048 else 1


if __name__ == "__main__":
    sys.exit(main())
