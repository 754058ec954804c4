"""Triton kernels of the fused neighbour search (imported only when Triton is used).

``_topk_kernel``: one program per (block of ``BLOCK_M`` query rows, key shard ``g``). It walks
the shard's keys (global index ``j = l·G + g`` for local index ``l``: strided shards, so that
each shard sees a random-looking sample of the index range) in tiles of ``BLOCK_N``, computes
each ``[BLOCK_M, BLOCK_N]`` score tile with ``tl.dot`` over ``BLOCK_D``-wide slices of the
feature dimension, and merges it into a running top-``KP`` per row that never leaves the chip.
No score tile is ever written to memory.

Running lists are packed 64-bit keys: the high 32 bits are the float32 score mapped to a signed
integer with the same order (non-negative floats keep their bits; negative floats flip their
magnitude bits; -0.0 is first made +0.0 so that equal floats get equal keys), the low 32 bits
are ``2^31 - 1 - j``. One integer comparison then orders by score descending and, at equal
scores, by index ascending: the lower-index tie rule is carried by ``tl.sort``/``tl.topk``.
Empty slots hold ``INT64_MIN``, below every real key.

Merging a tile, per block of rows:
  * ``cnt`` = entries of the tile above their row's current ``KP``-th score. Keys arrive in
    increasing index order, so an entry *equal* to the ``KP``-th score loses the tie: a strict
    comparison on floats is exact here.
  * dense merge (``max cnt > DENSE_AT``, typical for the first tiles): pack the tile,
    ``tl.topk`` it to ``KP``, join it with the running list and ``tl.topk`` again.
  * sparse merge (``0 < max cnt <= DENSE_AT``, typical once the lists have settled): ``max cnt``
    rounds of "take the row maximum (lowest index at equal scores), replace the row's smallest
    key if larger, remove it from the tile". Cheaper than sorting a tile when few entries
    qualify, which is the common case for large N.

With ``MARGIN`` the packed score is the certified upper bound ``a_ij + c·|q_i|·|k_j| + eta``
(``QS_ptr`` holds ``c·|q_i|``, ``KN_ptr`` holds ``|k_j|``); see ``_triton.py`` for the bound.

``_rescore_kernel``: exact re-scoring of candidate lists,
``out[i, t] = <q_{QI[i]}, k_{cand[i, t]}>`` in the accumulation dtype of the inputs (float32,
or float64 for float64 inputs), with elementwise products and ``tl.sum`` reductions (no tensor
cores). Every output element is
computed by the same sequence of operations, so identical key rows get bit-identical scores.
"""
from __future__ import annotations

import triton
import triton.language as tl

INT64_MIN = -(2**63)


