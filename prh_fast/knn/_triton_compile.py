"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU.

    python -m prh_fast.knn._triton_compile [--arch 90] [--all]

Triton lowers a kernel to PTX and runs ptxas without touching a device, so the GPU code path
(which the CPU interpreter does not exercise: types, layouts, control flow on scalars, the
``tl.topk`` merges) is checked on any machine, and register use and spills are reported
(``cuobjdump --dump-resource-usage`` when Triton ships it). Must run with
``TRITON_INTERPRET`` unset; tests call it in a subprocess.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile


def _variants(full: bool):
    """(name, kernel, dtype signature pieces, constexprs, options) to compile."""
    import torch

    from prh_fast.knn._triton import _config

    out = []
    specs = [("bf16", "ieee", 32, True, True), ("fp32", "tf32", 128, True, False),
             ("fp16", "ieee", 256, False, True)]
    if full:
        specs += [("bf16", "ieee", k, m, True) for k in (16, 64, 128) for m in (True, False)]
        specs += [("fp32", "ieee", 32, True, True), ("fp32", "tf32", 256, False, True)]
    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for dt, prec, kp, margin, self_search in specs:
        cfg = _config(kp, 1024, tdt[dt], False)
        opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
        const = dict(cfg, KP=kp, SELF=self_search, MARGIN=margin, PRECISION=prec, UPCAST=False)
        sig = {"Q_ptr": f"*{dt}", "K_ptr": f"*{dt}", "QID_ptr": "*i32", "QS_ptr": "*fp32",
               "KN_ptr": "*fp32", "OUT_ptr": "*i64", "M": "i32", "NK": "i32", "D": "i32",
               "G": "i32", "stride_qm": "i32", "stride_kn": "i32", "stride_om": "i32",
               "eta": "fp32"}
        name = f"topk_{dt}_{prec}_kp{kp}_{'margin' if margin else 'fast'}_" \
               f"{'self' if self_search else 'cross'}"
        out.append((name, "_topk_kernel", sig, const, opts))
    for dt in (("bf16", "fp32", "fp64") if full else ("bf16", "fp32")):
        sig = {"Q_ptr": f"*{dt}", "K_ptr": f"*{dt}", "QI_ptr": "*i32", "C_ptr": "*i32",
               "OUT_ptr": "*fp64", "M": "i32", "D": "i32", "C": "i32", "stride_qm": "i32",
               "stride_kn": "i32", "stride_cm": "i32", "stride_om": "i32"}
        const = {"BLOCK_M": 8, "BLOCK_C": 32, "BLOCK_D": 16}
        out.append((f"rescore_{dt}", "_rescore_kernel", sig, const, {"num_warps": 4}))
    return out


def compile_all(arch: int = 90, full: bool = False) -> list:
    """Compile every variant for ``sm_<arch>``; returns one dict per variant."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET to compile for a GPU target")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from prh_fast.knn import _triton_kernels as K

    target = GPUTarget("cuda", arch, 32)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cuobjdump = os.path.join(tools, "cuobjdump")
    results = []
    for name, kname, sig, const, opts in _variants(full):
        fn = getattr(K, kname)
        full_sig = dict(sig, **{c: "constexpr" for c in const})
        if set(full_sig) != set(fn.arg_names):
            raise RuntimeError(f"{name}: signature {sorted(full_sig)} does not name the "
                               f"arguments of {kname} {fn.arg_names}")
        # Constants are keyed by the position in the kernel's own argument list (not in
        # ``full_sig``, whose order differs).
        src = ASTSource(fn=fn, signature=full_sig,
                        constexprs={(fn.arg_names.index(c),): v for c, v in const.items()})
        kern = triton.compile(src, target=target, options=opts)
        row = {"name": name, "arch": arch, "shared_bytes": kern.metadata.shared, **opts}
        if os.path.exists(cuobjdump) and "cubin" in kern.asm:
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kern.asm["cubin"])
                f.flush()
                txt = subprocess.run([cuobjdump, "--dump-resource-usage", f.name],
                                     capture_output=True, text=True).stdout
            m = re.search(r"REG:(\d+) STACK:(\d+)", txt)
            if m:
                row["registers"], row["stack_bytes"] = int(m.group(1)), int(m.group(2))
        results.append(row)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--all", action="store_true", help="every variant (slower)")
    args = p.parse_args(argv)
    rows = compile_all(args.arch, args.all)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
