"""The one dispatch point for neighbour-search backends.

``backend=`` argument, else the ``PRH_FAST_BACKEND`` environment variable, else ``"auto"``.
An automatically chosen backend falls back with one log line; a backend the user asked for by
name raises if it cannot run (STYLE: "one dispatch point").
"""
from __future__ import annotations

import importlib.util
import logging
import os

import torch

from prh_fast import _native

logger = logging.getLogger("prh_fast")

KNN_BACKENDS = ("auto", "cpu", "torch", "faiss")
_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.warning(msg)


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_knn_backend(backend: str | None, device: torch.device) -> str:
    """Return the concrete backend name for a neighbour search on ``device``."""
    name = backend if backend is not None else os.environ.get("PRH_FAST_BACKEND", "auto")
    if not isinstance(name, str) or name.lower() not in KNN_BACKENDS:
        raise ValueError(f"backend: expected one of {KNN_BACKENDS}, got {name!r}")
    name = name.lower()
    on_cuda = device.type == "cuda"
    if name == "auto":
        if on_cuda:
            return "torch"
        if _native.HAS_NATIVE:
            return "cpu"
        _log_once("prh_fast: native CPU kernels unavailable; using the torch backend for kNN")
        return "torch"
    if name == "cpu":
        if on_cuda:
            raise ValueError("backend='cpu' was requested but the features are on a CUDA device")
        _native.native()  # raises with a clear message when the module is missing
    elif name == "faiss":
        if not faiss_available():
            raise RuntimeError("backend='faiss' was requested but faiss is not installed "
                               "(pip install faiss-cpu)")
    return name
