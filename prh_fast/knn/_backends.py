"""The backend registry: every backend declares what it supports, and one ``resolve`` picks.

A backend name (``backend=`` argument, else the configuration: ``config_context`` /
``set_config`` / ``PRH_FAST_BACKEND``, else ``"auto"``) names one computation from end to end:
the neighbour search and the neighbour-set / CKNNA step that reads the lists. Each backend is a
:class:`Backend` object that declares its devices, dtypes, largest ``k``, whether it takes a
cross search (``keys=``), a search streamed from a store, the distributed search, whether it is
exact, and which neighbour-set implementation (:class:`SetOps`) it uses; its
:meth:`Backend.not_supported_reasons` says why it cannot serve a :class:`Request`.

:func:`resolve` is the one dispatch point (the in-memory search, the streamed search of a store,
the distributed search and the neighbour-set scores all call it):

- a backend asked for by name that cannot serve the request raises, listing every reason:
  :class:`~prh_fast.errors.InputError` when the request is outside what the backend supports
  (wrong device, a cross search, a streamed search, ``k`` too large), and
  :class:`~prh_fast.errors.BackendUnavailableError` when the backend is not available here
  (missing module, no native kernels, Triton unable to run);
- ``"auto"`` walks a priority list for the device and takes the first backend that fits; a
  backend skipped because it is unavailable is logged once with its reasons (skipping one that
  does not support the request is the normal choice, not a fallback, and is silent).

Names:

- ``"auto"``: CPU tensors -> native C++ (``torch`` for a cross search, or without the native
  module); CUDA tensors -> the fused Triton search when Triton can run, else ``torch``.
  Neighbour-set scores: native on CPU, ``torch`` on CUDA lists (the CUDA set-op kernels are
  picked automatically only once declared verified on hardware,
  :attr:`SetOps.verified_on_hardware`).
- ``"cpu"``: native C++/OpenMP kernels (CPU tensors only; self search only).
- ``"torch"``: pure torch everywhere (CPU or CUDA).
- ``"triton"``: the fused Triton search (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the tests run it); neighbour sets as ``auto``.
- ``"cuda"``: prh_fast's GPU kernels end to end: the Triton search, then the native CUDA
  neighbour-set and CKNNA kernels (which must have been compiled; ``k <= CUDA_MAX_K``).
- ``"faiss"``: FAISS flat search (self search only); neighbour sets as ``auto``.
- ``"faiss-ivf"``, ``"faiss-ivfpq"``, ``"faiss-hnsw"``: approximate FAISS searches with a recall
  report (``prh_fast.knn._faiss_ann``); parameters ride along as an ``AnnParams`` backend or a
  spec string ``"faiss-ivf:nprobe=16,nlist=1024"``; neighbour sets as ``auto``.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from prh_fast import _config, _native
from prh_fast._log import _log_once
from prh_fast.errors import BackendUnavailableError, InputError
from prh_fast.knn._estimate import warn_if_slow
from prh_fast.knn._faiss_ann import ANN_BACKENDS, AnnParams

logger = logging.getLogger(__name__)

__all__ = ["ANN_BACKENDS", "KNN_BACKENDS", "CUDA_MAX_K", "Backend", "SetOps", "Request",
           "Choice", "BACKENDS", "SETOPS", "device_type", "resolve", "resolve_knn_backend",
           "resolve_setops_backend", "faiss_available", "triton_unavailable"]

KNN_BACKENDS = ("auto", "cpu", "torch", "faiss", "triton", "cuda") + ANN_BACKENDS

#: Largest list length the CUDA neighbour-set / CKNNA kernels take: the native module's
#: ``CUDA_MAX_K`` (``csrc/common/limits.h``); the same number when the module is missing.
CUDA_MAX_K = int(getattr(_native._C, "CUDA_MAX_K", 256))

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Kinds of reasons: the request is outside what the backend supports (InputError when asked
# for by name, silent for auto) or the backend cannot run on this machine (logged for auto).
UNSUPPORTED = "unsupported"
UNAVAILABLE = "unavailable"


def faiss_available() -> bool:
    """Whether the ``faiss`` package is importable (checked without importing it).

    Example:
        >>> isinstance(faiss_available(), bool)
        True
    """
    return importlib.util.find_spec("faiss") is not None


def triton_unavailable(device: torch.device) -> str | None:
    """Why the fused Triton search cannot run on ``device`` (None when it can).

    Example:
        >>> triton_unavailable(torch.device("meta")) is not None
        True
    """
    from prh_fast.knn._triton import unavailable_reason

    return unavailable_reason(device)


def device_type(device) -> str:
    """The type of ``device`` (``"cpu"``, ``"cuda"``...) as every support check sees it: the
    registry and the CUDA launchers ask here, so one replacement makes CPU tensors stand in
    for CUDA ones (how the tests follow a ``"cuda"`` computation to its launches without a
    GPU).

    Example:
        >>> device_type("cpu")
        'cpu'
    """
    return torch.device(device).type


# ------------------------------------------------------------------------------ the request
@dataclass(frozen=True)
class Request:
    """What a computation needs from a backend.

    Attributes:
        device: where the features (``op="knn"``) or the lists (``op="setops"``) are.
        op: ``"knn"`` (a neighbour search) or ``"setops"`` (neighbour-set / CKNNA scores of
            lists).
        k: list length (``None``: not known yet).
        dtype: the features' dtype (``None``: any).
        cross: queries differ from keys (``keys=``).
        stream: the search streams the rows from a store.
        distributed: the search is sharded across ranks.
    """

    device: torch.device
    op: str = "knn"
    k: int | None = None
    dtype: torch.dtype | None = None
    cross: bool = False
    stream: bool = False
    distributed: bool = False


# ------------------------------------------------------------------------------ set-ops
@dataclass(frozen=True)
class SetOps:
    """One implementation of the neighbour-set scores (``neighbour_scores``) and CKNNA terms
    (``cknna_terms``).

    Attributes:
        name: ``"cpu"`` (native OpenMP), ``"torch"`` or ``"cuda"`` (native CUDA kernels).
        devices: device types of the lists it takes.
        max_k: largest list length (``None``: any).
        verified_on_hardware: whether ``auto`` may pick it: it has passed its hardware tests
            (``tests/test_cuda.py``). An implementation that is not verified runs only when
            asked for by name.
    """

    name: str
    devices: tuple
    max_k: int | None = None
    verified_on_hardware: bool = True

    def available(self) -> str | None:
        """Why it cannot run on this machine (None when it can)."""
        if self.name == "cpu" and not _native.HAS_NATIVE:
            return f"the native module prh_fast._C is not available ({_native.NATIVE_ERROR})"
        if self.name == "cuda" and not _native.HAS_CUDA_KERNELS:
            return ("prh_fast._C was built without CUDA kernels (rebuild with PRH_FAST_CUDA=1 "
                    "and nvcc on PATH)")
        return None

    def not_supported_reasons(self, request: Request) -> list:
        """``[(kind, text)]``: why it cannot score ``request``'s lists (empty when it can)."""
        out = []
        dev = device_type(request.device)
        if dev not in self.devices:
            want = " or ".join("a CUDA device" if d == "cuda" else d.upper() for d in self.devices)
            out.append((UNSUPPORTED, f"the lists are on {dev}, not {want}"))
        if self.max_k is not None and request.k is not None and request.k > self.max_k:
            out.append((UNSUPPORTED, f"k: the {self.name.upper()} neighbour-set kernels take "
                                     f"k <= {self.max_k}, got {request.k}"))
        why = self.available()
        if why is not None:
            out.append((UNAVAILABLE, why))
        return out


