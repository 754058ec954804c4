"""CPU neighbour search: BLAS tile products + native streaming top-k selection.

For a self search the score matrix is symmetric, so each tile ``X_I X_J^T`` (``J >= I``) is
computed once and used twice: rows of block ``I`` against keys of ``J``, and (transposed) rows
of ``J`` against keys of ``I`` (``TopK.add_product(..., symmetric=True)`` of
``prh_fast.knn._merge``). The native ``topk_update`` keeps each row's running
candidates sorted and inserts only scores *strictly* greater than the current last; because
every query row sees its key tiles in increasing index order (block ``J`` receives keys
``0..J-1`` as transposes while the outer loop advances, then ``J..`` directly), an equal score
never displaces a lower index. Each entry that enters a list also gets its fixed-order float64
score (the tile's rows are passed along); ``prh_fast.knn._exact`` ranks the final lists by those,
so exact duplicates tie exactly whatever BLAS did.

The screen (:func:`cpu_screen`, setting ``cpu_screen``): on a CPU with native bfloat16 matrix
units (AMX-BF16, AVX512-BF16) the candidates of float32 rows come from bfloat16 copies of the
rows, cast once per search, multiplied at about twice the float32 rate. torch's CPU ``mm``
returns bfloat16 for bfloat16 inputs (no float32 output), so each tile is widened to float32
for the native merge and the certified margin covers the input and output rounding
(``prh_fast.knn._bound.BF16_CPU``); more candidates are kept (``_exact.EXTRA_BF16``). The
re-score, certificate and sweep are unchanged, so the lists are the float32 screen's lists.
float64 rows always screen in float64. Elsewhere (AVX2: a bfloat16 ``mm`` is emulated and
slower than float32) ``"auto"`` keeps the float32 screen.
"""
from __future__ import annotations

import functools

import torch

from prh_fast.errors import InputError
from prh_fast.knn._bound import input_rounding
from prh_fast.knn._exact import candidate_count, refine_in_memory
from prh_fast.knn._merge import TopK
from prh_fast.knn._tiles import square_tile
from prh_fast.prepare import row_norms


