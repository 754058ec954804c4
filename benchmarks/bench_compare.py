"""Side by side: prh_fast against the paper's reference code and against what users would
otherwise run, every ratio measured in one process on the same data.

    python -m benchmarks.bench_compare --against /tmp/ref            # the full suite
    python -m benchmarks.bench_compare --against /tmp/ref --quick    # tiny sizes (smoke test)
    python -m benchmarks.bench_compare --sections knn cka            # no reference needed

Sections (``--sections``):

``reference``
    One pair, ``N x D`` (``--n``, ``--d``): every metric of the reference's
    ``AlignmentMetrics`` (its default keyword arguments, ``topk`` for the kNN metrics and
    CKNNA) against ``prh_fast.metrics.<name>``: times, speed-up and the absolute difference
    of the two values. The checkout is loaded as ``prh-fast bench --against`` loads it
    (``prh_fast.profile.load_reference``): when ``torchaudio`` does not import, a stand-in
    ``torchaudio.functional`` whose ``edit_distance`` is ``prh_fast.reference.levenshtein`` is
    put in place while the reference loads (only ``edit_distance_knn`` calls it); the output
    says so.
``grid``
    A layer grid like the paper's (``--grid-layers`` squared pairs, ``N = --grid-n``): the
    reference's own loop (``measure_alignment.compute_score`` when that module imports, else
    the same loop over ``AlignmentMetrics.measure``; the output says which ran) against
    ``prh_fast.align``.
``knn``
    Exact self kNN (``--knn-n`` rows, normalised float32, self excluded): scikit-learn's brute
    ``NearestNeighbors`` (cosine), faiss-cpu ``IndexFlatIP`` and a chunked dense
    ``torch.mm + topk`` against ``prh_fast.knn.knn``, with the share of lists identical to
    prh_fast's exact lists (rows that differ only by float32 rounding near-ties are counted
    apart).
``cka``
    Linear CKA from dense ``N x N`` centred kernels (what a user would write, float32 and
    float64) against ``prh_fast.metrics.cka``.

Every pair (or group) is interleaved: one untimed warm-up call of each, then ``--repeats``
rounds that call each once; the median is reported. The 1-, 5- and 15-minute load averages
are recorded before and after every section: on a shared machine read the ratios, not the
absolute times. Prints one markdown table per section and writes
``benchmarks/results/bench_compare.json`` (``--out`` to change the folder).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

# Before torch loads the OpenMP runtime, ask for sleeping idle threads (as the prh-fast command
# does); the reference runs in the same process and gets the same policy
import prh_fast

prh_fast.prefer_passive_wait()

# isort: split

import torch  # noqa: E402  (after prefer_passive_wait)

from benchmarks._harness import environment, interleaved, loadavg, write_json  # noqa: E402

SECTIONS = ("reference", "grid", "knn", "cka")
REFERENCE_METRICS = ("cycle_knn", "mutual_knn", "lcs_knn", "edit_distance_knn", "cka",
                     "unbiased_cka", "cknna", "svcca")
SVCCA_NOTE = "reference value is randomised (torch.svd_lowrank); prh_fast's is exact"


# --------------------------------------------------------------------------------------------
# timing, load, tables


def worktree_changes() -> list:
    """``git status --porcelain`` lines of the package and native sources: what the measured
    prh_fast had on top of the recorded revision (empty where git is not available)."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--", "prh_fast", "csrc"],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if line.strip()]


def _f(v, fmt):
    if v is None:
        return ""
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return format(v, fmt)


