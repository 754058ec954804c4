"""FAISS approximate search (IVF-Flat, IVF-PQ, HNSW) against exact search: time, recall@10 and
the error it puts into mutual_knn, at N = 1,000,000, D = 128 on the CPU.

    python -m benchmarks.bench_ann                 # N = 1M, D = 128 (long on 2 cores)
    python -m benchmarks.bench_ann --small         # N = 50,000: a quick run
    python -m benchmarks.bench_ann --n 200000 --nprobe 8 32 --no-hnsw

Two related "layers" A and B (D = 128 each) are generated from one clustered latent (different
nonlinear maps plus noise), so mutual_knn(A, B) is well above chance, as between two models.

Exact reference: an exact search of all N rows is 2·N²·D flops (2.6e14 at 1M: tens of minutes
to hours on two cores), so it is *not run*. Exact lists are computed for a seeded sample of
query rows (the same sample and code as the backends' recall report: torch tiles against all
N keys), and the full exact time is *extrapolated* twice: from a FAISS flat search
(IndexFlatIP, the "faiss" backend) of ``--flat-queries`` rows, linearly in the number of
queries, and from prh_fast's "cpu" backend (symmetric tiles, half the products) on the first
``--cpu-n`` rows, by ``(N / n)²``. Both rows are labelled "extrapolated".

Per approximate configuration and per layer: index build (train + add), search of all N rows
(k + 1 results, self dropped, as the backend does), recall@k on the sample, and mutual_knn from
the approximate lists: on all N rows, and on the sample rows next to the exact value there;
the error is ``|mutual_knn(approx) - mutual_knn(exact)|`` on the sample (paired rows).
IVF-Flat is built once per layer and searched at each ``--nprobe``. Correctness first: the
flat search must reproduce the exact sample lists (up to near-ties), and the public
``knn(..., backend=AnnParams(...))`` must return the benchmark's lists and recall for one
configuration (``--no-pipeline-check`` skips that rebuild).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from benchmarks._harness import finish
from prh_fast.knn import AnnParams, knn
from prh_fast.knn._faiss_ann import build_index, exact_rows, recall_at_k, sample_rows, search_index
from prh_fast.metrics._neighbours import neighbour_scores

BUDGET = 256 * 2**20


def features(n: int, d: int, seed: int = 0, chunk: int = 1 << 17):
    """Two layers ``A, B [n, d]`` (float32, rows L2-normalised) of one clustered latent."""
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


def mutual(a: torch.Tensor, b: torch.Tensor) -> float:
    """mutual_knn of two lists [R, k]: mean |a_i ∩ b_i| / k (sample lists hold ids of all N
    rows, so the row-local torch version runs, not the native kernel)."""
    return float(recall_at_k(a, b).mean())


def load() -> float:
    return round(os.getloadavg()[0], 2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--small", action="store_true", help="N = 50,000 (a quick run)")
    p.add_argument("--sample", type=int, default=1000, help="query rows with exact lists")
    p.add_argument("--flat-queries", type=int, default=4000,
                   help="rows of the timed exact flat search (extrapolated to N)")
    p.add_argument("--cpu-n", type=int, default=100_000,
                   help="rows of the timed exact cpu-backend search (extrapolated by N²; 0: "
                   "skip)")
    p.add_argument("--nprobe", type=int, nargs="+", default=[4, 16, 32])
    p.add_argument("--pq-nprobe", type=int, nargs="*", default=[16],
                   help="IVF-PQ nprobe values (none: skip IVF-PQ)")
    p.add_argument("--no-hnsw", action="store_true", help="skip HNSW (slow to build)")
    p.add_argument("--ef-search", type=int, nargs="+", default=[64])
    p.add_argument("--no-pipeline-check", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.small:
        args.n = 50_000
    import faiss

    n, d, k = args.n, args.d, args.k
    threads = faiss.omp_get_max_threads()
    print(f"N = {n:,}, D = {d}, k = {k}; faiss {faiss.__version__} with {threads} threads; "
          f"torch threads {torch.get_num_threads()}; load {os.getloadavg()}", flush=True)
    t0 = time.perf_counter()
    layers = dict(zip("AB", features(n, d, args.seed)))
    print(f"features generated in {time.perf_counter() - t0:.1f} s", flush=True)

    # ---- exact lists of the sample rows (the report's own code), per layer
    sample = sample_rows(n, min(n, args.sample), args.seed)
    exact = {}
    t_exact = {}
    for name, X in layers.items():
        t0 = time.perf_counter()
        exact[name], _ = exact_rows(X[sample], sample, X, k, BUDGET)
        t_exact[name] = time.perf_counter() - t0
    m_exact = mutual(exact["A"], exact["B"])
    print(f"exact lists of {sample.numel()} sample rows: {np.mean(list(t_exact.values())):.1f} "
          f"s per layer; mutual_knn on the sample (exact) = {m_exact:.4f}", flush=True)

    rows = []
    # ---- exact flat search, timed on some rows (the sample first: checked), extrapolated
    X = layers["A"]
    extra = sample_rows(n, min(n, args.flat_queries), args.seed + 1)
    q_ids = torch.cat([sample, extra[~torch.isin(extra, sample)]])[: max(args.flat_queries,
                                                                       sample.numel())]
    index = faiss.IndexFlatIP(d)
    index.add(X.numpy())
    t0 = time.perf_counter()
    Dq, Iq = index.search(np.ascontiguousarray(X[q_ids].numpy()), k + 1)
    t_flat = time.perf_counter() - t0
    del index
    flat = torch.from_numpy(Iq[: sample.numel()])
    flat = torch.stack([r[r != i][:k] for r, i in zip(flat, sample)])
    differ = int((torch.sort(flat, 1).values != torch.sort(exact["A"], 1).values)
                 .any(1).sum())
    gap = (torch.from_numpy(Dq[: sample.numel()])[:, k - 1:k + 1]).diff(dim=1).abs()
    print(f"flat search of {q_ids.numel()} rows: {t_flat:.1f} s -> {t_flat * n / q_ids.numel():.0f}"
          f" s extrapolated to {n:,}; sample rows whose set differs from the torch exact lists: "
          f"{differ} (k-th/(k+1)-th score gap there <= {float(gap.max()):.2e})", flush=True)
    rows.append({"method": "exact flat (faiss)", "params": f"measured on {q_ids.numel()} rows",
                 "build_s": 0.0, "search_s": t_flat * n / q_ids.numel(),
                 "search_note": "extrapolated", "recall": 1.0, "mutual_full": None,
                 "mutual_sample": m_exact, "mutual_exact": m_exact, "error": 0.0,
                 "flat_rows_measured": int(q_ids.numel()), "flat_seconds_measured": t_flat,
                 "sample_rows_differing_from_torch_exact": differ, "load1": load()})

    # ---- prh_fast's exact CPU backend (symmetric tiles: N²·D flops), timed on the first
    # ``--cpu-n`` rows and extrapolated by (N / n)²
    n_cpu = min(n, args.cpu_n)
    if n_cpu:
        t0 = time.perf_counter()
        knn(X[:n_cpu], k, backend="cpu")
        t_cpu = time.perf_counter() - t0
        est = t_cpu * (n / n_cpu) ** 2
        print(f"exact cpu backend on the first {n_cpu:,} rows: {t_cpu:.1f} s -> {est:.0f} s "
              f"extrapolated to {n:,} (x (N/n)^2)", flush=True)
        rows.append({"method": "exact cpu (prh_fast)", "params": f"measured at N={n_cpu:,}",
                     "build_s": 0.0, "search_s": est, "search_note": "extrapolated",
                     "recall": 1.0, "mutual_full": None, "mutual_sample": m_exact,
                     "mutual_exact": m_exact, "error": 0.0, "cpu_rows_measured": n_cpu,
                     "cpu_seconds_measured": t_cpu, "load1": load()})

    def run(label, params: AnnParams, sweep: str, values):
        """Build ``params`` once per layer, search at each ``sweep`` value."""
        built = {}
        for name, X in layers.items():
            p = params.resolved(n, d, k)
            tm: dict = {}
            idx, _res = build_index(faiss, p, X.numpy(), None, tm)
            built[name] = (idx, p, tm)
            print(f"  {label} layer {name}: train {tm['train']:.1f} s, add {tm['add']:.1f} s",
                  flush=True)
        out = []
        for v in values:
            lists, recall, t_search = {}, {}, {}
            for name, X in layers.items():
                idx, p0, tm = built[name]
                p = AnnParams(**{**p0.__dict__, sweep: v}).resolved(n, d, k)
                if sweep == "nprobe":
                    idx.nprobe = v
                else:
                    idx.hnsw.efSearch = v
                t0 = time.perf_counter()
                lists[name], _, completed = search_index(idx, p, X, X, k, True, BUDGET)
                t_search[name] = time.perf_counter() - t0
                recall[name] = float(recall_at_k(lists[name][sample], exact[name]).mean())
            full = float(neighbour_scores("mutual", lists["A"], lists["B"])[0, 0]) / k
            m_s = mutual(lists["A"][sample], lists["B"][sample])
            ps = {a: b for a, b in p.to_dict().items()
                  if a not in ("backend", "seed", "recall_sample")}
            row = {"method": label, "params": ", ".join(f"{a}={b}" for a, b in ps.items()),
                   "build_s": float(np.mean([built[x][2]["train"] + built[x][2]["add"]
                                             for x in layers])),
                   "search_s": float(np.mean(list(t_search.values()))), "search_note": "",
                   "recall": float(np.mean(list(recall.values()))),
                   "recall_A": recall["A"], "recall_B": recall["B"], "mutual_full": full,
                   "mutual_sample": m_s, "mutual_exact": m_exact,
                   "error": abs(m_s - m_exact), "rows_completed": completed,
                   "train_s": float(np.mean([built[x][2]["train"] for x in layers])),
                   "add_s": float(np.mean([built[x][2]["add"] for x in layers])),
                   "load1": load(), "_lists_A": lists["A"]}
            print(f"  {label} {sweep}={v}: search {row['search_s']:.1f} s/layer, recall@{k} "
                  f"{row['recall']:.4f}, mutual_knn {full:.4f} (all rows), sample "
                  f"{m_s:.4f} vs exact {m_exact:.4f}: error {row['error']:.4f}", flush=True)
            out.append(row)
        del built
        return out

    ivf = run("faiss-ivf", AnnParams("faiss-ivf", seed=args.seed), "nprobe", args.nprobe)
    rows += ivf
    if args.pq_nprobe:
        rows += run("faiss-ivfpq", AnnParams("faiss-ivfpq", seed=args.seed), "nprobe",
                    args.pq_nprobe)
    if not args.no_hnsw:
        rows += run("faiss-hnsw", AnnParams("faiss-hnsw", seed=args.seed), "ef_search",
                    args.ef_search)

    check = None
    if not args.no_pipeline_check:
        # The public path (knn -> AnnParams -> report) gives the benchmark's lists and recall.
        v, row = args.nprobe[0], ivf[0]  # the cheapest configuration: this is a rebuild
        idx, rep = knn(layers["A"], k, backend=AnnParams(
            "faiss-ivf", nprobe=v, seed=args.seed, recall_sample=min(n, args.sample)),
            return_report=True)
        check = {"nprobe": v, "lists_equal": bool(torch.equal(idx, row["_lists_A"])),
                 "recall_report": rep.recall, "recall_bench": row["recall_A"],
                 "report_timings": rep.timings}
        print(f"pipeline check (knn, faiss-ivf nprobe={v}): lists equal "
              f"{check['lists_equal']}, report recall {rep.recall:.4f} vs benchmark "
              f"{row['recall_A']:.4f}", flush=True)
        if not check["lists_equal"] or abs(rep.recall - row["recall_A"]) > 1e-12:
            raise SystemExit("pipeline check failed: the public path differs from the benchmark")
    for r in rows:
        r.pop("_lists_A", None)
        r.update(N=n, D=d, k=k, sample=int(sample.numel()))
    args.pipeline_check = check
    args.exact_sample_seconds_per_layer = float(np.mean(list(t_exact.values())))
    foot = (f"search: all {n:,} rows of one layer (k+1 results, self dropped), mean of layers A "
            f"and B; exact rows: NOT RUN in full, times extrapolated (flat: from {q_ids.numel()} "
            f"query rows; cpu: from N = {n_cpu:,}).\n"
            f"recall@{k} and errors on {sample.numel()} sampled rows with exact lists; error = "
            f"|mutual_knn(approx) - mutual_knn(exact)| on those rows; mutual_knn (all) from the "
            f"approximate lists of all rows.\nmachine: {os.cpu_count()}-core CPU shared with "
            f"other jobs (load1 per row); faiss threads {threads}.")
    finish("bench_ann" + ("_small" if args.small else ""), "faiss_ann", args, rows, [
        ("method", "method", ""), ("params", "params", ""), ("build_s", "build s", ".1f"),
        ("search_s", "search s", ".1f"), ("search_note", "", ""),
        ("recall", f"recall@{k}", ".4f"), ("mutual_full", "mutual (all)", ".4f"),
        ("mutual_sample", "mutual (sample)", ".4f"), ("mutual_exact", "exact (sample)", ".4f"),
        ("error", "|error|", ".4f"), ("load1", "load1", ".2f"),
    ], footer=foot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
