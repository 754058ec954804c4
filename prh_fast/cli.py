"""Command line: ``prh-fast info`` and ``prh-fast example``."""
from __future__ import annotations

import argparse
import json
import sys


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

    g = torch.Generator().manual_seed(args.seed)
    n = args.n
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="prh-fast", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="what was built and what is usable here")
    pi.add_argument("--json", action="store_true", help="print as JSON")
    pi.set_defaults(func=_cmd_info)
    pe = sub.add_parser("example", help="all metrics on synthetic paired features")
    pe.add_argument("--n", type=int, default=2048)
    pe.add_argument("--topk", type=int, default=10)
    pe.add_argument("--seed", type=int, default=0)
    pe.set_defaults(func=_cmd_example)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
