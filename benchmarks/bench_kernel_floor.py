"""CKA, unbiased CKA and CKNNA of one pair against the paper's reference, next to their floor.

    python -m benchmarks.bench_kernel_floor                     # N = 4096, D = 768, /tmp/ref
    python -m benchmarks.bench_kernel_floor --against PATH --n 1024 --repeats 5

For each metric, in one process on the same data (``prh_fast.profile.paired_features``, rows
L2-normalised as the pipeline does): one untimed warm-up call of prh_fast and of the
reference's ``AlignmentMetrics.measure`` (its default keywords; ``topk`` for CKNNA), then
``--repeats`` interleaved rounds; medians, the speed-up and the difference of the two values.

Next to them, the *floor*: the matrix products no exact method can skip, timed alone in the same
run --

- ``cka`` / ``unbiased_cka`` (feature space): ``AᵀB`` and the blocks on and above the diagonal
  of ``AᵀA`` and ``BᵀB`` (``prh_fast.metrics._kernel._sym_fro2``'s products);
- ``cknna``: the score tiles on and above the diagonal of ``AAᵀ`` and of ``BBᵀ`` (the two
  symmetric exact searches' products, with the CPU search's own tile size).

``prh_fast / floor`` says how much of prh_fast's time is above the floor. ``--profile`` adds a
breakdown of one prh_fast call per metric (:func:`breakdown`): where the time goes.
The 1-, 5- and 15-minute load averages are recorded before and after; on a shared machine read
the ratios, not the absolute times. Writes ``benchmarks/results/bench_kernel_floor.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import sys
import time

# prh_fast before torch: it chooses the OpenMP wait policy before torch loads the runtime
import prh_fast

# isort: split

import torch

from benchmarks._harness import finish, interleaved, loadavg

METRICS = ("cka", "unbiased_cka", "cknna")


def pair(n: int, d: int, seed: int = 0):
    """Paired ``[n, d]`` float32 features sharing a latent, rows L2-normalised."""
    from prh_fast.profile import paired_features

    x, y = paired_features(n, 1, d, seed=seed)
    A, B = x[:, 0].contiguous(), y[:, 0].contiguous()
    return (torch.nn.functional.normalize(A, dim=1), torch.nn.functional.normalize(B, dim=1))


def cka_floor(A: torch.Tensor, B: torch.Tensor) -> None:
    """The products of feature-space CKA: ``AᵀB`` and the upper column blocks of ``AᵀA`` and
    ``BᵀB`` (the widths ``_sym_fro2`` uses)."""
    from prh_fast.metrics._kernel import SYM_BLOCK

    A.T @ B
    for x in (A, B):
        d = x.shape[1]
        nb = 1 if d <= SYM_BLOCK * 3 // 2 else round(d / SYM_BLOCK)
        edges = [d * i // nb for i in range(nb + 1)]
        for c0, c1 in zip(edges[:-1], edges[1:]):
            x[:, c0:c1].T @ x[:, c0:]


def search_floor(A: torch.Tensor, B: torch.Tensor, budget: int) -> None:
    """The score tiles on and above the diagonal of ``AAᵀ`` and ``BBᵀ``, with the CPU search's
    tile side, into one reused buffer."""
    from prh_fast.knn._cpu import cpu_tile

    for X in (A, B):
        n = X.shape[0]
        b = cpu_tile(n, X.element_size(), budget)
        buf = torch.empty(b * b, dtype=X.dtype)
        for i0 in range(0, n, b):
            Q = X[i0:i0 + b]
            for j0 in range(i0, n, b):
                K = X[j0:j0 + b]
                torch.mm(Q, K.T, out=buf[:Q.shape[0] * K.shape[0]].view(Q.shape[0], K.shape[0]))


def breakdown(fn, top: int) -> list:
    """Where one call of ``fn`` spends its time: the ``top`` torch operators by own CPU time
    (``torch.profiler``, both threads summed) and every ``prh_fast._C`` kernel (cProfile, wall
    time; the native kernels are no torch operators). ``[(name, seconds, calls)]``, the call's
    wall time first as ``("total", seconds, 1)``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        total = time.perf_counter() - t0
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [(e.key, e.self_cpu_time_total * 1e-6, e.count) for e in events[:top]]
    cp = cProfile.Profile()
    cp.enable()
    fn()
    cp.disable()
    for (_, _, name), (_, calls, tottime, *_) in pstats.Stats(cp).stats.items():
        if "prh_fast._C" in name:
            rows.append((name.strip("<>").replace("built-in method ", ""), tottime, calls))
    return [("total", total, 1)] + sorted(rows, key=lambda r: r[1], reverse=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="/tmp/ref", help="the reference checkout")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    p.add_argument("--profile", action="store_true", help="add a cProfile breakdown")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from prh_fast import metrics
    from prh_fast._config import get_config
    from prh_fast._validate import check_memory_budget
    from prh_fast.knn import DEFAULT_MEMORY_BUDGET
    from prh_fast.profile import load_reference

    loaded = load_reference(args.against)  # stands in for torchaudio where it is missing
    ref = loaded.metrics.AlignmentMetrics
    stubbed = bool(getattr(loaded, "stubs", None))
    A, B = pair(args.n, args.d)
    budget = check_memory_budget(get_config().memory_budget, DEFAULT_MEMORY_BUDGET)
    floors = {"cka": lambda: cka_floor(A, B), "unbiased_cka": lambda: cka_floor(A, B),
              "cknna": lambda: search_floor(A, B, budget)}
    rows, profiles = [], {}
    print(f"N = {args.n}, D = {args.d}, topk = {args.topk}, repeats = {args.repeats}, "
          f"torch threads = {torch.get_num_threads()}, prh_fast {prh_fast.__version__}"
          + (" (torchaudio stand-in for the reference's import)" if stubbed else ""), flush=True)
    for m in args.metrics:
        kw = {"topk": args.topk} if m == "cknna" else {}
        before = loadavg()
        res = interleaved({"reference": lambda: ref.measure(m, A, B, **kw),
                           "prh_fast": lambda: metrics.measure(m, A, B, **kw),
                           "floor": floors[m]}, args.repeats)
        after = loadavg()
        for name, r in res.items():
            if "error" in r:
                print(f"{m}: {name} failed: {r['error']}", file=sys.stderr)
                return 1
        r, p, f = res["reference"], res["prh_fast"], res["floor"]
        rv, pv = float(r["value"]), float(p["value"])
        row = {"metric": m, "N": args.n, "D": args.d, "kwargs": kw,
               "reference_s": r["seconds"], "prh_fast_s": p["seconds"],
               "floor_s": f["seconds"], "speedup": r["seconds"] / p["seconds"],
               "over_floor": p["seconds"] / f["seconds"],
               "floor_speedup": r["seconds"] / f["seconds"],
               "reference_value": rv, "prh_fast_value": pv,
               "abs_diff": abs(rv - pv) if math.isfinite(rv - pv) else float("nan"),
               "times": {k: v["times"] for k, v in res.items()},
               "load_before": before, "load_after": after,
               "load": "/".join(f"{v:.1f}" for v in (after or [])[:1] + (before or [])[:1])}
        rows.append(row)
        print(f"  {m:>12}: reference {r['seconds']:.3f} s, prh_fast {p['seconds']:.4f} s "
              f"(x{row['speedup']:.1f}), floor {f['seconds']:.4f} s, load {before} -> {after}",
              flush=True)
        if args.profile:
            profiles[m] = breakdown(lambda: metrics.measure(m, A, B, **kw), 12)
            row["profile"] = [{"function": n, "seconds": s, "calls": c}
                              for n, s, c in profiles[m]]
            for name, sec, calls in profiles[m]:
                print(f"      {sec * 1e3:9.1f} ms  {calls:5d}  {name}")
    finish("bench_kernel_floor", "kernel metrics against the reference, with their floor",
           args, rows, [
               ("metric", "metric", ""), ("reference_s", "reference (s)", ".3f"),
               ("prh_fast_s", "prh_fast (s)", ".4f"), ("speedup", "speed-up", ".1f"),
               ("floor_s", "floor (s)", ".4f"), ("over_floor", "prh_fast/floor", ".2f"),
               ("floor_speedup", "reference/floor", ".1f"), ("abs_diff", "abs diff", ".1e"),
               ("load", "load 1-min after/before", ""),
           ], footer="floor: the products an exact method cannot skip (see the module "
                     "docstring); load: 1-minute load average after/before the metric's rounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
