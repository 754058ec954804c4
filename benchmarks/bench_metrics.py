"""Every metric, prh_fast against the reference provider (``prh_fast.reference``: the literal
float64 N x N implementation of docs/metrics.md).

    python -m benchmarks.bench_metrics                 # N in {1024, 4096, 16384}
    python -m benchmarks.bench_metrics --n 1024 --quick

Correctness is checked at every size where the reference runs: kernel metrics within 1e-4
relative; neighbour metrics equal to 1e-12 when the reference scores prh_fast's own float32
lists (rows whose float64 lists differ by near-ties are counted and reported). Then each
provider is timed. The reference is skipped above ``--ref-max-n`` (its N x N float64 matrices
and N^3 products take hours at 16384).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from benchmarks._harness import finish, timeit
from prh_fast import metrics, reference
from prh_fast.knn import knn
from prh_fast.testing import latent, layer_features


def features(n: int, d: int, seed: int = 0):
    """Paired float32 features with shared structure (a common latent, two nonlinear maps)."""
    g = torch.Generator().manual_seed(seed)
    z = latent(n, 32, generator=g)
    return (layer_features(z, d, generator=g, gain=None),
            layer_features(z, d, generator=g, gain=None, nonlinearity="relu"))


def kwargs_for(metric: str, topk: int) -> dict:
    return {"topk": topk} if ("knn" in metric or metric == "cknna") else {}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--metrics", nargs="+", default=metrics.SUPPORTED_METRICS)
    p.add_argument("--ref-max-n", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="one repeat each (smoke test)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    repeats = 1 if args.quick else args.repeats

    rows = []
    for n in args.n:
        A, B = features(n, args.d)
        for m in args.metrics:
            kw = kwargs_for(m, args.topk)
            fast, t_fast = timeit(lambda: metrics.measure(m, A, B, **kw), repeats=repeats)
            row = {"metric": m, "N": n, "D": args.d, "topk": args.topk, "dtype": "float32",
                   "prh_fast_s": t_fast["p50"], "prh_fast": t_fast, "value": fast}
            if n <= args.ref_max_n:
                ref, t_ref = timeit(lambda: reference.measure(m, A, B, **kw), repeats=1,
                                    warmup=0)
                err = abs(fast - ref) / max(abs(ref), 1e-12)
                tol = 1e-4
                if m.endswith("_knn"):
                    # float32 features: prh_fast searches in float32, the reference in float64,
                    # so rows with near-ties (gaps below float32 rounding) may order differently.
                    # Check the metric exactly on prh_fast's own lists, and count those rows.
                    la, lb = knn(A, args.topk), knn(B, args.topk)
                    ra, rb = reference.knn(A, args.topk), reference.knn(B, args.topk)
                    row["rows_differing_from_float64"] = int(
                        ((la != ra).any(1) | (lb != rb).any(1)).sum())
                    err = abs(fast - reference.FROM_LISTS[m](la, lb)) / max(abs(fast), 1e-12)
                    tol = 1e-12
                ok = err < tol or (math.isnan(fast) and math.isnan(ref))
                if not ok:
                    print(f"MISMATCH {m} N={n}: prh_fast={fast!r} reference={ref!r}",
                          file=sys.stderr)
                    return 1
                row.update(reference_s=t_ref["p50"], reference=t_ref, reference_value=ref,
                           rel_diff=err, speedup=t_ref["p50"] / t_fast["p50"])
            rows.append(row)
            print(f"  {m:>18} N={n:>6}: prh_fast {t_fast['p50'] * 1e3:9.1f} ms"
                  + (f", reference {row['reference_s']:8.2f} s, x{row['speedup']:.0f}"
                     if "speedup" in row else ""), flush=True)
    finish("bench_metrics", "metrics", args, rows, [
        ("metric", "metric", ""), ("N", "N", "d"), ("value", "value", ".4f"),
        ("prh_fast_s", "prh_fast (s)", ".4f"), ("reference_s", "reference (s)", ".2f"),
        ("speedup", "speed-up", ".0f"), ("rel_diff", "rel diff", ".1e"),
        ("rows_differing_from_float64", "near-tie rows", "d"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
