"""Approximate search tuned to a recall target (faiss-ivf, faiss-ivfpq, faiss-hnsw) against the
exact search on structured features: tuned parameters, time, recall@k and the error it puts into
mutual_knn and cknna, each with its uncertainty.

    python -m benchmarks.bench_ann --n 100000 --d 128      # the exact search of all rows measured
    python -m benchmarks.bench_ann --n 1000000 --d 128 --name bench_ann_1m
    python -m benchmarks.bench_ann --small                 # N = 20,000, D = 64: a quick run

Features: two related "layers" A and B ``[N, D]`` from one clustered latent (different
nonlinear maps plus noise, rows L2-normalised), so mutual_knn(A, B) is well above chance, as
between two models' layers.

Approximate searches go through the public API only: ``knn(X, k, backend=name,
return_scores=True, return_report=True)`` with the backend's name and nothing else, so the
default recall target (0.95) applies and the search tunes its query-time parameter (IVF
``nprobe``, IVF-PQ ``nprobe`` and ``refine``, HNSW ``efSearch``) on the report's seeded recall
sample (``--target`` passes an explicit target instead). Per backend and layer: the tuned
parameters, the build (train + add), tuning, search and report (exact lists of the sample)
seconds from the report, and the wall time of the call; recall@k on the sample with its 95% CI.

Metric errors (the same sample rows in both layers):

- |Δ mutual_knn|: per sample row ``i`` the paired difference ``|A_i ∩ B_i|/k`` from the
  approximate minus from the exact lists; its mean, standard error (finite-population factor)
  and 95% CI (``prh_fast.knn._faiss_ann.mean_ci``). It is *resolved* when the whole CI lies
  inside ``±--tolerance`` (0.005): then |Δ| <= tolerance is established by the sample. While the
  CI reaches past ``±tolerance`` without lying wholly beyond it (undecided), the sample is
  doubled (``AnnReport.grow``, nested rows) up to ``--max-sample``.
- |Δ cknna|: where the exact search of all rows is run (``N <= --exact-full-max-n``), cknna
  from the exact lists of all rows against cknna from the approximate lists: *measured*. Always
  also *estimated from a sample* of ``--cknna-sample`` rows: each of the five sums of CKNNA's
  three HSIC terms (``Σ P_ij Q_ji``, ``1ᵀP1``, ``1ᵀQ1``, ``1ᵀPQ1``, ``1ᵀQP1``) is a sum over rows
  ``i`` of a share that reads the lists of ``i`` and of the rows ``j`` in its mask ``M_i``;
  the shares of the sample rows, scaled by ``N / S``, estimate the sums, from the exact lists
  (of the sample rows and of their exact neighbours: the only exact search this needs) and
  from the approximate lists of the same rows; the difference of the two cknna values is the
  estimate, and a delete-a-group jackknife over ``--groups`` groups of rows its standard
  error. Where both exist, the table shows both, which checks the estimate.

Exact reference: prh_fast's ``cpu`` backend (the fastest exact CPU search here, symmetric tiles).
When ``N <= --exact-full-max-n`` both layers are searched in full and timed (*measured*); the
first ``--exact-sub`` rows of layer A are also timed and scaled by ``(N / n)²``, which checks the
extrapolation. Above it only the subset is run, and the exact time is *extrapolated* from it.
The estimate the library logs for long exact searches (``prh_fast.knn._estimate``: the products
at this machine's GEMM rate, a lower bound) is printed next to it.

Targets (issue): at N = 1,000,000, D = 128: recall@10 >= 0.95, |Δ mutual_knn| <= 0.005
resolved by the sample, in at most 1/10 of the exact search time (per layer: the approximate
call's wall time, build + tuning + search + report, against the exact search); at N = 100,000,
D = 256: the default approximate search reaches recall >= 0.95. Each row says met / not met.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

from benchmarks._harness import environment, finish, loadavg, write_json
from prh_fast.knn import AnnParams, knn
from prh_fast.knn._estimate import estimate_seconds, gemm_rate
from prh_fast.knn._faiss_ann import (
    ANN_BACKENDS,
    AnnReport,
    exact_rows,
    mean_ci,
    recall_at_k,
    sample_rows,
)
from prh_fast.metrics._cknna import cknna_sim, cknna_values
from prh_fast.metrics._kernel import cka_ratio, hsic_from_sums
from prh_fast.metrics._neighbours import neighbour_scores

#: Issue targets.
TARGET_RECALL = 0.95
TARGET_ERROR = 0.005
TARGET_SPEEDUP = 10.0
BUDGET = 256 * 2**20


def features(n: int, d: int, seed: int = 0, chunk: int = 1 << 17
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two layers ``A, B [n, d]`` (float32, rows L2-normalised) of one clustered latent.

    Example:
        >>> A, B = features(100, 8)
        >>> tuple(A.shape), round(float(A[0].norm()), 4)
        ((100, 8), 1.0)
    """
    g = torch.Generator().manual_seed(seed)
    latent, clusters = 24, 256
    centres = 1.5 * torch.randn(clusters, latent, generator=g)
    W1 = torch.randn(latent, 64, generator=g) / latent**0.5
    W2 = torch.randn(64, d, generator=g) / 8.0
    W3 = torch.randn(latent, 96, generator=g) / latent**0.5
    W4 = torch.randn(96, d, generator=g) / 96**0.5
    A = torch.empty(n, d)
    B = torch.empty(n, d)
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        c = torch.randint(0, clusters, (r1 - r0,), generator=g)
        z = centres[c] + torch.randn(r1 - r0, latent, generator=g)
        a = torch.tanh(z @ W1) @ W2
        b = torch.relu(z @ W3) @ W4
        a += 0.35 * a.std() * torch.randn(r1 - r0, d, generator=g)
        b += 0.35 * b.std() * torch.randn(r1 - r0, d, generator=g)
        A[r0:r1] = torch.nn.functional.normalize(a, dim=1)
        B[r0:r1] = torch.nn.functional.normalize(b, dim=1)
    return A, B


