"""SVCCA side by side: prh_fast's exact ``svcca`` against the paper's reference code (its
randomised ``torch.svd_lowrank`` + scikit-learn CCA), in one process on the same data.

    python -m benchmarks.bench_svcca --against /tmp/ref                  # N=4096, D=768, r=10
    python -m benchmarks.bench_svcca --against /tmp/ref --n 1024 --quick
    python -m benchmarks.bench_svcca --against /tmp/ref --data noise --out /tmp   # worst case

The reference checkout is loaded as ``prh-fast bench --against`` loads it
(``prh_fast.profile.load_reference``, which stands in for a missing torchaudio -- the reference
uses it only in ``edit_distance_knn`` -- and says so; the note is printed under the table).

Correctness first: prh_fast's value is checked against the float64 oracle
(``prh_fast.reference.svcca``, an exact SVD) before anything is timed. The reference's value is
randomised and is reported, not checked. The two implementations are timed interleaved
(alternating which goes first), after one warm-up call each; the table gives medians, the speed-up
and the machine's load average before and after. A per-stage profile of prh_fast's basis
(standardisation with the Gram product, the product alone, the top-eigenspace solver, the
basis product) is recorded too, with the full ``torch.linalg.eigh`` the solver replaces, so
the floor is visible.
"""
# ruff: noqa: I001
from __future__ import annotations

# prh_fast first, as the CLI does: it chooses the OpenMP wait policy before torch loads it
import prh_fast  # noqa: F401

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks._harness import finish
from benchmarks.bench_metrics import features
from prh_fast import reference
from prh_fast.metrics import _svcca, svcca
from prh_fast.profile import load_reference


def load() -> str:
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def median_time(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def stage_profile(X: torch.Tensor, r: int, repeats: int) -> dict:
    """Median seconds of each stage of one layer's basis, and whether the Krylov solver's
    certificate held (``None``: the matrix is small enough for the full solver)."""
    Y, m, q, G = _svcca._standardised_gram(X, X.dtype)
    lam, V = _svcca._top_eig(G, r, "x")
    return {
        "standardise_and_gram_s": median_time(lambda: _svcca._standardised_gram(X, X.dtype),
                                              repeats),
        "gram_product_only_s": median_time(lambda: Y.T @ Y, repeats),
        "top_eig_s": median_time(lambda: _svcca._top_eig(G, r, "x"), repeats),
        "full_eigh_s": median_time(lambda: torch.linalg.eigh(G), repeats),
        "basis_s": median_time(lambda: _svcca._times(Y, q[:, None] * V / lam.sqrt()), repeats),
        "krylov_certified": _svcca._top_eig_krylov(G, r) is not None
        if G.shape[0] >= _svcca._KRYLOV_MIN_DIM else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", required=True, help="the reference checkout (has metrics.py)")
    p.add_argument("--n", type=int, nargs="+", default=[4096])
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--cca-dim", type=int, default=10)
    p.add_argument("--data", choices=["latent", "noise"], default="latent",
                   help="latent: paired features with shared structure (bench_metrics); noise: "
                        "independent Gaussian features, whose flat spectrum top sends the "
                        "eigenspace to the full eigendecomposition (the slow case)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both implementations (default: as is)")
    p.add_argument("--quick", action="store_true", help="one repeat each (smoke test)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    if args.threads:
        torch.set_num_threads(args.threads)

    mods = load_reference(args.against)
    ref = mods.metrics.AlignmentMetrics
    notes = ["svcca: the reference's value is randomised (torch.svd_lowrank); prh_fast's is "
             "exact and is checked against the float64 oracle", *mods.stubs]

    rows = []
    r = args.cca_dim
    for n in args.n:
        if args.data == "latent":
            A, B = features(n, args.d)
        else:
            g = torch.Generator().manual_seed(0)
            A, B = (torch.randn(n, args.d, generator=g) for _ in range(2))
        fast = svcca(A, B, cca_dim=r)
        oracle = reference.svcca(A.double(), B.double(), r)
        if not abs(fast - oracle) <= 1e-4 * abs(oracle) + 1e-5:
            print(f"MISMATCH N={n}: prh_fast={fast!r} oracle={oracle!r}", file=sys.stderr)
            return 1
        load_before = load()
        ref_value = float(ref.svcca(A, B, r))  # warm-up
        svcca(A, B, cca_dim=r)
        t_fast, t_ref = [], []
        for i in range(repeats):
            order = [("fast", lambda: svcca(A, B, cca_dim=r)),
                     ("ref", lambda: ref.svcca(A, B, r))]
            for name, fn in (order if i % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                fn()
                (t_fast if name == "fast" else t_ref).append(time.perf_counter() - t0)
        row = {"N": n, "D": args.d, "cca_dim": r, "dtype": "float32", "data": args.data,
               "threads": torch.get_num_threads(),
               "prh_fast_s": statistics.median(t_fast), "reference_s": statistics.median(t_ref),
               "prh_fast_runs": t_fast, "reference_runs": t_ref,
               "value": fast, "oracle_value": oracle, "reference_value": ref_value,
               "load_before": load_before, "load_after": load()}
        row["speedup"] = row["reference_s"] / row["prh_fast_s"]
        row["profile_layer_A"] = stage_profile(A, r, repeats)
        rows.append(row)
        print(f"  N={n}: prh_fast {row['prh_fast_s']:.3f} s, reference {row['reference_s']:.3f} s,"
              f" x{row['speedup']:.2f} (load {row['load_before']} -> {row['load_after']})",
              flush=True)
        prof = row["profile_layer_A"]
        print("    one layer: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in prof.items()), flush=True)
    name = "bench_svcca" if args.data == "latent" else "bench_svcca_noise"
    finish(name, "svcca", args, rows, [
        ("data", "data", ""), ("N", "N", "d"), ("D", "D", "d"), ("cca_dim", "r", "d"),
        ("value", "prh_fast", ".5f"),
        ("oracle_value", "oracle", ".5f"), ("reference_value", "reference", ".5f"),
        ("prh_fast_s", "prh_fast (s)", ".3f"), ("reference_s", "reference (s)", ".3f"),
        ("speedup", "speed-up", ".2f"), ("threads", "threads", "d"),
        ("load_before", "load before", ""),
        ("load_after", "load after", ""),
    ], footer="\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
