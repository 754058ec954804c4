"""Fused Triton neighbour search: tensor-core tile products with an on-chip running top-k,
exact by default through a certified error margin and an exact re-score.

Pipeline of ``knn_triton`` (self search, or cross search against ``keys``):

1. **Candidate pass** (``_triton_kernels._topk_kernel``): scores ``a_ij`` from ``tl.dot`` in a
   product format (bf16, fp16, tf32 or plain fp32), never written to memory; each query row
   keeps its ``KP`` best keys on chip. For ``k`` beyond one pass (``KP <= 256``) the keys are
   split into ``G`` strided shards (key ``j`` in shard ``j mod G``), each shard gives its own
   ``KP`` best, and the union is merged (``select_topk``): the second stage.
2. **Exact mode** (default): the kernel ranks keys by a certified *upper bound*
   ``U_ij = a_ij + c·|q_i|·|k_j| + eta`` of the exact score ``r_ij = <q_i, k_j>``, where
   ``|a_ij - r_ij| <= c·|q_i|·|k_j| + eta`` always holds (derivation below). From the kept
   entries, ``L_i`` = the ``k``-th largest lower bound (``U_ij`` minus twice the margin); every
   key scoring at or above the true ``k``-th score has ``U_ij >= L_i``. The row is *certified*
   when every shard that had to drop keys dropped only keys with ``U < L_i``; then the kept
   keys with ``U >= L_i`` hold the whole top-k, ties at the k-th place included. Those
   candidates are re-scored by ``_rescore_kernel`` with float64 accumulation (the products of
   float32, bf16 or fp16 values are exact in float64, so the re-score is the exact inner
   product up to float64 rounding of the sum, ~1e-16 relative) and selected with the
   lower-index tie rule. The lists are therefore the exact lists of the given values: they
   equal the float32 lists of ``backend="torch"``/``"cpu"`` except where two scores lie within
   float32 rounding of each other, where float32 results themselves depend on the summation
   order (BLAS library, tile shape). Exact ties (duplicated rows, quantised values) are exact
   in both and go to the lower index. Rows that fail the certificate (a candidate buffer
   overflowed: many near-ties) are retried once with the largest buffer, then computed by an
   exact float64 torch path. Never silently wrong.
3. **Fast mode** (``exact=False``): the kernel ranks by ``a_ij`` itself (bf16 products by
   default) and returns those lists and scores, approximate; a log line says so.

Error bound (exact mode). Let ``q, k`` be the feature vectors (float32 values, or float64),
``q', k'`` their values in the product format, ``u`` the relative rounding of that conversion
(bf16: ``2^-8``, round to nearest; tf32: ``2^-10``, allowing truncation; fp16 features in
fp16, bf16 features in any format, float32 in fp32: 0; float64 features add ``2^-24`` for
their float32 step), ``D`` the dimension. Then

* input rounding: ``|Σ q'_d k'_d - Σ q_d k_d| <= (2u + u²)·Σ|q_d k_d| <= (2u + u²)·|q|·|k|``
  (Cauchy-Schwarz);
* accumulation: the products of the converted values are exact in float32 (8- and 11-bit
  significands) and the tensor cores add them in float32, possibly truncating and aligning
  several terms at once; we allow twice the recursive-summation bound with a one-ulp unit,
  ``A = 2·γ(D + 32, 2^-23)·(1 + u)²·|q|·|k|`` with ``γ(n, v) = n·v / (1 - n·v)``;
* the re-score's own rounding: ``R = γ(D + 1, 2^-53)·|q|·|k|``;
* underflow and flushed subnormals: an absolute ``eta = 2^-124·(D + √D·(max|q| + max|k|))``.

So ``c = 2u + u² + A + R`` (per unit ``|q|·|k|``). Norms are computed in float64 and rounded
up. The kernel's own float32 rounding of ``U`` is absorbed by using ``c' = c·(1 + 2^-8) + 2^-20``
and ``2·eta`` in the kernel, and ``(2c' + 2^-16)·|q|·|k| + 4.02·eta`` between ``U`` and the
lower bound; the certificate compares numbers in float64. For unit rows and ``D = 1024`` the
margin ``c`` is about 2.2e-3 with tf32 products, 8.1e-3 with bf16 products of float32
features, 2.5e-4 for bf16 or fp16 features (products exact, only accumulation).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os

import torch

from prh_fast.errors import InputError
from prh_fast.knn._bound import TENSOR_CORE, coefficient, eta_conversion
from prh_fast.knn._merge import TopK, select_topk

logger = logging.getLogger(__name__)

#: Largest running list held on chip in one pass (``tl.topk`` sizes are powers of two).
KMAX = 256
#: Largest list the default plans use per shard (register budget, see ``plan``).
KP_PREF = 128
#: Product formats: ``precision=`` names.
PRECISIONS = ("auto", "tf32", "bf16", "fp16", "fp32")

_INT64_MIN = -(2**63)



@dataclasses.dataclass
class SearchStats:
    """What one :func:`knn_triton` call did: returned with ``return_stats=True``, and carried
    (as a dict) by a DEBUG record of this module's logger in its ``triton_stats`` field.

    Attributes:
        rows: query rows.
        KP: running-list size per key shard of the first pass.
        G: key shards of the first pass.
        precision: product format (``"bf16"``, ``"fp16"``, ``"tf32"`` or ``"fp32"``).
        exact: exact mode (certificate + re-score) or fast mode.
        retried: rows the first pass could not certify, run again with a larger buffer.
        fallback: rows computed by the exact float64 torch path.
        margin: the error-bound coefficient ``c`` (exact mode; None in fast mode).
    """

    rows: int
    KP: int
    G: int
    precision: str
    exact: bool
    retried: int = 0
    fallback: int = 0
    margin: float | None = None

    def as_dict(self) -> dict:
        """The fields as a plain dict (for JSON and log records)."""
        return dataclasses.asdict(self)


def interpret_mode() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``, read when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def unavailable_reason(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` (None when it can). Imports nothing
    unless triton is installed and the device qualifies."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cpu":
        if not interpret_mode():
            return ("the features are on the CPU; the triton backend needs a CUDA device "
                    "(or TRITON_INTERPRET=1 set before triton is imported, for testing)")
    elif device.type != "cuda":
        return f"the triton backend needs a CUDA device, got {device.type}"
    try:
        import triton.language as tl
    except Exception as exc:  # pragma: no cover - broken installs
        return f"triton failed to import ({exc})"
    for name in ("topk", "join", "reshape", "argmin"):
        if not hasattr(tl, name):
            return f"this triton version lacks tl.{name} (need triton >= 3.4)"
    return None


# --------------------------------------------------------------------------------------------
# product formats and the error bound


def product_format(in_dtype: torch.dtype, precision: str | None, exact: bool):
    """``(torch dtype fed to tl.dot, tl.dot input_precision, u)`` for features of ``in_dtype``.

    ``u`` is the relative rounding of converting the compute-dtype values to the product format
    (see the module docstring)."""
    p = "auto" if precision is None else str(precision).lower()
    if p == "ieee":
        p = "fp32"
    if p not in PRECISIONS:
        raise InputError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    if p == "auto":
        if in_dtype in (torch.bfloat16, torch.float16):
            p = "bf16" if in_dtype == torch.bfloat16 else "fp16"
        else:
            p = "tf32" if exact else "bf16"
    f64_step = 2.0**-24 if in_dtype == torch.float64 else 0.0
    if p == "fp16":
        if in_dtype != torch.float16:
            raise InputError("precision: 'fp16' products need float16 features (float32 values "
                             "can overflow or underflow in float16); use 'bf16' or 'tf32'")
        return torch.float16, "ieee", 0.0
    if p == "bf16":
        u = 0.0 if in_dtype == torch.bfloat16 else 2.0**-8
        return torch.bfloat16, "ieee", (1 + f64_step) * (1 + u) - 1
    if p == "tf32":
        # bf16 (8-bit) and fp16 (11-bit) significands fit tf32's 11 bits exactly.
        u = 0.0 if in_dtype in (torch.bfloat16, torch.float16) else 2.0**-10
        return torch.float32, "tf32", (1 + f64_step) * (1 + u) - 1
    return torch.float32, "ieee", f64_step


def margin_coefficient(u: float, d: int, rescore_dtype: torch.dtype) -> float:
    """``c`` such that ``|a_ij - r_ij| <= c·|q_i|·|k_j| + eta`` (module docstring): the shared
    bound of ``prh_fast.knn._bound`` with :data:`TENSOR_CORE` accumulation."""
    return coefficient(d, dataclasses.replace(TENSOR_CORE, u_in=u), rescore_dtype)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def plan(k: int, n_keys: int, exact: bool):
    """``(KP, G)``: running-list size per shard and number of key shards.

    Lists of up to ``KP_PREF = 128`` keep the default tiles (``_config``) free of register
    spills in the sm_90 ptxas report; ``KP = 256`` needs 16-row tiles, so it is used only for a
    fast-mode ``k`` in 129..256, and longer candidate lists come from more shards. Exact mode
    keeps ``max(2k, k + 16)`` candidates: room for keys within the margin of the k-th."""
    want = max(2 * k, k + 16) if exact else k
    if want <= KP_PREF or (not exact and want <= KMAX):
        return max(4, _next_pow2(want)), 1
    g = -(-(2 * k if not exact else want) // KP_PREF)
    return KP_PREF, max(1, min(n_keys, g))


def retry_plan(kp: int, g: int, k: int, n_keys: int):
    """A larger candidate buffer for rows the first pass could not certify."""
    return KP_PREF, max(1, min(n_keys, max(2 * g, -(-4 * k // KP_PREF))))


def _config(kp: int, d: int, prod_dtype: torch.dtype, interp: bool) -> dict:
    """Tile sizes. The interpreter favours few large numpy ops and the sparse merge (its
    ``tl.topk`` is slow). GPU sizes: the ``BLOCK_M x BLOCK_N`` float32 score tile plus the
    ``BLOCK_M x KP`` int64 lists (and their ``BLOCK_M x 2·KP`` merge) live in registers, so
    ``BLOCK_M`` shrinks as ``KP`` grows. Chosen from ptxas's sm_90 resource report
    (``python -m prh_fast.knn._triton_compile --all``; 8 warps, 255 registers a thread; bf16,
    fp16 and tf32 products): at most 16 bytes of stack for ``KP <= 32`` at 64 x 128, at most 8
    for ``KP`` 64..128 at 32 x 128 (64 x 128 spilled 72-256 bytes), none for ``KP = 256`` at
    16 x 256 with 32-wide slices. Plain fp32 products (``precision="fp32"``) spill ~0.5 KB.
    Untuned on hardware: ``benchmarks/bench_knn.py --sweep`` times alternatives on a GPU."""
    if interp:
        bn = max(64, kp)
        return dict(BLOCK_M=64, BLOCK_N=bn, BLOCK_D=min(64, max(16, _next_pow2(d))),
                    DENSE_AT=bn)
    bd = min(64 if prod_dtype != torch.float32 else 32, max(16, _next_pow2(d)))
    if kp <= 32:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_D=bd, DENSE_AT=min(8, kp), num_warps=8,
                    num_stages=3)
    if kp <= KP_PREF:
        return dict(BLOCK_M=32, BLOCK_N=128, BLOCK_D=bd, DENSE_AT=8, num_warps=8,
                    num_stages=3)
    return dict(BLOCK_M=16, BLOCK_N=kp, BLOCK_D=min(bd, 32), DENSE_AT=8, num_warps=8,
                num_stages=3)


# --------------------------------------------------------------------------------------------
# kernel launchers


def _decode(keys: torch.Tensor):
    """Packed int64 keys -> (float32 scores, int64 indices; -inf / -1 for empty slots)."""
    m = (keys >> 32).to(torch.int32)
    b = torch.where(m >= 0, m, m ^ 0x7FFFFFFF)
    vals = b.view(torch.float32)
    idx = 0x7FFFFFFF - (keys & 0xFFFFFFFF)
    empty = keys == _INT64_MIN
    return vals.masked_fill(empty, float("-inf")), idx.masked_fill(empty, -1)


def _candidates(Qp, Kp, qid, qs, kn, eta, kp, g, precision, self_search, interp, tune=None):
    """Run the top-k kernel: per-shard lists sorted descending, as ``(U [m, g·kp] float32,
    idx [m, g·kp] int64)``."""
    from prh_fast.knn import _triton_kernels as K

    m, d = Qp.shape
    nk = Kp.shape[0]
    cfg = _config(kp, d, Qp.dtype, interp)
    cfg.update(tune or {})
    cfg["BLOCK_N"] = max(cfg["BLOCK_N"], kp)  # the dense merge takes tl.topk of a tile
    out = torch.empty((m, g * kp), dtype=torch.int64, device=Qp.device)
    margin = qs is not None
    grid = (triton_cdiv(m, cfg["BLOCK_M"]), g)
    K._topk_kernel[grid](
        Qp, Kp, qid if self_search else Qp, qs if margin else Qp, kn if margin else Qp, out,
        m, nk, d, g, Qp.stride(0), Kp.stride(0), out.stride(0), float(eta),
        KP=kp, SELF=bool(self_search), MARGIN=margin, PRECISION=precision,
        UPCAST=bool(interp and Qp.dtype == torch.bfloat16), **cfg)
    keys = out.view(m, g, kp).sort(dim=2, descending=True).values.view(m, g * kp)
    return _decode(keys)


def _rescore(Qc, Kc, qrows, cand, out_dtype, interp):
    """``out[i, t] = <Qc[qrows[i]], Kc[cand[i, t]]>`` in ``out_dtype``; ``-inf`` where
    ``cand < 0``. Features are read in their own dtype (no copies)."""
    from prh_fast.knn import _triton_kernels as K

    m, c = cand.shape
    qrows = qrows.to(torch.int32).contiguous()
    d = Qc.shape[1]
    cand = cand.to(torch.int32).contiguous()
    out = torch.empty((m, c), dtype=out_dtype, device=Qc.device)
    if interp:
        bm, bc, bd = 64, min(64, _next_pow2(c)), min(64, max(16, _next_pow2(d)))
        extra = {}
    else:
        bc = min(32, _next_pow2(c))
        bd = 32 if out_dtype == torch.float32 else 16
        bm = max(1, 8192 // (bc * bd))
        extra = {"num_warps": 4}
    grid = (triton_cdiv(m, bm), triton_cdiv(c, bc))
    K._rescore_kernel[grid](Qc, Kc, qrows, cand, out, m, d, c, Qc.stride(0), Kc.stride(0),
                            cand.stride(0), out.stride(0), BLOCK_M=bm, BLOCK_C=bc,
                            BLOCK_D=bd, **extra)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# the search


def _exact_rows(Xs, Ks, rows, k, budget, self_search):
    """Exact lists of query ``rows`` in float64 (products of float32/float64 values are exact
    there): torch tiles of keys into a running :class:`~prh_fast.knn._merge.TopK`, self
    excluded by global id."""
    Q = Xs[rows].to(torch.float64)
    n = Ks.shape[0]
    cols = min(n, max(k, 4096))
    top = TopK(Q.shape[0], k, torch.float64, Q.device, ids=rows)
    for c0 in range(0, n, cols):
        top.add_product(Q, Ks[c0:c0 + cols].to(torch.float64), col0=c0,
                        exclude_self=self_search)
    vals, idx, _ = top.result()
    return idx, vals


def _row_norms64(X: torch.Tensor, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """float64 row norms, in row chunks: never a float64 copy of all of ``X`` (32 GiB for
    2^20 x 4096 features)."""
    rows = max(1, chunk_bytes // (8 * max(1, X.shape[1])))
    out = torch.empty(X.shape[0], dtype=torch.float64, device=X.device)
    for r0 in range(0, X.shape[0], rows):
        out[r0:r0 + rows] = torch.linalg.vector_norm(X[r0:r0 + rows].to(torch.float64), dim=1)
    return out


def _shard_truncated(qid, n_keys, g, kp, self_search):
    """``[m, g]`` bool: shard ``s`` of row ``i`` had more keys than its list holds."""
    s = torch.arange(g, device=qid.device)
    size = (n_keys - s + g - 1) // g  # keys j = l·g + s
    size = size.unsqueeze(0).expand(qid.shape[0], g)
    if self_search:
        size = size - ((qid.unsqueeze(1) % g) == s).to(size.dtype)
    return size > kp


def _certify(U, idx, qn, kn, coef2, eta2, k, truncated, g, kp):
    """Certificate and candidate mask of exact mode (float64 arithmetic)."""
    valid = idx >= 0
    kn_j = kn[idx.clamp_min(0)]
    lower = U.double() - (coef2 * qn.unsqueeze(1) * kn_j + eta2) * (1 + 2.0**-30)
    lower = lower.masked_fill(~valid, float("-inf"))
    L = lower.topk(k, dim=1).values[:, -1]
    umin = U.view(-1, g, kp)[:, :, -1].double()  # smallest kept upper bound of each shard
    ok = (~truncated) | (umin < L.unsqueeze(1))
    cand = valid & (U.double() >= L.unsqueeze(1))
    return ok.all(dim=1), cand


def knn_triton(X: torch.Tensor, k: int, budget: int, *, keys: torch.Tensor | None = None,
               exact: bool = True, precision: str | None = None, tune: dict | None = None,
               return_stats: bool = False):
    """Top-k of each row of ``X`` against ``keys`` (default: ``X`` itself, self excluded).

    Args:
        X: ``[M, D]`` queries, float16/bfloat16/float32/float64, CUDA (CPU under
            ``TRITON_INTERPRET=1``).
        k: neighbours per row, ``1 <= k <= number of candidate keys``.
        budget: bytes of scratch per chunk of query rows (candidate lists and re-scores).
        keys: ``[N, D]`` keys for a cross search (no exclusion), same device.
        exact: certified candidates + float32 re-score (default); ``False`` is the fast,
            approximate mode.
        precision: product format of the candidate pass, one of ``PRECISIONS``; ``auto`` is
            tf32 (exact) or bf16 (fast) for float32/float64 features, the features' own format
            for bf16/fp16 features.
        tune: overrides of the kernel's tile configuration (``BLOCK_M``, ``BLOCK_N``,
            ``BLOCK_D``, ``DENSE_AT``, ``num_warps``, ``num_stages``): for tests and tuning.
        return_stats: also return the call's :class:`SearchStats` (always logged at DEBUG).

    Returns:
        ``(idx [M, k] int64, vals [M, k])``, vals in float32 (float64 for float64 features),
        rows ordered by score descending, ties by lower index; ``(idx, vals, stats)`` with
        ``return_stats``.
    """
    if X.device.type == "cuda":
        with torch.cuda.device(X.device):  # Triton launches on the current device and stream
            out = _knn_triton(X, k, budget, keys, exact, precision, tune)
    else:
        out = _knn_triton(X, k, budget, keys, exact, precision, tune)
    return out if return_stats else out[:2]


def _knn_triton(X, k, budget, keys, exact, precision, tune):
    self_search = keys is None
    K = X if self_search else keys
    if K.shape[1] != X.shape[1]:
        raise InputError(f"keys: expected {X.shape[1]} columns like X, got {K.shape[1]}")
    if K.device != X.device:
        raise InputError(f"keys: must be on X's device {X.device}, got {K.device}")
    reason = unavailable_reason(X.device)
    if reason is not None:
        raise RuntimeError(f"backend='triton' cannot run: {reason}")
    m, d = X.shape
    nk = K.shape[0]
    avail = nk - 1 if self_search else nk
    if not 1 <= k <= avail:
        raise InputError(f"k: expected 1 <= k <= {avail}, got {k}")
    if nk >= 2**31 - 1 or m >= 2**31 - 1:
        raise InputError("X: the triton backend handles fewer than 2^31 - 1 rows")
    in_dtype = torch.promote_types(X.dtype, K.dtype)
    cd = torch.float64 if in_dtype == torch.float64 else torch.float32
    prod_dtype, ip, u = product_format(in_dtype, precision, exact)
    interp = X.device.type == "cpu"

    Xs = X.to(in_dtype).contiguous()
    Ks = Xs if self_search else K.to(in_dtype).contiguous()
    Qp = Xs.to(prod_dtype).contiguous()
    Kp = Qp if self_search else Ks.to(prod_dtype).contiguous()
    kp, g = plan(k, nk, exact)
    fmt = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        prod_dtype, "tf32" if ip == "tf32" else "fp32")
    stats = SearchStats(rows=m, KP=kp, G=g, precision=fmt, exact=bool(exact))
    if not exact:
        from prh_fast._log import _log_once

        _log_once(f"prh_fast: triton kNN in fast mode ({stats.precision} products, no "
                  "float32 re-score): neighbour lists and scores are approximate", logger)

    if exact:
        qn = _row_norms64(Xs) * (1 + 2.0**-20)
        kn = qn if self_search else _row_norms64(Ks) * (1 + 2.0**-20)
        c = margin_coefficient(u, d, torch.float64)
        c1 = c * (1 + 2.0**-8) + 2.0**-20
        eta = eta_conversion(d, float(qn.max()), float(kn.max()))
        qs32 = (c1 * qn).to(torch.float32)
        kn32 = kn.to(torch.float32)
        coef2, eta2 = 2 * c1 + 2.0**-16, 4.02 * eta
        stats.margin = c
    out_i = torch.empty((m, k), dtype=torch.int64, device=X.device)
    out_v = torch.empty((m, k), dtype=cd, device=X.device)
    per_row = 48 * g * kp + 16 * k
    chunk = max(1, min(m, int(budget) // per_row))
    all_ids = torch.arange(m, device=X.device)

    def run(rows, kp, g, Qr):
        """Candidate pass + (exact) certificate/re-score for query ``rows`` (features ``Qr``);
        returns the rows that still need work."""
        qid = rows.to(torch.int32)
        if exact:
            U, idx = _candidates(Qr, Kp, qid, qs32[rows], kn32, 2 * eta, kp, g, ip,
                                 self_search, interp, tune)
            trunc = _shard_truncated(rows, nk, g, kp, self_search)
            ok, cand = _certify(U, idx, qn[rows], kn, coef2, eta2, k, trunc, g, kp)
            good = ok.nonzero().squeeze(1)
            if good.numel():
                ci = idx[good].masked_fill(~cand[good], -1)
                r = _rescore(Xs, Ks, rows[good], ci, torch.float64, interp)
                v, i = select_topk(r, ci, k)
                out_v[rows[good]], out_i[rows[good]] = v.to(cd), i
            return rows[~ok]
        U, idx = _candidates(Qr, Kp, qid, None, None, 0.0, kp, g, ip, self_search, interp,
                             tune)
        if g == 1:
            out_v[rows], out_i[rows] = U[:, :k].to(cd), idx[:, :k]
            return rows[:0]
        v, i = select_topk(U, idx, k)
        # A shard that dropped keys scoring as high as the k-th could hide list members.
        trunc = _shard_truncated(rows, nk, g, kp, self_search)
        umin = U.view(-1, g, kp)[:, :, -1]
        ok = ((~trunc) | (umin < v[:, -1:])).all(dim=1)
        out_v[rows], out_i[rows] = v.to(cd), i
        return rows[~ok]

    for r0 in range(0, m, chunk):
        rows = all_ids[r0:r0 + chunk]
        left = run(rows, kp, g, Qp[r0:r0 + chunk])
        if left.numel() and exact:
            kp2, g2 = retry_plan(kp, g, k, nk)
            if kp2 * g2 > kp * g:
                stats.retried += int(left.numel())
                left = run(left, kp2, g2, Qp[left])
        if left.numel():
            stats.fallback += int(left.numel())
            i, v = _exact_rows(Xs, Ks, left, k, budget, self_search)
            out_i[left], out_v[left] = i, v.to(cd)
    if stats.retried or stats.fallback:
        logger.info("prh_fast: triton kNN: %d of %d rows needed a larger candidate buffer, %d "
                    "were computed by the exact float64 path", stats.retried, m, stats.fallback)
    logger.debug("prh_fast: triton kNN: %d rows, KP=%d, G=%d, %s products, %d retried, %d "
                     "by the float64 path", m, kp, g, fmt, stats.retried, stats.fallback,
                     extra={"triton_stats": stats.as_dict()})
    return out_i, out_v, stats