SETOPS = {
    "cpu": SetOps("cpu", ("cpu",)),
    "torch": SetOps("torch", ("cpu", "cuda")),
    # Not picked by auto until these kernels have passed tests/test_cuda.py on a GPU
    # (docs/gpu.md); backend="cuda" runs them regardless.
    "cuda": SetOps("cuda", ("cuda",), max_k=CUDA_MAX_K, verified_on_hardware=False),
}
#: Priority of the neighbour-set implementations for ``auto``, per device type.
SETOPS_AUTO = {"cpu": ("cpu", "torch"), "cuda": ("cuda", "torch")}


# ------------------------------------------------------------------------------ backends
@dataclass(frozen=True)
class Backend:
    """One backend and what it supports.

    Attributes:
        name: the name users pass.
        search: the neighbour search it runs (``"cpu"``, ``"torch"``, ``"faiss"``,
            ``"triton"`` or an approximate FAISS name); the ``cuda`` backend searches with
            ``triton``.
        devices: device types of the features it searches.
        dtypes: feature dtypes it takes (each backend casts to its compute dtype).
        max_k: largest ``k`` of its search (``None``: any).
        cross: takes a cross search (``keys=``).
        streams: has a form streamed from a store (``prh_fast.store.stream_knn``).
        distributed: runs the distributed exact search (``prh_fast.distributed.knn``).
        exact: its lists are exact (the approximate FAISS indexes are not).
        setops: the neighbour-set / CKNNA implementation it uses (a :data:`SETOPS` name), or
            ``None``: the device's ``auto`` choice.
    """

    name: str
    search: str
    devices: tuple
    dtypes: tuple = _FLOAT_DTYPES
    max_k: int | None = None
    cross: bool = True
    streams: bool = False
    distributed: bool = True
    exact: bool = True
    setops: str | None = None

    def available(self, device: torch.device) -> str | None:
        """Why its search cannot run on this machine for ``device`` (None when it can)."""
        if self.search == "cpu" and not _native.HAS_NATIVE:
            return f"the native module prh_fast._C is not available ({_native.NATIVE_ERROR})"
        if self.search == "triton" and device_type(device) in self.devices:
            return triton_unavailable(device)
        if self.search.startswith("faiss") and not faiss_available():
            return "faiss is not installed (pip install faiss-cpu)"
        return None

    def not_supported_reasons(self, request: Request) -> list:
        """``[(kind, text)]``: why this backend cannot serve ``request`` (empty when it can).

        ``kind`` is ``"unsupported"`` (the request is outside what it declares) or
        ``"unavailable"`` (it cannot run on this machine).
        """
        if request.op == "setops":
            if self.setops is None:  # the device's auto choice: always something
                return []
            return SETOPS[self.setops].not_supported_reasons(request)
        out = []
        dev = device_type(request.device)
        if dev not in self.devices:
            want = " or ".join("a CUDA device" if d == "cuda" else d.upper() for d in self.devices)
            out.append((UNSUPPORTED, f"the features are on {dev}, not {want}"))
        if request.dtype is not None and request.dtype not in self.dtypes:
            out.append((UNSUPPORTED, f"it does not take {request.dtype} features"))
        if self.max_k is not None and request.k is not None and request.k > self.max_k:
            out.append((UNSUPPORTED, f"k: it takes k <= {self.max_k}, got {request.k}"))
        if request.cross and not self.cross:
            out.append((UNSUPPORTED, "it searches a set against itself only; use 'torch' or "
                                     "'triton' for keys="))
        if request.stream and not self.streams:
            out.append((UNSUPPORTED, "it has no streaming search from a store (use 'auto', "
                                     "'cpu', 'torch' or an approximate faiss-ivf / "
                                     "faiss-ivfpq / faiss-hnsw, or load the layer and "
                                     "use prh_fast.knn.knn)"))
        if request.distributed and not self.distributed:
            what = repr(self.name) if self.exact else f"the approximate {self.name!r}"
            why = "its tie order differs" if self.exact else "the distributed search is exact"
            out.append((UNSUPPORTED, f"{what} is not supported by the distributed search "
                                     f"({why}); use 'cpu', 'torch' or 'auto'"))
        why = self.available(request.device)
        if why is not None:
            out.append((UNAVAILABLE, why))
        return out


