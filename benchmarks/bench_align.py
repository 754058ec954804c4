"""Layer-grid alignment: prh_fast's ``align`` (every layer pair in one pass) against the
reference provider looped pair by pair (``prh_fast.reference``, float64 N x N, the way the
reference's ``compute_score`` loops).

    python -m benchmarks.bench_align                       # 13x13 @ N=1024 and 33x25 @ N=4096
    python -m benchmarks.bench_align --grid 13x13:1024 --metrics mutual_knn cka

Correctness first: where the whole reference loop runs, ``align``'s score matrix must equal it
(neighbour metrics to 1e-12, kernel metrics to 1e-4) and the best pair must be the same. Where
the loop would take hours (``--ref-max-pairs``), the reference is timed on a sample of pairs
(also checked) and its total is extrapolated: such rows say "estimated".
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks._harness import finish, timeit
from prh_fast import reference
from prh_fast._align import align, best_pair
from prh_fast.metrics import SUPPORTED_METRICS
from prh_fast.testing import drifting_layers


def model_features(n: int, layers: int, d: int, seed: int):
    """[N, L, D] float32 features whose layers share a latent with the other model and drift
    from layer to layer (``prh_fast.testing.drifting_layers``)."""
    return drifting_layers(n, layers, d, seed=seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", nargs="+", default=[
        "13x13:1024:768x768",
        # svcca left out at this size: 58 eigendecompositions of 4096 x 4096 take ~10 min here
        "33x25:4096:4096x1024:cycle_knn,mutual_knn,lcs_knn,edit_distance_knn,cka,"
        "unbiased_cka,cknna"],
        help="LxxLy:N[:DxxDy[:metric,metric...]]")
    p.add_argument("--metrics", nargs="+", default=SUPPORTED_METRICS)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--ref-max-pairs", type=int, default=200,
                   help="loop the reference over the whole grid up to this many pairs")
    p.add_argument("--ref-sample", type=int, default=3, help="pairs timed when extrapolating")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    rows = []
    for spec in args.grid:
        parts = spec.split(":")
        lx, ly = map(int, parts[0].split("x"))
        n = int(parts[1])
        dx, dy = map(int, parts[2].split("x")) if len(parts) > 2 else (768, 768)
        grid_metrics = parts[3].split(",") if len(parts) > 3 else args.metrics
        X, Y = model_features(n, lx, dx, 1), model_features(n, ly, dy, 2)
        for m in [m for m in args.metrics if m in grid_metrics]:
            kw = {"topk": args.topk} if "knn" in m else {}
            res, t = timeit(lambda: align(X, Y, m, topk=args.topk), repeats=1, warmup=0)
            pairs = [(i, j) for i in range(lx) for j in range(ly)]
            full = len(pairs) <= args.ref_max_pairs
            sample = pairs if full else random.Random(0).sample(pairs, args.ref_sample)
            tol = 1e-12 if m.endswith("_knn") else 1e-4
            ref_scores = torch.full((lx, ly), float("nan"), dtype=torch.float64)
            t0 = time.perf_counter()
            for i, j in sample:
                ref_scores[i, j] = reference.measure(m, F.normalize(X[:, i], dim=-1),
                                                     F.normalize(Y[:, j], dim=-1), **kw)
            t_ref = time.perf_counter() - t0
            got = res.scores[[i for i, _ in sample], [j for _, j in sample]]
            want = ref_scores[[i for i, _ in sample], [j for _, j in sample]]
            err = float(((got - want).abs() / want.abs().clamp_min(1e-12)).max())
            if not err < tol:
                print(f"MISMATCH {m} {spec}: max rel diff {err:.2e}", file=sys.stderr)
                return 1
            if full and best_pair(ref_scores)[1] != res.best_pair:
                print(f"MISMATCH {m} {spec}: best pair {res.best_pair} vs reference "
                      f"{best_pair(ref_scores)[1]}", file=sys.stderr)
                return 1
            ref_total = t_ref if full else t_ref / len(sample) * len(pairs)
            row = {"grid": f"{lx}x{ly}", "N": n, "D": f"{dx}/{dy}", "metric": m,
                   "prh_fast_s": t["p50"], "reference_s": ref_total,
                   "reference": "measured" if full else f"estimated ({len(sample)} pairs)",
                   "speedup": ref_total / t["p50"], "best_pair": res.best_pair,
                   "best_score": res.best_score, "max_rel_diff": err,
                   "timings": res.timings}
            rows.append(row)
            print(f"  {spec} {m:>18}: prh_fast {t['p50']:.2f} s, reference {ref_total:.1f} s "
                  f"({row['reference']}), x{row['speedup']:.0f}", flush=True)
    finish("bench_align", "align", args, rows, [
        ("grid", "grid", ""), ("N", "N", "d"), ("metric", "metric", ""),
        ("prh_fast_s", "prh_fast (s)", ".2f"), ("reference_s", "reference (s)", ".1f"),
        ("reference", "reference time", ""), ("speedup", "speed-up", ".0f"),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
