"""Helpers of the GPU benchmarks (``bench_knn.py --suite gpu``, ``bench_grid_gpu.py``).

Everything here also runs on the CPU at tiny sizes (``--device cpu``, Triton's interpreter), so
the scripts' logic is tested where no GPU is at hand. Nothing here prints numbers that were not
measured: ceilings are timed on the device in hand, predictions are only used to decide what
fits in the time left, and rows that were timed on a sample of query rows say so.
"""
from __future__ import annotations

import math
import os
import time

import torch

from prh_fast.testing import latent, layer_features


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Deadline:
    """Wall-clock budget of one benchmark run: ``--deadline`` (Unix time) and/or
    ``--budget`` seconds from now, whichever ends first (``inf`` when neither is given)."""

    def __init__(self, deadline: float | None = None, budget: float | None = None):
        ends = [t for t in (deadline, None if budget is None else time.time() + budget)
                if t is not None]
        self.end = min(ends) if ends else math.inf

    def left(self) -> float:
        return self.end - time.time()


def cuda_env(device) -> dict:
    """What the rows were measured on (device name, SMs, memory, versions)."""
    import importlib.util

    out = {"device": str(device)}
    try:
        import triton

        out["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken triton is recorded, not fatal
        out["triton"] = None
    out["triton_interpret"] = os.environ.get("TRITON_INTERPRET")
    out["faiss"] = importlib.util.find_spec("faiss") is not None
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(gpu=p.name, sm=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), torch_cuda=torch.version.cuda)
        try:
            out["driver"] = torch.cuda.driver_version()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - older torch
            pass
    return out


# --------------------------------------------------------------------------------------------
# features with structure


#: The latent of the GPU benchmarks: 256 clusters, spread 0.6 around the centres.
LATENT = {"clusters": 256, "spread": 0.6}


def features(n: int, d: int, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """One layer of structured unit rows for the kNN benchmark, generated on ``device``:
    ``prh_fast.testing.layer_features`` of a clustered latent of rank 32."""
    z = latent(n, 32, seed=seed, device=device, **LATENT)
    return layer_features(z, d, seed=seed + 1, dtype=dtype)


# --------------------------------------------------------------------------------------------
# ceilings


def _time_mm(A, B, reps: int, device) -> float:
    """Median seconds of ``A @ B`` (CUDA events on a GPU)."""
    for _ in range(3):
        A @ B
    ts = []
    if torch.device(device).type == "cuda":
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            A @ B
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            A @ B
            ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def matmul_ceilings(device, size: int = 8192, reps: int = 10) -> dict:
    """Measured dense-product rates (TFLOP/s) of ``torch.mm`` on ``device``: bf16, tf32 and
    full fp32, ``size``-cubed products on random data (never zeros), median of ``reps``."""
    out = {"size": size, "reps": reps}
    g = torch.Generator(device=device).manual_seed(0)
    A = torch.randn(size, size, generator=g, device=device)
    B = torch.randn(size, size, generator=g, device=device)
    prev = torch.get_float32_matmul_precision()
    try:
        for name, dt, prec in (("bf16", torch.bfloat16, "highest"), ("tf32", torch.float32, "high"),
                               ("fp32", torch.float32, "highest")):
            torch.set_float32_matmul_precision(prec)
            t = _time_mm(A.to(dt), B.to(dt), reps, device)
            out[name] = 2.0 * size**3 / t / 1e12
    finally:
        torch.set_float32_matmul_precision(prev)
    return out


# --------------------------------------------------------------------------------------------
# the oracle on a sample of rows


def oracle_lists(X: torch.Tensor, rows: torch.Tensor, k: int, *, exclude_self: bool,
                 key_chunk: int = 65536):
    """Exact top-``k`` lists of the query rows ``X[rows]`` against all rows of ``X``:
    ``(float64 lists, float32 lists)``, both with ties to the lower index (stable sorts; a
    running list always holds lower indices than the next chunk). float64 products of float32
    values are exact, so the first is the exact list up to float64 rounding of the sums; the
    second is what a float32 search (full fp32 products) returns."""
    Q = X[rows]
    m = Q.shape[0]
    dev = X.device
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        res = []
        for dt in (torch.float64, torch.float32):
            Qd = Q.to(dt)
            run_v = torch.empty((m, 0), dtype=dt, device=dev)
            run_i = torch.empty((m, 0), dtype=torch.int64, device=dev)
            for c0 in range(0, X.shape[0], key_chunk):
                c1 = min(X.shape[0], c0 + key_chunk)
                s = Qd @ X[c0:c1].to(dt).T
                ids = torch.arange(c0, c1, device=dev)
                if exclude_self:
                    s.masked_fill_(rows.unsqueeze(1) == ids.unsqueeze(0), float("-inf"))
                v = torch.cat([run_v, s], 1)
                i = torch.cat([run_i, ids.expand(m, -1)], 1)
                order = torch.sort(v, dim=1, descending=True, stable=True).indices[:, :k]
                run_v, run_i = v.gather(1, order), i.gather(1, order)
            res.append(run_i)
        return res[0], res[1]
    finally:
        torch.set_float32_matmul_precision(prev)


def list_check(got: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, X: torch.Tensor,
               rows: torch.Tensor) -> dict:
    """Rows of ``got`` (lists of the query ``rows``) equal to the float64 / float32 lists,
    recall against the float64 lists, and the largest float64 score gap at any rank between
    ``got`` and the float32 lists (relative to ``|q|·max|k|``: what a float32 near-tie can
    explain is ~1e-6)."""
    k = ref64.shape[1]
    got = got[:, :k]
    eq64 = (got == ref64).all(dim=1)
    eq32 = (got == ref32).all(dim=1)
    hits = (got.unsqueeze(2) == ref64.unsqueeze(1)).any(dim=2).sum()
    out = {"sample_rows": int(rows.numel()), "rows_equal_fp64": int(eq64.sum()),
           "rows_equal_fp32": int(eq32.sum()), "recall_fp64": float(hits) / ref64.numel()}
    bad = (~eq32).nonzero().flatten()
    gap = 0.0
    if bad.numel():
        kmax = float(torch.linalg.vector_norm(X, dim=1).max())
        for b0 in range(0, bad.numel(), 64):  # [64, k, D] float64 at a time
            b = bad[b0:b0 + 64]
            Q = X[rows[b]].double()
            sg = (Q.unsqueeze(1) * X[got[b]].double()).sum(-1)
            sr = (Q.unsqueeze(1) * X[ref32[b]].double()).sum(-1)
            scale = Q.norm(dim=1, keepdim=True) * kmax
            gap = max(gap, float(((sg - sr).abs() / scale).max()))
    out["max_gap_vs_fp32"] = gap
    return out


def peak_gib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak(device) -> int:
    """Reset the peak counter; return the bytes allocated now (the baseline)."""
    if torch.device(device).type != "cuda":
        return 0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)
