"""``prh-fast extract`` and ``prh-fast demo``."""
from __future__ import annotations

import logging
import sys

_DTYPES = ("auto", "float32", "float16", "bfloat16")


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment: one replaced after the handler was made (by a
    caller of main() capturing output) gets the lines, and a closed one is not kept."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _log_to_stderr() -> None:
    """Show prh_fast's INFO lines (e.g. a one-time model conversion) while a command works."""
    log = logging.getLogger("prh_fast")
    if not log.handlers:
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)


def _torch_dtype(name):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def _modality(text: str) -> str:
    """``--modality``: a model kind of the extractors; "language" (the reference's word) is
    "text"."""
    from prh_fast.extract._registry import KINDS

    kind = "text" if text == "language" else text
    if kind not in KINDS:
        import argparse

        raise argparse.ArgumentTypeError(
            f"expected language (or text) or vision, got {text!r}")
    return kind


def _kind(args) -> str:
    """The kind of the models to extract: ``--modality``, else the ``--models`` set's, else
    text."""
    if not args.models:
        return args.modality or "text"
    from prh_fast._cli_common import _UserError
    from prh_fast.extract._registry import MODEL_SETS, model_set_kind

    if args.models.strip().lower() not in MODEL_SETS:
        raise _UserError(f"--models {args.models}: unknown model set; known sets: "
                         f"{', '.join(MODEL_SETS)}")
    kind = model_set_kind(args.models)
    if args.modality and args.modality != kind:
        shown = "language" if args.modality == "text" else args.modality
        raise _UserError(f"--modality {shown}: the set '{args.models}' holds {kind} models")
    return kind


def _cmd_extract(args) -> int:
    from prh_fast._cli_common import (
        _about,
        _UserError,
        check_device,
        check_output_folder,
    )

    kind = _kind(args)
    if kind == "text":
        from prh_fast.extract._runner import TEXT_POOLINGS as poolings
    else:
        from prh_fast.extract._vision import POOLINGS as poolings
        if args.caption_level is not None:
            raise _UserError("--caption-level: only for language models (--modality language)")
    if args.pool is not None and args.pool not in poolings:
        raise _UserError(f"--pool {args.pool}: {kind} models pool by {' | '.join(poolings)}")
    check_device("--device", args.device, allow_auto=(kind == "text"))
    check_output_folder("--output_dir", args.output_dir)
    _log_to_stderr()
    from prh_fast.extract._runner import extract_images, extract_text

    names = list(args.model or [])
    if args.models:
        from prh_fast.extract._registry import check_available, resolve_model_set

        names += resolve_model_set(args.models)
        ok, missing = check_available(names, kind)
        if missing:
            print(f"{args._prog}: error: {len(missing)} of {len(names)} model(s) in set "
                  f"'{args.models}' are not available here:", file=sys.stderr)
            for name, why in missing:
                print(f"  {name}: {why}", file=sys.stderr)
            if not args.skip_missing:
                print("(--skip-missing extracts the others)", file=sys.stderr)
                return 2
            names = [n for n in names if n in set(ok)]
            if not names:
                raise _UserError(f"--models {args.models}: none of its models is available "
                                 f"here")
    if not names:
        raise _UserError("give --model NAME... or --models SET")
    pool = args.pool or ("avg" if kind == "text" else "cls")
    from prh_fast.distributed import launched_by_torchrun

    if launched_by_torchrun():
        return _extract_distributed(args, kind, names, pool)
    for name in names:
        with _about(name):
            if kind == "text":
                path = extract_text(name, args.data, pool=pool, features_dir=args.output_dir,
                                    n=args.n, batch_size=args.batch_size, device=args.device,
                                    dtype=_torch_dtype(args.dtype),
                                    storage_dtype=args.storage_dtype,
                                    caption_level=args.caption_level, split=args.split,
                                    force=args.force, progress=not args.no_progress)
            else:
                path = extract_images(name, args.data, pool=pool, features_dir=args.output_dir,
                                      n=args.n, batch_size=args.batch_size, device=args.device,
                                      dtype=_torch_dtype(args.dtype),
                                      storage_dtype=args.storage_dtype, split=args.split,
                                      force=args.force, progress=not args.no_progress)
        print(f"{name}: {path}")
    return 0


def _extract_distributed(args, kind, names, pool) -> int:
    """Under torchrun: every model's samples split over the ranks, merged by rank 0 into the
    file a single process would write. A failure on any rank fails every rank loudly; a
    restart resumes from the ranges (and batches) already written."""
    import torch.distributed as dist

    from prh_fast._cli_common import _about
    from prh_fast.distributed import init_from_env
    from prh_fast.extract._runner import extract_sharded

    created = init_from_env()
    try:
        rank = dist.get_rank()
        device = args.device
        if device == "cuda":  # one GPU per rank, as torchrun numbers them on each node
            import os

            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        for name in names:
            with _about(f"{name}, rank {rank}"):
                path = extract_sharded(
                    kind, name, args.data,
                    pool=pool, features_dir=args.output_dir, n=args.n,
                    batch_size=args.batch_size, device=device,
                    dtype=_torch_dtype(args.dtype), storage_dtype=args.storage_dtype,
                    caption_level=args.caption_level if kind == "text" else None,
                    split=args.split, force=args.force,
                    progress=(rank == 0 and not args.no_progress))
            if rank == 0:
                print(f"{name}: {path}")
        return 0
    finally:
        if created:
            dist.destroy_process_group()