def markdown(headers: list, rows: list) -> str:
    """A markdown table from ``headers`` and rows of already formatted cells."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _value(v) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.item())
    return float(v)


def _diff(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b)


def _normalised(x):
    from prh_fast.prepare import normalize_rows

    return normalize_rows(x.float())


# --------------------------------------------------------------------------------------------
# sections


def section_reference(args, ref, stubbed: bool) -> dict:
    """Every reference metric on one pair against ``prh_fast.metrics``."""
    from prh_fast import metrics
    from prh_fast.profile import paired_features

    x, y = paired_features(args.n, 1, args.d, seed=0)
    A, B = _normalised(x[:, 0]), _normalised(y[:, 0])
    rows, notes = [], []
    for m in args.metrics:
        kw = {"topk": args.topk} if "knn" in m else {}
        fast = getattr(metrics, m)
        res = interleaved({"reference": lambda: ref.metrics.AlignmentMetrics.measure(m, A, B,
                                                                                     **kw),
                           "prh_fast": lambda: fast(A, B, **kw)}, args.repeats)
        r, p = res["reference"], res["prh_fast"]
        row = {"metric": m, "N": args.n, "D": args.d, "kwargs": kw, "note": ""}
        if m == "svcca":
            row["note"] = SVCCA_NOTE
        if m == "edit_distance_knn" and stubbed:
            row["note"] = "reference ran against the torchaudio stand-in (see notes)"
        if "error" in p:
            row["error"] = f"prh_fast failed: {p['error']}"
        elif "error" in r:
            row["error"] = f"reference failed: {r['error']}"
        else:
            rv, pv = _value(r["value"]), _value(p["value"])
            row.update(reference_s=r["seconds"], prh_fast_s=p["seconds"],
                       speedup=r["seconds"] / p["seconds"], reference_value=rv,
                       prh_fast_value=pv, abs_diff=_diff(rv, pv),
                       reference_times=r["times"], prh_fast_times=p["times"])
        rows.append(row)
    if stubbed:
        notes += ref.stubs
    if any("knn" in m for m in args.metrics):
        notes.append("kNN lists: the reference ranks float32 scores with argsort (near-ties in "
                     "any order), prh_fast by float64 scores with ties to the lower index, so a "
                     "few rows' lists can differ; that is the abs diff of the list metrics")
    table = markdown(
        ["metric", "reference (s)", "prh_fast (s)", "prh_fast speed-up", "reference value",
         "prh_fast value", "abs diff", "note"],
        [[r["metric"], r.get("error", "")] + [""] * 6 if "error" in r else
         [r["metric"], _f(r["reference_s"], ".3f"), _f(r["prh_fast_s"], ".4f"),
          _f(r["speedup"], ".1f") + "x", _f(r["reference_value"], ".6f"),
          _f(r["prh_fast_value"], ".6f"), _f(r["abs_diff"], ".1e"), r["note"]] for r in rows])
    title = f"One pair, N = {args.n}, D = {args.d}, topk = {args.topk}: the paper's reference"
    return {"title": title, "rows": rows, "notes": notes, "table": table}


def _reference_loop(ref_metrics, x_feats, y_feats, metric, topk, normalize=True):
    """The reference's layer-grid loop (``compute_score``'s steps) over
    ``AlignmentMetrics.measure``, for checkouts whose ``measure_alignment`` does not import."""
    import torch.nn.functional as F

    best, pair = 0, None
    for i in range(x_feats.shape[1]):
        for j in range(y_feats.shape[1]):
            x, y = x_feats[:, i, :], y_feats[:, j, :]
            if normalize:
                x, y = F.normalize(x, p=2, dim=-1), F.normalize(y, p=2, dim=-1)
            kw = {"topk": topk} if "knn" in metric else {}
            score = ref_metrics.AlignmentMetrics.measure(metric, x, y, **kw)
            if score > best:
                best, pair = score, (i, j)
    return best, pair


def section_grid(args, ref) -> dict:
    """A layer grid: the reference's loop against ``prh_fast.align``."""
    from prh_fast.profile import paired_features

    L = args.grid_layers
    x_feats, y_feats = paired_features(args.grid_n, L, args.grid_d, seed=1)
    notes = []
    if ref.measure_alignment is not None:
        ran = "measure_alignment.compute_score"

        def reference(m):
            return ref.measure_alignment.compute_score(x_feats, y_feats, m, args.topk, True)
    else:
        ran = "loop over AlignmentMetrics.measure"
        notes.append(f"grid: the reference's measure_alignment did not import "
                     f"({ref.measure_alignment_error}); its compute_score loop was reproduced "
                     "over AlignmentMetrics.measure")

        def reference(m):
            return _reference_loop(ref.metrics, x_feats, y_feats, m, args.topk)

    def fast(m):
        res = prh_fast.align(x_feats, y_feats, m, topk=args.topk)
        return res.best_score, res.best_pair

    rows = []
    for m in args.grid_metrics:
        res = interleaved({"reference": lambda: reference(m), "prh_fast": lambda: fast(m)},
                          args.repeats)
        r, p = res["reference"], res["prh_fast"]
        row = {"metric": m, "grid": f"{L}x{L}", "N": args.grid_n, "D": args.grid_d,
               "reference_ran": ran}
        if "error" in r or "error" in p:
            row["error"] = (f"reference failed: {r['error']}" if "error" in r
                            else f"prh_fast failed: {p['error']}")
        else:
            rb, pb = r["value"], p["value"]
            rpair = tuple(rb[1]) if rb[1] is not None else None
            ppair = tuple(pb[1]) if pb[1] is not None else None
            row.update(reference_s=r["seconds"], prh_fast_s=p["seconds"],
                       speedup=r["seconds"] / p["seconds"],
                       reference_best=[_value(rb[0]), rpair], prh_fast_best=[float(pb[0]), ppair],
                       same_pair=rpair == ppair, best_abs_diff=_diff(_value(rb[0]), float(pb[0])),
                       reference_times=r["times"], prh_fast_times=p["times"])
        rows.append(row)
    table = markdown(
        ["metric", "grid", "reference ran", "reference (s)", "prh_fast (s)", "prh_fast speed-up",
         "best pair (ref / prh_fast)", "best score abs diff"],
        [[r["metric"], r["grid"], r["reference_ran"], r["error"], "", "", "", ""]
         if "error" in r else
         [r["metric"], r["grid"], r["reference_ran"], _f(r["reference_s"], ".2f"),
          _f(r["prh_fast_s"], ".3f"), _f(r["speedup"], ".1f") + "x",
          f"{r['reference_best'][1]} / {r['prh_fast_best'][1]}"
          + ("" if r["same_pair"] else " (DIFFERENT)"), _f(r["best_abs_diff"], ".1e")]
         for r in rows])
    title = (f"Layer grid {L} x {L}, N = {args.grid_n}, D = {args.grid_d}, topk = {args.topk}: "
             "the reference's loop")
    return {"title": title, "rows": rows, "notes": notes, "table": table}


