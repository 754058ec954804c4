"""Peak memory of whole metric calls at sizes where an N x N matrix would not fit.

    python -m benchmarks.bench_memory        # mutual_knn and cka at N = 50,000, D = 64

Each case runs in a fresh process; peak resident memory (``VmHWM``) is reported together
with the baseline of that process after importing torch and building the inputs, so the
difference is what the metric itself needed. For scale: one N x N float32 matrix at
N = 50,000 is 9.3 GiB.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from benchmarks._harness import ROOT, finish

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[5])
from benchmarks._harness import peak_rss_mib
from prh_fast import metrics
from prh_fast.testing import latent, layer_features
n, d, metric, topk = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
g = torch.Generator().manual_seed(0)
z = latent(n, 16, generator=g)
A = layer_features(z, d, generator=g, gain=None)
B = layer_features(z, d, generator=g, gain=None, nonlinearity="relu")
base = peak_rss_mib()
t0 = time.perf_counter()
kw = {"topk": topk} if ("knn" in metric) else {}
value = metrics.measure(metric, A, B, **kw)
dt = time.perf_counter() - t0
peak = peak_rss_mib()
print(json.dumps({"value": value, "seconds": dt, "baseline_mib": base, "peak_mib": peak}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--metrics", nargs="+", default=["mutual_knn", "cknna", "cka"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = []
    for m in args.metrics:
        out = subprocess.check_output([sys.executable, "-c", CHILD, str(args.n), str(args.d), m,
                                       str(args.topk), str(ROOT)])
        r = json.loads(out.decode().strip().splitlines()[-1])
        r.update(metric=m, N=args.n, D=args.d, topk=args.topk)
        rows.append(r)
        print(f"  {m}: peak {r['peak_mib']:.0f} MiB (baseline {r['baseline_mib']:.0f} MiB), "
              f"{r['seconds']:.2f} s", flush=True)
    finish("bench_memory", "memory", args, rows, [
        ("metric", "metric", ""), ("N", "N", "d"), ("D", "D", "d"),
        ("seconds", "time (s)", ".2f"), ("baseline_mib", "baseline MiB", ".0f"),
        ("peak_mib", "peak MiB", ".0f"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
