"""Command line: ``prh-fast info | example | align | bench | extract | demo | store``.

Every subcommand runs through :func:`main`, which turns the errors a user can act on (a bad
argument value, a missing or corrupt input file, mismatched samples, a missing optional
package) into one line ``<prog>: error: ...`` and exit status 2, and lets anything else (a bug)
raise with its traceback. ``PRH_FAST_TRACEBACK=1`` shows the traceback of user errors too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from prh_fast._cli_common import (  # noqa: F401  (re-exported: prh_fast.cli's names)
    _about,
    _exit_code,
    _int_type,
    _one_line,
    _quantile,
    _run,
    _UserError,
    check_device,
    check_output_folder,
    nonnegative_int,
    positive_int,
)
from prh_fast.errors import InputError


def _cmd_info(args) -> int:
    from prh_fast._info import collect, info

    if args.json:
        print(json.dumps(collect(), indent=2, default=str))
    else:
        info()
    return 0


def _cmd_example(args) -> int:
    """All eight metrics on synthetic paired features with shared structure."""
    import time

    import torch

    from prh_fast import metrics
    from prh_fast.demo import check_metric_settings

    n = args.n
    check_metric_settings(metrics.SUPPORTED_METRICS, n, args.topk, names=("--n", "--topk"))
    g = torch.Generator().manual_seed(args.seed)
    z = torch.randn(n, 16, generator=g)
    A = torch.tanh(z @ torch.randn(16, 256, generator=g)) + 0.3 * torch.randn(n, 256, generator=g)
    B = torch.relu(z @ torch.randn(16, 384, generator=g)) + 0.3 * torch.randn(n, 384, generator=g)
    A = torch.nn.functional.normalize(A, dim=1)
    B = torch.nn.functional.normalize(B, dim=1)
    Bn = torch.nn.functional.normalize(torch.randn(n, 384, generator=g), dim=1)
    print(f"paired features: N = {n}, Da = 256, Db = 384, topk = {args.topk}")
    print(f"{'metric':>18} {'paired':>9} {'unpaired':>9} {'time':>9}")
    for m in metrics.SUPPORTED_METRICS:
        kw = {"topk": args.topk} if ("knn" in m or m == "cknna") else {}
        t0 = time.perf_counter()
        s = metrics.measure(m, A, B, **kw)
        dt = time.perf_counter() - t0
        s0 = metrics.measure(m, A, Bn, **kw)
        print(f"{m:>18} {s:9.4f} {s0:9.4f} {dt * 1e3:7.1f}ms")
    return 0


def _discover(input_dir, pool, side):
    """Every ``*.pt`` file or store folder under ``input_dir`` whose name contains
    ``pool-<pool>`` (the reference's
    ``<input_dir>/<dataset>/<subset>/<model>_pool-<pool>_prompt-<bool>.pt``); all of them, with
    a note, when none does."""
    from pathlib import Path

    from prh_fast.store import INDEX_NAME

    if os.path.exists(input_dir) and not os.path.isdir(input_dir):
        raise _UserError(f"--input_dir {input_dir}: is a file, not a folder (feature files go "
                         f"to --x/--y)")
    if not os.path.isdir(input_dir):
        raise _UserError(f"--input_dir {input_dir}: no such folder (or give --x/--y files)")
    files = sorted([str(p) for p in Path(input_dir).rglob("*.pt")]
                   + [str(p.parent) for p in Path(input_dir).rglob(INDEX_NAME)])
    if not files:
        raise _UserError(f"--input_dir {input_dir}: no .pt feature files or store folders "
                         f"found")
    picked = [f for f in files if f"pool-{pool}" in os.path.basename(f)]
    if not picked:
        print(f"note: no file under {input_dir} has 'pool-{pool}' in its name; using all "
              f"{len(files)} .pt files for {side}")
        return files
    return picked


def _named(files) -> dict:
    """Model name -> file: the stem without the reference's ``_pool-<p>_prompt-<b>`` suffix
    (the plain stem when that would make two names equal)."""
    import re

    from prh_fast.grid import _names_for_paths

    stems = _names_for_paths(files)
    short = [re.sub(r"_pool-[^_/]+(_prompt-[^/]*)?$", "", s) or s for s in stems]
    names = short if len(set(short)) == len(short) else stems
    return dict(zip(names, files))


def _cmd_align(args) -> int:
    """The reference's measure_alignment.py over local feature files."""
    from prh_fast.distributed.launch import run_align_command  # torchrun: every rank

    return run_align_command(_align, args)