def load1() -> float | None:
    """The 1-minute load average."""
    la = loadavg()
    return None if la is None else la[0]


def mutual_full(ia: torch.Tensor, ib: torch.Tensor) -> float:
    """mutual_knn of two full ``[N, k]`` lists (the native neighbour-set kernel)."""
    return float(neighbour_scores("mutual", ia, ib)[0, 0]) / ia.shape[1]


def cknna_of(n: int, a: tuple, b: tuple) -> float:
    """cknna (unbiased, self excluded: the default) from two layers' ``(idx, values)``."""
    pa = (a[0], cknna_values(a[0], a[1], True, False))
    pb = (b[0], cknna_values(b[0], b[1], True, False))
    return cka_ratio(cknna_sim(n, pa, pb, True), cknna_sim(n, pa, pa, True),
                     cknna_sim(n, pb, pb, True))


def mutual_error(ra: AnnReport, rb: AnnReport, n: int) -> dict:
    """The paired per-row difference of mutual_knn (approximate minus exact) on the shared
    sample rows of two layers' reports: mean, se, 95% CI, resolved."""
    d_rows = recall_at_k(ra.approx, rb.approx) - recall_at_k(ra.exact, rb.exact)
    m, se, lo, hi = mean_ci(d_rows, n)
    return {"delta": m, "abs": abs(m), "se": se, "ci": [lo, hi], "halfwidth": (hi - lo) / 2,
            "rows": int(d_rows.numel()), "rows_differing": int((d_rows != 0).sum())}


