"""``prh-fast extract`` and ``prh-fast demo``."""
from __future__ import annotations

import sys

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _log_to_stderr() -> None:
    """Show prh_fast's INFO lines (e.g. a one-time model conversion) while a command works."""
    import logging

    log = logging.getLogger("prh_fast")
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)


def _torch_dtype(name):
    import torch

    return None if name in (None, "auto") else getattr(torch, name)


def _cmd_extract(args) -> int:
    _log_to_stderr()
    from prh_fast.extract._runner import extract_images, extract_text

    names = list(args.model or [])
    if args.models:
        from prh_fast.extract._registry import check_available, resolve_model_set

        try:
            names += resolve_model_set(args.models)
        except ValueError as err:
            print(f"prh-fast extract: error: {err}", file=sys.stderr)
            return 2
        ok, missing = check_available(names, args.modality)
        if missing:
            print(f"prh-fast extract: {len(missing)} of {len(names)} model(s) in set "
                  f"'{args.models}' are not available here:", file=sys.stderr)
            for name, why in missing:
                print(f"  {name}: {why}", file=sys.stderr)
            if not args.skip_missing:
                print("(--skip-missing extracts the others)", file=sys.stderr)
                return 2
            names = [n for n in names if n in set(ok)]
    if not names:
        print("prh-fast extract: error: give --model NAME... or --models SET", file=sys.stderr)
        return 2
    pool = args.pool or ("avg" if args.modality == "language" else "cls")
    from prh_fast.distributed import launched_by_torchrun

    if launched_by_torchrun():
        return _extract_distributed(args, names, pool)
    for name in names:
        try:
            if args.modality == "language":
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
        except (ValueError, FileNotFoundError, OSError, ImportError) as err:
            print(f"prh-fast extract: error ({name}): {err}", file=sys.stderr)
            return 2
        print(f"{name}: {path}")
    return 0


def _extract_distributed(args, names, pool) -> int:
    """Under torchrun: every model's samples split over the ranks, merged by rank 0 into the
    file a single process would write. A failure on any rank fails every rank loudly; a
    restart resumes from the ranges (and batches) already written."""
    import torch.distributed as dist

    from prh_fast.distributed import DistributedError, init_from_env
    from prh_fast.extract._runner import extract_sharded

    created = init_from_env()
    try:
        rank = dist.get_rank()
        device = args.device
        if device == "cuda":  # one GPU per rank, as torchrun numbers them on each node
            import os

            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        for name in names:
            try:
                path = extract_sharded(
                    "text" if args.modality == "language" else "vision", name, args.data,
                    pool=pool, features_dir=args.output_dir, n=args.n,
                    batch_size=args.batch_size, device=device,
                    dtype=_torch_dtype(args.dtype), storage_dtype=args.storage_dtype,
                    caption_level=args.caption_level if args.modality == "language" else None,
                    split=args.split, force=args.force,
                    progress=(rank == 0 and not args.no_progress))
            except (ValueError, FileNotFoundError, OSError, ImportError) as err:
                print(f"prh-fast extract: error ({name}, rank {rank}): {err}", file=sys.stderr)
                return 2
            if rank == 0:
                print(f"{name}: {path}")
        return 0
    except DistributedError as err:
        print(f"prh-fast extract: error: {err}", file=sys.stderr)
        return 1
    finally:
        if created:
            dist.destroy_process_group()


def _cmd_demo(args) -> int:
    _log_to_stderr()
    from prh_fast.demo import run_demo

    try:
        run_demo(args.out, n=args.n, batch_size=args.batch_size, topk=args.topk,
                 null_permutations=args.null_permutations, device=args.device,
                 force=args.force, progress=not args.no_progress, metrics=args.metrics)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"prh-fast demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def add_parsers(sub) -> None:
    from prh_fast.metrics import SUPPORTED_METRICS

    pe = sub.add_parser("extract", help="per-layer features of language or vision models "
                        "(the reference's extract_features.py, offline first)")
    pe.add_argument("--model", nargs="+", metavar="NAME",
                    help="model names, local folders/files or packaged aliases "
                         "(smollm2-135m, all-minilm-l6-v2, efficientnet-lite0)")
    pe.add_argument("--models", metavar="SET", help="a named model set (e.g. paper-val-lang)")
    pe.add_argument("--modality", choices=("language", "vision"), default="language")
    pe.add_argument("--data", default="easy-vqa",
                    help="easy-vqa, a folder of images + captions.jsonl/csv, or a saved "
                         "Hugging Face dataset")
    pe.add_argument("--split", default=None, help="data split (easy-vqa: train, test, all)")
    pe.add_argument("--caption-level", default=None, help="easy-vqa caption detail level")
    pe.add_argument("--n", type=int, default=None, help="first N samples only")
    pe.add_argument("--pool", default=None,
                    help="language: avg | last | prompt (default avg); vision: cls | avg | auto "
                         "(default cls)")
    pe.add_argument("--batch-size", type=int, default=32)
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
    pd.add_argument("--n", type=int, default=1024, help="image-caption pairs")
    pd.add_argument("--batch-size", type=int, default=64)
    pd.add_argument("--topk", type=int, default=10)
    pd.add_argument("--null-permutations", type=int, default=5,
                    help="shuffled pairings scored as control")
    pd.add_argument("--metrics", nargs="+", choices=SUPPORTED_METRICS, default=None)
    pd.add_argument("--device", default="cpu")
    pd.add_argument("--force", action="store_true", help="re-extract cached features")
    pd.add_argument("--no-progress", action="store_true")
    pd.set_defaults(func=_cmd_demo)