# streams: prh_fast.store._ann (the index trained and filled from rows read from the store)
_ANN = {n: Backend(n, n, ("cpu", "cuda"), exact=False, distributed=False, streams=True)
        for n in ANN_BACKENDS}
BACKENDS = {
    "cpu": Backend("cpu", "cpu", ("cpu",), cross=False, streams=True, setops="cpu"),
    "torch": Backend("torch", "torch", ("cpu", "cuda"), streams=True, setops="torch"),
    "faiss": Backend("faiss", "faiss", ("cpu", "cuda"), cross=False, distributed=False),
    # CPU tensors reach triton under TRITON_INTERPRET=1; triton_unavailable says when not.
    "triton": Backend("triton", "triton", ("cpu", "cuda")),
    "cuda": Backend("cuda", "triton", ("cuda",), setops="cuda"),
    **_ANN,
}
#: Priority of the backends for ``auto``, per device type.
AUTO = {"cpu": ("cpu", "torch"), "cuda": ("triton", "torch")}


# ------------------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class Choice:
    """What :func:`resolve` picked.

    Attributes:
        name: the backend (``"auto"`` resolved to a concrete one).
        search: the neighbour search to run (``"cpu"``, ``"torch"``, ``"faiss"``,
            ``"triton"`` or an approximate FAISS name).
        setops: the neighbour-set / CKNNA implementation (``"cpu"``, ``"torch"`` or
            ``"cuda"``). For a search: the one the backend declares, ``None`` when it uses
            the lists' device's ``auto`` choice.
        params: the approximate search's ``AnnParams`` (``None`` for exact backends).
        requested: the name asked for (``"auto"`` when nothing was).
    """

    name: str
    search: str
    setops: str | None = None
    params: AnnParams | None = None
    requested: str = "auto"


