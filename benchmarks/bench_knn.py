"""Exact self kNN on the CPU: prh_fast's backends against FAISS's flat inner-product search.

    python benchmarks/bench_knn.py                      # N in {4096, 16384, 50000}, D = 768/64
    python benchmarks/bench_knn.py --n 4096 --d 768 --k 10

Correctness first: every backend's lists are compared with the native backend's (FAISS may
order exact ties differently; the count of differing rows is reported). Peak memory of each
backend is measured in a fresh subprocess (``VmHWM``) when ``--memory`` is given.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import finish, timeit  # noqa: E402

from prh_fast._backend import faiss_available  # noqa: E402
from prh_fast.knn import knn  # noqa: E402


def features(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 32, generator=g)
    X = torch.tanh(z @ torch.randn(32, d, generator=g)) + 0.5 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(X, dim=1)


def peak_memory(backend: str, n: int, d: int, k: int) -> float:
    """Peak resident memory (MiB) of a fresh process that runs one search."""
    code = (
        "import sys; sys.path.insert(0, %r);"
        "from bench_knn import features; from _harness import peak_rss_mib;"
        "from prh_fast.knn import knn;"
        "X = features(%d, %d); knn(X, %d, backend=%r);"
        "print(peak_rss_mib())"
    ) % (str(Path(__file__).resolve().parent), n, d, k, backend)
    out = subprocess.check_output([sys.executable, "-c", code])
    return float(out.decode().strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
