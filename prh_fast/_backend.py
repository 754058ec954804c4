"""The one dispatch point for neighbour-search and neighbour-set backends.

``backend=`` argument, else the ``PRH_FAST_BACKEND`` environment variable, else ``"auto"``.
An automatically chosen backend falls back with one log line; a backend the user asked for by
name raises if it cannot run (one dispatch point).

Names (one family for the whole computation):

- ``"auto"``: CPU tensors -> native C++ (else torch); CUDA tensors -> the fused Triton search
  when Triton can run, else torch, and the CUDA neighbour-set kernels when compiled.
- ``"cpu"``: native C++/OpenMP kernels (CPU tensors only).
- ``"triton"``: the fused Triton neighbour search (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the tests run it).
- ``"cuda"``: prh_fast's GPU kernels: the Triton search for neighbours plus the native CUDA
  neighbour-set / CKNNA kernels (must have been compiled).
- ``"torch"``: pure torch everywhere (CPU or CUDA).
- ``"faiss"``: FAISS flat search for neighbours (other steps as ``auto``).
- ``"faiss-ivf"``, ``"faiss-ivfpq"``, ``"faiss-hnsw"``: approximate FAISS searches with a
  recall report (``prh_fast.knn._faiss_ann``); parameters ride along as an ``AnnParams``
  backend or a spec string ``"faiss-ivf:nprobe=16,nlist=1024"`` (other steps as ``auto``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

from prh_fast import _native
from prh_fast._log import _log_once, _logged, logger  # noqa: F401  (re-exported)

ANN_BACKENDS = ("faiss-ivf", "faiss-ivfpq", "faiss-hnsw")
KNN_BACKENDS = ("auto", "cpu", "torch", "faiss", "triton", "cuda") + ANN_BACKENDS
#: Largest list length the CUDA neighbour-set / CKNNA kernels take (csrc/common/cuda_check.h).
CUDA_MAX_K = 256
#: Whether ``auto`` picks the CUDA neighbour-set / CKNNA kernels for CUDA lists. False until
#: they have passed ``tests/test_cuda.py`` on hardware (see docs/gpu.md); ``backend="cuda"``
#: runs them regardless.
CUDA_SETOPS_AUTO = False


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def triton_unavailable(device: torch.device) -> str | None:
    """Why the fused Triton search cannot run on ``device`` (None when it can)."""
    from prh_fast.knn._triton import unavailable_reason

    return unavailable_reason(device)


def _requested(backend) -> str:
    name = backend if backend is not None else os.environ.get("PRH_FAST_BACKEND", "auto")
    if not isinstance(name, str) or ":" in name:
        from prh_fast.knn._faiss_ann import AnnParams

        if isinstance(name, AnnParams):  # an approximate search with its parameters
            return name.backend
        if isinstance(name, str):  # "faiss-ivf:nprobe=16": the name, options checked
            return AnnParams.parse(name).backend
    if not isinstance(name, str) or name.lower() not in KNN_BACKENDS:
        raise ValueError(f"backend: expected one of {KNN_BACKENDS}, got {name!r}")
    return name.lower()


def resolve_knn_backend(backend: str | None, device: torch.device, *,
                        cross: bool = False) -> str:
    """Concrete neighbour-search backend (``cpu``, ``torch``, ``faiss``, ``triton`` or one of
    ``ANN_BACKENDS``) for a search on ``device``; ``backend``: a name, an ``AnnParams`` or a
    spec string. ``cross``: queries differ from keys (cpu and faiss search a set
    against itself only)."""
    name = _requested(backend)
    on_cuda = device.type == "cuda"
    if name == "auto":
        if on_cuda:
            reason = triton_unavailable(device)
            if reason is None:
                return "triton"
            _log_once(f"prh_fast: the fused triton kNN is unavailable ({reason}); using the "
                      "torch backend")
            return "torch"
        if cross:
            return "torch"
        if _native.HAS_NATIVE:
            return "cpu"
        _log_once("prh_fast: native CPU kernels unavailable; using the torch backend for kNN")
        return "torch"
    if name in ("triton", "cuda"):
        if name == "cuda" and not on_cuda:
            raise ValueError("backend='cuda' was requested but the features are on "
                             f"{device.type}, not a CUDA device")
        reason = triton_unavailable(device)
        if reason is not None:
            raise RuntimeError(f"backend={name!r} was requested but the triton kNN cannot run: "
                               f"{reason}")
        return "triton"
    if name == "cpu":
        if on_cuda:
            raise ValueError("backend='cpu' was requested but the features are on a CUDA device")
        if cross:
            raise ValueError("backend='cpu' searches a set against itself only; use 'torch' or "
                             "'triton' for keys=")
        _native.native()  # raises with a clear message when the module is missing
    elif name in ANN_BACKENDS:
        if not faiss_available():
            raise RuntimeError(f"backend={name!r} was requested but faiss is not installed "
                               "(pip install faiss-cpu)")
    elif name == "faiss":
        if cross:
            raise ValueError("backend='faiss' searches a set against itself only here; use "
                             "'torch' or 'triton' for keys=")
        if not faiss_available():
            raise RuntimeError("backend='faiss' was requested but faiss is not installed "
                               "(pip install faiss-cpu)")
    return name


def resolve_setops_backend(backend: str | None, device: torch.device, k: int) -> str:
    """Backend (``cpu``, ``cuda`` or ``torch``) for neighbour-set scores and CKNNA terms over
    lists of length ``k`` on ``device``. kNN-only names (``triton``, ``faiss``) act as
    ``auto`` here."""
    name = _requested(backend)
    on_cuda = device.type == "cuda"
    if name == "torch":
        return "torch"
    if name == "cpu":
        if on_cuda:
            raise ValueError("backend='cpu' was requested but the lists are on a CUDA device")
        _native.native()
        return "cpu"
    if name == "cuda":
        if not on_cuda:
            raise ValueError(f"backend='cuda' was requested but the lists are on {device.type}")
        if not _native.HAS_CUDA_KERNELS:
            raise RuntimeError("backend='cuda' was requested but prh_fast._C was built without "
                               "CUDA kernels (rebuild with PRH_FAST_CUDA=1 and nvcc on PATH)")
        if k > CUDA_MAX_K:
            raise ValueError(f"k: the CUDA neighbour-set kernels take k <= {CUDA_MAX_K}, got {k}")
        return "cuda"
    # auto (and the kNN-only names)
    if on_cuda:
        if not CUDA_SETOPS_AUTO:
            return "torch"
        if _native.HAS_CUDA_KERNELS and k <= CUDA_MAX_K:
            return "cuda"
        why = ("prh_fast._C has no CUDA kernels" if not _native.HAS_CUDA_KERNELS
               else f"k = {k} > {CUDA_MAX_K}")
        _log_once(f"prh_fast: CUDA neighbour-set kernels unavailable ({why}); using torch")
        return "torch"
    if _native.HAS_NATIVE:
        return "cpu"
    _log_once("prh_fast: native CPU kernels unavailable; using torch for neighbour-set scores")
    return "torch"
