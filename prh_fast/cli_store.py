"""``prh-fast store info | verify | convert``: inspect, check and convert feature stores."""
from __future__ import annotations

import json
import os
import sys

# Errors are raised; prh_fast.cli.main reports user errors in one line (exit 2).


def _cmd_info(args) -> int:
    from prh_fast.store import feature_info, is_store, open_store

    if is_store(args.path):
        info = open_store(args.path, allow_partial=True).info()
    else:
        info = feature_info(args.path)
    print(json.dumps(info, indent=2, default=str))
    return 0


def _cmd_verify(args) -> int:
    from prh_fast.store import StoreError, open_store

    bad = 0
    for path in args.paths:
        try:
            rep = open_store(path, allow_partial=True).verify(
                checksums=not args.no_checksums, progress=not args.no_progress)
        except (StoreError, FileNotFoundError, ValueError) as err:
            print(f"FAILED {err}", file=sys.stderr)
            bad += 1
            continue
        state = "complete" if rep["complete"] else "UNFINISHED"
        what = "sizes, headers and checksums" if rep["checksums"] else "sizes and headers"
        print(f"ok {path}: {rep['n']} rows, {rep['shards']} shards, {rep['bytes']} bytes, "
              f"{state}; {what} checked")
    return 1 if bad else 0


def _cmd_convert(args) -> int:
    from prh_fast._cli_common import _UserError, check_output_folder
    from prh_fast.store import is_store, pt_to_store, store_to_pt

    src, dst = args.src, args.dst
    if not os.path.exists(dst):  # its folder can be made (an existing dst is checked below)
        check_output_folder("dst", dst)
    if is_store(src):
        if os.path.exists(dst) and not args.overwrite:
            raise _UserError(f"{dst}: exists (pass --overwrite to replace it)")
        store_to_pt(src, dst)
    elif os.path.isfile(src):
        pt_to_store(src, dst, dtype=args.dtype, shard_rows=args.shard_rows,
                    overwrite=args.overwrite, trust=args.trust,
                    progress=not args.no_progress)
    else:
        raise _UserError(f"{src}: neither a feature file nor a store folder")
    print(f"wrote {dst}")
    return 0


def add_parsers(sub) -> None:
    """Register ``prh-fast store info | verify | convert`` on the top-level subparsers.

    Args:
        sub: What ``ArgumentParser.add_subparsers()`` returned for ``prh-fast``.

    Example:
        >>> import argparse
        >>> from prh_fast.cli_store import add_parsers
        >>> parser = argparse.ArgumentParser(prog="prh-fast")
        >>> add_parsers(parser.add_subparsers(dest="cmd"))
        >>> args = parser.parse_args(["store", "convert", "a.pt", "a.store", "--dtype", "float16"])
        >>> args.store_cmd, args.dtype, args.func.__name__
        ('convert', 'float16', '_cmd_convert')
    """
    from prh_fast._cli_common import positive_int

    ps = sub.add_parser("store", help="feature stores: info, verify, convert (.pt <-> store)")
    ss = ps.add_subparsers(dest="store_cmd", required=True)
    pi = ss.add_parser("info", help="summary of a store folder or .pt file")
    pi.add_argument("path")
    pi.set_defaults(func=_cmd_info)
    pv = ss.add_parser("verify", help="check shard sizes, headers and SHA-256 checksums")
    pv.add_argument("paths", nargs="+", metavar="PATH")
    pv.add_argument("--no-checksums", action="store_true", help="sizes and headers only (fast)")
    pv.add_argument("--no-progress", action="store_true")
    pv.set_defaults(func=_cmd_verify)
    pc = ss.add_parser("convert", help="reference .pt file -> store folder, or store -> .pt")
    pc.add_argument("src", help="a .pt feature file or a store folder")
    pc.add_argument("dst", help="the store folder or .pt file to write")
    pc.add_argument("--dtype", choices=["float32", "float16", "bfloat16", "float64"],
                    default=None, help="storage dtype of a new store (default: as in the file)")
    pc.add_argument("--shard-rows", type=positive_int, default=None,
                    help="rows per shard (default: about 128 MiB per shard)")
    pc.add_argument("--overwrite", action="store_true", help="replace an existing output")
    pc.add_argument("--trust", action="store_true",
                    help="allow .pt files holding arbitrary Python objects (runs their code)")
    pc.add_argument("--no-progress", action="store_true")
    pc.set_defaults(func=_cmd_convert)
