"""Approximate neighbour search with FAISS: IVF-Flat, IVF-PQ and HNSW, with a recall report.

Backends ``"faiss-ivf"``, ``"faiss-ivfpq"`` and ``"faiss-hnsw"`` of ``prh_fast.knn.knn``. They
search the prepared features by inner product, like the exact backends (cosine similarity on
L2-normalised rows), exclude each row itself, and return ``[N, k]`` int64 lists ordered by
score (descending), ties by the lower index among the candidates the index returned.

Choosing and passing parameters (``AnnParams``; every field ``None`` means "derived from N"):

- as the backend itself: ``knn(X, 10, backend=AnnParams("faiss-ivf", nprobe=16))``;
- as a spec string, anywhere a backend name is accepted (``backend=``, the configured backend:
  ``PRH_FAST_BACKEND`` or ``prh_fast.config_context(backend=...)``, ``prh-fast align
  --backend``): ``"faiss-ivf:nprobe=16,nlist=1024"``; FAISS's own names
  (``m``, ``nbits``, ``M``, ``efConstruction``, ``efSearch``) work as aliases there;
- on the command line: ``--backend faiss-ivf --knn-option nprobe=16``.

Every approximate search measures what it lost (``AnnReport``): on a seeded sample of query
rows (``recall_sample``, default ``min(N, 1000)``) it runs an exact float32 search of those
rows against all keys (torch tiles, ties by the lower index) and reports recall@k, the share of
the exact neighbours the index found. The rows of the sample depend only on ``(N, seed)``, so
every layer of a model pair is sampled at the same rows, and ``prh_fast.align`` turns the
per-layer reports into the error of the metric itself (``|mutual_knn(approx) -
mutual_knn(exact)|`` on the sample rows, per layer pair). Each report is logged (one line) and
returned (``knn(..., return_report=True)``, ``AlignmentResult.ann_report``).

Rows for which the index returned fewer than ``k`` results (an IVF probe that reached too few
points) are completed by an exact search of those rows; the report counts them.

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
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch

from prh_fast.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["ANN_BACKENDS", "AnnParams", "AnnReport", "knn_ann"]

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
}
#: FAISS's names for the same knobs (spec strings, the CLI, ``AnnParams.from_options``).
_ALIASES = {"nbits": "pq_nbits", "M": "hnsw_m", "efConstruction": "ef_construction",
            "efSearch": "ef_search", "ef_construct": "ef_construction",
            "train": "train_size", "sample": "recall_sample"}

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
        nprobe: cells visited per query, ``1..nlist``. Default ``round(sqrt(nlist))`` (64 at
            nlist = 4096). ``nprobe = nlist`` makes IVF-Flat an exact search.
        train_size: rows drawn (seeded, without replacement) to train the quantisers, up to N.
            Default ``min(N, 64·nlist)`` (IVF-PQ: at least ``64·2**pq_nbits``).
        pq_m: PQ sub-quantisers, a divisor of D. Default: the largest divisor of D that is at
            most ``D // 4`` (4 dimensions per code byte at 8 bits).
        pq_nbits: bits per sub-quantiser code, 1..16. Default 8 (fewer when the training
            sample is too small for 256 centroids).
        refine: IVF-PQ returns ``refine·(k+1)`` candidates per query, which are re-scored with
            exact float32 inner products and the best ``k`` kept (the returned scores are
            exact). Default 4; 1 re-scores without widening.
        hnsw_m: HNSW graph degree ``M``. Default 32.
        ef_construction: HNSW build beam. Default 40 (FAISS's).
        ef_search: HNSW search beam (FAISS uses at least ``k+1``). Default ``max(64, 2(k+1))``.
        seed: training sample, k-means, HNSW levels and the recall sample. Default 0.
        recall_sample: query rows of the recall report, ``1..N``. Default ``min(N, 1000)``.

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

    def __post_init__(self):
        object.__setattr__(self, "backend", _canonical_name(self.backend))
        for f in fields(self):
            if f.name == "backend":
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

    # ---------------------------------------------------------------------------- parsing
    @classmethod
    def from_options(cls, backend: str, options=None) -> "AnnParams":
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
            if isinstance(val, str):
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
        ``n_keys`` points of ``d`` dims, ``k`` neighbours, ``n_queries`` query rows (N)."""
        nq = n_keys if n_queries is None else n_queries
        b = self.backend
        out = {}

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
        if b == "faiss-ivfpq":
            out["refine"] = self.refine or _PQ_DEFAULT_REFINE
        if b == "faiss-hnsw":
            out["hnsw_m"] = self.hnsw_m or 32
            out["ef_construction"] = self.ef_construction or 40
            out["ef_search"] = self.ef_search or max(64, 2 * (k + 1))
        return replace(self, **out)