def _requested(backend):
    """``(name, params, source)`` of the backend asked for: ``backend`` itself, else the
    configured one. ``source``: ``"argument"`` or where the configuration got it."""
    source = "argument"
    if backend is None:
        cfg = _config.get_config()
        backend, source = cfg.backend, cfg.origin("backend")
    where = "" if source == "argument" else f" (from {source})"
    params = None
    if isinstance(backend, AnnParams):  # an approximate search with its parameters
        params = backend
    elif isinstance(backend, str) and ":" in backend:  # "faiss-ivf:nprobe=16": checked here
        try:
            params = AnnParams.parse(backend)
        except ValueError as err:
            raise InputError(f"{err}{where}") from None
    if params is not None:
        return params.backend, params, source
    if not isinstance(backend, str) or backend.strip().lower() not in KNN_BACKENDS:
        raise InputError(f"backend: expected one of {KNN_BACKENDS}, got {backend!r}{where}")
    name = backend.strip().lower()
    if name in ANN_BACKENDS:
        params = AnnParams(backend=name)
    return name, params, source


def _fail(name: str, reasons: list):
    text = "; ".join(t for _, t in reasons)
    msg = f"backend={name!r} was requested but it cannot run here: {text}"
    if any(kind == UNSUPPORTED for kind, _ in reasons):
        raise InputError(msg)
    raise BackendUnavailableError(msg)


def _auto(request: Request, order, table, what: str):
    skipped = []
    for cand in order:
        reasons = table[cand].not_supported_reasons(request)
        if not reasons and not getattr(table[cand], "verified_on_hardware", True):
            # a declared capability, not a failure: auto leaves it alone, silently
            reasons = [(UNSUPPORTED, "not verified on hardware")]
        if not reasons:
            if skipped:
                _log_once(f"prh_fast: {what} 'auto' skipped " + "; ".join(skipped)
                          + f"; using the {cand} backend"
                          + (" for neighbour-set scores" if request.op == "setops" else ""), logger)
            return cand
        missing = [t for kind, t in reasons if kind == UNAVAILABLE]
        if missing and not any(kind == UNSUPPORTED for kind, _ in reasons):
            skipped.append(f"{cand!r}: " + "; ".join(missing))
    raise InputError(f"backend: no backend can run a {request.op} request on "
                     f"{device_type(request.device)}")


