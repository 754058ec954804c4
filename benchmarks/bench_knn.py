"""Exact self kNN: prh_fast's CPU backends against FAISS (``--suite cpu``, the default), or the
GPU engine against what users write (``--suite gpu``).

    python -m benchmarks.bench_knn                      # N in {4096, 16384, 50000}, D = 768/64
    python -m benchmarks.bench_knn --n 4096 --d 768 --k 10
    python -m benchmarks.bench_knn --suite screen --n 4096 16384   # bf16 vs fp32 CPU screen
    python -m benchmarks.bench_knn --suite screen --features emb.pt --extra 16 32 64

Correctness first: every backend's lists are compared with the native backend's (FAISS may
order exact ties differently; the count of differing rows is reported). Peak memory of each
backend is measured in a fresh subprocess (``VmHWM``) when ``--memory`` is given.

GPU suite (``benchmarks/gpu_suite.sh`` runs it on the lent GPU machine):

    python -m benchmarks.bench_knn --suite gpu                    # the issue's grid, CUDA
    python -m benchmarks.bench_knn --suite gpu --budget 240 --guard 45
    python -m benchmarks.bench_knn --suite gpu --device cpu --small   # logic only (interpreter)

Grid: N in {65,536; 262,144; 1,048,576} x D in {1024, 4096} x k in {10, 100}, cells in order
of cost. Modes: ``triton_exact_bf16`` / ``triton_exact_tf32`` (prh_fast's fused search, exact
lists: certified candidates + float64 re-score), ``triton_fast_bf16`` / ``triton_fast_tf32``
(no re-score, approximate), ``torch_fp32`` (tiled ``torch.mm`` + ``topk`` in full float32:
what users write), ``faiss`` (flat inner product; only where a FAISS with GPU support is
installed, or on ``--device cpu``). Before the grid, the ceilings: ``torch.mm`` of 8192-cubed
random matrices in bf16, tf32 and fp32 on the same device. Per row: seconds, TFLOP/s
(2·N²·D / t), fraction of the ceiling of its product format, peak GPU memory
(``torch.cuda.max_memory_allocated``) and the part beyond the features, and list checks on a
row sample against float64 and float32 lists (``_gpu.oracle_lists``): exact modes must equal
the float64 lists on every sampled row (``checks_passed``).

Time guard: a run is predicted from the mode's best rate so far (else a prior fraction of its
ceiling). A run predicted over ``--guard`` seconds (or over the time left before ``--deadline``
/ ``--budget``) is timed on a sample of query rows as a cross search against all N keys, and
its time is scaled by N / rows: such rows carry ``"extrapolated": true`` and ``timed_rows``.
Runs that cannot fit at all are recorded as skipped. The JSON is rewritten after every row, so
a run killed from outside keeps what it measured.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks._harness import ROOT, finish, timeit
from prh_fast.knn import knn  # noqa: E402
from prh_fast.knn._backends import faiss_available  # noqa: E402
from prh_fast.testing import latent, layer_features


def features(n: int, d: int, seed: int = 0):
    """Unit rows ``normalize(tanh(z W) + 0.5 eps)`` of a Gaussian latent ``z`` of rank 32
    (``prh_fast.testing``; ``W`` and ``eps`` standard normal, one generator for all three)."""
    g = torch.Generator().manual_seed(seed)
    return layer_features(latent(n, 32, generator=g), d, generator=g, gain=None)


def peak_memory(backend: str, n: int, d: int, k: int) -> float:
    """Peak resident memory (MiB) of a fresh process that runs one search."""
    code = (
        "import sys; sys.path.insert(0, %r);"
        "from benchmarks.bench_knn import features; from benchmarks._harness import peak_rss_mib;"
        "from prh_fast.knn import knn;"
        "X = features(%d, %d); knn(X, %d, backend=%r);"
        "print(peak_rss_mib())"
    ) % (str(ROOT), n, d, k, backend)
    out = subprocess.check_output([sys.executable, "-c", code])
    return float(out.decode().strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--suite", choices=["cpu", "gpu", "screen"], default="cpu")
    suite, rest = pre.parse_known_args(argv)
    if suite.suite == "gpu":
        return main_gpu(rest)
    if suite.suite == "screen":
        return main_screen(rest)
    return main_cpu(rest)


def main_cpu(argv) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: these backends on the CPU (default); gpu: see --suite gpu --help")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384, 50000])
    p.add_argument("--d", type=int, nargs="+", default=[768, 64])
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--backends", nargs="+", default=["cpu", "faiss", "torch"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="also measure peak RSS per backend")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    backends = [b for b in args.backends if b != "faiss" or faiss_available()]

    rows = []
    for d in args.d:
        for n in args.n:
            X = features(n, d)
            base = None
            for b in backends:
                idx, t = timeit(lambda: knn(X, args.k, backend=b), repeats=args.repeats)
                if base is None:
                    base = idx
                diff_rows = int((idx != base).any(dim=1).sum())
                gflops = 2.0 * n * n * d / t["p50"] / 1e9
                row = {"backend": b, "N": n, "D": d, "k": args.k, "seconds": t["p50"],
                       "timing": t, "gflops": gflops, "rows_differing": diff_rows}
                if args.memory:
                    row["peak_mib"] = peak_memory(b, n, d, args.k)
                rows.append(row)
                print(f"  {b:>6} N={n:>6} D={d:>4}: {t['p50']:.3f} s ({gflops:.0f} GFLOP/s "
                      f"equiv.), differing rows vs first backend: {diff_rows}", flush=True)
    finish("bench_knn_cpu", "knn_cpu", args, rows, [
        ("backend", "backend", ""), ("N", "N", "d"), ("D", "D", "d"), ("k", "k", "d"),
        ("seconds", "time (s)", ".3f"), ("gflops", "GFLOP/s*", ".0f"),
        ("peak_mib", "peak MiB", ".0f"), ("rows_differing", "rows != cpu", "d"),
    ], footer="* 2·N²·D / time: the dense-product work a brute-force search would do")
    return 0


# --------------------------------------------------------------------------------------------
# --suite screen: the CPU search's bfloat16 screen against its float32 screen


def screen_search(X, k, screen, extra, budget):
    """One exact CPU self search with candidates from ``screen`` products (``extra`` beyond
    ``k``): ``(idx, ExactStats)``."""
    from prh_fast.knn._bound import input_rounding
    from prh_fast.knn._cpu import cpu_candidates
    from prh_fast.knn._exact import refine_in_memory
    from prh_fast.prepare import row_norms

    n = X.shape[0]
    kc = min(n - 1, k + extra)
    scr = None if screen == X.dtype else screen
    norms = row_norms(X)
    Xs = None if scr is None else X.to(scr)
    rho = None if scr is None else input_rounding(X, Xs, norms)
    cand = cpu_candidates(X, kc, budget, screen=scr, Xs=Xs)
    idx, _, st = refine_in_memory(X, None, k, cand, budget, norms=norms, screen=scr, rho=rho,
                                  return_stats=True)
    return idx, st


def _mm_rate(dtype, n=4096, d=768, repeats=5):
    """GFLOP/s of one ``n x d`` by ``d x n`` ``torch.mm`` in ``dtype`` (median)."""
    g = torch.Generator().manual_seed(1)
    A = torch.randn(n, d, generator=g).to(dtype)
    _, t = timeit(lambda: torch.mm(A, A.T), repeats=repeats)
    return 2.0 * n * n * d / t["p50"] / 1e9


def main_screen(argv) -> int:
    """bfloat16 vs float32 candidate screen of the exact CPU search, side by side in one
    process (interleaved repeats, medians), with the rows each screen left to the sweep."""
    import os

    from prh_fast.knn._cpu import cpu_bf16_support
    from prh_fast.knn._exact import EXTRA, candidate_count

    p = argparse.ArgumentParser(description="CPU search: bfloat16 vs float32 screen")
    p.add_argument("--suite", default="screen")
    p.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--extra", type=int, nargs="+", default=None,
                   help="bfloat16 candidates beyond k (several: one row each; default: the "
                        "search's own count, candidate_count)")
    p.add_argument("--features", default=None,
                   help="a .pt tensor [N, D] of real features (first N rows) instead of the "
                        "structured generator")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each screen first")
    p.add_argument("--mm-size", type=int, default=4096,
                   help="rows of the torch.mm rate check (rows x D by D x rows)")
    p.add_argument("--memory-budget", type=int, default=256 << 20)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.extra is None:
        args.extra = [candidate_count(args.k, 1 << 62, torch.bfloat16) - args.k]
    fast, why = cpu_bf16_support()
    load0 = os.getloadavg()
    m = args.mm_size
    rates = {"float32": _mm_rate(torch.float32, m, args.d),
             "bfloat16": _mm_rate(torch.bfloat16, m, args.d)}
    print(f"CPU bfloat16: {why}; torch.mm {m}x{args.d} GFLOP/s: float32 {rates['float32']:.0f}, "
          f"bfloat16 {rates['bfloat16']:.0f}; load {load0[0]:.2f}", flush=True)
    real = None
    if args.features:
        real = torch.load(args.features, map_location="cpu").float()
        real = torch.nn.functional.normalize(real, dim=1)
    rows = []
    for n in args.n:
        if real is not None:
            X = real[:n].contiguous()
            src = Path(args.features).name
        else:
            X = features(n, args.d)
            src = "structured"
        runs = [("float32", torch.float32, EXTRA)] + [("bfloat16", torch.bfloat16, e)
                                                      for e in args.extra]
        for _ in range(max(0, args.warmup)):
            for _name, dt, e in runs:
                screen_search(X, args.k, dt, e, args.memory_budget)
        times = {r: [] for r in range(len(runs))}
        out = {}
        for _ in range(max(1, args.repeats)):
            for r, (_name, dt, e) in enumerate(runs):
                t0 = time.perf_counter()
                out[r] = screen_search(X, args.k, dt, e, args.memory_budget)
                times[r].append(time.perf_counter() - t0)
        base_idx = out[0][0]
        t32 = statistics.median(times[0])
        for r, (name, _dt, e) in enumerate(runs):
            idx, st = out[r]
            t = statistics.median(times[r])
            row = {"screen": name, "source": src, "N": X.shape[0], "D": X.shape[1],
                   "k": args.k, "candidates": st.candidates, "seconds": t, "timing": times[r],
                   "vs_float32": t32 / t, "swept": st.swept, "rescored": st.rescored,
                   "rescored_per_row": st.rescored / max(1, st.rows),
                   "lists_equal": bool(torch.equal(idx, base_idx))}
            rows.append(row)
            print(f"  {name:>8} +{e:<3} {src} N={row['N']:>6} D={row['D']}: {t:.3f} s "
                  f"({row['vs_float32']:.2f}x float32), swept {st.swept} rows, "
                  f"{row['rescored_per_row']:.1f} re-scores/row, lists equal: "
                  f"{row['lists_equal']}", flush=True)
    load1 = os.getloadavg()
    args.load = [load0[0], load1[0]]
    args.bf16_hardware = why
    args.mm_gflops = rates
    finish("bench_knn_screen", "knn_cpu_screen", args, rows, [
        ("screen", "screen", ""), ("source", "data", ""), ("N", "N", "d"), ("D", "D", "d"),
        ("k", "k", "d"), ("candidates", "k'", "d"), ("seconds", "time (s)", ".3f"),
        ("vs_float32", "speed vs fp32", ".2f"), ("swept", "rows swept", "d"),
        ("rescored_per_row", "re-scores/row", ".1f"), ("lists_equal", "= fp32 lists", ""),
    ], footer=f"load average {load0[0]:.2f} -> {load1[0]:.2f}; {why}; torch.mm GFLOP/s "
              f"float32 {rates['float32']:.0f}, bfloat16 {rates['bfloat16']:.0f}")
    ok = all(r["lists_equal"] for r in rows)
    return 0 if ok else 1


# --------------------------------------------------------------------------------------------
# --suite gpu

#: mode -> (kind, product format, knn keyword arguments)
GPU_MODES = {
    "triton_exact_bf16": ("triton", "bf16", dict(exact=True, precision="bf16")),
    "triton_exact_tf32": ("triton", "tf32", dict(exact=True, precision="tf32")),
    "triton_fast_bf16": ("triton", "bf16", dict(exact=False, precision="bf16")),
    "triton_fast_tf32": ("triton", "tf32", dict(exact=False, precision="tf32")),
    "torch_fp32": ("torch", "fp32", {}),
    "faiss": ("faiss", "fp32", {}),
}
#: Prior fraction of the ceiling, used only to predict a mode's first run (time guard).
_PRIOR = {"triton": 0.25, "torch": 0.8, "faiss": 0.5}
ISSUE_N = [65536, 262144, 1048576]
ISSUE_D = [1024, 4096]
ISSUE_K = [10, 100]
#: Tile alternatives ``--sweep`` times (``tune=`` of ``knn_triton``) at the first cell.
SWEEP = [dict(BLOCK_M=64, BLOCK_N=128, num_warps=8), dict(BLOCK_M=128, BLOCK_N=128, num_warps=8),
         dict(BLOCK_M=64, BLOCK_N=64, num_warps=4),
         dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=4, DENSE_AT=32)]


def torch_mm_topk(X, k, rows=None, block_bytes=2**31):
    """Tiled ``X[q] @ X.T`` + ``topk`` in full float32 (what users write). ``rows``: only the
    first ``rows`` queries, as a cross search (no self exclusion) for sampled timing."""
    import torch

    n = X.shape[0]
    m = n if rows is None else rows
    b = max(1, min(m, block_bytes // (4 * n)))
    out = torch.empty((m, k), dtype=torch.int64, device=X.device)
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        for r0 in range(0, m, b):
            r1 = min(m, r0 + b)
            s = X[r0:r1] @ X.T
            if rows is None:
                ar = torch.arange(r1 - r0, device=X.device)
                s[ar, ar + r0] = float("-inf")
            out[r0:r1] = s.topk(k, dim=1).indices
    finally:
        torch.set_float32_matmul_precision(prev)
    return out


def _gpu_args(argv):
    p = argparse.ArgumentParser(description="GPU engine kNN grid (see the module docstring)")
    p.add_argument("--suite", choices=["cpu", "gpu"], default="gpu")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (interpreter)")
    p.add_argument("--small", action="store_true",
                   help="tiny grid (N 192/320, D 32, k 5/24, 256-cubed ceilings) to test the "
                        "script's logic, e.g. on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--n", type=int, nargs="+", default=None)
    p.add_argument("--d", type=int, nargs="+", default=None)
    p.add_argument("--k", type=int, nargs="+", default=None)
    p.add_argument("--modes", nargs="+", default=list(GPU_MODES), choices=list(GPU_MODES))
    p.add_argument("--guard", type=float, default=60.0,
                   help="seconds one timed run may take (predicted); longer runs are timed on "
                        "a sample of query rows")
    p.add_argument("--deadline", type=float, default=None, help="Unix time to finish by")
    p.add_argument("--budget", type=float, default=None, help="seconds to finish within")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--check-rows", type=int, default=None, help="rows checked per cell")
    p.add_argument("--max-full-n", type=int, default=None,
                   help="time every run with N above this on a sample of query rows")
    p.add_argument("--memory-budget", type=int, default=1 << 30,
                   help="knn(memory_budget=) of the triton modes, bytes")
    p.add_argument("--ceiling-size", type=int, default=None)
    p.add_argument("--sweep", action="store_true", help="time tile alternatives first")
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None, help="JSON file name (default bench_knn_gpu)")
    a = p.parse_args(argv)
    small = a.small
    a.n = sorted(a.n or ([192, 320] if small else ISSUE_N))
    a.d = a.d or ([32] if small else ISSUE_D)
    a.k = a.k or ([5, 24] if small else ISSUE_K)
    a.check_rows = a.check_rows or (48 if small else 1024)
    a.ceiling_size = a.ceiling_size or (256 if small else 8192)
    if small and a.max_full_n is None:
        a.max_full_n = 256
    a.name = a.name or ("bench_knn_gpu_small" if small else "bench_knn_gpu")
    return a


def main_gpu(argv) -> int:
    args = _gpu_args(argv)
    import os

    if args.device == "cpu":  # before anything imports triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import time

    import torch

    from benchmarks._gpu import (
        Deadline,
        cuda_env,
        list_check,
        matmul_ceilings,
        oracle_lists,
        peak_gib,
        reset_peak,
        sync,
    )
    from benchmarks._gpu import features as gpu_features
    from benchmarks._harness import environment, print_table, write_json

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --small to test the script's logic")
        return 2
    deadline = Deadline(args.deadline, args.budget)
    on_gpu = dev.type == "cuda"
    payload = {"benchmark": "knn_gpu", "env": environment(), "gpu": cuda_env(dev),
               "args": vars(args), "ceilings": None, "rows": [], "checks_passed": None,
               "note": "seconds of rows with extrapolated=true are the time of timed_rows query "
                       "rows (cross search against all N keys) times N / timed_rows"}

    def save():
        exact_rows = [r for r in payload["rows"] if r.get("check", {}).get("passed") is not None]
        payload["checks_passed"] = bool(exact_rows) and all(r["check"]["passed"]
                                                            for r in exact_rows)
        write_json(args.name, payload, args.out)

    payload["ceilings"] = matmul_ceilings(dev, args.ceiling_size, reps=10 if on_gpu else 3)
    print("ceilings (TFLOP/s): " + ", ".join(f"{f} {payload['ceilings'][f]:.3g}"
                                            for f in ("bf16", "tf32", "fp32")), flush=True)
    save()
    rates: dict = {}  # mode -> best TFLOP/s so far

    from prh_fast.knn import _triton as T
    from prh_fast.knn._backends import faiss_available

    def run_mode(mode, X, k, check):
        kind, fmt, kw = GPU_MODES[mode]
        n, d = X.shape
        flops = 2.0 * n * n * d
        ceiling = payload["ceilings"][fmt]
        row = {"mode": mode, "N": n, "D": d, "k": k, "format": fmt, "status": "ok",
               "ceiling_tflops": ceiling}
        rate = rates.get(mode, ceiling * _PRIOR[kind])
        pred = flops / (rate * 1e12)
        limit = min(args.guard, deadline.left() - 5.0)
        if kind == "faiss":
            why = None
            if not faiss_available():
                why = "faiss not installed"
            elif on_gpu:
                import faiss

                if not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
                    why = "this faiss has no GPU support"
            if why:
                return dict(row, status="skipped", reason=why)
        if limit <= 1.0:
            return dict(row, status="skipped", reason="deadline")
        sample = (args.max_full_n is not None and n > args.max_full_n) or pred > limit
        m = n
        if sample:
            if kind == "faiss":
                return dict(row, status="skipped", reason="the full search does not fit the "
                            "guard, and faiss is timed on full searches only")
            m = int(n * (limit / 3) / pred) // 256 * 256 if pred > limit else n // 4
            m = max(min(256, n // 2), min(m, n // 2))
        if kind == "triton":
            last: dict = {}  # the latest call's SearchStats

            def fn():
                idx, _, last["stats"] = T.knn_triton(X[:m] if sample else X, k,
                                                     args.memory_budget, return_stats=True,
                                                     **(dict(kw, keys=X) if sample else kw))
                return idx
            if on_gpu:  # compile outside the timed region
                w = X[:4096]
                T.knn_triton(w[:256], k, args.memory_budget, keys=w, **kw) if sample else \
                    T.knn_triton(w, k, args.memory_budget, **kw)
        elif kind == "torch":
            fn = lambda: torch_mm_topk(X, k, rows=m if sample else None)  # noqa: E731
            if on_gpu:
                torch_mm_topk(X[:1024], k)
        else:
            fn = lambda: knn(X, k, backend="faiss")  # noqa: E731
        reps = args.repeats if (on_gpu and not sample
                                and pred * args.repeats <= limit / 3) else 1
        base = reset_peak(dev)
        try:
            got, t = timeit(fn, repeats=reps, warmup=0, device=dev)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            return dict(row, status="error", reason=f"out of memory: {str(exc)[:200]}")
        peak = peak_gib(dev)
        sec = t["p50"] * (n / m if sample else 1.0)
        row.update(seconds=sec, timing=t, runs=t["runs"], timed_rows=m, extrapolated=sample,
                   tflops=flops / sec / 1e12, predicted_seconds=pred)
        row["frac_ceiling"] = row["tflops"] / ceiling
        if peak is not None:
            row["peak_gib"] = peak
            row["extra_gib"] = peak - base / 2**30
        if kind == "triton":
            row["stats"] = {key: last["stats"].as_dict().get(key) for key in
                            ("KP", "G", "retried", "fallback", "margin")}
        c = check(got, k, sample, m)
        if c is not None:
            c["passed"] = (c["rows_equal_fp64"] == c["sample_rows"]) if kw.get("exact") else None
            row["check"] = c
        rates[mode] = max(rates.get(mode, 0.0), row["tflops"])
        return row

    def show(row):
        c = row.get("check", {})
        print(f"  {row['mode']:>18} N={row['N']:>8} D={row['D']:>5} k={row['k']:>3}: "
              + (f"{row['seconds']:.3f} s{' (extrapolated)' if row.get('extrapolated') else ''}"
                 f", {row['tflops']:.3g} TFLOP/s ({100 * row['frac_ceiling']:.0f}% of "
                 f"{row['format']}), eq fp64 {c.get('rows_equal_fp64')}/{c.get('sample_rows')}"
                 if row["status"] == "ok" else f"{row['status']}: {row.get('reason')}"),
              flush=True)

    cells = sorted(((n, d) for n in args.n for d in args.d), key=lambda c: c[0] * c[0] * c[1])
    kmax = max(args.k)
    first = True
    for n, d in cells:
        if deadline.left() < 10:
            for k in args.k:
                for mode in args.modes:
                    payload["rows"].append({"mode": mode, "N": n, "D": d, "k": k,
                                            "status": "skipped", "reason": "deadline"})
            save()
            continue
        try:
            X = gpu_features(n, d, seed=n + d, device=dev)
        except torch.cuda.OutOfMemoryError as exc:
            payload["rows"].append({"N": n, "D": d, "status": "error",
                                    "reason": f"features: out of memory: {str(exc)[:200]}"})
            save()
            continue
        sync(dev)
        rows = torch.linspace(0, n - 1, min(n, args.check_rows), device=dev).long().unique()
        oracles: dict = {}

        def check(got, k, sample, m, X=X, rows=rows, oracles=oracles):
            if sample:
                key = ("cross", m)
                q = torch.arange(min(m, args.check_rows), device=dev)
                if key not in oracles:
                    oracles[key] = oracle_lists(X, q, kmax, exclude_self=False)
                r64, r32 = oracles[key]
                return list_check(got[q], r64[:, :k], r32[:, :k], X, q)
            if "self" not in oracles:
                oracles["self"] = oracle_lists(X, rows, kmax, exclude_self=True)
            r64, r32 = oracles["self"]
            return list_check(got[rows], r64[:, :k], r32[:, :k], X, rows)

        if first and args.sweep:
            first = False
            _sweep(args, X, payload, save, check, T, dev, timeit)
        for k in args.k:
            for mode in args.modes:
                t0 = time.time()
                try:
                    row = run_mode(mode, X, k, check)
                except Exception as exc:  # noqa: BLE001 - one failing mode must not end the grid
                    row = {"mode": mode, "N": n, "D": d, "k": k, "status": "error",
                           "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}
                    if on_gpu:
                        torch.cuda.empty_cache()
                row["wall_seconds"] = time.time() - t0
                payload["rows"].append(row)
                show(row)
                save()
        del X, oracles, check  # check's defaults hold X too
        if on_gpu:
            torch.cuda.empty_cache()

    table = print_table([dict(r, check_eq64=r.get("check", {}).get("rows_equal_fp64"),
                              check_eq32=r.get("check", {}).get("rows_equal_fp32"),
                              check_n=r.get("check", {}).get("sample_rows"),
                              recall=r.get("check", {}).get("recall_fp64"),
                              pct=None if r.get("frac_ceiling") is None
                              else 100 * r["frac_ceiling"],
                              ext="x" if r.get("extrapolated") else "")
                         for r in payload["rows"] if "mode" in r], [
        ("mode", "mode", ""), ("N", "N", "d"), ("D", "D", "d"), ("k", "k", "d"),
        ("status", "status", ""), ("seconds", "time (s)", ".3f"), ("ext", "extrap.", ""),
        ("tflops", "TFLOP/s", ".3g"), ("pct", "% ceil", ".0f"), ("peak_gib", "peak GiB", ".2f"),
        ("extra_gib", "extra GiB", ".2f"), ("check_eq64", "=fp64", "d"),
        ("check_eq32", "=fp32", "d"), ("check_n", "of", "d"), ("recall", "recall", ".4f")])
    payload["table"] = table
    save()
    c = payload["ceilings"]
    print(f"ceilings (torch.mm {c['size']}^3, TFLOP/s): bf16 {c['bf16']:.3g}, tf32 "
          f"{c['tf32']:.3g}, fp32 {c['fp32']:.3g}; TFLOP/s = 2·N²·D / time; "
          f"checks_passed: {payload['checks_passed']}")
    print(f"wrote {Path(args.out or Path(__file__).resolve().parent / 'results') / args.name}.json")
    return 0 if payload["checks_passed"] is not False else 1


def _sweep(args, X, payload, save, check, T, dev, timeit):
    """Tile alternatives for the exact modes at the first cell: same lists required."""
    k = args.k[0]
    interp = dev.type == "cpu"
    # the interpreter: two cheap shapes that exercise the code path (its timings mean nothing)
    configs = [dict(BLOCK_M=64, BLOCK_N=64, DENSE_AT=64), dict(BLOCK_M=32, BLOCK_N=64,
                                                              DENSE_AT=64)] if interp else SWEEP
    for prec in ("bf16", "tf32"):
        for tune in configs:
            row = {"mode": f"sweep_exact_{prec}", "N": X.shape[0], "D": X.shape[1], "k": k,
                   "format": prec, "tune": tune, "status": "ok"}
            try:
                fn = lambda: T.knn_triton(X, k, args.memory_budget, precision=prec,  # noqa: E731
                                          tune=tune)[0]
                if not interp:
                    fn()
                got, t = timeit(fn, repeats=1 if interp else args.repeats, warmup=0, device=dev)
                row.update(seconds=t["p50"], timing=t,
                           tflops=2.0 * X.shape[0] ** 2 * X.shape[1] / t["p50"] / 1e12)
                c = check(got, k, False, X.shape[0])
                c["passed"] = c["rows_equal_fp64"] == c["sample_rows"]
                row["check"] = c
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is data
                row.update(status="error", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            payload["rows"].append(row)
            print(f"  sweep {prec} {tune}: "
                  + (f"{row['seconds']:.4f} s" if row["status"] == "ok" else row["reason"]),
                  flush=True)
            save()


if __name__ == "__main__":
    sys.exit(main())