# -------------------------------------------------------------------------------- the report
@dataclass
class AnnReport:
    """What one approximate search lost, measured on a sample of its query rows.

    Attributes:
        backend, params: the search (``params``: every applicable field, resolved).
        n, n_keys, d, k: query rows, indexed points, width, neighbours.
        sample: ``[S]`` int64 query rows of the sample (sorted; fixed by ``(N, seed)``).
        approx, exact: ``[S, k]`` the approximate and the exact lists of those rows.
        recall: mean over the sample of ``|approx_i ∩ exact_i| / k`` (recall@k).
        rows_equal: share of sample rows whose approximate set equals the exact set.
        rows_completed: rows that had fewer than ``k`` results and were searched exactly.
        device: ``"cpu"`` or ``"gpu"`` (where the index ran).
        timings: seconds: ``train``, ``add``, ``search``, ``report`` (the exact sample search).

    Example:
        >>> import torch
        >>> from prh_fast.knn import knn
        >>> X = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
        >>> _, rep = knn(X, 5, backend="faiss-ivf", return_report=True)  # doctest: +SKIP
        >>> 0.0 <= rep.recall <= 1.0  # doctest: +SKIP
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

    def to_dict(self) -> dict:
        """JSON-ready summary (no lists)."""
        return {"backend": self.backend, "params": dict(self.params), "n": self.n,
                "n_keys": self.n_keys, "d": self.d, "k": self.k,
                "sample_size": int(self.sample.numel()), "recall": self.recall,
                "rows_equal": self.rows_equal, "rows_completed": self.rows_completed,
                "device": self.device, "timings": dict(self.timings)}

    def summary(self) -> str:
        p = ", ".join(f"{a}={v}" for a, v in self.params.items()
                      if a not in ("backend", "recall_sample"))
        t = self.timings
        return (f"prh_fast: approximate kNN {self.backend} ({p}) on N = {self.n}: "
                f"recall@{self.k} = {self.recall:.4f} on {self.sample.numel()} sampled rows "
                f"(exact sets {self.rows_equal:.1%}; {self.rows_completed} rows completed "
                f"exactly); build {t.get('train', 0) + t.get('add', 0):.2f} s, search "
                f"{t.get('search', 0):.2f} s, report {t.get('report', 0):.2f} s")


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per row ``|set(approx_i) ∩ set(exact_i)| / k`` (float64 ``[S]``); lists hold distinct
    indices."""
    hit = (approx.unsqueeze(2) == exact.unsqueeze(1)).any(dim=2)
    return hit.sum(dim=1).double() / exact.shape[1]


def sample_rows(n: int, size: int, seed: int) -> torch.Tensor:
    """The report's query rows: ``size`` distinct rows of ``range(n)``, sorted, from
    ``(n, seed)`` alone (so every layer of a model is sampled at the same rows)."""
    if size >= n:
        return torch.arange(n, dtype=torch.int64)
    rng = np.random.default_rng([seed, 0x5A3])
    return torch.from_numpy(np.sort(rng.choice(n, size, replace=False)).astype(np.int64))


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


def exact_rows(Q: torch.Tensor, ids, K: torch.Tensor, k: int, budget: int):
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