def resolve(backend: str | AnnParams | None, device: torch.device | str, *, op: str = "knn",
            k: int | None = None, dtype: torch.dtype | None = None,
            cross: bool = False, stream: bool = False, distributed: bool = False,
            n: int | None = None, dim: int | None = None,
            n_keys: int | None = None) -> Choice:
    """The one dispatch point: the backend that runs a search or a neighbour-set step.

    Args:
        backend: a name (see the module docstring), a spec string
            (``"faiss-ivf:nprobe=16"``), an ``AnnParams``, or ``None`` for the configured
            backend (``config_context`` / ``set_config`` / ``PRH_FAST_BACKEND``, else auto).
        device: the features' (``op="knn"``) or lists' (``op="setops"``) device.
        op: ``"knn"`` or ``"setops"``.
        k: list length, when known.
        dtype: the features' dtype, when known.
        cross: a cross search (``keys=``).
        stream: the search streams from a store. A configured (not passed) backend without a
            streaming form is replaced by ``auto`` there, with one log line: the configuration
            applies to a whole run, and the streamed layers still get exact lists.
        distributed: the search is sharded across ranks.
        n: query rows of the search, when known (with ``dim``: an exact search on CPU
            tensors estimated to take long logs one warning suggesting an approximate
            backend with a recall target, :func:`prh_fast.knn._estimate.warn_if_slow`; the
            choice is unchanged).
        dim: feature dimension of the search, when known.
        n_keys: key rows of a cross search (``None``: a self search).

    Returns:
        A :class:`Choice`.

    Raises:
        InputError: an unknown name, or a backend asked for by name whose declared support
            does not cover the request (the message lists every reason).
        BackendUnavailableError: a backend asked for by name that cannot run here.

    Example:
        >>> resolve("torch", torch.device("cpu")).search
        'torch'
        >>> resolve("torch", torch.device("cpu"), op="setops", k=10).setops
        'torch'
    """
    if op not in ("knn", "setops"):
        raise InputError(f"op: expected 'knn' or 'setops', got {op!r}")
    device = torch.device(device)
    name, params, source = _requested(backend)
    request = Request(device=device, op=op, k=k, dtype=dtype, cross=bool(cross),
                      stream=bool(stream), distributed=bool(distributed))
    if name != "auto" and stream and source != "argument" and not BACKENDS[name].streams:
        _log_once(f"prh_fast: {source}={name!r} cannot stream from a store; the streaming "
                  f"search uses 'auto'", logger)
        name, params = "auto", None
    requested = name
    if name == "auto":
        order = AUTO.get(device_type(device), ("torch",))
        name = _auto(request, order, BACKENDS, "kNN") if op == "knn" else "auto"
    else:
        reasons = BACKENDS[name].not_supported_reasons(request)
        if reasons:
            _fail(name, reasons)
    if op == "knn":
        if n is not None and dim is not None and not distributed:
            warn_if_slow(BACKENDS[name].search, device, n, dim, n_keys=n_keys)
        return Choice(name=name, search=BACKENDS[name].search, setops=BACKENDS[name].setops,
                      params=params, requested=requested)
    fixed = None if name == "auto" else BACKENDS[name].setops
    setops = fixed or _auto(request, SETOPS_AUTO.get(device_type(device), ("torch",)), SETOPS,
                            "neighbour-set")
    return Choice(name=name, search=BACKENDS[name].search if name != "auto" else "auto",
                  setops=setops, params=params, requested=requested)


def resolve_knn_backend(backend, device, *, cross: bool = False) -> str:
    """The neighbour search :func:`resolve` picks (``cpu``, ``torch``, ``faiss``, ``triton``
    or an approximate FAISS name) for features on ``device``.

    Example:
        >>> resolve_knn_backend("torch", torch.device("cpu"))
        'torch'
    """
    return resolve(backend, device, cross=cross).search


def resolve_setops_backend(backend, device, k: int) -> str:
    """The neighbour-set / CKNNA implementation :func:`resolve` picks (``cpu``, ``torch`` or
    ``cuda``) for lists of length ``k`` on ``device``.

    Example:
        >>> resolve_setops_backend(None, torch.device("cpu"), 10) in ("cpu", "torch")
        True
    """
    return resolve(backend, device, op="setops", k=k).setops