def drop_self(idx: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, k]`` lists from ``[N, k + 1]`` self-inclusive ones: each row loses its own index,
    or its last entry when its own index is not among them (exact duplicates can push it out).

    Example:
        >>> drop_self(torch.tensor([[0, 2, 1], [2, 0, 1]]), 2).tolist()
        [[2, 1], [2, 0]]
    """
    n = idx.shape[0]
    own = idx == torch.arange(n, dtype=idx.dtype).unsqueeze(1)
    keep = ~own
    keep[:, -1] &= own.any(dim=1)
    return idx[keep].reshape(n, k)


def _torch_dense_knn(X: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    out = torch.empty(X.shape[0], k, dtype=torch.int64)
    for s in range(0, X.shape[0], chunk):
        S = X[s:s + chunk] @ X.T
        r = torch.arange(S.shape[0])
        S[r, s + r] = float("-inf")
        out[s:s + chunk] = S.topk(k, dim=1).indices
    return out


def agreement(X: torch.Tensor, mine: torch.Tensor, exact: torch.Tensor) -> dict:
    """How ``mine`` agrees with the exact lists: identical rows, same sets, and rows that
    differ only where float64 scores are within float32 rounding (near-ties)."""
    equal = (mine == exact).all(dim=1)
    same_set = (mine.sort(dim=1).values == exact.sort(dim=1).values).all(dim=1)
    rows = (~equal).nonzero().squeeze(1)
    ties = 0
    if rows.numel():
        X64 = X.double()
        q = X64[rows].unsqueeze(1)
        s_mine = (q * X64[mine[rows]]).sum(-1).sort(dim=1).values
        s_exact = (q * X64[exact[rows]]).sum(-1).sort(dim=1).values
        # float32 products of unit rows carry ~D * 2^-24 of rounding; score gaps below that
        # are ties to a float32 search
        tol = X.shape[1] * 2.0 ** -24
        ties = int(((s_mine - s_exact).abs().amax(dim=1) <= tol).sum())
    n = X.shape[0]
    return {"rows_equal": float(equal.float().mean()), "rows_same_set": float(
        same_set.float().mean()), "rows_differing": int(n - int(equal.sum())),
        "rows_differing_within_rounding": ties}


def section_knn(args) -> dict:
    """Exact self kNN against scikit-learn, faiss-cpu and dense torch."""
    from prh_fast.knn import knn
    from prh_fast.profile import paired_features

    n, d, k = args.knn_n, args.knn_d, args.topk
    X = _normalised(paired_features(n, 1, d, seed=2)[0][:, 0]).contiguous()
    Xn = X.numpy()
    fns = {"prh_fast.knn.knn": lambda: knn(X, k)}
    skipped, notes = [], []
    if importlib.util.find_spec("sklearn") is not None:
        from sklearn.neighbors import NearestNeighbors

        def sk():
            nn = NearestNeighbors(n_neighbors=k + 1, algorithm="brute", metric="cosine").fit(Xn)
            return drop_self(torch.from_numpy(nn.kneighbors(Xn, return_distance=False)), k)

        fns["scikit-learn NearestNeighbors(brute, cosine)"] = sk
    else:
        skipped.append(("scikit-learn NearestNeighbors(brute, cosine)",
                        "scikit-learn is not installed (pip install scikit-learn)"))
    faiss_threads = None
    if importlib.util.find_spec("faiss") is not None:
        import faiss

        faiss_threads = faiss.omp_get_max_threads()

        def fa():
            index = faiss.IndexFlatIP(d)
            index.add(Xn)
            _, I = index.search(Xn, k + 1)
            return drop_self(torch.from_numpy(I).long(), k)

        fns["faiss-cpu IndexFlatIP"] = fa
    else:
        skipped.append(("faiss-cpu IndexFlatIP", "faiss is not installed (pip install faiss-cpu)"))
    fns["torch mm + topk (dense, chunked)"] = lambda: _torch_dense_knn(X, k, args.torch_chunk)
    res = interleaved(fns, args.repeats)
    base = res["prh_fast.knn.knn"]
    if "error" in base:
        raise RuntimeError(f"prh_fast.knn.knn failed: {base['error']}")
    exact = base["value"]
    rows = []
    for name, r in res.items():
        row = {"method": name, "N": n, "D": d, "k": k}
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update(seconds=r["seconds"], times=r["times"],
                       prh_fast_speedup=r["seconds"] / base["seconds"],
                       **agreement(X, r["value"], exact))
        rows.append(row)
    rows += [{"method": name, "N": n, "D": d, "k": k, "skipped": why} for name, why in skipped]
    notes.append("lists compared with prh_fast's exact lists (float64 ranking, ties to the lower "
                 "index); 'within rounding' counts differing rows whose float64 scores agree to "
                 "D * 2^-24 (near-ties a float32 search may order either way)")
    if faiss_threads is not None:
        notes.append(f"faiss threads: {faiss_threads}; torch threads: {torch.get_num_threads()}")
    table = markdown(
        ["method", "time (s)", "prh_fast speed-up", "lists identical", "same sets",
         "differing rows (within rounding)"],
        [[r["method"], f"skipped: {r['skipped']}", "", "", "", ""] if "skipped" in r else
         [r["method"], f"failed: {r['error']}", "", "", "", ""] if "error" in r else
         [r["method"], _f(r["seconds"], ".3f"), _f(r["prh_fast_speedup"], ".2f") + "x",
          _f(100 * r["rows_equal"], ".2f") + "%", _f(100 * r["rows_same_set"], ".2f") + "%",
          f"{r['rows_differing']} ({r['rows_differing_within_rounding']})"] for r in rows])
    title = f"Exact self kNN, N = {n}, D = {d}, k = {k}, normalised float32 rows, self excluded"
    return {"title": title, "rows": rows, "notes": notes, "table": table}


def dense_cka(A: torch.Tensor, B: torch.Tensor, dtype) -> float:
    """Linear CKA from dense centred ``N x N`` kernels:
    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with ``HSIC(K, L) = <HKH, HLH>``.

    Example:
        >>> A = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
        >>> round(dense_cka(A, 2 * A, torch.float64), 6)
        1.0
    """
    A, B = A.to(dtype), B.to(dtype)

    def centred(F_):
        K = F_ @ F_.T
        return K - K.mean(0, keepdim=True) - K.mean(1, keepdim=True) + K.mean()

    Kc, Lc = centred(A), centred(B)
    return float((Kc * Lc).sum() / torch.sqrt((Kc * Kc).sum() * (Lc * Lc).sum()))


def section_cka(args) -> dict:
    """Linear CKA against dense ``N x N`` implementations."""
    from prh_fast import metrics
    from prh_fast.profile import paired_features

    x, y = paired_features(args.cka_n, 1, args.d, seed=3)
    A, B = _normalised(x[:, 0]), _normalised(y[:, 0])
    res = interleaved({"prh_fast.metrics.cka": lambda: metrics.cka(A, B),
                       "dense torch float32": lambda: dense_cka(A, B, torch.float32),
                       "dense torch float64": lambda: dense_cka(A, B, torch.float64)},
                      args.repeats)
    base = res["prh_fast.metrics.cka"]
    if "error" in base:
        raise RuntimeError(f"prh_fast.metrics.cka failed: {base['error']}")
    truth = res["dense torch float64"].get("value")
    rows = []
    for name, r in res.items():
        row = {"implementation": name, "N": args.cka_n, "D": args.d}
        if "error" in r:
            row["error"] = r["error"]
        else:
            row.update(seconds=r["seconds"], times=r["times"], value=float(r["value"]),
                       prh_fast_speedup=r["seconds"] / base["seconds"],
                       abs_diff_vs_float64=None if truth is None else abs(r["value"] - truth))
        rows.append(row)
    table = markdown(
        ["implementation", "time (s)", "prh_fast speed-up", "value", "abs diff vs dense float64"],
        [[r["implementation"], f"failed: {r['error']}", "", "", ""] if "error" in r else
         [r["implementation"], _f(r["seconds"], ".3f"), _f(r["prh_fast_speedup"], ".1f") + "x",
          _f(r["value"], ".6f"), _f(r["abs_diff_vs_float64"], ".1e")] for r in rows])
    title = f"Linear CKA, N = {args.cka_n}, D = {args.d}: dense N x N centred kernels"
    notes = ["prh_fast divides by sqrt(HSIC(K,K) HSIC(L,L)) + 1e-6, as the reference; the dense "
             "versions have no epsilon"]
    return {"title": title, "rows": rows, "notes": notes, "table": table}


# --------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default=None, help="checkout of the reference repository")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--n", type=int, default=4096, help="samples of the one-pair section")
    p.add_argument("--d", type=int, default=768, help="width of the one-pair and CKA sections")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--metrics", nargs="+", choices=REFERENCE_METRICS,
                   default=list(REFERENCE_METRICS), help="metrics of the one-pair section")
    p.add_argument("--grid-n", type=int, default=1024)
    p.add_argument("--grid-d", type=int, default=768)
    p.add_argument("--grid-layers", type=int, default=8)
    p.add_argument("--grid-metrics", nargs="+", choices=("mutual_knn", "cka", "cknna"),
                   default=["mutual_knn"])
    p.add_argument("--knn-n", type=int, default=16384)
    p.add_argument("--knn-d", type=int, default=768)
    p.add_argument("--torch-chunk", type=int, default=2048,
                   help="query rows per product of the dense torch search")
    p.add_argument("--cka-n", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes, one round (a smoke test, not a measurement)")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.n = args.grid_n = args.knn_n = args.cka_n = 256
        args.d = args.grid_d = args.knn_d = 64
        args.grid_layers, args.repeats = 2, 1
    if args.repeats < 1:
        p.error("--repeats: expected an integer >= 1")
    return args


def main(argv=None) -> int:
    from prh_fast._threads import wait_policy

    args = parse_args(argv)
    t_start = time.perf_counter()
    changes_at_start = worktree_changes()
    sections, notes = {}, []
    ref, ref_error, stubbed = None, None, False
    if {"reference", "grid"} & set(args.sections):
        if args.against is None:
            ref_error = "no --against checkout given"
        else:
            from prh_fast.profile import load_reference

            try:
                ref = load_reference(args.against)  # stands in for torchaudio if missing
            except Exception as exc:
                ref_error = f"the reference did not load: {exc}"
        stubbed = bool(ref is not None and ref.stubs)
        notes += ref.stubs if stubbed else ["torchaudio: the installed one (no stand-in)"]
    runners = {"reference": lambda: section_reference(args, ref, stubbed),
               "grid": lambda: section_grid(args, ref),
               "knn": lambda: section_knn(args), "cka": lambda: section_cka(args)}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        if name in ("reference", "grid") and ref is None:
            sections[name] = {"skipped": ref_error, "rows": []}
            print(f"\n## {name}: skipped: {ref_error}", flush=True)
            continue
        before = loadavg()
        t0 = time.perf_counter()
        sec = runners[name]()
        sec.update(load_before=before, load_after=loadavg(),
                   wall_s=round(time.perf_counter() - t0, 1))
        sections[name] = sec
        print(f"\n## {sec['title']}\n\n{sec['table']}\n", flush=True)
        for line in sec["notes"]:
            print(f"- {line}")
        print(f"- load average (1/5/15 min): {sec['load_before']} before, {sec['load_after']} "
              f"after; medians of {args.repeats} interleaved runs after a warm-up run "
              f"({sec['wall_s']} s)", flush=True)
    notes.append("OpenMP wait policy: {} ({})".format(*wait_policy()))
    rows = [dict(r, section=name) for name, sec in sections.items() for r in sec["rows"]]
    text = "\n\n".join(f"## {s['title']}\n\n{s['table']}" for s in sections.values()
                       if "table" in s)
    path = write_json("bench_compare", {
        "benchmark": "compare", "env": environment(), "args": vars(args),
        "reference": None if ref is None else str(ref.path), "torchaudio_stub": stubbed,
        "worktree_changes_at_start": changes_at_start, "omp_wait_policy": wait_policy(),
        "notes": notes, "sections": sections, "rows": rows, "table": text,
        "wall_s": round(time.perf_counter() - t_start, 1)}, args.out)
    for line in notes:
        print(f"note: {line}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