def build_index(faiss, p: AnnParams, x_keys: np.ndarray, gpu_device, timings):
    """Train (IVF) and fill the index; returns ``(index, gpu_resources or None)``."""
    d = x_keys.shape[1]
    ip = faiss.METRIC_INNER_PRODUCT
    res = None
    t0 = time.perf_counter()
    if p.backend == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, p.hnsw_m, ip)
        index.hnsw.efConstruction = p.ef_construction
        index.hnsw.rng = faiss.RandomGenerator(p.seed)
        timings["train"] = 0.0
    else:
        quantizer = faiss.IndexFlatIP(d)
        if p.backend == "faiss-ivf":
            index = faiss.IndexIVFFlat(quantizer, d, p.nlist, ip)
        else:
            index = faiss.IndexIVFPQ(quantizer, d, p.nlist, p.pq_m, p.pq_nbits, ip)
            index.pq.cp.seed = p.seed
        index.cp.seed = p.seed  # (faiss's wrapper keeps the quantiser alive with the index)
        if gpu_device is not None:
            res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(res, gpu_device.index or 0, index)
            if hasattr(index, "cp"):
                index.cp.seed = p.seed
        n = x_keys.shape[0]
        if p.train_size < n:
            rng = np.random.default_rng([p.seed, 0x7A1])
            sel = np.sort(rng.choice(n, p.train_size, replace=False))
            train = np.ascontiguousarray(x_keys[sel])
        else:
            train = x_keys
        index.train(train)
        del train
        timings["train"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    index.add(x_keys)
    timings["add"] = time.perf_counter() - t1
    if p.backend == "faiss-hnsw":
        index.hnsw.efSearch = p.ef_search
    else:
        index.nprobe = p.nprobe
    return index, res


def _rescore(Q: torch.Tensor, K: torch.Tensor, I: torch.Tensor, budget: int) -> torch.Tensor:
    """Exact float32 inner products of each query row with its candidates ``I`` (``-1``:
    none -> ``-inf``), in row blocks that keep the gathered ``[rows, c, D]`` within budget."""
    b, c = I.shape
    rows = max(1, budget // max(1, c * K.shape[1] * 4 * 2))
    out = torch.empty((b, c), dtype=torch.float32)
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        ii = I[r0:r1]
        cand = K[ii.clamp_min(0)]
        s = torch.einsum("bd,bcd->bc", Q[r0:r1], cand)
        out[r0:r1] = s.masked_fill(ii < 0, float("-inf"))
    return out


def search_index(index, p: AnnParams, x_cpu: torch.Tensor, k_cpu: torch.Tensor, k: int,
                 self_search: bool, budget: int):
    """Search the float32 CPU query rows ``x_cpu`` in a built index of ``k_cpu``:
    ``(idx [N, k] int64, vals [N, k] float32, rows completed exactly)``."""
    from prh_fast.knn._torch import _canonical

    n, m = x_cpu.shape[0], k_cpu.shape[0]
    xq = x_cpu.numpy()
    # k + 1 results for a self search (the row itself is normally among them); IVF-PQ widens
    # the candidate list by ``refine`` and re-scores it exactly.
    want = k + 1 if self_search else k
    kk = min(m, want * (p.refine if p.backend == "faiss-ivfpq" else 1))
    rows = max(1, min(n, budget // max(1, kk * 12 * 4)))
    out_i = torch.empty((n, k), dtype=torch.int64)
    out_v = torch.empty((n, k), dtype=torch.float32)
    incomplete = []
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        D, I = index.search(xq[r0:r1], kk)
        I = torch.from_numpy(I).to(torch.int64)
        if p.backend == "faiss-ivfpq":
            D = _rescore(x_cpu[r0:r1], k_cpu, I, budget)  # PQ scores are approximate
        else:
            D = torch.from_numpy(D)
        bad = I < 0
        if self_search:
            bad |= I == torch.arange(r0, r1).view(-1, 1)
        D = D.masked_fill(bad, float("-inf"))
        I = I.masked_fill(bad, -1)
        D, I = _canonical(D, I)  # score desc, index asc; missing (-inf) last
        D, I = D[:, :k], I[:, :k]
        short = (I < 0).any(dim=1)
        if bool(short.any()):
            incomplete.append(short.nonzero().flatten() + r0)
        out_i[r0:r1], out_v[r0:r1] = I, D
    if not incomplete:
        return out_i, out_v, 0
    rows_c = torch.cat(incomplete)
    ii, vv = exact_rows(x_cpu[rows_c], rows_c if self_search else None, k_cpu, k, budget)
    out_i[rows_c], out_v[rows_c] = ii, vv
    return out_i, out_v, int(rows_c.numel())


def knn_ann(X: torch.Tensor, k: int, params: AnnParams, budget: int, keys=None):
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
    t0 = time.perf_counter()
    out_i, out_v, n_completed = search_index(index, p, x_cpu, k_cpu, k, self_search, budget)
    timings["search"] = time.perf_counter() - t0
    del index, _res

    # The recall report: exact lists of a seeded sample of query rows (on the features'
    # device: the exact search is the expensive part of the report).
    t0 = time.perf_counter()
    sample = sample_rows(n, p.recall_sample, p.seed)
    s_dev = sample.to(dev)
    ex_i, _ = exact_rows(Xf[s_dev], s_dev if self_search else None, Kf, k, budget)
    ex_i = ex_i.cpu()
    ap_i = out_i[sample]
    per_row = recall_at_k(ap_i, ex_i)
    timings["report"] = time.perf_counter() - t0
    report = AnnReport(backend=p.backend, params=p.to_dict(), n=n, n_keys=m, d=d, k=k,
                       sample=sample, approx=ap_i, exact=ex_i, recall=float(per_row.mean()),
                       rows_equal=float((per_row == 1.0).double().mean()),
                       rows_completed=n_completed, device="gpu" if gpu else "cpu",
                       timings=timings)
    logger.warning(report.summary())
    vals = out_v.to(dev)
    if X.dtype != torch.float32:
        vals = vals.to(X.dtype)
    return out_i.to(dev), vals, report
