"""Exact lists from fast products: fixed-order re-scoring, a certified margin, and the sweep for
rows the margin cannot certify. Shared by every exact search that ranks BLAS-style products:
``cpu`` and ``torch`` (``prh_fast.knn``), the streamed search (``prh_fast.store._stream``) and
the distributed one (``prh_fast.distributed._knn``).

Why: a tiled matrix product (BLAS, cuBLAS) sums each ``<x_i, x_j>`` in an order that depends
on where ``x_j`` sits in its tile, so two *identical* key rows can score one ulp apart and the
lower-index tie rule silently breaks (for several percent of the rows of duplicate-heavy
data). So the product only *proposes* candidates; the lists are ranked by a second score.

Definition. ``fixed(i, j)`` is ``<x_i, x_j>`` accumulated in float64 in one fixed order that
depends on ``D`` only (``dot_fixed`` in ``csrc/common/rowops.h`` on CPU; a pairwise tree of
elementwise adds elsewhere, see ``prh_fast.knn._merge.fixed_dots``): equal rows give bit-equal
scores, wherever they are. ``knn(X, k)[i]`` is the ``k`` keys ``j != i`` with the largest
``fixed(i, j)``, ties to the lower index. For float32 (and float16 / bfloat16) features the
products are exact in float64, so ``fixed`` is the exact inner product up to a float64 rounding
of the sum.

Mechanism, per query row ``i``:

1. the search keeps the ``k' = k + extra`` best keys by the product score ``a_ij`` (lower index
   at ties) and, for each, ``fixed(i, j)``: a running :class:`~prh_fast.knn._merge.TopK` with
   fixed-order payloads, whatever the backend;
2. the row's list is the top ``k`` of those candidates by ``(fixed desc, index asc)``;
3. certificate: every score pair obeys ``|a_ij - fixed(i, j)| <= e_i`` with
   ``e_i = c · |x_i| · max_j |x_j| + eta`` (:func:`margins`). A key outside the candidates has
   ``a_ij <= a_min`` (the smallest kept product score), hence ``fixed(i, j) <= a_min + e_i``. If
   ``a_min + e_i < f_k`` (the ``k``-th fixed score kept) no outside key can enter or tie: the
   list is exact. Rows with all keys as candidates are exact by construction;
4. other rows (many near-ties: duplicated rows, quantised features) go through :class:`Sweep`:
   every key with a product score ``>= f_k - e_i`` -- a superset of the true top-k -- is
   re-scored and merged by ``(fixed desc, index asc)``. Exact, whatever the data.

Error bound ``c`` (per unit ``|x_i| |x_j|``): one implementation, ``prh_fast.knn._bound``
(shared with the triton backend). The product in the compute dtype: recursive summation worst
case ``γ(D + 2, u)`` with ``u = 2^-24`` (float32) or ``2^-53`` (float64), plus the rounding of
float32 inputs to the tensor-core format when ``torch.get_float32_matmul_precision`` allows it
(tf32: ``2^-10``, bf16: ``2^-8``); plus the fixed-order sum's own ``γ(D + 1, 2^-53)``. ``eta``
covers underflow. Norms are float64, rounded up.

bfloat16 screen (``screen=torch.bfloat16``, the CPU search on CPUs with fast bfloat16): the
candidates come from a bfloat16 ``torch.mm`` of bfloat16 copies of the rows. Its bound
(:data:`~prh_fast.knn._bound.BF16_CPU`) adds the inputs' rounding (at most ``2^-8`` each; the
search passes the copies' measured rounding ``rho``, about ``2^-9``), a matrix-unit
accumulation allowance and the rounding of the result to bfloat16 (``2^-8``): ``c`` is about
0.008 at ``D = 768`` (0.012 in the worst case), so more candidates are kept
(:data:`EXTRA_BF16`). The
fixed-order re-score, the ranking, the certificate and the sweep are the float32 search's:
the lists are the same lists. The sweep re-scores with float32 products, so its threshold uses
the float32 margin.

Re-scores only where they can matter: a candidate with ``a_ij < a_(k) - 2 e_i`` (``a_(k)``: the
row's ``k``-th product score) has ``fixed(i, j) <= a_ij + e_i < a_(k) - e_i``, which is below
the fixed score of each of the ``k`` best candidates by product: it cannot be in the list, so
:func:`refine_in_memory` does not re-score it (its fixed score is ``-inf``). The certificate is
unchanged (``a_min`` is still the smallest kept product score).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import torch

from prh_fast.errors import InputError
from prh_fast.knn._bound import (
    BF16_CPU,
    U_BF16,
    U_FP32,
    U_FP64,
    U_TF32,
    ProductFormat,
    coefficient,
    eta_conversion,
    eta_products,
)
from prh_fast.knn._merge import TopK, _canonical, _tree_dots, fixed_dots, fixed_self, merge_results

logger = logging.getLogger(__name__)

# fixed_dots, fixed_self (and the tree order of _tree_dots) are defined with the running merge
# whose entries carry them (prh_fast.knn._merge) and re-exported here with the mechanism.
__all__ = ["fixed_dots", "candidate_count", "margins", "finish", "Sweep", "merge_self",
           "fixed_self", "check_scores_finite", "search_exponent", "refine_in_memory",
           "_tree_dots", "product_format", "ExactStats", "EXTRA", "EXTRA_BF16"]

#: Candidates kept beyond ``k``: room for a few near-ties at the boundary (duplicated rows)
#: before a row needs the sweep. Each one costs a little in the running lists (an insertion
#: shifts up to ``k'`` entries) and at most one fixed-order re-score.
EXTRA = 8

#: Candidates kept beyond ``k`` by a bfloat16 screen (at least; ``k // 2`` for larger ``k``),
#: whose margin is 175-350x wider (D = 768..384). Measured (``benchmarks/bench_knn.py --suite
#: screen``, N = 16384): rows left to the sweep with 8 / 16 / 32 extra: 3.3% / 0.01% / 0 of
#: structured D = 768 rows, 0.12% / 0 / 0 of MiniLM sentence embeddings (k = 10); at k = 50
#: (MiniLM, N = 4096) 16% / 0.12% / 0. Only the candidates within the margin band of the k-th
#: are re-scored.
EXTRA_BF16 = 16


def candidate_count(k: int, n_keys: int, screen: torch.dtype | None = None) -> int:
    """``k'``: candidates kept per row for lists of ``k`` among ``n_keys`` keys (``screen``:
    the product dtype; bfloat16 keeps ``max(EXTRA_BF16, k // 2)`` beyond ``k``)."""
    extra = max(EXTRA_BF16, k // 2) if screen == torch.bfloat16 else EXTRA
    return min(n_keys, k + extra)


# --------------------------------------------------------------------------------------------
# margin and certificate


def product_format(dtype: torch.dtype, screen: torch.dtype | None = None) -> ProductFormat:
    """How a CPU/torch search computes its product scores of ``dtype`` rows: a ``torch.mm`` in
    ``dtype`` (float32 products may round their inputs to tf32 (``"high"``) or bf16
    (``"medium"``) when ``torch.set_float32_matmul_precision`` allows it, as the triton
    backend's formats), or -- ``screen`` bfloat16 -- a bfloat16 ``torch.mm`` of bfloat16 copies
    (:data:`~prh_fast.knn._bound.BF16_CPU`)."""
    if screen == torch.bfloat16 and dtype != torch.bfloat16:
        return BF16_CPU
    if dtype == torch.float64:
        return ProductFormat(u_in=0.0, u_acc=U_FP64)
    prec = torch.get_float32_matmul_precision()
    u_in = {"high": U_TF32, "medium": U_BF16}.get(prec, 0.0)
    return ProductFormat(u_in=u_in, u_acc=U_FP32)


def margins(qnorm: torch.Tensor, kmax: float, d: int, dtype: torch.dtype,
            screen: torch.dtype | None = None, rho: float | None = None) -> torch.Tensor:
    """``e_i``: a bound on ``|product score - fixed score|`` for query ``i`` against any key
    (``qnorm`` = float64 query norms ``[r]``, ``kmax`` = the largest key norm, ``dtype`` the
    rows' dtype, ``screen``: bfloat16 when the product scores came from bfloat16 copies of the
    rows, see :func:`product_format`; ``rho``: the copies' measured relative rounding
    (``prh_fast.knn._bound.input_rounding``, at most ``2^-8``), used instead of the worst
    case)."""
    fmt = product_format(dtype, screen)
    if rho is not None and fmt.u_in and rho < fmt.u_in:
        fmt = dataclasses.replace(fmt, u_in=rho)
    c = coefficient(d, fmt)
    c *= 1.0 + 2.0**-20  # absorbs the rounding of the norms and of this product
    eta = eta_products(d, dtype)
    if fmt.u_in or rho is not None:
        qmax = float(qnorm.max()) if qnorm.numel() else 0.0
        eta += eta_conversion(d, qmax, kmax)
    return qnorm.to(torch.float64) * (c * kmax) + eta


def check_scores_finite(vals: torch.Tensor, what: str) -> None:
    """The search's own scores must be finite (finite features, scaled into range)."""
    if vals.numel() and not bool(torch.isfinite(vals).all()):
        raise InputError(f"{what}: the neighbour search produced non-finite inner products "
                         f"(the features' scale overflows {vals.dtype}); normalise the rows or "
                         f"pass float64 features")


def _ranked(vals: torch.Tensor, idx: torch.Tensor, k: int):
    """The first ``k`` of each row by ``(vals desc, idx asc)``: one sort by value; rows where
    equal values meet within the first ``k + 1`` (rare: exact ties; ``-inf`` entries after the
    ``k``-th do not count) are put in canonical order by the two stable sorts."""
    v, o = torch.sort(vals, dim=1, descending=True, stable=True)
    i = idx.gather(1, o)
    h = v[:, :k + 1]
    tied = (h[:, 1:] == h[:, :-1]).any(dim=1) if h.shape[1] > 1 else v.new_zeros(0, dtype=bool)
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        v[rows], i[rows] = _canonical(v[rows], i[rows])
    return v[:, :k].contiguous(), i[:, :k].contiguous()


def finish(idx: torch.Tensor, prod: torch.Tensor, fixed: torch.Tensor, k: int,
           e: torch.Tensor, all_keys: bool):
    """Final lists from candidates: ``(idx [r, k], fixed [r, k] float64, uncertain rows)``.

    ``idx``, ``prod``, ``fixed``: ``[r, k']`` candidates (product scores in any order), ``e``:
    ``[r]`` margins, ``all_keys``: the candidates are every key (nothing to certify).
    ``uncertain`` holds the rows (positions) that need :class:`Sweep`, with their threshold
    ``f_k - e`` as the second element: ``(rows, thresholds)``.
    """
    check_scores_finite(prod, "X")
    f, i = _ranked(fixed, idx, k)
    if all_keys or idx.shape[1] == 0:
        rows = torch.empty(0, dtype=torch.int64, device=idx.device)
        return i, f, (rows, f.new_empty(0))
    fk = f[:, k - 1]
    amin = prod.amin(dim=1).to(torch.float64)
    bad = ~(amin + e < fk)
    rows = bad.nonzero().squeeze(1)
    return i, f, (rows, (fk - e)[rows])


class Sweep:
    """Exact lists for rows the certificate left open: every key whose product score reaches the
    row's threshold is re-scored (fixed order) and merged by ``(fixed desc, index asc)`` into a
    running :class:`~prh_fast.knn._merge.TopK` of fixed scores.

    ``Q``: the rows' features ``[r, D]`` (same values and dtype as the search's), ``qids``: their
    global row ids (a key with the same id is skipped: self), ``thr``: float64 thresholds
    ``[r]``, ``k``: list length, ``budget``: bytes of scratch. Feed every key block once with
    :meth:`add`, in any order; :meth:`result` returns ``(idx [r, k], fixed [r, k])``.
    """

    def __init__(self, Q: torch.Tensor, qids: torch.Tensor, thr: torch.Tensor, k: int,
                 budget: int, exclude_self: bool = True):
        self.Q, self.k, self.budget = Q, k, budget
        self.qids, self.thr = qids.to(Q.device), thr.to(Q.device, torch.float64)
        self.exclude_self = exclude_self
        # keys below the threshold enter as -inf: a list that keeps one is an error (result)
        self._top = TopK(Q.shape[0], k, torch.float64, Q.device)

    def add(self, K: torch.Tensor, k0: int) -> None:
        """Merge keys ``K`` ``[m, D]`` with global ids ``k0 .. k0 + m - 1``."""
        r, m = self.Q.shape[0], K.shape[0]
        if r == 0 or m == 0:
            return
        K = K.to(self.Q.device)
        cols = min(m, 4096)
        # float64 S and F, a mask, ids; at least 64 rows (as the search's smallest tiles)
        rows = max(1, min(r, max(64, self.budget // (32 * cols))))
        for c0 in range(0, m, cols):
            c1 = min(m, c0 + cols)
            for r0 in range(0, r, rows):
                r1 = min(r, r0 + rows)
                self._block(r0, r1, K, c0, c1, k0)

    def _block(self, r0, r1, K, c0, c1, k0):
        S = (self.Q[r0:r1] @ K[c0:c1].T).to(torch.float64)
        hit = S >= self.thr[r0:r1].unsqueeze(1)
        if self.exclude_self:
            ids = torch.arange(k0 + c0, k0 + c1, device=K.device)
            hit &= ids.unsqueeze(0) != self.qids[r0:r1].unsqueeze(1)
        rr, cc = hit.nonzero(as_tuple=True)
        if rr.numel() == 0:
            return
        F = torch.full_like(S, float("-inf"))
        F[rr, cc] = fixed_dots(self.Q[r0:r1], K, rr, cc + c0)
        self._top.add(F, k0 + c0, row0=r0)

    def result(self):
        vals, idx, _ = self._top.result()
        if bool((vals == float("-inf")).any()):
            raise InputError("X: the exact re-score found fewer than k keys above a row's "
                             "threshold (non-finite scores?)")
        return idx, vals


@dataclasses.dataclass
class ExactStats:
    """What the exact refinement of one search did (logged at DEBUG as ``exact_stats``).

    Attributes:
        rows: query rows.
        candidates: candidates kept per row (``k'``).
        screen: product dtype of the candidates (``"float32"``, ``"bfloat16"``, ...).
        rescored: fixed-order re-scores of candidates (pairs).
        swept: rows the certificate left open, finished by :class:`Sweep`.

    Example:
        >>> ExactStats(rows=4, candidates=3, screen="float32").swept
        0
    """

    rows: int
    candidates: int
    screen: str
    rescored: int = 0
    swept: int = 0


def _rescore(X, K, ci, keep):
    """Fixed-order scores of the candidates ``ci`` ``[r, k']`` marked by ``keep`` (others:
    ``-inf``), in chunks of ~4M pairs."""
    cf = torch.full(ci.shape, float("-inf"), dtype=torch.float64, device=ci.device)
    step = max(1, (1 << 22) // max(1, ci.shape[1]))
    for r0 in range(0, ci.shape[0], step):
        c, m = ci[r0:r0 + step], keep[r0:r0 + step]
        rr, cc = m.nonzero(as_tuple=True)
        cf[r0 + rr, cc] = fixed_dots(X, K, rr + r0, c[rr, cc])
    return cf


def refine_in_memory(X: torch.Tensor, keys, k: int, cand, budget: int,
                     norms: torch.Tensor | None = None, screen: torch.dtype | None = None,
                     rho: float | None = None, return_stats: bool = False):
    """Exact lists ``(idx [N, k], fixed [N, k] float64)`` from candidates ``cand = (idx, prod,
    fixed)`` of the rows of ``X`` against ``keys`` (``None``: ``X`` itself, self excluded;
    ``fixed`` None: re-scored here, only the candidates that can enter a list, see the module
    docstring); uncertain rows are swept over the keys in memory. ``norms``: ``X``'s float64
    row norms when already known. ``screen``: the dtype of the candidates' products when not
    ``X``'s (bfloat16 copies), ``rho`` their measured rounding (:func:`margins`).
    ``return_stats``: also return the :class:`ExactStats`."""
    from prh_fast.prepare import row_norms

    K = X if keys is None else keys
    qn = row_norms(X) if norms is None else norms.to(torch.float64)
    kn = qn if keys is None else row_norms(K)
    kmax = float(kn.max()) if kn.numel() else 0.0
    d = X.shape[1]
    e = margins(qn, kmax, d, X.dtype, screen, rho)
    n_keys = K.shape[0] - (1 if keys is None else 0)
    ci, cv, cf = cand
    name = str(screen if screen is not None else X.dtype).replace("torch.", "")
    stats = ExactStats(rows=int(ci.shape[0]), candidates=int(ci.shape[1]), screen=name)
    if cf is None:
        if ci.shape[1] > k:
            check_scores_finite(cv, "X")
            ak = cv.topk(k, dim=1).values[:, -1].to(torch.float64)
            keep = cv.to(torch.float64) >= (ak - 2.0 * e).unsqueeze(1)
        else:
            keep = torch.ones(ci.shape, dtype=torch.bool, device=ci.device)
        cf = _rescore(X, K, ci, keep)
        stats.rescored = int(keep.sum())
    else:
        stats.rescored = int(cf.numel())
    idx, fixed, (rows, thr) = finish(ci, cv, cf, k, e, all_keys=ci.shape[1] >= n_keys)
    if rows.numel():
        if screen is not None and screen != X.dtype:
            # the sweep's own products are X's dtype: its (narrower) margin sets the threshold
            thr = fixed[rows, k - 1] - margins(qn[rows], kmax, d, X.dtype)
        stats.swept = int(rows.numel())
        sw = Sweep(X[rows], rows, thr, k, budget, exclude_self=keys is None)
        step = 4096
        for c0 in range(0, K.shape[0], step):
            sw.add(K[c0:c0 + step], c0)
        idx[rows], fixed[rows] = sw.result()
    logger.debug("prh_fast: exact kNN: %d rows, %d candidates (%s products), %d re-scores, %d "
                 "rows swept", stats.rows, stats.candidates, stats.screen, stats.rescored,
                 stats.swept, extra={"exact_stats": dataclasses.asdict(stats)})
    return (idx, fixed, stats) if return_stats else (idx, fixed)


# --------------------------------------------------------------------------------------------
# range: the search runs on features scaled by a power of two


def search_exponent(max_norm: float, dtype: torch.dtype) -> int:
    """``e`` such that the search runs on ``X · 2**-e``: 0 when the largest row norm keeps every
    inner product comfortably inside ``dtype``'s range, else the exponent of ``max_norm`` (the
    scaled rows then have norms below 1). Exact, and the lists do not change: every inner
    product scales by the same ``4**-e``."""
    if not max_norm > 0 or not math.isfinite(max_norm):
        return 0
    info = torch.finfo(dtype)
    lo, hi = info.tiny ** 0.25, info.max ** 0.25
    if lo <= max_norm <= hi:
        return 0
    return math.frexp(max_norm)[1]


def merge_self(idx: torch.Tensor, vals: torch.Tensor, self_vals: torch.Tensor, k: int):
    """Lists that also admit the row itself: each row's ``k`` best of its own entry (score
    ``self_vals[i]``) and its ``k`` best other keys ``(idx, vals)``, by ``(score desc, index
    asc)``. The top-k of a whole row is either its self-excluded top-k or itself plus the
    self-excluded top-(k-1), so this equals the top-k of the row with the diagonal eligible."""
    me = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1)
    v, i = merge_results([(vals.to(self_vals.dtype), idx), (self_vals.unsqueeze(1), me)], k)
    return i, v