def _align(args) -> int:
    from prh_fast.distributed import align_models  # one process: prh_fast.grid's
    from prh_fast.grid import output_stem

    check_output_folder("--output_dir", args.output_dir)
    x_files = args.x or _discover(args.input_dir, args.pool_x, "x")
    y_files = args.y or _discover(args.input_dir, args.pool_y, "y")
    from prh_fast.store import is_store

    missing = [f for f in x_files + y_files if not (os.path.isfile(f) or is_store(f))]
    if missing:
        what = ("a folder but not a feature store (no index)" if os.path.isdir(missing[0])
                else "no such feature file")
        raise _UserError(f"{missing[0]}: {what}"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    out_dir = args.output_dir
    if not (args.x and args.y):
        # Keep runs of different modalities / pools apart, as the reference's folders do.
        out_dir = os.path.join(out_dir, f"{args.modality_x}_pool-{args.pool_x}_"
                                        f"{args.modality_y}_pool-{args.pool_y}")
    backend = _knn_backend(args.backend, args.knn_option)
    k = f" (topk {args.topk})" if "knn" in args.metric else ""
    print(f"{args.metric}{k}: {len(x_files)} x model(s) vs {len(y_files)} y model(s)")
    res = align_models(_named(x_files), _named(y_files), metric=args.metric,
                       topk=args.topk, q=None if args.q >= 1.0 else args.q,
                       exact=args.precise, output_dir=out_dir,
                       force_remake=args.force_remake, progress=not args.no_progress,
                       backend=backend, null_permutations=args.null_permutations,
                       trust=args.trust, stream=args.stream,
                       memory_budget=_memory_budget(args),
                       **({"ties": args.ties} if args.ties != "rule" else {}))
    print(res.table())
    ann = res.options.get("ann")
    if ann:
        p = ", ".join(f"{a}={v}" for a, v in ann["params"].items() if a != "backend")
        err = ann["mutual_knn_error_max"]
        print(f"approximate kNN {ann['backend']} ({p}): recall@{ann['k']} >= "
              f"{ann['recall_min']:.4f} on {ann['sample_size']} sampled rows; max "
              f"|mutual_knn(approx) - mutual_knn(exact)| over layer pairs = "
              + ("n/a" if err is None else f"{err:.4f}"))
    _print_ties(res)
    if res.null is not None:
        P = args.null_permutations
        print(f"best score against {P} shuffled pairings: permutation p-value "
              f"(b + 1) / (P + 1), smallest possible {1 / (P + 1):.3g}")
        from prh_fast.grid import GridResult

        p = GridResult(metric=res.metric, topk=res.topk, x_names=res.x_names,
                       y_names=res.y_names, scores=res.null["best_p"], indices=res.indices)
        print(p.table())
        print("null best score, mean [central 95%]:")
        for a, x in enumerate(res.x_names):
            for b, y in enumerate(res.y_names):
                nl = {f: res.null[f][a, b] for f in ("best_mean", "best_low", "best_high")}
                print(f"  {x} vs {y}: {nl['best_mean']:.4f} [{nl['best_low']:.4f}, "
                      f"{nl['best_high']:.4f}]")
    paths = res.paths(out_dir)
    written = [paths["npy"], paths["json"], paths["csv"]]
    if args.heatmap:
        from prh_fast.plots import plot_grid, plot_layers

        stem = output_stem(res.metric, res.topk)
        written.append(plot_grid(res, os.path.join(out_dir, stem + ".png")))
        layer_dir = os.path.join(out_dir, stem + "_layers")
        for (x, y), mat in res.pair_scores.items():
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{x}__{y}")
            plot_layers(mat, os.path.join(layer_dir, safe + ".png"), x, y, res.metric,
                        best_pair=res.best(x, y)[1], topk=res.topk)
        if res.pair_scores:
            written.append(os.path.join(layer_dir, "*.png") + f" ({len(res.pair_scores)})")
    t = res.timings
    if res.options.get("resumed_from"):
        print("existing result loaded (--force_remake recomputes):\n  "
              + "\n  ".join(written))
        return 0
    print(f"{t.get('computed', 0)} pair(s) scored, {t.get('mirrored', 0)} mirrored, "
          f"{t.get('total', 0.0):.2f} s")
    print("wrote:\n  " + "\n  ".join(written))
    return 0


def _print_ties(res) -> None:
    """One line per model whose lists the tie rule decides in part (``options["ties"]``)."""
    ties = res.options.get("ties")
    if not ties:
        return
    for name, layers in ties["models"].items():
        worst = max(layers, key=lambda t: t["tied_fraction"], default=None)
        if worst is None or worst["tied_fraction"] <= 0:
            continue
        rows = ("" if worst.get("distinct_rows") is None
                else f", {worst['distinct_rows']} distinct rows of {worst['n']}")
        print(f"ties: {name}: layer {worst['layer']} has {worst['tied_fraction']:.1%} of rows "
              f"with the k-th neighbour tied{rows}"
              + (" (scored as the expectation over tie breaks)" if ties["mode"] == "expected"
                 else ""))


def _memory_budget(args):
    """``--memory-budget``, or its deprecated name ``--stream-budget`` (with a notice on
    stderr); both is a usage error."""
    old = getattr(args, "stream_budget", None)
    if old is None:
        return args.memory_budget
    if args.memory_budget is not None:
        raise _UserError("--memory-budget: given together with --stream-budget, its former "
                         "name; pass --memory-budget only")
    print("prh-fast align: --stream-budget is deprecated, use --memory-budget (the same "
          "bytes of scratch memory)", file=sys.stderr)
    return old


def _knn_backend(backend, options):
    """``--backend`` plus ``--knn-option KEY=VALUE`` -> what ``align_models`` takes: the name
    (or spec string) as given, or an ``AnnParams`` when options are given."""
    from prh_fast.knn import AnnParams
    from prh_fast.knn._backends import ANN_BACKENDS, KNN_BACKENDS

    name = (backend or "").partition(":")[0].lower()
    if backend is not None and name not in KNN_BACKENDS:
        raise _UserError(f"--backend {backend}: expected one of {', '.join(KNN_BACKENDS)}")
    if not options:
        if backend is not None and ":" in backend:
            AnnParams.parse(backend)  # its options checked before any file is read
        return backend
    if name not in ANN_BACKENDS:
        raise _UserError(f"--knn-option: applies to --backend {' / '.join(ANN_BACKENDS)}, "
                         + (f"got --backend {backend}" if backend else "and no --backend is given"))

    sep = "," if ":" in backend else ":"
    return AnnParams.parse(backend + sep + ",".join(options))


def _cmd_bench(args) -> int:
    """Time prh_fast against a checkout of the reference implementation, side by side."""
    from prh_fast.profile import profile_against

    x = y = None
    if args.x or args.y:
        if not (args.x and args.y):
            raise _UserError("--x and --y: give both feature files, or neither")
        from prh_fast.store import load_features

        x = _as_nld(load_features(args.x)["feats"], args.x)
        y = _as_nld(load_features(args.y)["feats"], args.y)
        if x.shape[0] != y.shape[0]:
            raise _UserError(f"--x {args.x} has {x.shape[0]} samples but --y {args.y} has "
                             f"{y.shape[0]}; the metrics need the same (paired) samples")
    from prh_fast._names import SUPPORTED_METRICS
    from prh_fast.demo import check_metric_settings

    check_metric_settings(list(args.metrics or SUPPORTED_METRICS) + list(args.grid_metrics),
                          args.n if x is None else x.shape[0], args.topk,
                          names=("--n" if x is None else f"--x {args.x} samples", "--topk"))
    report = profile_against(args.against, x_feats=x, y_feats=y, n=args.n, d=args.d,
                             layers=args.layers, topk=args.topk, metrics=args.metrics,
                             grid_metrics=args.grid_metrics, repeats=args.repeats)
    src = f"{args.x} vs {args.y}" if args.x else (
        f"generated paired features N={args.n}, D={args.d}, {args.layers} layers")
    print(f"reference: {args.against}\nfeatures: {src}; topk {args.topk}\n")
    print(report.table())
    return 0


def _as_nld(feats, path):
    """Feature files hold [N, L, D] tensors or per-layer lists; profiling needs [N, L, D]."""
    import torch

    if isinstance(feats, (list, tuple)):
        if len({f.shape[1] for f in feats}) != 1:
            raise InputError(f"{path}: layers of different widths; profiling needs [N, L, D]")
        feats = torch.stack(list(feats), dim=1)
    return feats.float()


def build_parser() -> argparse.ArgumentParser:
    """The ``prh-fast`` parser with every subcommand."""
    p = argparse.ArgumentParser(prog="prh-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="what was built and what is usable here")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.set_defaults(func=_cmd_info)
    pe = sub.add_parser("example", help="all metrics on synthetic paired features")
    pe.add_argument("--n", type=positive_int, default=2048, help="samples")
    pe.add_argument("--topk", type=positive_int, default=10)
    pe.add_argument("--seed", type=_int_type(0, 2**64 - 1), default=0)
    pe.set_defaults(func=_cmd_example)
    from prh_fast._names import SUPPORTED_METRICS

    pa = sub.add_parser("align", help="align a grid of models' feature files "
                        "(the reference's measure_alignment.py)")
    pa.add_argument("--metric", default="mutual_knn", choices=SUPPORTED_METRICS)
    pa.add_argument("--topk", type=positive_int, default=10,
                    help="neighbours (the *knn metrics, cknna)")
    pa.add_argument("--pool_x", default="avg", help="pooling in the x files' names (pool-<p>)")
    pa.add_argument("--pool_y", default="cls", help="pooling in the y files' names (pool-<p>)")
    pa.add_argument("--modality_x", default="language", help="names the output folder")
    pa.add_argument("--modality_y", default="vision", help="names the output folder")
    pa.add_argument("--input_dir", default="./results/features",
                    help="folder searched for *.pt feature files and store folders")
    pa.add_argument("--output_dir", default="./results/alignment")
    pa.add_argument("--precise", action="store_true", help="exact outlier threshold")
    pa.add_argument("--trust", action="store_true",
                    help="resume from a reference-format .npy (a pickle: it can run code) when "
                         "no .json is beside it; only for files you wrote yourself")
    pa.add_argument("--force_remake", action="store_true",
                    help="recompute even if the output exists")
    pa.add_argument("--q", type=_quantile, default=0.95,
                    help="outlier clipping quantile; 1 disables clipping")
    pa.add_argument("--x", nargs="+", metavar="FILE",
                    help="x feature files or store folders (no discovery)")
    pa.add_argument("--y", nargs="+", metavar="FILE",
                    help="y feature files or store folders (no discovery)")
    pa.add_argument("--heatmap", action="store_true",
                    help="also write PNG heatmaps (grid and every pair's layers)")
    pa.add_argument("--null-permutations", type=nonnegative_int, default=0, metavar="P",
                    help="also score P shuffled pairings of the samples: permutation p-values "
                    "of the best scores (hundreds for a p-value below 0.01)")
    pa.add_argument("--ties", choices=["rule", "expected"], default="rule",
                    help="neighbour lists' exact ties at the k-th neighbour: 'rule' (the "
                    "reference: to the lower index) or 'expected' (mutual_knn only: the "
                    "expected score over random tie breaks)")
    pa.add_argument("--backend", "--knn-backend", default=None,
                    help="neighbour-search backend: auto, cpu, torch, faiss, triton, cuda, or "
                    "approximate faiss-ivf, faiss-ivfpq, faiss-hnsw")
    pa.add_argument("--knn-option", action="append", default=[], metavar="KEY=VALUE",
                    help="parameter of an approximate backend, repeatable: nlist, nprobe, "
                    "train_size, pq_m, pq_nbits, refine, hnsw_m, ef_construction, ef_search, "
                    "seed, recall_sample (FAISS's names m, nbits, M, efConstruction, efSearch "
                    "too)")
    pa.add_argument("--stream", choices=["auto", "on", "off"], default=None,
                    help="store folders: stream them instead of loading (default auto: "
                    "neighbour lists always, kernel metrics above 1 GiB; PRH_FAST_STREAM)")
    pa.add_argument("--memory-budget", type=positive_int, default=None, metavar="BYTES",
                    help="scratch memory: the streamed computations (default 512 MiB) and "
                    "CKA's kernel row blocks in memory (default 256 MiB)")
    # the former name of --memory-budget, still accepted (with a deprecation notice)
    pa.add_argument("--stream-budget", type=positive_int, default=None,
                    help=argparse.SUPPRESS)
    pa.add_argument("--no-progress", action="store_true", help="no progress bar")
    pa.set_defaults(func=_cmd_align)
    pb = sub.add_parser("bench", help="time prh_fast against a reference checkout, side by side")
    pb.add_argument("--against", required=True, metavar="PATH",
                    help="checkout of the reference repository (metrics.py, measure_alignment.py)")
    pb.add_argument("--x", metavar="FILE", help="x feature file (.pt); default: generated")
    pb.add_argument("--y", metavar="FILE", help="y feature file (.pt)")
    pb.add_argument("--n", type=positive_int, default=1024,
                    help="samples of the generated features")
    pb.add_argument("--d", type=positive_int, default=256, help="width of the generated features")
    pb.add_argument("--layers", type=positive_int, default=4,
                    help="layers of the generated features")
    pb.add_argument("--topk", type=positive_int, default=10)
    pb.add_argument("--metrics", nargs="+", choices=SUPPORTED_METRICS, default=None)
    pb.add_argument("--grid-metrics", nargs="+", choices=SUPPORTED_METRICS,
                    default=["mutual_knn"], help="metrics timed over the whole layer grid")
    pb.add_argument("--repeats", type=positive_int, default=3,
                    help="timed runs per measurement, after one warm-up run; the median is shown "
                         "(default 3)")
    pb.set_defaults(func=_cmd_bench)
    from prh_fast.cli_extract import add_parsers as _extract_parsers

    _extract_parsers(sub)
    from prh_fast.cli_store import add_parsers as _store_parsers

    _store_parsers(sub)
    for _, leaf in commands(p):
        leaf.set_defaults(_prog=leaf.prog)  # names the command in its one-line errors
    return p


def commands(parser=None):
    """``[(("store", "info"), subparser), ...]``: every runnable subcommand of ``parser``
    (default: :func:`build_parser`'s), nested ones by their full name."""
    parser = build_parser() if parser is None else parser
    out = []

    def walk(p, words):
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            if words:
                out.append((tuple(words), p))
            return
        seen = set()
        for action in subs:
            for name, child in action.choices.items():
                if id(child) not in seen:  # an alias maps to the same parser
                    seen.add(id(child))
                    walk(child, words + [name])

    walk(parser, [])
    return out


def main(argv: list[str] | None = None) -> int:
    """Run ``prh-fast`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status.
    Usage errors exit through argparse (``SystemExit(2)``) with its one-line message.

    Before anything loads torch or the native module (hence the OpenMP runtime), the command
    asks for sleeping idle threads (:func:`prh_fast._threads.prefer_passive_wait`; a user's own
    ``OMP_WAIT_POLICY`` stands)."""
    from prh_fast._threads import prefer_passive_wait

    prefer_passive_wait()
    args = build_parser().parse_args(argv)
    return _run(args)


if __name__ == "__main__":
    # Through the package module, so that prh_fast.cli_extract/cli_store and this run share
    # one copy of this module's classes (``python -m`` would make a second, ``__main__``).
    from prh_fast.cli import main as _main

    sys.exit(_main())