def _mutual_rows(LA: torch.Tensor, VA: torch.Tensor, LB: torch.Tensor, VB: torch.Tensor,
                 rows: torch.Tensor) -> tuple:
    """For ``rows``: layer a's lists, which of their entries are in layer b's list too (the
    CKNNA mask ``M``), and the masked row sums of ``P = M∘K`` and ``Q = M∘L``."""
    a, b = LA[rows], LB[rows]
    in_a = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1)
    in_b = (b.unsqueeze(-1) == a.unsqueeze(-2)).any(-1)
    row_p = (VA[rows].double() * in_a).sum(-1)
    row_q = (VB[rows].double() * in_b).sum(-1)
    return a, in_a, row_p, row_q


def cknna_row_terms(S: torch.Tensor, LA: torch.Tensor, VA: torch.Tensor, LB: torch.Tensor,
                    VB: torch.Tensor, Xb: torch.Tensor) -> torch.Tensor:
    """``[S, 5]``: each row's share of the five sums of ``sim(P, Q)``
    (``Σ P_ij Q_ji, 1ᵀP1, 1ᵀQ1, 1ᵀPQ1, 1ᵀQP1``, ``prh_fast.metrics._cknna.cknna_terms``); the
    shares of all rows add up to the sums. Row ``i``'s share reads the lists of ``i`` and of
    the rows ``j`` in its mask ``M_i`` (``LA/LB [N, k]`` lists, ``VA/VB`` their values, ``Xb``
    layer b's features for ``L_ij``)."""
    a, in_a, t2, t3 = _mutual_rows(LA, VA, LB, VB, S)
    J = a.clamp_min(0)
    K = VA[S].double()
    L = torch.einsum("sd,skd->sk", Xb[S], Xb[J]).double()
    _, _, row_p_j, row_q_j = _mutual_rows(LA, VA, LB, VB, J)
    me = S.view(-1, 1, 1)
    i_in_mj = (LA[J] == me).any(-1) & (LB[J] == me).any(-1)
    m = in_a.double()
    return torch.stack([(m * K * L * i_in_mj).sum(1), t2, t3, (m * K * row_q_j).sum(1),
                        (m * L * row_p_j).sum(1)], 1)


def _cknna_from_sums(n: int, T: torch.Tensor) -> float:
    """cknna from ``[3, 5]`` sums of ``sim(A, B)``, ``sim(A, A)``, ``sim(B, B)``."""
    h = [hsic_from_sums(n, float(t[0]), float(t[1]), float(t[2]), float(t[3]), unbiased=True,
                        dot_rows_t=float(t[4])) for t in T]
    return cka_ratio(*h)


def cknna_terms_of(lists: dict, X: dict, S: torch.Tensor) -> torch.Tensor:
    """``[3, S, 5]`` row shares of the three sims of cknna(A, B) for the rows ``S``."""
    (LA, VA), (LB, VB) = lists["A"], lists["B"]
    return torch.stack([cknna_row_terms(S, la, va, lb, vb, xb) for la, va, lb, vb, xb in
                        ((LA, VA, LB, VB, X["B"]), (LA, VA, LA, VA, X["A"]),
                         (LB, VB, LB, VB, X["B"]))])


def cknna_sample_estimate(n: int, te: torch.Tensor, ta: torch.Tensor, groups: int = 20
                          ) -> dict:
    """cknna(exact) - cknna(approx) from the row shares ``te`` / ``ta`` ``[3, S, 5]`` of the
    same sample rows: each sum scaled by ``N / S`` (an unbiased estimate of the whole sum), the
    difference of the two ratios, and its standard error by the delete-a-group jackknife."""
    s = te.shape[1]

    def delta(keep):
        f = n / int(keep.sum())
        return (_cknna_from_sums(n, te[:, keep].sum(1) * f)
                - _cknna_from_sums(n, ta[:, keep].sum(1) * f))

    d = delta(torch.ones(s, dtype=torch.bool))
    g = max(2, min(groups, s))
    grp = torch.arange(s) % g
    jk = np.array([delta(grp != j) for j in range(g)])
    se = math.sqrt((g - 1) / g * float(((jk - jk.mean()) ** 2).sum()))
    return {"delta": d, "abs": abs(d), "se": se, "rows": s, "groups": g}


