"""Alignment from store folders without loading them: the glue between the model grid
(``prh_fast.grid``) and the streaming computations (``prh_fast.store._stream``,
``prh_fast.store._moments``).

When a model of the grid is a store folder (see :func:`stream_mode` for when):

- neighbour metrics (``*_knn``, CKNNA) read each layer's lists from
  :func:`prh_fast.store._stream.stream_knn`: searched once, streamed, cached in the store, and
  identical to the lists of the in-memory path; with an approximate backend (``faiss-ivf``,
  ``faiss-ivfpq``, ``faiss-hnsw``) the lists of the in-memory approximate search, the index
  built from streamed rows and cached in the store (``prh_fast.store._ann``), and each layer's
  ``AnnReport`` kept in :attr:`StreamPolicy.reports` for the grid's ``ann_report``;
- linear CKA, unbiased CKA and SVCCA come from the one-pass float64 accumulators of
  :func:`prh_fast.store._moments.kernel_scores` (1e-9 relative to the in-memory metrics on
  float64 features, the float64 value of the stored features otherwise).

RBF CKA and kernel metrics with ``null_permutations`` need all rows at once: they take the
in-memory path (an error when streaming was forced with ``stream=True``).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from prh_fast import _config
from prh_fast.errors import InputError

__all__ = ["stream_mode", "STREAM_AUTO_BYTES", "StreamPolicy"]

#: In ``"auto"`` mode a store whose prepared features exceed this many bytes is streamed for the
#: kernel metrics (and on a GPU for the neighbour metrics too); smaller ones are loaded.
STREAM_AUTO_BYTES = 1 << 30

def stream_mode(stream: bool | str | None = None) -> str:
    """``"auto"``, ``"on"`` or ``"off"``: the ``stream`` argument, else the configured mode
    (``config_context(stream=...)``, ``set_config``, ``PRH_FAST_STREAM``), else ``"auto"``.

    Args:
        stream: ``None``, ``True`` / ``False``, or ``"auto"`` / ``"on"`` / ``"off"`` (also
            ``"1"``, ``"yes"``, ``"false"``...).

    Returns:
        The mode.

    Raises:
        InputError: naming ``stream`` (or ``PRH_FAST_STREAM``) for another value.

    Example:
        >>> stream_mode(True), stream_mode("off")
        ('on', 'off')
    """
    if stream is None:
        return _config.get_config().stream
    return _config.parse_stream(stream, "stream")


def _knn_backend_streams(backend) -> bool:
    """Whether the backend (``None``: the configured one) has a streaming search, as the
    backend registry declares it (``auto``, ``cpu``, ``torch`` and the approximate FAISS
    searches, also as an ``AnnParams`` or a spec string ``"faiss-ivf:nprobe=16"``)."""
    from prh_fast.knn._backends import BACKENDS
    from prh_fast.knn._faiss_ann import AnnParams

    name = backend if backend is not None else _config.get_config().backend
    if isinstance(name, AnnParams):
        name = name.backend
    if not isinstance(name, str):
        return False
    name = name.partition(":")[0].strip().lower()
    return name == "auto" or (name in BACKENDS and BACKENDS[name].streams)


def _approximate(backend, device: torch.device) -> bool:
    """Whether the streamed search of ``backend`` is an approximate FAISS search."""
    from prh_fast.knn._backends import resolve
    from prh_fast.knn._faiss_ann import ANN_BACKENDS

    return resolve(backend, device, stream=True).search in ANN_BACKENDS


class StreamPolicy:
    """Which models of a grid stream, and the streamed data itself (prepared-row sources per
    model, neighbour data, kernel scores)."""

    def __init__(self, *, stream: bool | str | None = None, budget: int | None = None,
                 q: float | None = None, exact: bool = False, normalize: bool = True,
                 backend: object = None, device: str | torch.device | None = None,
                 progress: bool = False) -> None:
        from prh_fast._validate import check_memory_budget
        from prh_fast.store._stream import DEFAULT_STREAM_BUDGET

        self.mode = stream_mode(stream)
        # budget: the memory_budget of the call, else the configured one
        # (config_context(memory_budget=...), PRH_FAST_MEMORY_BUDGET), else the default
        if budget is None:
            budget = _config.get_config().memory_budget
        self.budget = check_memory_budget(budget, DEFAULT_STREAM_BUDGET)
        self.q, self.exact, self.normalize = q, bool(exact), bool(normalize)
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.progress = bool(progress)
        self._preps: dict = {}
        #: model key -> its layers' ``AnnReport`` (streamed approximate searches)
        self.reports: dict = {}

    @staticmethod
    def is_store(m: Any) -> bool:
        from prh_fast import store

        return isinstance(m.source, str) and store.is_store(m.source)

    def prep(self, m: Any) -> Any:
        """The model's :class:`StreamPrep` (one per model: the threshold is found once)."""
        from prh_fast.store._stream import StreamPrep

        p = self._preps.get(m.key)
        if p is None:
            p = self._preps[m.key] = StreamPrep(
                m.source, q=self.q, exact=self.exact, normalize=self.normalize,
                device=self.device, memory_budget=self.budget, progress=self.progress)
        return p

    def _large(self, m) -> bool:
        from prh_fast.store._stream import prepared_bytes

        return prepared_bytes(m.source) > STREAM_AUTO_BYTES

    # -- neighbour metrics ---------------------------------------------------------------------
    def streams_knn(self, m: Any) -> bool:
        if self.mode == "off" or not self.is_store(m):
            return False
        if not _knn_backend_streams(self.backend):
            if self.mode == "on" and self.backend is not None:
                raise InputError(f"backend: {self.backend!r} has no streaming search; with "
                                 f"stream=True use 'auto', 'cpu', 'torch' or an approximate "
                                 f"search ('faiss-ivf', 'faiss-ivfpq', 'faiss-hnsw')")
            return False
        if self.mode == "on":
            return True
        # auto: on a CPU the streamed search is the in-memory one (same tiles, same lists) with
        # bounded memory and a cache; on a GPU the fused in-memory kernel is faster when it fits
        return self.device.type == "cpu" or self._large(m)

    def knn_side(self, m: Any, metric: str, k: int, opts: dict) -> Any:
        """The model's neighbour data in the form ``prh_fast._align._knn_side`` (a
        ``NeighbourSide``; distinct rows are not counted from a stream) or ``_cknna_side``
        (``(lists, self_sims)``) returns it."""
        from prh_fast._align import NeighbourSide
        from prh_fast.metrics._cknna import cknna_excludes_self, cknna_sim, cknna_values
        from prh_fast.metrics._ties import list_ties
        from prh_fast.store._stream import _stream_knn_report

        p = self.prep(m)
        L = p.store.num_layers
        include_self = metric == "cknna" and not cknna_excludes_self(
            opts.get("unbiased", True), opts.get("exclude_self"))
        approx = _approximate(self.backend, self.device)
        reports = []

        def search(l, extra=0):
            # (idx, float64 scores): the in-memory path's lists and similarities
            i, s, _, rep = _stream_knn_report(
                p.store, l, k + extra, q=self.q, exact=self.exact, normalize=self.normalize,
                device=self.device, backend=self.backend, memory_budget=self.budget,
                progress=self.progress, include_self=include_self)
            reports.append(rep)
            return i, s

        # exact lists: k + 1 neighbours (the same first k: one total order) tell the exact ties
        # at the k-th; cknna asks for as many, so the two metrics share the store's cached
        # lists. Approximate lists: k, as the in-memory search (same report, no exact ties).
        extra = 1 if k + 1 <= p.n - 1 and not approx else 0
        if metric != "cknna":
            found = [search(l, extra) for l in range(L)]
            if approx:
                self.reports[m.key] = reports
            return NeighbourSide(torch.stack([i[:, :k].contiguous() for i, _ in found]),
                                 None if approx else [list_ties(i, s, k, None) for i, s in found])
        lists = []
        for l in range(L):
            i, s = search(l, extra)
            i, s = i[:, :k].contiguous(), s[:, :k].contiguous()
            lists.append((i, cknna_values(i, s, opts.get("unbiased", True),
                                          opts.get("distance_agnostic", False))))
        if approx:
            self.reports[m.key] = reports
        n = p.n
        return lists, [cknna_sim(n, x, x, opts.get("unbiased", True), self.backend)
                       for x in lists]

    def stand_ins(self, m: Any) -> list:
        """``[N, 0]`` tensors, one per layer: what the grid scorers read (N, L, device)."""
        p = self.prep(m)
        return [torch.empty((p.n, 0), device=self.device) for _ in range(p.store.num_layers)]

    # -- kernel metrics ------------------------------------------------------------------------
    def streams_kernel(self, a: Any, b: Any, metric: str, opts: dict,
                       null_permutations: int) -> bool:
        from prh_fast.store._moments import KERNEL_METRICS

        if self.mode == "off" or not (self.is_store(a) or self.is_store(b)):
            return False
        why = None
        if metric not in KERNEL_METRICS:
            why = f"metric {metric!r} has no one-pass form"
        elif opts.get("kernel_metric", "ip") != "ip":
            why = "kernel_metric='rbf' needs all rows at once (no feature-space form)"
        elif null_permutations:
            why = "null_permutations re-score shuffled rows, which needs the rows in memory"
        if why is not None:
            if self.mode == "on":
                raise InputError(f"stream: cannot stream {metric} ({why}); pass stream=False "
                                 f"or 'auto' to load the features")
            return False
        if self.mode == "on":
            return True
        return any(self.is_store(m) and self._large(m) for m in (a, b))

    def kernel_matrix(self, a: Any, b: Any, metric: str, opts: dict,
                      layers_of: Callable[[Any], list], timings: dict) -> torch.Tensor:
        """``[La, Lb]`` float64 scores; ``layers_of(m)``: a model's prepared layers in memory
        (used for a model that is not a store)."""
        from prh_fast.store._moments import TensorSource, kernel_scores

        def source(m):
            if self.is_store(m):
                return self.prep(m)
            return TensorSource(layers_of(m), m.where)

        t0 = time.perf_counter()
        sa, sb = source(a), source(b)
        budget = opts.get("memory_budget") or self.budget
        out = kernel_scores(sa, sb, metric, unbiased=opts.get("unbiased", False),
                            cca_dim=opts.get("cca_dim", 10), memory_budget=budget,
                            progress=self.progress, device=self.device)
        timings["score"] = time.perf_counter() - t0
        timings["space"] = "stream"
        return out