def cpu_tile(n: int, itemsize: int, budget: int) -> int:
    """Side of the square score tiles of a symmetric search of ``n`` rows.

    Tiles of 256..1024 rows: small enough that the symmetric saving is real (about half the
    products at 8+ blocks), large enough for BLAS to run at full speed (measured on 2 cores:
    N=4096, D=768 takes 0.097 s with 512-row tiles, 0.135 s with 2048, 0.163 s unblocked).
    The streaming search (``prh_fast.store._stream``) uses the same tiles.
    """
    return square_tile(n, itemsize, budget, buffers=1, maximum=min(1024, max(256, -(-n // 8))))


def cpu_candidates(X: torch.Tensor, kc: int, budget: int, with_fixed: bool = False,
                   screen: torch.dtype | None = None, Xs: torch.Tensor | None = None):
    """``(idx, prod, fixed)`` ``[N, kc]``: each row's ``kc`` best other rows by the BLAS score
    (lower index at ties), with those scores and -- ``with_fixed`` -- the candidates'
    fixed-order float64 scores, computed as they enter (else ``fixed`` is None: in memory a
    pass over the final candidates is cheaper, about ``kc`` instead of ``kc·(1 + ln(N/kc))``
    re-scores per row). ``screen`` bfloat16: the scores are products of bfloat16 copies of the
    rows (cast once), widened to float32 for the running lists; the fixed-order scores are
    still those of ``X``'s own values. ``Xs``: the copies, when already made."""
    if screen is None or screen == X.dtype:
        return _candidates_native(X, kc, budget, with_fixed)
    if screen != torch.bfloat16 or X.dtype != torch.float32:
        raise InputError(f"screen: a {screen} screen needs float32 rows, got {X.dtype}")
    n = X.shape[0]
    Xs = X.to(screen) if Xs is None else Xs
    top = TopK(n, kc, torch.float32, native=True, with_fixed=with_fixed)
    # a bfloat16 tile and its float32 copy (the native merge reads float32 or float64)
    b = cpu_tile(n, 6, budget)
    s16 = torch.empty(b * b, dtype=screen)
    s32 = torch.empty(b * b, dtype=torch.float32)
    for i0 in range(0, n, b):
        Qs, Q = Xs[i0:i0 + b], X[i0:i0 + b]
        for j0 in range(i0, n, b):
            Ks, K = Xs[j0:j0 + b], X[j0:j0 + b]
            r, c = Qs.shape[0], Ks.shape[0]
            S16 = s16[:r * c].view(r, c)
            torch.mm(Qs, Ks.T, out=S16)
            S = s32[:r * c].view(r, c)
            S.copy_(S16)
            top.add(S, j0, row0=i0, exclude_self=True, q=Q, keys=K)
            if j0 != i0:
                top.add(S.T, i0, row0=j0, exclude_self=True, q=K, keys=Q)
    vals, idx, fixed = top.result("X")
    return idx, vals, fixed


def _candidates_native(X, kc, budget, with_fixed):
    n = X.shape[0]
    top = TopK(n, kc, X.dtype, native=True, with_fixed=with_fixed)
    b = cpu_tile(n, X.element_size(), budget)
    for i0 in range(0, n, b):
        Xi = X[i0:i0 + b]
        for j0 in range(i0, n, b):
            # Off the diagonal the transposed tile feeds block j0's lists as a view: the native
            # kernel walks column-major tiles in row blocks (measured: as fast as a transposed
            # copy at N = 4096, 9% faster at N = 16384, and no second tile buffer).
            top.add_product(Xi, X[j0:j0 + b], row0=i0, col0=j0, exclude_self=True,
                            symmetric=j0 != i0)
    vals, idx, fixed = top.result("X")
    return idx, vals, fixed


# --------------------------------------------------------------------------------------------
# the screen: which product dtype proposes the candidates


@functools.lru_cache(maxsize=1)
def cpu_bf16_support() -> tuple:
    """``(fast, why)``: whether this CPU multiplies bfloat16 matrices natively (AMX-BF16 or
    AVX512-BF16, from the flags of ``/proc/cpuinfo``) and a short reason. Elsewhere torch's CPU
    bfloat16 ``mm`` emulates them and is slower than float32 (~3-10x on AVX2).

    Example:
        >>> fast, why = cpu_bf16_support()
        >>> isinstance(fast, bool) and isinstance(why, str)
        True
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[-1].split())
                    break
    except OSError:
        return False, "CPU flags unknown (no /proc/cpuinfo)"
    have = [name for name, flag in (("AMX-BF16", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"))
            if flag in flags]
    if have:
        return True, f"{' and '.join(have)} on this CPU"
    return False, "no AMX/AVX512-BF16 on this CPU"


def cpu_screen(dtype: torch.dtype, setting: str | None = None) -> tuple:
    """``(screen dtype, why)``: the product dtype of the CPU search's candidates for rows of
    ``dtype`` under the ``cpu_screen`` setting (``None``: ``prh_fast.get_config().cpu_screen``).

    float64 rows always screen in float64 (a bfloat16 screen of them would need a float32
    sweep with its own bound); ``"bfloat16"`` / ``"float32"`` force the screen of float32 rows;
    ``"auto"`` is bfloat16 where :func:`cpu_bf16_support` says the CPU has fast bfloat16.

    Example:
        >>> cpu_screen(torch.float32, "bfloat16")[0]
        torch.bfloat16
        >>> cpu_screen(torch.float64, "bfloat16")[0]
        torch.float64
    """
    if setting is None:
        from prh_fast._config import get_config

        setting = get_config().cpu_screen
    if dtype == torch.float64:
        return torch.float64, "float64 features screen in float64"
    if setting == "bfloat16":
        return torch.bfloat16, "cpu_screen='bfloat16'"
    if setting == "float32":
        return torch.float32, "cpu_screen='float32'"
    fast, why = cpu_bf16_support()
    return (torch.bfloat16 if fast else torch.float32), why


def knn_cpu(X: torch.Tensor, k: int, budget: int, norms: torch.Tensor | None = None,
            screen: torch.dtype | None = None, return_stats: bool = False):
    """Exact lists ``(idx [N, k], fixed scores [N, k] float64)`` of a self search.

    ``screen``: product dtype of the candidates (``None``: :func:`cpu_screen` of ``X``'s dtype
    under the current settings); the lists are the same for every screen. ``return_stats``:
    also return the :class:`~prh_fast.knn._exact.ExactStats` (rows swept, re-scores)."""
    n = X.shape[0]
    if screen is None:
        screen = cpu_screen(X.dtype)[0]
    if screen == X.dtype:
        screen = None
    kc = candidate_count(k, n - 1, screen)
    Xs = rho = None
    if screen is not None:
        if norms is None:
            norms = row_norms(X)
        Xs = X.to(screen)  # once per search; the margin uses its measured rounding
        rho = input_rounding(X, Xs, norms)
    cand = cpu_candidates(X, kc, budget, screen=screen, Xs=Xs)
    out = refine_in_memory(X, None, k, cand, budget, norms=norms, screen=screen, rho=rho,
                           return_stats=True)
    return out if return_stats else out[:2]