def exact_lists_of(X: dict, rows: torch.Tensor, k: int, into: dict | None = None) -> dict:
    """Exact lists and values of ``rows`` in both layers, written into ``[N, k]`` tensors
    (``-1`` / NaN where not computed)."""
    n = X["A"].shape[0]
    out = into or {nm: (torch.full((n, k), -1, dtype=torch.int64),
                        torch.full((n, k), float("nan"))) for nm in "AB"}
    for nm in "AB":
        idx, vals = exact_rows(X[nm][rows], rows, X[nm], k, BUDGET)
        out[nm][0][rows] = idx
        out[nm][1][rows] = vals.float()
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (see the module docstring); returns the exit status.

    Example:
        >>> main(["--n", "3000", "--d", "16", "--backends", "faiss-ivf",
        ...       "--out", "/tmp"])  # doctest: +SKIP
        0
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--small", action="store_true", help="N = 20,000, D = 64 (a quick run)")
    p.add_argument("--backends", nargs="+", default=list(ANN_BACKENDS), choices=ANN_BACKENDS)
    p.add_argument("--target", type=float, default=None,
                   help="explicit target_recall (default: none given, the default applies)")
    p.add_argument("--sample", type=int, default=None,
                   help="recall sample rows (default: the report's, min(N, 1000))")
    p.add_argument("--max-sample", type=int, default=16_000,
                   help="largest sample the mutual_knn error may grow to")
    p.add_argument("--tolerance", type=float, default=TARGET_ERROR,
                   help="|Δ mutual_knn| resolved: the 95%% CI inside ±tolerance")
    p.add_argument("--groups", type=int, default=20,
                   help="jackknife groups of the cknna estimate's standard error")
    p.add_argument("--cknna-sample", type=int, default=1000,
                   help="rows of the cknna estimate (their exact neighbours' lists are needed)")
    p.add_argument("--exact-full-max-n", type=int, default=200_000,
                   help="largest N whose exact search of all rows is run (measured)")
    p.add_argument("--exact-sub", type=int, default=50_000,
                   help="rows of the timed exact subset (extrapolated by (N/n)^2); N (above "
                        "--exact-full-max-n): layer A's exact search of all rows is timed "
                        "(measured) without keeping its lists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder of the JSON (default benchmarks/results)")
    p.add_argument("--name", default=None,
                   help="JSON file name without .json (default bench_ann, or bench_ann_small)")
    args = p.parse_args(argv)
    if args.small:
        args.n, args.d = 20_000, 64
    import faiss

    n, d, k = args.n, args.d, args.k
    name = args.name or ("bench_ann" + ("_small" if args.small else ""))
    threads = faiss.omp_get_max_threads()
    print(f"N = {n:,}, D = {d}, k = {k}; faiss {faiss.__version__} with {threads} threads; "
          f"torch threads {torch.get_num_threads()}; load {loadavg()}", flush=True)
    t0 = time.perf_counter()
    X = dict(zip("AB", features(n, d, args.seed)))
    print(f"features generated in {time.perf_counter() - t0:.1f} s", flush=True)

    # ---- exact reference: the cpu backend, all rows where it fits, a subset otherwise
    rows: list = []
    rate = gemm_rate()
    lower = estimate_seconds(n, d, search="cpu", rate=rate)
    full = n <= args.exact_full_max_n
    exact_lists: dict = {}
    exact_s = None
    exact_label = "measured" if full else "extrapolated"
    if full:
        secs = []
        for nm in "AB":
            t0 = time.perf_counter()
            exact_lists[nm] = knn(X[nm], k, backend="cpu", return_scores=True)
            secs.append(time.perf_counter() - t0)
        exact_s = float(np.mean(secs))
        print(f"exact cpu search of all {n:,} rows: {secs[0]:.1f} / {secs[1]:.1f} s (layers A "
              f"/ B), measured; the library's lower-bound estimate {lower:.1f} s", flush=True)
        rows.append({"method": "exact cpu", "params": "all rows", "total_s": exact_s,
                     "exact": "measured", "recall": 1.0, "seconds_A": secs[0],
                     "seconds_B": secs[1], "estimate_lower_s": lower, "load1": load1()})
    sub = min(n, args.exact_sub)
    if sub == n and not full:  # layer A searched in full: its time is measured
        t0 = time.perf_counter()
        knn(X["A"], k, backend="cpu")
        exact_s = time.perf_counter() - t0
        exact_label = "measured"
        print(f"exact cpu search of all {n:,} rows of layer A: {exact_s:.1f} s, measured; "
              f"lower-bound estimate {lower:.0f} s", flush=True)
        rows.append({"method": "exact cpu", "params": "all rows of layer A", "total_s": exact_s,
                     "exact": "measured", "recall": 1.0, "seconds_A": exact_s,
                     "estimate_lower_s": lower, "load1": load1()})
    if sub < n:
        t0 = time.perf_counter()
        knn(X["A"][:sub], k, backend="cpu")
        t_sub = time.perf_counter() - t0
        ext = t_sub * (n / sub) ** 2
        print(f"exact cpu search of the first {sub:,} rows: {t_sub:.1f} s -> {ext:.0f} s "
              f"extrapolated to {n:,} (x (N/n)^2); lower-bound estimate {lower:.0f} s",
              flush=True)
        rows.append({"method": "exact cpu", "params": f"first {sub:,} rows x (N/n)^2",
                     "total_s": ext, "exact": "extrapolated", "recall": 1.0,
                     "subset_rows": sub, "subset_seconds": t_sub, "estimate_lower_s": lower,
                     "load1": load1()})
        if exact_s is None:
            exact_s = ext
    m_exact = c_exact = None
    if full:
        m_exact = mutual_full(exact_lists["A"][0], exact_lists["B"][0])
        c_exact = cknna_of(n, exact_lists["A"], exact_lists["B"])
        print(f"exact: mutual_knn {m_exact:.4f}, cknna {c_exact:.4f} (all rows)", flush=True)
    # cknna's sample: the exact lists of its rows and of their exact neighbours (both layers)
    t0 = time.perf_counter()
    ck_rows = sample_rows(n, min(n, args.cknna_sample), args.seed + 1)
    if full:
        ck_lists = {nm: (exact_lists[nm][0], exact_lists[nm][1].float()) for nm in "AB"}
    else:
        ck_lists = exact_lists_of(X, ck_rows, k)
        nbrs = torch.cat([ck_lists[nm][0][ck_rows].flatten() for nm in "AB"]).unique()
        nbrs = nbrs[~torch.isin(nbrs, ck_rows)]
        ck_lists = exact_lists_of(X, nbrs, k, ck_lists)
        print(f"exact lists of the {ck_rows.numel()} cknna sample rows and their "
              f"{nbrs.numel()} neighbours: {time.perf_counter() - t0:.1f} s", flush=True)
    ck_exact_terms = cknna_terms_of(ck_lists, X, ck_rows)
    args.cknna_sample_seconds = time.perf_counter() - t0
    del ck_lists

    # ---- the approximate backends, through the public API
    for backend in args.backends:
        if args.target is None and args.sample is None and args.seed == 0:
            spec: str | AnnParams = backend  # nothing given: the default target applies
        else:
            spec = AnnParams(backend, seed=args.seed, recall_sample=args.sample,
                             target_recall=args.target)
        lists, reps, wall = {}, {}, {}
        for nm in "AB":
            t0 = time.perf_counter()
            idx, vals, rep = knn(X[nm], k, backend=spec, return_scores=True,
                                 return_report=True)
            wall[nm] = time.perf_counter() - t0
            lists[nm], reps[nm] = (idx, vals), rep
            print(f"  {backend} layer {nm}: {rep.summary()}; wall {wall[nm]:.1f} s", flush=True)
        err = mutual_error(reps["A"], reps["B"], n)
        t_grow = time.perf_counter()
        tol = args.tolerance
        # grow while the CI reaches past ±tol but does not lie wholly beyond it (undecided)
        while (not (-tol <= err["ci"][0] and err["ci"][1] <= tol)
               and not (err["ci"][0] > tol or err["ci"][1] < -tol)
               and err["rows"] < min(n, args.max_sample)):
            size = min(n, args.max_sample, 2 * err["rows"])
            for nm in "AB":
                reps[nm].grow(size)
            err = mutual_error(reps["A"], reps["B"], n)
            print(f"  {backend}: sample grown to {err['rows']} rows: Δ mutual_knn "
                  f"{err['delta']:+.5f}, 95% CI {err['ci'][0]:+.5f}..{err['ci'][1]:+.5f}",
                  flush=True)
        t_grow = time.perf_counter() - t_grow
        resolved = -args.tolerance <= err["ci"][0] and err["ci"][1] <= args.tolerance
        m_approx = mutual_full(lists["A"][0], lists["B"][0])
        c_approx = cknna_of(n, lists["A"], lists["B"])
        ck = cknna_sample_estimate(n, ck_exact_terms, cknna_terms_of(lists, X, ck_rows),
                                   args.groups)
        tm = [r.timings for r in reps.values()]

        def mean_t(key, tm=tm):
            return float(np.mean([t.get(key, 0.0) for t in tm]))

        ra, rb = reps["A"], reps["B"]
        shown = {a: v for a, v in ra.params.items()
                 if a not in ("backend", "seed", "recall_sample", "target_recall")}
        params_b = {a: v for a, v in rb.params.items() if a in shown}
        ptxt = ", ".join(f"{a}={v}" + (f"/{params_b[a]}" if params_b.get(a) != v else "")
                         for a, v in shown.items())
        total = float(np.mean(list(wall.values())))
        recall = min(ra.recall, rb.recall)
        speedup = exact_s / total if exact_s else None
        checks = {f"recall>={TARGET_RECALL}": recall >= TARGET_RECALL,
                  f"|dmutual|<={args.tolerance} resolved": resolved,
                  f"time<=exact/{TARGET_SPEEDUP:g}": (speedup is not None
                                                      and speedup >= TARGET_SPEEDUP)}
        row = {"method": backend, "params": ptxt,
               "target_recall": ra.target_recall,
               "tuning_trials": [len((r.tuning or {}).get("trials", [])) for r in (ra, rb)],
               "tuning": [r.tuning for r in (ra, rb)],
               "build_s": mean_t("train") + mean_t("add"), "train_s": mean_t("train"),
               "add_s": mean_t("add"), "tune_s": mean_t("tune"), "search_s": mean_t("search"),
               "report_s": mean_t("report"), "total_s": total, "grow_s": t_grow,
               "exact": exact_label, "exact_s": exact_s, "speedup": speedup,
               "recall": recall, "recall_A": ra.recall, "recall_B": rb.recall,
               "recall_ci_A": list(ra.recall_ci), "recall_ci_B": list(rb.recall_ci),
               "recall_ci_low": min(ra.recall_ci[0], rb.recall_ci[0]),
               "sample": err["rows"], "rows_completed": [ra.rows_completed, rb.rows_completed],
               "dmutual": err["abs"], "dmutual_signed": err["delta"], "dmutual_se": err["se"],
               "dmutual_ci": err["ci"], "dmutual_half": err["halfwidth"],
               "dmutual_resolved": resolved, "rows_differing": err["rows_differing"],
               "mutual_approx_all": m_approx, "mutual_exact_all": m_exact,
               "dmutual_all": None if m_exact is None else abs(m_approx - m_exact),
               "cknna_approx_all": c_approx, "cknna_exact_all": c_exact,
               "dcknna_all": None if c_exact is None else abs(c_approx - c_exact),
               "dcknna_all_signed": None if c_exact is None else c_exact - c_approx,
               "dcknna_est": ck["abs"], "dcknna_est_signed": ck["delta"],
               "dcknna_est_se": ck["se"], "dcknna_est_groups": ck["groups"],
               "dcknna_est_rows": ck["rows"],
               "checks": checks,
               "targets": ", ".join(("met" if ok else "NOT met") for ok in checks.values()),
               "timings_A": dict(ra.timings), "timings_B": dict(rb.timings),
               "load1": load1()}
        rows.append(row)
        print(f"  {backend}: recall {recall:.4f} (CI low {row['recall_ci_low']:.4f}), "
              f"|Δ mutual_knn| {err['abs']:.5f} ± {err['halfwidth']:.5f} on {err['rows']} rows"
              f" (resolved {resolved}); all rows: "
              + ("n/a" if m_exact is None else f"{row['dmutual_all']:.5f}")
              + "; |Δ cknna| all rows: "
              + ("n/a" if c_exact is None else f"{row['dcknna_all']:.5f}")
              + f", sample estimate {ck['delta']:+.5f} ± {ck['se']:.5f}; "
              f"{speedup if speedup is not None else float('nan'):.1f}x faster than exact "
              f"({exact_label}); targets: {row['targets']}", flush=True)
        for r in (ra, rb):
            r.release()
        del lists, reps
        # the rows so far, in case a long run is stopped (the final write replaces it)
        write_json(name, {"benchmark": "faiss_ann", "partial": True, "env": environment(),
                          "args": {a: v for a, v in vars(args).items()}, "rows": rows},
                   args.out)
    for r in rows:
        r.update(N=n, D=d, k=k)
    args.gemm_gflops = rate / 1e9
    args.load_end = loadavg()
    foot = (f"N = {n:,}, D = {d}, k = {k}; per layer, mean of layers A and B; total = wall time "
            f"of the knn call (build + tune + search + report); exact = the cpu backend "
            f"({exact_label}); recall = the lower layer's, on the sample (CI low: 95%).\n"
            f"|Δ mutual|: paired per-row difference on the sample, ± the 95% CI half-width; "
            f"|Δ cknna|: all rows (where the exact search ran) / sample estimate ± se.\n"
            f"targets: recall >= {TARGET_RECALL}, |Δ mutual| <= {args.tolerance} resolved, "
            f"time <= exact/{TARGET_SPEEDUP:g}.\nmachine: {os.cpu_count()}-core CPU shared "
            f"with other jobs (load1 per row, end {args.load_end}); faiss threads {threads}; "
            f"GEMM {args.gemm_gflops:.0f} GFLOP/s.")
    finish(name, "faiss_ann", args, rows, [
        ("method", "method", ""), ("params", "params", ""), ("build_s", "build s", ".1f"),
        ("tune_s", "tune s", ".1f"), ("search_s", "search s", ".1f"),
        ("total_s", "total s", ".1f"), ("exact", "exact", ""), ("speedup", "x faster", ".1f"),
        ("recall", f"recall@{k}", ".4f"), ("recall_ci_low", "CI low", ".4f"),
        ("dmutual", "|Δ mutual|", ".5f"), ("dmutual_half", "±", ".5f"),
        ("sample", "rows", "d"), ("dmutual_all", "|Δ mutual| all", ".5f"),
        ("dcknna_all", "|Δ cknna| all", ".5f"), ("dcknna_est", "|Δ cknna| est", ".5f"),
        ("dcknna_est_se", "±se", ".5f"), ("targets", "targets", ""), ("load1", "load1", ".2f"),
    ], footer=foot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