@triton.jit
def _pack(s, j):
    """float32 scores ``s`` and int32 indices ``j`` (broadcastable) -> ordered int64 keys."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: equal floats must pack to equal keys
    b = s.to(tl.int32, bitcast=True)
    m = tl.where(b >= 0, b, b ^ 0x7FFFFFFF)
    return (m.to(tl.int64) << 32) | (0x7FFFFFFF - j).to(tl.int64)


@triton.jit
def _key_score(key):
    """Inverse of the score half of ``_pack`` (empty slots decode to -inf)."""
    m = (key >> 32).to(tl.int32)
    b = tl.where(m >= 0, m, m ^ 0x7FFFFFFF)
    f = b.to(tl.float32, bitcast=True)
    return tl.where(key == -9223372036854775808, float("-inf"), f)


# ``M`` (query rows of a chunk, or rows left to re-score) is not specialised: its divisibility
# by 16 varies between calls and would otherwise compile a second variant mid-run.
@triton.jit(do_not_specialize=["M"])
def _topk_kernel(
    Q_ptr, K_ptr, QID_ptr, QS_ptr, KN_ptr, OUT_ptr,
    M, NK, D, G,
    stride_qm, stride_kn, stride_om,
    eta,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
    SELF: tl.constexpr, MARGIN: tl.constexpr, DENSE_AT: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    if SELF:
        qid = tl.load(QID_ptr + rows, mask=row_ok, other=-1)
    if MARGIN:
        qs = tl.load(QS_ptr + rows, mask=row_ok, other=0.0)
    n_local = (NK - g + G - 1) // G
    cols = tl.arange(0, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    slot = tl.arange(0, KP)
    run = tl.full([BLOCK_M, KP], -9223372036854775808, tl.int64)
    thr = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for l0 in range(0, n_local, BLOCK_N):
        loc = l0 + cols
        col_ok = loc < n_local
        j = loc * G + g  # global key index; the driver guarantees NK < 2^31 - 1
        j64 = j.to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + dd
            d_ok = d < D
            q = tl.load(Q_ptr + rows64[:, None] * stride_qm + d[None, :],
                        mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            kt = tl.load(K_ptr + j64[:, None] * stride_kn + d[None, :],
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                # Interpreter only: its bfloat16 tl.dot is wrong; products of bfloat16 values
                # are exact in float32, so upcasting computes what the tensor cores compute.
                q = q.to(tl.float32)
                kt = kt.to(tl.float32)
            acc = tl.dot(q, tl.trans(kt), acc, input_precision=PRECISION)
        if MARGIN:
            kn = tl.load(KN_ptr + j, mask=col_ok, other=0.0)
            acc = acc + (qs[:, None] * kn[None, :] + eta)
        valid = col_ok[None, :] & row_ok[:, None]
        if SELF:
            valid = valid & (j[None, :] != qid[:, None])
        s = tl.where(valid, acc, float("-inf"))
        cnt = tl.sum((s > thr[:, None]).to(tl.int32), axis=1)
        most = tl.max(cnt, axis=0)
        if most > DENSE_AT:
            keys = tl.where(valid, _pack(s, j[None, :]), -9223372036854775808)
            top = tl.topk(keys, KP, dim=1)
            run = tl.topk(tl.reshape(tl.join(run, top), [BLOCK_M, 2 * KP]), KP, dim=1)
            thr = _key_score(tl.min(run, axis=1))
        elif most > 0:
            # At most KP rounds: once a tile's KP largest entries are in, no other can enter.
            for _t in range(0, tl.minimum(most, KP)):
                v = tl.max(s, axis=1)
                jm = tl.min(tl.where(s == v[:, None], j[None, :], 0x7FFFFFFF), axis=1)
                take = v > thr
                pos = tl.argmin(run, axis=1)
                put = (slot[None, :] == pos[:, None]) & take[:, None]
                run = tl.where(put, _pack(v, jm)[:, None], run)
                s = tl.where(j[None, :] == jm[:, None], float("-inf"), s)
                thr = _key_score(tl.min(run, axis=1))
    # Unsorted: the caller sorts the [M, G·KP] keys (a cheap torch.sort) and decodes them.
    offs = rows64[:, None] * stride_om + g * KP + slot[None, :]
    tl.store(OUT_ptr + offs, run, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["M"])
def _rescore_kernel(
    Q_ptr, K_ptr, QI_ptr, C_ptr, OUT_ptr,
    M, D, C,
    stride_qm, stride_kn, stride_cm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows64 = rows.to(tl.int64)
    qrow = tl.load(QI_ptr + rows, mask=row_ok, other=0).to(tl.int64)  # row of Q for output row
    t = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok = t < C
    cm = row_ok[:, None] & t_ok[None, :]
    cand = tl.load(C_ptr + rows64[:, None] * stride_cm + t[None, :], mask=cm, other=-1)
    use = cm & (cand >= 0)
    cand64 = tl.where(use, cand, 0).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=OUT_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + dd
        d_ok = d < D
        # Loaded in the features' dtype, multiplied in the output dtype (bf16/fp16 products
        # are exact in float32, as in the float32 oracle on converted features).
        q = tl.load(Q_ptr + qrow[:, None] * stride_qm + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(acc.dtype)
        kk = tl.load(K_ptr + cand64[:, :, None] * stride_kn + d[None, None, :],
                     mask=use[:, :, None] & d_ok[None, None, :], other=0.0).to(acc.dtype)
        acc += tl.sum(q[:, None, :] * kk, axis=2)
    acc = tl.where(use, acc, float("-inf"))
    tl.store(OUT_ptr + rows64[:, None] * stride_om + t[None, :], acc, mask=cm)
