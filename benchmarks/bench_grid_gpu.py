"""The layer grid of mutual_knn on one GPU: 33 layers (D = 4096) x 25 layers (D = 1024) at
N = 1,048,576 samples, one layer on the GPU at a time.

    python -m benchmarks.bench_grid_gpu                                # the full grid (long)
    python -m benchmarks.bench_grid_gpu --n 65536                      # all 825 pairs, small N
    python -m benchmarks.bench_grid_gpu --layers 1 1 --replicate-to 33 25   # N = 2^20, 2 layers
    python -m benchmarks.bench_grid_gpu --device cpu --small           # logic only (interpreter)

Pipeline (prh_fast's grid: neighbour lists computed once per layer, reused by every pair):

1. A latent ``[N, 32]`` shared by every layer is drawn on the device. For each layer of model X
   then of model Y, the layer's features are generated on the device
   (``prh_fast.testing.layer_features``: ``normalize(tanh(z W_l) + noise_l·eps)``, noise growing
   with depth,
   so neighbour lists share structure and the alignment varies over the grid), its kNN lists
   are computed (``prh_fast.knn``: the fused Triton search, exact unless ``--fast``), copied to
   host memory (``--cache host``, pinned) or to ``.npy`` files (``--cache disk``), and the layer
   is freed. With ``--cache disk`` a rerun with the same settings reuses the files (resume).
2. The lists go to the device (``[Lx, N, k]``, ``[Ly, N, k]`` int64) and all ``Lx·Ly`` pair
   scores come from one launch of the CUDA neighbour-set kernel
   (``metrics._neighbours.neighbour_scores_cuda``; the native CPU kernel on ``--device cpu``):
   ``mutual_knn = mean_i |A_i ∩ B_i| / k``.
3. Checks: ``--check-pairs`` pairs against the native CPU kernel on the cached lists (equal),
   and the first layer of each model on a row sample against the float64 lists (exact mode:
   equal on every sampled row).

Reported: wall time per phase and per layer, peak GPU memory beyond the layer in hand (kNN) and
beyond the lists (scores), the score matrix. ``--replicate-to LX LY`` scores the computed
layers' lists repeated to ``LX x LY`` layers (flagged): the scoring phase at full size when
only a few layers' kNN fit in the time at hand. ``projection`` = measured mean kNN seconds per
layer x the full layer counts + the measured scoring time: a projection, labelled as such.
Layers that do not fit before ``--deadline`` / ``--budget`` are skipped and recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (interpreter)")
    p.add_argument("--small", action="store_true",
                   help="tiny grid (N 160, 2 x 2 layers, D 16/8, k 4) to test the logic")
    p.add_argument("--n", type=int, default=None, help="samples (default 1,048,576)")
    p.add_argument("--layers", type=int, nargs=2, default=None, metavar=("LX", "LY"))
    p.add_argument("--dims", type=int, nargs=2, default=None, metavar=("DX", "DY"))
    p.add_argument("--k", type=int, default=None, help="neighbours (default 10)")
    p.add_argument("--fast", action="store_true", help="knn exact=False (approximate lists)")
    p.add_argument("--precision", default=None, help="knn precision= (default: library's)")
    p.add_argument("--knn-backend", default=None,
                   help="knn backend (default triton; on --device cpu: triton when "
                        "TRITON_INTERPRET=1 is set by --small, else cpu)")
    p.add_argument("--cache", choices=["host", "disk"], default="host")
    p.add_argument("--cache-dir", default=None, help="--cache disk folder (default: a temp dir)")
    p.add_argument("--replicate-to", type=int, nargs=2, default=None, metavar=("LX", "LY"),
                   help="score the computed layers repeated to LX x LY layers (flagged); also "
                        "the layer counts of the projection")
    p.add_argument("--memory-budget", type=int, default=1 << 30)
    p.add_argument("--check-rows", type=int, default=None)
    p.add_argument("--check-pairs", type=int, default=4)
    p.add_argument("--deadline", type=float, default=None, help="Unix time to finish by")
    p.add_argument("--budget", type=float, default=None, help="seconds to finish within")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--name", default=None, help="JSON name (default bench_grid_gpu)")
    a = p.parse_args(argv)
    s = a.small
    a.n = a.n or (160 if s else 1048576)
    a.layers = a.layers or ([2, 2] if s else [33, 25])
    a.dims = a.dims or ([16, 8] if s else [4096, 1024])
    a.k = a.k or (4 if s else 10)
    a.check_rows = a.check_rows or (32 if s else 512)
    a.name = a.name or ("bench_grid_gpu_small" if s else "bench_grid_gpu")
    return a


def main(argv=None) -> int:
    args = _args(sys.argv[1:] if argv is None else argv)
    if args.device == "cpu" and args.small:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    import numpy as np
    import torch

    from benchmarks._gpu import (
        LATENT,
        Deadline,
        cuda_env,
        list_check,
        oracle_lists,
        reset_peak,
        sync,
    )
    from benchmarks._harness import environment, write_json
    from prh_fast import _native
    from prh_fast.knn import knn
    from prh_fast.metrics._neighbours import neighbour_scores, neighbour_scores_cuda
    from prh_fast.testing import latent, layer_features

    dev = torch.device(args.device)
    on_gpu = dev.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu --small to test the script's logic")
        return 2
    backend = args.knn_backend or (
        "triton" if on_gpu or os.environ.get("TRITON_INTERPRET") == "1" else "cpu")
    deadline = Deadline(args.deadline, args.budget)
    n, k = args.n, args.k
    models = [("X", args.layers[0], args.dims[0]), ("Y", args.layers[1], args.dims[1])]
    payload = {"benchmark": "grid_gpu", "env": environment(), "gpu": cuda_env(dev),
               "args": vars(args), "knn_backend": backend, "exact": not args.fast,
               "layers": [], "scores": None, "checks": {}, "checks_passed": None}

    def save():
        write_json(args.name, payload, args.out)

    cache_dir = None
    if args.cache == "disk":
        cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="prh_grid_"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        meta = {key: getattr(args, key) for key in ("n", "dims", "k", "fast", "precision",
                                                    "seed")}
        meta_path = cache_dir / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
            for f in cache_dir.glob("*.npy"):  # lists of other settings: not reusable
                f.unlink()
        meta_path.write_text(json.dumps(meta))
        payload["cache_dir"] = str(cache_dir)

    if on_gpu:  # compile the search's kernels outside the per-layer times
        for d in args.dims:
            w = torch.nn.functional.normalize(torch.randn(4096, d, device=dev), dim=1)
            knn(w, k, backend=backend, exact=not args.fast, precision=args.precision,
                memory_budget=args.memory_budget)
        del w
        sync(dev)
    t_all = time.perf_counter()
    z = latent(n, 32, seed=args.seed, device=dev, **LATENT)
    lists: dict = {"X": [], "Y": []}
    host = {}
    if args.cache == "host":
        for name, L, _ in models:
            host[name] = torch.empty((L, n, k), dtype=torch.int64,
                                     pin_memory=on_gpu)
    for name, L, d in models:
        for layer in range(L):
            rec = {"model": name, "layer": layer, "D": d}
            path = cache_dir / f"{name}_{layer:03d}.npy" if cache_dir else None
            if path is not None and path.exists():
                lists[name].append(np.load(path, mmap_mode="r"))
                payload["layers"].append(dict(rec, status="cached"))
                continue
            done = [r for r in payload["layers"] if r.get("model") == name
                    and r.get("status") == "ok"]
            guess = max((r["knn_seconds"] for r in done), default=0.0) * 1.2
            if deadline.left() < guess + 15:
                payload["layers"].append(dict(rec, status="skipped", reason="deadline"))
                continue
            noise = 0.35 + 0.9 * layer / max(1, L - 1)  # deeper layers: noisier
            t0 = time.perf_counter()
            base0 = reset_peak(dev)
            X = layer_features(z, d, seed=args.seed * 1000 + (0 if name == "X" else 500) + layer,
                               noise=noise)
            sync(dev)
            t1 = time.perf_counter()
            gen_peak = torch.cuda.max_memory_allocated(dev) if on_gpu else 0
            base = reset_peak(dev)
            idx = knn(X, k, backend=backend, exact=not args.fast, precision=args.precision,
                      memory_budget=args.memory_budget)
            sync(dev)
            t2 = time.perf_counter()
            if on_gpu:
                rec["layer_gib"] = X.numel() * X.element_size() / 2**30
                rec["knn_extra_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
                rec["generate_extra_gib"] = (gen_peak - base0) / 2**30 - rec["layer_gib"]
            if layer == 0:  # the first layer of each model: exact lists on a row sample
                rows = torch.linspace(0, n - 1, min(n, args.check_rows),
                                      device=dev).long().unique()
                r64, r32 = oracle_lists(X, rows, k, exclude_self=True)
                c = list_check(idx[rows], r64, r32, X, rows)
                c["passed"] = c["rows_equal_fp64"] == c["sample_rows"] if not args.fast else None
                payload["checks"][f"knn_{name}0"] = c
            if args.cache == "host":
                host[name][layer].copy_(idx)
                lists[name].append(host[name][layer])
            else:
                np.save(path, idx.cpu().numpy())
                lists[name].append(np.load(path, mmap_mode="r"))
            t3 = time.perf_counter()
            del X, idx
            if on_gpu:
                torch.cuda.empty_cache()
            rec.update(status="ok", noise=noise, generate_seconds=t1 - t0,
                       knn_seconds=t2 - t1, cache_seconds=t3 - t2)
            payload["layers"].append(rec)
            print(f"  {name}{layer:<3} D={d}: generate {t1 - t0:.2f} s, knn {t2 - t1:.2f} s, "
                  f"cache {t3 - t2:.2f} s", flush=True)
            save()
    del z

    # ---- scores of every pair
    got = {name: len(lists[name]) for name, _, _ in models}
    if not all(got.values()):
        payload["scores"] = {"status": "skipped", "reason": "no layer of one model was done"}
        save()
        print("no complete layer pair: nothing to score")
        return 1

    def stacked(name):
        if args.cache == "host":
            return host[name][:got[name]]
        return torch.from_numpy(np.stack([np.asarray(a) for a in lists[name]]))

    A_host, B_host = stacked("X"), stacked("Y")
    rep = args.replicate_to
    if rep is not None:
        ia = torch.arange(rep[0]) % A_host.shape[0]
        ib = torch.arange(rep[1]) % B_host.shape[0]
    t0 = time.perf_counter()
    A = (A_host if rep is None else A_host[ia]).to(dev)
    B = (B_host if rep is None else B_host[ib]).to(dev)
    sync(dev)
    t1 = time.perf_counter()
    base = reset_peak(dev)
    if on_gpu and _native.HAS_CUDA_KERNELS:
        setops = "cuda"
        w = torch.arange(1024 * k, device=dev).view(1, 1024, k) % 1024
        neighbour_scores_cuda("mutual", w, w)  # the first launch (module load) outside
        sync(dev)
        t2 = time.perf_counter()
        raw = neighbour_scores_cuda("mutual", A, B)
        sync(dev)
        raw = raw.cpu()
    else:
        setops = "cpu" if dev.type == "cpu" and _native.HAS_NATIVE else "torch"
        t2 = time.perf_counter()
        raw = neighbour_scores("mutual", A, B)
    t3 = time.perf_counter()
    scores = raw / k
    sc = {"status": "ok", "setops": setops, "pairs": int(A.shape[0] * B.shape[0]),
          "layers": [int(A.shape[0]), int(B.shape[0])], "replicated": rep is not None,
          "to_device_seconds": t1 - t0, "seconds": t3 - t2,
          "mutual_knn": scores.tolist(), "mean": float(scores.mean()),
          "min": float(scores.min()), "max": float(scores.max()), "chance": k / (n - 1)}
    if on_gpu:
        sc["lists_gib"] = (A.numel() + B.numel()) * 8 / 2**30
        sc["extra_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**30
        sc["note"] = ("extra_gib counts torch's allocator only; the kernel's own per-pair "
                      "counters (cudaMallocAsync, 8 bytes a pair) are not in it")
    payload["scores"] = sc
    del A, B

    # ---- pairs against the native CPU kernel
    g = torch.Generator().manual_seed(1)
    la, lb = scores.shape
    pairs = {(0, 0), (la - 1, lb - 1)}
    while len(pairs) < min(args.check_pairs, la * lb):
        pairs.add((int(torch.randint(0, la, (1,), generator=g)),
                   int(torch.randint(0, lb, (1,), generator=g))))
    mism = []
    for p, q in sorted(pairs):
        pa = int(ia[p]) if rep is not None else p
        qb = int(ib[q]) if rep is not None else q
        want = float(neighbour_scores("mutual", A_host[pa:pa + 1].contiguous(),
                                      B_host[qb:qb + 1].contiguous())[0, 0])
        if want != float(raw[p, q]):
            mism.append({"pair": [p, q], "got": float(raw[p, q]), "want": want})
    payload["checks"]["pairs_vs_cpu"] = {"pairs": len(pairs), "mismatches": mism,
                                         "passed": not mism}
    payload["wall_seconds"] = time.perf_counter() - t_all

    ok = [r for r in payload["layers"] if r.get("status") == "ok"]
    proj = {}
    for name, L_full, _ in models:
        per = [r["knn_seconds"] + r["generate_seconds"] for r in ok if r["model"] == name]
        if per:
            proj[name] = {"layers_measured": len(per), "mean_layer_seconds": sum(per) / len(per),
                          "layers_full": L_full}
    full = args.replicate_to or args.layers
    for (name, _, _), L_full in zip(models, full):
        if name in proj:
            proj[name]["layers_full"] = L_full
    if len(proj) == 2:
        full_pairs = full[0] * full[1]
        score_s = sc["seconds"] * (full_pairs / sc["pairs"])
        payload["projection"] = {
            "what": "projection, not a measurement: measured mean seconds per layer "
                    "(generate + kNN) x the full layer counts, plus the scoring time scaled "
                    "by pairs",
            "layers": list(full), "n": n, "per_model": proj, "scores_seconds": score_s,
            "seconds": sum(v["mean_layer_seconds"] * v["layers_full"] for v in proj.values())
            + score_s}
    if on_gpu:
        knn_extra = [r["knn_extra_gib"] for r in ok]
        payload["peak"] = {"layer_gib_max": max((r["layer_gib"] for r in ok), default=None),
                           "knn_extra_gib_max": max(knn_extra, default=None),
                           "scores_extra_gib": sc.get("extra_gib")}
    checks = [c.get("passed") for c in payload["checks"].values()]
    payload["checks_passed"] = all(c is not False for c in checks)
    save()
    print(f"layers done: X {got['X']}/{args.layers[0]}, Y {got['Y']}/{args.layers[1]}; "
          f"{sc['pairs']} pair scores ({setops}{', replicated layers' if rep else ''}) in "
          f"{sc['seconds']:.3f} s; mutual_knn mean {sc['mean']:.4f} (min {sc['min']:.4f}, max "
          f"{sc['max']:.4f}; chance {sc['chance']:.2e})")
    if "peak" in payload:
        pk = payload["peak"]
        print(f"peak GPU memory beyond the layer in hand: {pk['knn_extra_gib_max']:.2f} GiB "
              f"(layer {pk['layer_gib_max']:.2f} GiB); scoring beyond the lists: "
              f"{pk['scores_extra_gib']:.2f} GiB")
    if "projection" in payload:
        print(f"projected full grid (not measured): {payload['projection']['seconds']:.0f} s")
    print(f"wall {payload['wall_seconds']:.1f} s; checks_passed: {payload['checks_passed']}")
    return 0 if payload["checks_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