def _cmd_demo(args) -> int:
    from prh_fast._cli_common import check_device, check_output_folder
    from prh_fast._names import SUPPORTED_METRICS
    from prh_fast.demo import check_metric_settings

    check_device("--device", args.device)
    check_output_folder("--out", args.out)
    check_metric_settings(args.metrics or SUPPORTED_METRICS, args.n, args.topk,
                          names=("--n", "--topk"))
    _log_to_stderr()
    from prh_fast.demo import run_demo

    run_demo(args.out, n=args.n, batch_size=args.batch_size, topk=args.topk,
             null_permutations=args.null_permutations,
             kernel_null_permutations=args.kernel_null_permutations, device=args.device,
             force=args.force, progress=not args.no_progress, metrics=args.metrics)
    return 0


def add_parsers(sub) -> None:
    """Register ``prh-fast extract`` and ``prh-fast demo`` on the top-level subparsers.

    Args:
        sub: What ``ArgumentParser.add_subparsers()`` returned for ``prh-fast``.

    Example:
        >>> import argparse
        >>> from prh_fast.cli_extract import add_parsers
        >>> parser = argparse.ArgumentParser(prog="prh-fast")
        >>> add_parsers(parser.add_subparsers(dest="cmd"))
        >>> args = parser.parse_args(["demo", "--n", "256"])
        >>> args.n, args.topk, args.out
        (256, 10, './prh-fast-demo')
    """
    from prh_fast._cli_common import nonnegative_int, positive_int
    from prh_fast._names import (
        DEMO_KERNEL_NULL_PERMUTATIONS,
        DEMO_NULL_PERMUTATIONS,
        SUPPORTED_METRICS,
    )

    pe = sub.add_parser("extract", help="per-layer features of language or vision models "
                        "(the reference's extract_features.py, offline first)")
    pe.add_argument("--model", nargs="+", metavar="NAME",
                    help="model names, local folders/files or packaged aliases "
                         "(smollm2-135m, all-minilm-l6-v2, efficientnet-lite0)")
    pe.add_argument("--models", metavar="SET", help="a named model set (e.g. paper-val-lang)")
    pe.add_argument("--modality", type=_modality, default=None, metavar="{language,vision}",
                    help="language (or text) or vision; default: the --models set's kind, "
                         "else language")
    pe.add_argument("--data", default="easy-vqa",
                    help="easy-vqa, a folder of images + captions.jsonl/csv, or a saved "
                         "Hugging Face dataset")
    pe.add_argument("--split", default=None, help="data split (easy-vqa: train, test, all)")
    pe.add_argument("--caption-level", default=None, help="easy-vqa caption detail level")
    pe.add_argument("--n", type=positive_int, default=None, help="first N samples only")
    pe.add_argument("--pool", default=None,
                    help="language: avg | last | prompt (default avg); vision: cls | avg | auto "
                         "(default cls)")
    pe.add_argument("--batch-size", type=positive_int, default=32)
    pe.add_argument("--device", default="cpu")
    pe.add_argument("--dtype", choices=_DTYPES, default="auto", help="compute dtype")
    pe.add_argument("--storage-dtype", choices=_DTYPES[1:], default="float32")
    pe.add_argument("--output_dir", "--output-dir", default="./results/features",
                    help="features go to <output_dir>/<data set>/<model>_pool-<p>_prompt-<b>.pt")
    pe.add_argument("--force", action="store_true", help="recompute even if the file exists")
    pe.add_argument("--skip-missing", action="store_true",
                    help="with --models: extract the available models, skip the others")
    pe.add_argument("--no-progress", action="store_true")
    pe.set_defaults(func=_cmd_extract)

    pd = sub.add_parser("demo", help="three packaged models on easy-VQA: every pair, every "
                        "metric, shuffled control and caption detail, with a report")
    pd.add_argument("--out", default="./prh-fast-demo", help="report folder")
    pd.add_argument("--n", type=positive_int, default=1024, help="image-caption pairs")
    pd.add_argument("--batch-size", type=positive_int, default=64)
    pd.add_argument("--topk", type=positive_int, default=10)
    pd.add_argument("--null-permutations", type=nonnegative_int,
                    default=DEMO_NULL_PERMUTATIONS, metavar="P",
                    help="shuffled pairings scored as control of the list metrics (mutual, "
                    "cycle, lcs, edit-distance kNN): permutation p-values down to 1/(P+1)")
    pd.add_argument("--kernel-null-permutations", type=nonnegative_int,
                    default=DEMO_KERNEL_NULL_PERMUTATIONS,
                    metavar="P", help="the same for cknna, cka, unbiased_cka and svcca, "
                    "whose shuffles rescore every layer pair")
    pd.add_argument("--metrics", nargs="+", choices=SUPPORTED_METRICS, default=None)
    pd.add_argument("--device", default="cpu")
    pd.add_argument("--force", action="store_true", help="re-extract cached features")
    pd.add_argument("--no-progress", action="store_true")
    pd.set_defaults(func=_cmd_demo)
