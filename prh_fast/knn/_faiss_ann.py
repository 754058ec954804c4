"""Approximate neighbour search with FAISS: IVF-Flat, IVF-PQ and HNSW, with a recall report.

Backends ``"faiss-ivf"``, ``"faiss-ivfpq"`` and ``"faiss-hnsw"`` of ``prh_fast.knn.knn``. They
search the prepared features by inner product, like the exact backends (cosine similarity on
L2-normalised rows), exclude each row itself, and return ``[N, k]`` int64 lists ordered by
score (descending), ties by the lower index among the candidates the index returned.

Choosing and passing parameters (``AnnParams``; every field ``None`` means "derived from N",
or for the query-time parameters "tuned to the target"):

- as the backend itself: ``knn(X, 10, backend=AnnParams("faiss-ivf", nprobe=16))``;
- as a spec string, anywhere a backend name is accepted (``backend=``, the configured backend:
  ``PRH_FAST_BACKEND`` or ``prh_fast.config_context(backend=...)``, ``prh-fast align
  --backend``): ``"faiss-ivf:nprobe=16,nlist=1024"``, ``"faiss-hnsw:target_recall=0.98"``;
  FAISS's own names (``m``, ``nbits``, ``M``, ``efConstruction``, ``efSearch``) and
  ``target`` work as aliases there;
- on the command line: ``--backend faiss-ivf --knn-option nprobe=16`` (or
  ``--knn-option target_recall=0.98``).

Query-time parameters and a requested recall: the build parameters (``nlist``, PQ codes,
HNSW graph) are derived from N unless given; the query-time ones (``QUERY_PARAMS``: IVF
``nprobe``, IVF-PQ ``nprobe`` and ``refine``, HNSW ``ef_search``) are tuned to
``target_recall`` (``tune_query``: doubling, then bisection, to the smallest setting whose
recall@k on the recall sample reaches the target) unless given explicitly. Without a target
and without query-time parameters the default target (``DEFAULT_TARGET_RECALL``, 0.95)
applies; a target that the index cannot reach is an ``InputError`` naming the best recall.

Every approximate search measures what it lost (``AnnReport``): on a seeded sample of query
rows (``recall_sample``, default ``min(N, 1000)``) it runs an exact float32 search of those
rows against all keys (torch tiles, ties by the lower index) — before the full search, as the
tuning measures its trials against it — and reports recall@k, the share of the exact
neighbours the index found (a neighbour tied with the ``k``-th exact score counts as found),
with a 95% interval. The rows of the sample depend only on ``(N, seed)`` and are nested (a
larger sample holds a smaller one's rows), so every layer of a model pair is sampled at the
same rows and a sample can grow (``AnnReport.grow``). ``prh_fast.align`` turns the per-layer
reports into the error of the metric itself (``|mutual_knn(approx) - mutual_knn(exact)|`` on
the sample rows, per layer pair, with its standard error and 95% interval; the sample grows
while an error is not resolved). Each report is logged (one line) and returned
(``knn(..., return_report=True)``, ``AlignmentResult.ann_report``). A returned report holds
the search's features and lists until ``AnnReport.release`` (``align`` releases its own).

Rows for which the index returned fewer than ``k`` results (an IVF probe that reached too few
points) are completed by an exact search of those rows; the report counts them.

The IVF-Flat search on the CPU does not use FAISS's per-query list scan: ``IvfFlatScan``
(``prh_fast.knn._ivf_scan``) groups the queries by probed cell, scores each cell with one
matrix product and ranks the candidates by fixed-order float64 scores (ties by the lower
index): the candidates of FAISS's search, 4-5x faster at N = 1M, the lists independent of how
the rows are blocked (in memory or from a store).

GPU: features on a CUDA device use FAISS's GPU IVF indexes when a faiss build with GPU support
is installed (``faiss.StandardGpuResources``); HNSW always runs on the CPU (FAISS has no GPU
HNSW). That path is guarded but has never run: the project's GPU machine has no FAISS and no
GPU FAISS wheel fits there, so it is untested. Without GPU FAISS, CUDA features are
copied to the CPU for the index (one log line); lists come back on the features' device.

Determinism: the training sample is drawn with ``numpy.random.default_rng(seed)``, FAISS's
k-means (coarse quantiser and PQ codebooks) gets ``cp.seed = seed``, and HNSW's level generator
is seeded with ``seed``. FAISS inserts HNSW vertices from several threads; the graphs were
identical run to run in our tests, but FAISS does not promise it.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from prh_fast.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["ANN_BACKENDS", "AnnParams", "AnnReport", "DEFAULT_TARGET_RECALL", "QUERY_PARAMS",
           "knn_ann", "mean_ci", "sample_rows", "set_query_params", "tune_query"]

ANN_BACKENDS = ("faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
_SHORT = {"ivf": "faiss-ivf", "ivfflat": "faiss-ivf", "faiss-ivfflat": "faiss-ivf",
          "ivfpq": "faiss-ivfpq", "hnsw": "faiss-hnsw"}

#: Which fields apply to which backend (``seed`` and ``recall_sample`` apply to all).
_APPLIES = {
    "nlist": ("faiss-ivf", "faiss-ivfpq"),
    "nprobe": ("faiss-ivf", "faiss-ivfpq"),
    "train_size": ("faiss-ivf", "faiss-ivfpq"),
    "pq_m": ("faiss-ivfpq",),
    "pq_nbits": ("faiss-ivfpq",),
    "refine": ("faiss-ivfpq",),
    "hnsw_m": ("faiss-hnsw",),
    "ef_construction": ("faiss-hnsw",),
    "ef_search": ("faiss-hnsw",),
    "seed": ANN_BACKENDS,
    "recall_sample": ANN_BACKENDS,
    "target_recall": ANN_BACKENDS,
}
#: The query-time parameters of each backend: the ones ``target_recall`` tunes.
QUERY_PARAMS = {"faiss-ivf": ("nprobe",), "faiss-ivfpq": ("nprobe", "refine"),
                "faiss-hnsw": ("ef_search",)}
#: The recall@k a search must reach when no query-time parameter and no target are given.
DEFAULT_TARGET_RECALL = 0.95
#: The largest HNSW ``efSearch`` the tuning tries (also capped by the number of points).
EF_SEARCH_CAP = 4096
#: The largest IVF-PQ ``refine`` the tuning tries.
REFINE_CAP = 64
_Z95 = 1.959963984540054
#: FAISS's names for the same knobs (spec strings, the CLI, ``AnnParams.from_options``).
_ALIASES = {"nbits": "pq_nbits", "M": "hnsw_m", "efConstruction": "ef_construction",
            "efSearch": "ef_search", "ef_construct": "ef_construction",
            "train": "train_size", "sample": "recall_sample", "target": "target_recall"}

_PQ_DEFAULT_REFINE = 4


def _canonical_name(name) -> str:
    if not isinstance(name, str):
        raise InputError(f"backend: expected one of {ANN_BACKENDS}, got {name!r}")
    low = name.strip().lower()
    low = _SHORT.get(low, low)
    if low not in ANN_BACKENDS:
        raise InputError(f"backend: expected one of {ANN_BACKENDS}, got {name!r}")
    return low


@dataclass(frozen=True)
class AnnParams:
    """An approximate FAISS search and its parameters; ``None`` fields take defaults from N.

    Args:
        backend: ``"faiss-ivf"`` (IVF-Flat), ``"faiss-ivfpq"`` (IVF with product quantisation)
            or ``"faiss-hnsw"``.
        nlist: IVF cells. Default: the power of two nearest ``4·sqrt(N)``, at most ``N // 39``
            (FAISS's k-means wants 39+ training points per centroid), at least 1.
        nprobe: cells visited per query, ``1..nlist``. Default: tuned to the target; when
            another query-time parameter is given, ``round(sqrt(nlist))`` (64 at nlist =
            4096). ``nprobe = nlist`` makes IVF-Flat an exact search.
        train_size: rows drawn (seeded, without replacement) to train the quantisers, up to N.
            Default ``min(N, 64·nlist)`` (IVF-PQ: at least ``64·2**pq_nbits``).
        pq_m: PQ sub-quantisers, a divisor of D. Default: the largest divisor of D that is at
            most ``D // 4`` (4 dimensions per code byte at 8 bits).
        pq_nbits: bits per sub-quantiser code, 1..16. Default 8 (fewer when the training
            sample is too small for 256 centroids).
        refine: IVF-PQ returns ``refine·(k+1)`` candidates per query, which are re-scored with
            exact float32 inner products and the best ``k`` kept (the returned scores are
            exact). Default 4 (the tuning may raise it); 1 re-scores without widening.
        hnsw_m: HNSW graph degree ``M``. Default 32.
        ef_construction: HNSW build beam. Default 40 (FAISS's).
        ef_search: HNSW search beam (FAISS uses at least ``k+1``). Default: tuned to the
            target.
        seed: training sample, k-means, HNSW levels and the recall sample. Default 0.
        recall_sample: query rows of the recall report, ``1..N``. Default ``min(N, 1000)``.
        target_recall: the recall@k the search must reach, ``0 < t <= 1``: the query-time
            parameters (``QUERY_PARAMS``: IVF ``nprobe``, IVF-PQ ``nprobe`` and ``refine``,
            HNSW ``ef_search``) are tuned on the recall sample (``tune_query``) to the smallest
            setting whose sample recall reaches it. When neither a target nor any query-time
            parameter is given, ``DEFAULT_TARGET_RECALL`` (0.95) applies; query-time
            parameters given without a target are used as given; both together are an error.

    Example:
        >>> p = AnnParams.parse("faiss-ivf:nprobe=16,nlist=1024")
        >>> p.backend, p.nprobe, p.nlist
        ('faiss-ivf', 16, 1024)
    """

    backend: str = "faiss-ivf"
    nlist: int | None = None
    nprobe: int | None = None
    train_size: int | None = None
    pq_m: int | None = None
    pq_nbits: int | None = None
    refine: int | None = None
    hnsw_m: int | None = None
    ef_construction: int | None = None
    ef_search: int | None = None
    seed: int = 0
    recall_sample: int | None = None
    target_recall: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", _canonical_name(self.backend))
        t = self.target_recall
        if t is not None:
            if isinstance(t, bool) or not isinstance(t, (int, float, np.integer, np.floating)):
                raise InputError(f"target_recall: expected a number in (0, 1], got {t!r}")
            t = float(t)
            if not 0.0 < t <= 1.0:
                raise InputError(f"target_recall: expected a number in (0, 1], got {t}")
            object.__setattr__(self, "target_recall", t)
        for f in fields(self):
            if f.name in ("backend", "target_recall"):
                continue
            v = getattr(self, f.name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InputError(f"{f.name}: expected an integer, got {v!r}")
            v = int(v)
            object.__setattr__(self, f.name, v)
            low = 0 if f.name == "seed" else (2 if f.name == "hnsw_m" else 1)
            if v < low:
                raise InputError(f"{f.name}: expected an integer >= {low}, got {v}")
            if f.name != "seed" and self.backend not in _APPLIES[f.name]:
                raise InputError(f"{f.name}: applies to {' / '.join(_APPLIES[f.name])}, not "
                                 f"{self.backend}")
        if self.pq_nbits is not None and self.pq_nbits > 16:
            raise InputError(f"pq_nbits: expected 1..16, got {self.pq_nbits}")
        if self.seed >= 2**31:
            raise InputError(f"seed: expected an integer below 2**31, got {self.seed}")
        given = self.query_given()
        if t is not None and given:
            raise InputError(f"target_recall: tunes {' / '.join(QUERY_PARAMS[self.backend])}; "
                             f"give either target_recall or {', '.join(given)}, not both")

    def query_given(self) -> list[str]:
        """The query-time parameters (``QUERY_PARAMS``) set on this object.

        Returns:
            Their names, in ``QUERY_PARAMS`` order (empty when none is set).

        Example:
            >>> AnnParams("faiss-ivf", nprobe=4).query_given()
            ['nprobe']
        """
        return [a for a in QUERY_PARAMS[self.backend] if getattr(self, a) is not None]

    def target(self) -> float | None:
        """The recall@k this search is tuned to: ``target_recall`` when given, else
        ``DEFAULT_TARGET_RECALL`` when no query-time parameter is given, else ``None`` (the
        query-time parameters are used as given).

        Returns:
            The target, or ``None`` for no tuning.

        Example:
            >>> AnnParams("faiss-hnsw").target(), AnnParams("faiss-hnsw", ef_search=32).target()
            (0.95, None)
        """
        if self.target_recall is not None:
            return self.target_recall
        return None if self.query_given() else DEFAULT_TARGET_RECALL

    # ---------------------------------------------------------------------------- parsing
    @classmethod
    def from_options(cls, backend: str, options: dict | list | tuple | None = None
                     ) -> "AnnParams":
        """From a backend name and options: a dict, or ``"key=value"`` strings (the CLI's
        ``--knn-option``). FAISS's names are accepted as aliases (``m`` is ``pq_m`` for IVF-PQ
        and ``hnsw_m`` for HNSW)."""
        name = _canonical_name(backend)
        if options is None:
            options = {}
        if not isinstance(options, dict):
            items = {}
            for s in options:
                if not isinstance(s, str) or "=" not in s:
                    raise InputError(f"knn option: expected KEY=VALUE, got {s!r}")
                key, val = s.split("=", 1)
                items[key.strip()] = val.strip()
            options = items
        known = {f.name for f in fields(cls)} - {"backend"}
        kw = {}
        for key, val in options.items():
            if key == "m":
                field_name = "hnsw_m" if name == "faiss-hnsw" else "pq_m"
            else:
                field_name = _ALIASES.get(key, key)
            if field_name not in known:
                raise InputError(f"knn option {key!r}: unknown; expected one of "
                                 f"{sorted(known)} (or FAISS's names {sorted(_ALIASES)}, 'm')")
            if field_name in kw:
                raise InputError(f"knn option {key!r}: given twice (as {field_name})")
            if isinstance(val, str) and field_name == "target_recall":
                try:
                    val = float(val)
                except ValueError:
                    raise InputError(f"target_recall: expected a number in (0, 1], got "
                                     f"{val!r}") from None
            elif isinstance(val, str):
                try:
                    val = int(val)
                except ValueError:
                    raise InputError(f"{field_name}: expected an integer, got {val!r}") from None
            kw[field_name] = val
        return cls(backend=name, **kw)

    @classmethod
    def parse(cls, spec: str) -> "AnnParams":
        """``"faiss-ivf"`` or ``"faiss-ivf:nprobe=16,nlist=1024"``."""
        name, _, rest = spec.partition(":")
        opts = [s for s in rest.split(",") if s.strip()] if rest else []
        return cls.from_options(name, opts)

    def spec(self) -> str:
        """The spec string of the fields that are set (parses back to an equal object)."""
        kv = [f"{f.name}={getattr(self, f.name)}" for f in fields(self)
              if f.name != "backend" and getattr(self, f.name) is not None
              and not (f.name == "seed" and self.seed == 0)]
        return self.backend + (":" + ",".join(kv) if kv else "")

    def to_dict(self) -> dict:
        """The fields that apply to this backend (``None``: not resolved yet)."""
        return {"backend": self.backend, **{
            f.name: getattr(self, f.name) for f in fields(self)
            if f.name != "backend" and self.backend in _APPLIES[f.name]}}

    # ---------------------------------------------------------------------------- defaults
    def resolved(self, n_keys: int, d: int, k: int, n_queries: int | None = None) -> "AnnParams":
        """A copy with every applicable field set, checked against the search's shape:
        ``n_keys`` points of ``d`` dims, ``k`` neighbours, ``n_queries`` query rows (N).

        When a target applies (``target()``), ``target_recall`` is set to it and the
        query-time parameters stay ``None`` (``tune_query`` chooses them); otherwise the
        query-time parameters get their defaults and ``target_recall`` stays ``None``."""
        nq = n_keys if n_queries is None else n_queries
        b = self.backend
        target = self.target()
        out = {"target_recall": target}

        def check(name, v, lo, hi, why=""):
            if not lo <= v <= hi:
                raise InputError(f"{name}: expected {lo}..{hi}{why}, got {v}")
            return v

        out["recall_sample"] = check("recall_sample", self.recall_sample or min(nq, 1000), 1,
                                     nq, f" (query rows N = {nq})")
        if b in ("faiss-ivf", "faiss-ivfpq"):
            nlist = self.nlist
            if nlist is None:
                guess = 2 ** round(math.log2(max(1.0, 4.0 * math.sqrt(n_keys))))
                nlist = max(1, min(guess, n_keys // 39))
            out["nlist"] = check("nlist", nlist, 1, n_keys, f" (points N = {n_keys})")
            if target is None:
                nprobe = self.nprobe or max(1, min(nlist, round(math.sqrt(nlist))))
                out["nprobe"] = check("nprobe", nprobe, 1, nlist, f" (nlist = {nlist})")
        if b == "faiss-ivfpq":
            pq_m = self.pq_m
            if pq_m is None:
                pq_m = max(m for m in range(1, max(1, d // 4) + 1) if d % m == 0)
            if pq_m > d or d % pq_m:
                raise InputError(f"pq_m: must divide the feature width D = {d}, got {pq_m}")
            out["pq_m"] = pq_m
        if b in ("faiss-ivf", "faiss-ivfpq"):
            need = out["nlist"]
            nbits = self.pq_nbits
            if b == "faiss-ivfpq" and nbits is None:
                avail = self.train_size or n_keys
                nbits = max(1, min(8, int(math.log2(max(2, avail // 39)))))
            if b == "faiss-ivfpq":
                need = max(need, 2**nbits)
                out["pq_nbits"] = nbits
            train = self.train_size
            if train is None:
                want = 64 * out["nlist"]
                if b == "faiss-ivfpq":
                    want = max(want, 64 * 2**nbits)
                train = min(n_keys, want)
            if train > n_keys:
                raise InputError(f"train_size: expected at most N = {n_keys} points, got {train}")
            if train < need:
                what = ("nlist" if need == out["nlist"] else "2**pq_nbits")
                raise InputError(f"train_size: needs at least {what} = {need} points to train "
                                 f"the quantiser, got {train}")
            out["train_size"] = train
        if b == "faiss-ivfpq" and target is None:
            out["refine"] = self.refine or _PQ_DEFAULT_REFINE
        if b == "faiss-hnsw":
            out["hnsw_m"] = self.hnsw_m or 32
            out["ef_construction"] = self.ef_construction or 40
            if target is None:
                out["ef_search"] = self.ef_search or max(64, 2 * (k + 1))
        return replace(self, **out)


# -------------------------------------------------------------------------------- the report
@dataclass
class AnnReport:
    """What one approximate search lost, measured on a sample of its query rows.

    Attributes:
        backend, params: the search (``params``: every applicable field, resolved; after
            tuning, the chosen query-time parameters, so ``params`` reproduces the search).
        n, n_keys, d, k: query rows, indexed points, width, neighbours.
        sample: ``[S]`` int64 query rows of the sample (sorted; fixed by ``(N, seed)``, nested:
            a larger sample holds the rows of a smaller one).
        approx, exact: ``[S, k]`` the approximate and the exact lists of those rows.
        recall: mean over the sample of ``|approx_i ∩ exact_i| / k`` (recall@k).
        rows_equal: share of sample rows whose approximate set equals the exact set.
        rows_completed: rows that had fewer than ``k`` results and were searched exactly.
        device: ``"cpu"`` or ``"gpu"`` (where the index ran).
        timings: seconds: ``train``, ``add``, ``search``, ``report`` (the exact sample search),
            ``tune`` (the tuning's sample searches), ``grow`` (exact searches of added rows).
        target_recall: the recall@k the query-time parameters were tuned to (``None``: used
            as given).
        recall_ci: ``(low, high)``, the 95% confidence interval of the recall over all query
            rows, from the sample (``mean_ci`` of the per-row recalls).
        tuning: ``tune_query``'s record without its ``seconds`` (``timings["tune"]``), or
            ``None`` without a target.

    Example:
        >>> import torch
        >>> from prh_fast.knn import knn
        >>> X = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
        >>> _, rep = knn(X, 5, backend="faiss-ivf", return_report=True)  # doctest: +SKIP
        >>> rep.recall >= rep.target_recall  # doctest: +SKIP
        True
    """

    backend: str
    params: dict
    n: int
    n_keys: int
    d: int
    k: int
    sample: torch.Tensor
    approx: torch.Tensor
    exact: torch.Tensor
    recall: float
    rows_equal: float
    rows_completed: int
    device: str
    timings: dict = field(default_factory=dict)
    target_recall: float | None = None
    recall_ci: tuple[float, float] | None = None
    tuning: dict | None = None
    #: ``[S, k]`` float64 scores of ``approx``'s entries and ``[S]`` the exact ``k``-th score
    #: of each sample row (ties count as found: ``recall_at_k``), or None.
    approx_scores: torch.Tensor | None = field(default=None, repr=False)
    kth: torch.Tensor | None = field(default=None, repr=False)
    #: ``rows [R] -> (approx, exact, approx_scores, kth)`` of rows outside the sample, or None.
    _grow: Callable[[torch.Tensor], tuple] | None = field(default=None, repr=False,
                                                          compare=False)

    def __post_init__(self) -> None:
        if self.tuning is not None and "seconds" in self.tuning:
            # the tuning's time is a timing (``timings["tune"]``), kept out of its record
            self.timings.setdefault("tune", float(self.tuning["seconds"]))
            self.tuning = {a: v for a, v in self.tuning.items() if a != "seconds"}
        if self.recall_ci is None and self.sample.numel():
            self._measure()

    def _measure(self) -> None:
        per_row = recall_at_k(self.approx, self.exact, self.approx_scores, self.kth)
        m, _, lo, hi = mean_ci(per_row, self.n)
        self.recall = m
        self.rows_equal = float((per_row == 1.0).double().mean())
        self.recall_ci = (max(0.0, lo), min(1.0, hi))

    @property
    def can_grow(self) -> bool:
        """Whether the sample can still be enlarged (``grow``)."""
        return self._grow is not None and self.sample.numel() < self.n

    def grow(self, size: int) -> None:
        """Enlarge the sample to ``size`` rows (the nested sample of the same ``(N, seed)``):
        the added rows' approximate lists and exact lists are added, and ``recall``,
        ``rows_equal`` and ``recall_ci`` are measured again on the larger sample.

        Args:
            size: the new sample size, at most ``n``; not above the current size: no-op.

        Raises:
            InputError: the report cannot grow (``release`` was called, or it was built
                without its search) or ``size`` exceeds ``n``.
        """
        s = self.sample.numel()
        if size <= s:
            return
        if size > self.n:
            raise InputError(f"sample size: expected at most N = {self.n}, got {size}")
        if self._grow is None:
            raise InputError("ann report: cannot grow its sample (its search is released)")
        t0 = time.perf_counter()
        rows = sample_rows(self.n, size, int(self.params.get("seed", 0)))
        new = rows[~torch.isin(rows, self.sample)]
        ap, ex, sc, kth = self._grow(new)
        order = torch.cat([self.sample, new]).argsort()
        self.sample = torch.cat([self.sample, new])[order]
        self.approx = torch.cat([self.approx, ap.cpu()])[order]
        self.exact = torch.cat([self.exact, ex.cpu()])[order]
        if self.approx_scores is not None and sc is not None:
            self.approx_scores = torch.cat([self.approx_scores, sc.cpu()])[order]
            self.kth = torch.cat([self.kth, kth.cpu()])[order]
        self._measure()
        self.timings["grow"] = self.timings.get("grow", 0.0) + time.perf_counter() - t0

    def release(self) -> None:
        """Drop what ``grow`` needs (the search's features and lists); the sample stays."""
        self._grow = None

    def __getstate__(self) -> dict:
        # A pickled report (torch.distributed's object gathers) carries the measured sample,
        # not the search: the copy cannot grow.
        state = dict(self.__dict__)
        state["_grow"] = None
        return state

    def to_dict(self) -> dict:
        """JSON-ready summary (no lists)."""
        return {"backend": self.backend, "params": dict(self.params), "n": self.n,
                "n_keys": self.n_keys, "d": self.d, "k": self.k,
                "sample_size": int(self.sample.numel()), "recall": self.recall,
                "rows_equal": self.rows_equal, "rows_completed": self.rows_completed,
                "device": self.device, "timings": dict(self.timings),
                "target_recall": self.target_recall,
                "recall_ci": None if self.recall_ci is None else list(self.recall_ci),
                "tuning": None if self.tuning is None else dict(self.tuning)}

    def summary(self) -> str:
        """One line: the parameters, the recall with its interval, the tuning and the times."""
        p = ", ".join(f"{a}={v}" for a, v in self.params.items()
                      if a not in ("backend", "recall_sample", "target_recall"))
        t = self.timings
        ci = "" if self.recall_ci is None else (
            f" (95% CI {self.recall_ci[0]:.4f}..{self.recall_ci[1]:.4f})")
        tuned = ""
        if self.tuning is not None:
            tuned = (f"; tuned to target {self.target_recall:g} in "
                     f"{len(self.tuning['trials'])} trials, {t.get('tune', 0):.2f} s")
        return (f"prh_fast: approximate kNN {self.backend} ({p}) on N = {self.n}: "
                f"recall@{self.k} = {self.recall:.4f}{ci} on {self.sample.numel()} sampled "
                f"rows (exact sets {self.rows_equal:.1%}; {self.rows_completed} rows completed "
                f"exactly){tuned}; build {t.get('train', 0) + t.get('add', 0):.2f} s, search "
                f"{t.get('search', 0):.2f} s, report {t.get('report', 0):.2f} s")


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor, scores: torch.Tensor | None = None,
                kth: torch.Tensor | None = None) -> torch.Tensor:
    """Per row ``|set(approx_i) ∩ set(exact_i)| / k`` (float64 ``[S]``); lists hold distinct
    indices. With ``scores`` (``[S, k]``, the approximate neighbours' exact scores) and ``kth``
    (``[S]``, the exact ``k``-th score), a neighbour also counts as found when its score is at
    least the ``k``-th exact score: a tie with the list's last member broken the other way
    (duplicated rows) is not a miss.

    Args:
        approx: ``[S, k]`` approximate lists (``-1``: no neighbour, never found).
        exact: ``[S, k]`` exact lists.
        scores: ``[S, k]`` float64 scores of ``approx``'s entries, or None.
        kth: ``[S]`` float64 scores of ``exact``'s last column, or None.

    Returns:
        ``[S]`` float64 recall of each row.

    Example:
        >>> recall_at_k(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[2, 1], [3, 5]])).tolist()
        [1.0, 0.5]
    """
    hit = (approx.unsqueeze(2) == exact.unsqueeze(1)).any(dim=2)
    if scores is not None and kth is not None:
        hit |= (scores >= kth.view(-1, 1)) & (approx >= 0)
    return hit.sum(dim=1).double() / exact.shape[1]


def mean_ci(values: torch.Tensor, population: int | None = None,
            z: float = _Z95) -> tuple[float, float, float, float]:
    """The mean of per-row values over a sample of rows, its standard error and its 95%
    confidence interval (normal approximation): ``se = sd / sqrt(S)`` with the sample standard
    deviation ``sd`` (``S - 1`` in the denominator), times the finite-population factor
    ``sqrt((P - S) / (P - 1))`` when the sample was drawn without replacement from
    ``population`` rows (so a sample of every row has ``se = 0``). The interval is
    ``mean ± z·se``; it has zero width when every sampled row has the same value.

    Args:
        values: ``[S]`` per-row values (any float dtype; computed in float64).
        population: the number of rows the sample was drawn from, or None (infinite).
        z: the normal quantile (default: 95% two-sided).

    Returns:
        ``(mean, se, low, high)`` as floats.

    Example:
        >>> m, se, low, high = mean_ci(torch.tensor([0.0, 1.0, 1.0, 0.0]))
        >>> m, round(se, 4), round(high - low, 4)
        (0.5, 0.2887, 1.1316)
    """
    v = values.detach().double().flatten().cpu()
    s = v.numel()
    if s == 0:
        raise InputError("values: expected at least one row")
    m = float(v.mean())
    se = float(v.std(unbiased=True)) / math.sqrt(s) if s > 1 else 0.0
    if population is not None and population > 1:
        se *= math.sqrt(max(0.0, (population - s) / (population - 1)))
    return m, se, m - z * se, m + z * se


def sample_rows(n: int, size: int, seed: int) -> torch.Tensor:
    """The report's query rows: ``size`` distinct rows of ``range(n)``, sorted, from
    ``(n, seed)`` alone (so every layer of a model is sampled at the same rows). Samples are
    nested: the first ``size`` entries of one seeded permutation of ``range(n)``, so the rows
    for a larger ``size`` hold those of a smaller one.

    Args:
        n: the number of rows.
        size: the sample size (``size >= n``: every row).
        seed: the seed.

    Returns:
        ``[min(size, n)]`` int64 sorted rows.

    Example:
        >>> small, big = sample_rows(100, 5, 0), sample_rows(100, 20, 0)
        >>> bool(torch.isin(small, big).all())
        True
    """
    if size >= n:
        return torch.arange(n, dtype=torch.int64)
    rng = np.random.default_rng([seed, 0x5A3])
    return torch.from_numpy(np.sort(rng.permutation(n)[:size]).astype(np.int64))


# -------------------------------------------------------------------------------- tuning
def set_query_params(index: Any, p: AnnParams) -> None:
    """Set ``p``'s query-time parameters on a built index: ``nprobe`` (IVF, IVF-PQ) or
    ``efSearch`` (HNSW); ``None`` fields are left as they are. (IVF-PQ's ``refine`` is applied
    by ``search_index``, not stored in the index.)

    Args:
        index: a FAISS index built by ``build_index`` for ``p.backend`` (CPU or GPU).
        p: the parameters.

    Example:
        >>> import faiss  # doctest: +SKIP
        >>> index = faiss.IndexHNSWFlat(8, 16)  # doctest: +SKIP
        >>> set_query_params(index, AnnParams("faiss-hnsw", ef_search=40))  # doctest: +SKIP
        >>> index.hnsw.efSearch  # doctest: +SKIP
        40
    """
    if p.backend == "faiss-hnsw":
        if p.ef_search is not None:
            index.hnsw.efSearch = int(p.ef_search)
    elif p.nprobe is not None:
        index.nprobe = int(p.nprobe)


def _first_reaching(f: Callable[[int], float], lo: int, hi: int, target: float) -> int | None:
    """The smallest ``v`` in ``lo..hi`` with ``f(v) >= target``, by doubling from ``lo`` then
    bisection (``f`` taken as non-decreasing); None when ``f(hi)`` is below the target."""
    v, below = lo, lo - 1
    while f(v) < target:
        if v >= hi:
            return None
        below, v = v, min(hi, 2 * v)
    while v - below > 1:  # f(below) < target <= f(v) (below = lo - 1: not evaluated)
        mid = (below + v) // 2
        if f(mid) >= target:
            v = mid
        else:
            below = mid
    return v


def tune_query(p: AnnParams, search_sample: Callable[[AnnParams], torch.Tensor],
               exact: torch.Tensor, k: int, n_keys: int | None = None,
               scores: Callable[[torch.Tensor], torch.Tensor] | None = None,
               kth: torch.Tensor | None = None) -> tuple[AnnParams, dict | None]:
    """Choose the query-time parameters that reach ``p.target_recall`` on the recall sample.

    The integer knob (IVF / IVF-PQ ``nprobe`` in ``1..nlist``; HNSW ``ef_search`` from
    ``max(k + 1, 16)`` up to ``max(k + 1, min(EF_SEARCH_CAP, n_keys))``) is doubled until the
    sample recall@k reaches the target, then bisected down to the smallest setting that
    reaches it. IVF-PQ starts at ``refine = 4`` and first tries ``nprobe = nlist``; when
    that does not reach the target, ``refine`` is doubled (up to ``REFINE_CAP``), else
    ``nprobe`` is tuned at that ``refine``. The
    target counts as reached when the sample's mean recall is at least the target (the
    recorded 95% interval says how far the recall over all rows may be from it).

    Args:
        p: resolved parameters (``AnnParams.resolved``); with ``p.target_recall`` None
            nothing is tuned.
        search_sample: ``q -> [S, k]`` int64 approximate lists of the sample rows searched
            with ``q``'s query-time parameters (the callee sets them on its index).
        exact: ``[S, k]`` the exact lists of the same rows.
        k: neighbours.
        n_keys: indexed points (caps HNSW's ``ef_search``), or None.
        scores, kth: ``lists [S, k] -> [S, k]`` float64 scores of the sample rows' listed
            neighbours, and ``[S]`` the exact lists' ``k``-th scores: ties with the ``k``-th
            neighbour count as found (``recall_at_k``). None: set recall only.

    Returns:
        ``(params, tuning)``: ``params`` with the chosen query-time fields set and
        ``target_recall`` None (so it reproduces the search as given), and a JSON-ready
        dict: ``target``, ``trials`` (``[params, recall]`` in the order tried), ``chosen``,
        ``recall``, ``recall_ci`` (95%), ``sample_size``, ``seconds``. ``(p, None)`` when
        no target applies.

    Raises:
        InputError: naming ``target_recall``, the best recall found and its parameters, when
            the target is not reached within the index's limits.

    Example:
        >>> p = AnnParams("faiss-ivf", nlist=8).resolved(1000, 8, 5)
        >>> exact = torch.arange(10).view(2, 5)
        >>> fake = lambda q: exact if q.nprobe >= 3 else exact.flip(1) * 0 + 99
        >>> q, tuning = tune_query(p, fake, exact, 5)
        >>> q.nprobe, tuning["recall"]
        (3, 1.0)
    """
    target = p.target_recall
    if target is None:
        return p, None
    t0 = time.perf_counter()
    s = int(exact.shape[0])
    trials: list = []
    recalls: dict = {}

    def measure(**q: int) -> float:
        key = tuple(sorted(q.items()))
        if key not in recalls:
            lists = search_sample(replace(p, target_recall=None, **q))
            lists = lists.cpu()
            sc = None if scores is None or kth is None else scores(lists).cpu()
            recalls[key] = recall_at_k(lists, exact.cpu(), sc,
                                       None if sc is None else kth.cpu())
            trials.append([dict(q), float(recalls[key].mean())])
        return float(recalls[key].mean())

    chosen = None
    if p.backend == "faiss-hnsw":
        lo = max(k + 1, 16)
        hi = max(lo, min(EF_SEARCH_CAP, n_keys if n_keys is not None else EF_SEARCH_CAP))
        v = _first_reaching(lambda e: measure(ef_search=e), lo, hi, target)
        if v is not None:
            chosen = {"ef_search": v}
        limit = f"ef_search up to {hi}"
    elif p.backend == "faiss-ivf":
        v = _first_reaching(lambda n: measure(nprobe=n), 1, p.nlist, target)
        if v is not None:
            chosen = {"nprobe": v}
        limit = f"nprobe up to nlist = {p.nlist}"
    else:
        refine = _PQ_DEFAULT_REFINE
        while chosen is None:
            # nprobe = nlist first: a refine that cannot reach the target costs one trial
            v = None
            if measure(nprobe=p.nlist, refine=refine) >= target:
                v = _first_reaching(lambda n, r=refine: measure(nprobe=n, refine=r), 1,
                                    p.nlist, target)
            if v is not None:
                chosen = {"nprobe": v, "refine": refine}
            elif refine >= REFINE_CAP:
                break
            else:
                refine = min(REFINE_CAP, 2 * refine)
        limit = f"nprobe up to nlist = {p.nlist}, refine up to {REFINE_CAP}"
    seconds = time.perf_counter() - t0
    if chosen is None:
        best_q, best = max(trials, key=lambda tr: tr[1])
        q = ", ".join(f"{a}={v}" for a, v in best_q.items())
        raise InputError(
            f"target_recall: {target:g} not reached by {p.backend} within its limits ({limit}); "
            f"best recall@{k} on {s} sampled rows = {best:.4f} at {q}. Lower target_recall, or "
            "build a finer index (more nlist / hnsw_m / ef_construction, IVF-PQ: more pq_m)")
    per_row = recalls[tuple(sorted(chosen.items()))]
    m, _, lo_ci, hi_ci = mean_ci(per_row)
    tuning = {"target": target, "trials": trials, "chosen": dict(chosen), "recall": m,
              "recall_ci": [max(0.0, lo_ci), min(1.0, hi_ci)], "sample_size": s,
              "seconds": seconds}
    return replace(p, target_recall=None, **chosen), tuning


# -------------------------------------------------------------------------------- the search
def _faiss():
    try:
        import faiss
    except ImportError as err:  # pragma: no cover - the backend check catches this first
        raise RuntimeError("the approximate kNN backends need faiss (pip install faiss-cpu)"
                           ) from err
    return faiss


def _gpu_faiss(faiss, device: torch.device) -> bool:
    return (device.type == "cuda" and hasattr(faiss, "StandardGpuResources")
            and faiss.get_num_gpus() > 0)


def exact_rows(Q: torch.Tensor, ids: torch.Tensor | None, K: torch.Tensor, k: int,
               budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 lists of query rows ``Q`` against all keys ``K`` (ties by the lower
    index). ``ids``: the rows' own indices among the keys (self search; excluded) or None."""
    from prh_fast.knn._torch import knn_torch

    kk = min(K.shape[0], k + 1) if ids is not None else k
    idx, vals = knn_torch(Q, kk, budget, keys=K)
    vals = vals.to(Q.dtype)  # knn_torch's fixed-order scores are float64
    if ids is None:
        return idx, vals
    # Drop the row itself wherever it appears; if duplicates crowded it out, drop the last.
    is_self = idx == ids.to(idx.device).view(-1, 1)
    drop = torch.where(is_self.any(dim=1), is_self.int().argmax(dim=1),
                       torch.full_like(ids.to(idx.device), kk - 1))
    keep = torch.ones_like(idx, dtype=torch.bool)
    keep[torch.arange(idx.shape[0], device=idx.device), drop] = False
    return idx[keep].view(-1, kk - 1)[:, :k], vals[keep].view(-1, kk - 1)[:, :k]


def new_index(faiss: Any, p: AnnParams, d: int) -> Any:
    """An empty, seeded index of the resolved params ``p`` for ``d``-dimensional rows (IVF:
    untrained). The one place the three index types are made (in memory and from a store)."""
    ip = faiss.METRIC_INNER_PRODUCT
    if p.backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, p.hnsw_m, ip)
        index.hnsw.efConstruction = p.ef_construction
        index.hnsw.rng = faiss.RandomGenerator(p.seed)
        return index
    quantizer = faiss.IndexFlatIP(d)
    if p.backend == "faiss-ivf":
        index = faiss.IndexIVFFlat(quantizer, d, p.nlist, ip)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, p.pq_nbits, ip)
        index.pq.cp.seed = p.seed
    index.cp.seed = p.seed  # (faiss's wrapper keeps the quantiser alive with the index)
    return index


def training_rows(n: int, p: AnnParams) -> torch.Tensor | None:
    """The sorted rows of ``range(n)`` the IVF quantisers train on (``None``: all rows), from
    ``(n, p.train_size, p.seed)`` alone, so a store's build trains on the rows an in-memory
    build of the same features does."""
    if p.train_size >= n:
        return None
    rng = np.random.default_rng([p.seed, 0x7A1])
    return torch.from_numpy(np.sort(rng.choice(n, p.train_size, replace=False)).astype(np.int64))


def build_index(faiss: Any, p: AnnParams, x_keys: np.ndarray, gpu_device: torch.device | None,
                timings: dict) -> tuple[Any, Any]:
    """Train (IVF) and fill the index; returns ``(index, gpu_resources or None)``."""
    d = x_keys.shape[1]
    res = None
    t0 = time.perf_counter()
    index = new_index(faiss, p, d)
    if p.backend == "faiss-hnsw":
        timings["train"] = 0.0
    else:
        if gpu_device is not None:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, gpu_device.index or 0, index)
            if hasattr(index, "cp"):
                index.cp.seed = p.seed
        sel = training_rows(x_keys.shape[0], p)
        train = x_keys if sel is None else np.ascontiguousarray(x_keys[sel.numpy()])
        index.train(train)
        del train
        timings["train"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    index.add(x_keys)
    timings["add"] = time.perf_counter() - t1
    set_query_params(index, p)
    return index, res


def _dots64(Q: torch.Tensor, K: torch.Tensor, I: torch.Tensor, budget: int) -> torch.Tensor:
    """Float64 inner products ``[b, c]`` of each query row with its listed keys ``I``
    (``-1``: none -> ``-inf``), in row blocks within the memory budget (any device)."""
    b, c = I.shape
    rows = max(1, budget // max(1, c * K.shape[1] * 8 * 2))
    out = torch.empty((b, c), dtype=torch.float64, device=Q.device)
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        ii = I[r0:r1]
        s = torch.einsum("bd,bcd->bc", Q[r0:r1].double(), K[ii.clamp_min(0)].double())
        out[r0:r1] = s.masked_fill(ii < 0, float("-inf"))
    return out


def _rescore(Q: torch.Tensor, take: Callable[[torch.Tensor], torch.Tensor], I: torch.Tensor,
             budget: int) -> torch.Tensor:
    """Exact float32 inner products of each query row with its candidates ``I`` (``-1``:
    none -> ``-inf``), in row blocks that keep the gathered ``[rows, c, D]`` within budget.
    ``take(ids)``: the float32 key rows ``[len(ids), D]`` (from memory or a store)."""
    b, c = I.shape
    d = Q.shape[1]
    rows = max(1, budget // max(1, c * d * 4 * 2))
    out = torch.empty((b, c), dtype=torch.float32)
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        ii = I[r0:r1]
        cand = take(ii.clamp_min(0).reshape(-1)).view(r1 - r0, c, d)
        s = torch.einsum("bd,bcd->bc", Q[r0:r1], cand)
        out[r0:r1] = s.masked_fill(ii < 0, float("-inf"))
    return out


def search_lists(index: Any, p: AnnParams, Q: torch.Tensor, own: torch.Tensor | None, k: int,
                 n_keys: int, take: Callable[[torch.Tensor], torch.Tensor], budget: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index's lists of the float32 CPU query rows ``Q``: ``(idx [r, k] int64, vals
    [r, k] float32, short)``, ``short`` the positions of rows with fewer than ``k`` results
    (the caller completes them exactly). ``own``: each query row's own index among the
    ``n_keys`` keys, excluded from its list (a self search), or ``None`` (a cross search).
    IVF-PQ widens the candidate list by ``p.refine`` and re-scores it exactly from the key
    rows ``take(ids)``; a CPU IVF-Flat index is searched by ``IvfFlatScan`` (the queries
    grouped by cell, one matrix product per cell; lists independent of the row blocks); the
    index's query-time parameters are used as they are set. The one search loop of the
    in-memory and the store-backed searches."""
    from prh_fast.knn._ivf_scan import IvfFlatScan
    from prh_fast.knn._torch import _canonical

    r = Q.shape[0]
    # k + 1 results for a self search (the row itself is normally among them)
    want = k + 1 if own is not None else k
    kk = min(n_keys, want * (p.refine if p.backend == "faiss-ivfpq" else 1))
    rows = max(1, min(max(1, r), budget // max(1, kk * 12 * 4)))
    scan = IvfFlatScan.of(index) if p.backend == "faiss-ivf" else None
    if scan is not None:  # IVF-Flat on the CPU: the grouped matrix-product scan
        rows = max(1, min(max(1, r), scan.block_rows(index.nprobe, kk, budget)))
    out_i = torch.empty((r, k), dtype=torch.int64)
    out_v = torch.empty((r, k), dtype=torch.float32)
    short = []
    xq = Q.numpy()
    for r0 in range(0, r, rows):
        r1 = min(r, r0 + rows)
        if scan is not None:
            D, I = scan.search(Q[r0:r1], index.nprobe, kk, budget)
        else:
            D, I = index.search(xq[r0:r1], kk)
            D, I = torch.from_numpy(D), torch.from_numpy(I).to(torch.int64)
        if p.backend == "faiss-ivfpq":
            D = _rescore(Q[r0:r1], take, I, budget)  # PQ scores are approximate
        bad = I < 0
        if own is not None:
            bad |= I == own[r0:r1].view(-1, 1)
        D = D.masked_fill(bad, float("-inf"))
        I = I.masked_fill(bad, -1)
        D, I = _canonical(D, I)  # score desc, index asc; missing (-inf) last
        D, I = D[:, :k], I[:, :k]
        s = (I < 0).any(dim=1)
        if bool(s.any()):
            short.append(s.nonzero().flatten() + r0)
        out_i[r0:r1], out_v[r0:r1] = I, D
    return out_i, out_v, (torch.cat(short) if short else torch.empty(0, dtype=torch.int64))


def search_index(index: Any, p: AnnParams, x_cpu: torch.Tensor, k_cpu: torch.Tensor, k: int,
                 self_search: bool, budget: int, ids: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Search the float32 CPU query rows ``x_cpu`` in a built index of ``k_cpu``:
    ``(idx [N, k] int64, vals [N, k] float32, rows completed exactly)``. ``ids``: the query
    rows' own indices among the keys (a self search of some rows; default ``0..N-1``).
    :func:`search_lists`, then an exact search of the rows with fewer than ``k`` results."""
    own = None
    if self_search:
        own = torch.arange(x_cpu.shape[0]) if ids is None else ids
    out_i, out_v, short = search_lists(index, p, x_cpu, own, k, k_cpu.shape[0],
                                       lambda ii: k_cpu[ii], budget)
    if short.numel() == 0:
        return out_i, out_v, 0
    ii, vv = exact_rows(x_cpu[short], None if own is None else own[short], k_cpu, k, budget)
    out_i[short], out_v[short] = ii, vv
    return out_i, out_v, int(short.numel())


def knn_ann(X: torch.Tensor, k: int, params: AnnParams, budget: int,
            keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, AnnReport]:
    """Approximate lists ``(idx [N, k] int64, vals [N, k], report)`` on ``X``'s device.

    ``X``: ``[N, D]`` prepared features; ``keys``: ``[M, D]`` for a cross search (nothing
    excluded), else ``X`` searches itself with each row excluded.
    """
    from prh_fast._log import _log_once

    faiss = _faiss()
    self_search = keys is None
    dev = X.device
    if X.dtype == torch.float64 or (keys is not None and keys.dtype == torch.float64):
        _log_once("prh_fast: the faiss backends compute in float32; float64 features lose "
                  "precision there", logger)
    Xf = X.detach().to(torch.float32).contiguous()
    Kf = Xf if self_search else keys.detach().to(torch.float32).contiguous()
    n, d = Xf.shape
    m = Kf.shape[0]
    p = params.resolved(m, d, k, n_queries=n)
    gpu = _gpu_faiss(faiss, dev) and p.backend != "faiss-hnsw"
    if dev.type == "cuda" and not gpu:
        why = ("FAISS has no GPU HNSW" if p.backend == "faiss-hnsw"
               else "this faiss build has no GPU support")
        _log_once(f"prh_fast: {p.backend} runs on the CPU for CUDA features ({why}); the "
                  "features are copied to host memory", logger)
    x_cpu = Xf.cpu()
    k_cpu = x_cpu if self_search else Kf.cpu()
    xk = k_cpu.numpy()
    timings: dict = {}
    index, _res = build_index(faiss, p, xk, dev if gpu else None, timings)

    # The recall sample's exact lists (on the features' device: the exact search is the
    # expensive part of the report) come first: the tuning measures its trials against them.
    t0 = time.perf_counter()
    sample = sample_rows(n, p.recall_sample, p.seed)

    def exact_of(rows: torch.Tensor) -> torch.Tensor:
        r_dev = rows.to(dev)
        return exact_rows(Xf[r_dev], r_dev if self_search else None, Kf, k, budget)[0].cpu()

    def scores_of(rows: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
        return _dots64(Xf[rows.to(dev)], Kf, lists.to(dev), budget).cpu()

    ex_i = exact_of(sample)
    kth = scores_of(sample, ex_i[:, -1:]).view(-1)
    timings["report"] = time.perf_counter() - t0
    target = p.target_recall

    def search_sample(q: AnnParams) -> torch.Tensor:
        set_query_params(index, q)
        return search_index(index, q, x_cpu[sample], k_cpu, k, self_search, budget,
                            ids=sample)[0]

    t0 = time.perf_counter()
    p, tuning = tune_query(p, search_sample, ex_i, k, n_keys=m,
                           scores=lambda lists: scores_of(sample, lists), kth=kth)
    timings["tune"] = time.perf_counter() - t0
    set_query_params(index, p)
    t0 = time.perf_counter()
    out_i, out_v, n_completed = search_index(index, p, x_cpu, k_cpu, k, self_search, budget)
    timings["search"] = time.perf_counter() - t0
    index = _res = None  # the index is not kept (only the lists are)

    def grow(rows: torch.Tensor) -> tuple:
        ex = exact_of(rows)
        return (out_i[rows], ex, scores_of(rows, out_i[rows]),
                scores_of(rows, ex[:, -1:]).view(-1))

    ap_i = out_i[sample]
    report = AnnReport(backend=p.backend, params=p.to_dict(), n=n, n_keys=m, d=d, k=k,
                       sample=sample, approx=ap_i, exact=ex_i, recall=0.0, rows_equal=0.0,
                       rows_completed=n_completed, device="gpu" if gpu else "cpu",
                       timings=timings, target_recall=target, tuning=tuning,
                       approx_scores=scores_of(sample, ap_i), kth=kth, _grow=grow)
    logger.warning(report.summary())
    vals = out_v.to(dev)
    if X.dtype != torch.float32:
        vals = vals.to(X.dtype)
    return out_i.to(dev), vals, report
