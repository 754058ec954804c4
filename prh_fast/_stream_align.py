"""Alignment from store folders without loading them: the glue between the model grid
(``prh_fast.grid``) and the streaming computations (``prh_fast.store._stream``,
``prh_fast.store._moments``).

When a model of the grid is a store folder (see :func:`stream_mode` for when):

- neighbour metrics (``*_knn``, CKNNA) read each layer's lists from
  :func:`prh_fast.store._stream.stream_knn`: searched once, streamed, cached in the store, and
  identical to the lists of the in-memory path;
- linear CKA, unbiased CKA and SVCCA come from the one-pass float64 accumulators of
  :func:`prh_fast.store._moments.kernel_scores` (1e-9 relative to the in-memory metrics on
  float64 features, the float64 value of the stored features otherwise).

RBF CKA and kernel metrics with ``null_permutations`` need all rows at once: they take the
in-memory path (an error when streaming was forced with ``stream=True``).
"""
from __future__ import annotations

import os
import time

import torch

__all__ = ["stream_mode", "STREAM_AUTO_BYTES", "StreamPolicy"]

#: In ``"auto"`` mode a store whose prepared features exceed this many bytes is streamed for the
#: kernel metrics (and on a GPU for the neighbour metrics too); smaller ones are loaded.
STREAM_AUTO_BYTES = 1 << 30

_MODES = {"auto": "auto", "1": "on", "on": "on", "true": "on", "yes": "on",
          "0": "off", "off": "off", "false": "off", "no": "off"}


def stream_mode(stream=None) -> str:
    """``"auto"``, ``"on"`` or ``"off"`` from ``stream`` (``None`` -> ``PRH_FAST_STREAM``, else
    ``"auto"``; ``True`` / ``False`` accepted)."""
    if stream is None:
        stream = os.environ.get("PRH_FAST_STREAM", "auto")
        arg = "PRH_FAST_STREAM"
    else:
        arg = "stream"
    if isinstance(stream, bool):
        return "on" if stream else "off"
    mode = _MODES.get(str(stream).strip().lower())
    if mode is None:
        raise ValueError(f"{arg}: expected 'auto', 'on'/True or 'off'/False, got {stream!r}")
    return mode


def _knn_backend_streams(backend) -> bool:
    """Whether the requested neighbour backend has a streaming form (auto, cpu, torch)."""
    name = backend if backend is not None else os.environ.get("PRH_FAST_BACKEND", "auto")
    return isinstance(name, str) and name.lower() in ("auto", "cpu", "torch")


class StreamPolicy:
    """Which models of a grid stream, and the streamed data itself (prepared-row sources per
    model, neighbour data, kernel scores)."""

    def __init__(self, *, stream=None, budget=None, q=None, exact=False, normalize=True,
                 backend=None, device=None, progress=False):
        from prh_fast.store._stream import check_budget

        self.mode = stream_mode(stream)
        if budget is None and os.environ.get("PRH_FAST_STREAM_BUDGET"):
            try:
                budget = int(os.environ["PRH_FAST_STREAM_BUDGET"])
            except ValueError:
                raise ValueError(f"PRH_FAST_STREAM_BUDGET: expected a number of bytes, got "
                                 f"{os.environ['PRH_FAST_STREAM_BUDGET']!r}") from None
        self.budget = check_budget(budget)
        self.q, self.exact, self.normalize = q, bool(exact), bool(normalize)
        self.backend = backend
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.progress = bool(progress)
        self._preps: dict = {}

    @staticmethod
    def is_store(m) -> bool:
        from prh_fast import store

        return isinstance(m.source, str) and store.is_store(m.source)

    def prep(self, m):
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
    def streams_knn(self, m) -> bool:
        if self.mode == "off" or not self.is_store(m):
            return False
        if not _knn_backend_streams(self.backend):
            if self.mode == "on" and self.backend is not None:
                raise ValueError(f"backend: {self.backend!r} has no streaming search; with "
                                 f"stream=True use 'auto', 'cpu' or 'torch'")
            return False
        if self.mode == "on":
            return True
        # auto: on a CPU the streamed search is the in-memory one (same tiles, same lists) with
        # bounded memory and a cache; on a GPU the fused in-memory kernel is faster when it fits
        return self.device.type == "cpu" or self._large(m)

    def knn_side(self, m, metric: str, k: int, opts: dict):
        """The model's neighbour data in the form ``prh_fast._align._knn_side`` (``[L, N, k]``)
        or ``_cknna_side`` (``(lists, self_sims)``) returns it."""
        from prh_fast._align import _cknna_sim
        from prh_fast.metrics._cknna import cknna_excludes_self, cknna_values
        from prh_fast.store._stream import _stream_knn

        p = self.prep(m)
        L = p.store.num_layers
        include_self = metric == "cknna" and not cknna_excludes_self(
            opts.get("unbiased", True), opts.get("exclude_self"))

        def search(l):
            # (idx, float64 scores): the in-memory path's lists and similarities
            i, s, _ = _stream_knn(p.store, l, k, q=self.q, exact=self.exact,
                                  normalize=self.normalize, device=self.device,
                                  backend=self.backend, memory_budget=self.budget,
                                  progress=self.progress, include_self=include_self)
            return i, s

        if metric != "cknna":
            return torch.stack([search(l)[0] for l in range(L)])
        lists = []
        for l in range(L):
            i, s = search(l)
            lists.append((i, cknna_values(i, s, opts.get("unbiased", True),
                                          opts.get("distance_agnostic", False))))
        n = p.n
        return lists, [_cknna_sim(n, x, x, opts.get("unbiased", True)) for x in lists]

    def stand_ins(self, m) -> list:
        """``[N, 0]`` tensors, one per layer: what the grid scorers read (N, L, device)."""
        p = self.prep(m)
        return [torch.empty((p.n, 0), device=self.device) for _ in range(p.store.num_layers)]

    # -- kernel metrics ------------------------------------------------------------------------
    def streams_kernel(self, a, b, metric: str, opts: dict, null_permutations: int) -> bool:
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
                raise ValueError(f"stream: cannot stream {metric} ({why}); pass stream=False "
                                 f"or 'auto' to load the features")
            return False
        if self.mode == "on":
            return True
        return any(self.is_store(m) and self._large(m) for m in (a, b))

    def kernel_matrix(self, a, b, metric: str, opts: dict, layers_of, timings: dict):
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

