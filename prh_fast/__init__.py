"""prh_fast: fast, exact representational-alignment metrics at any scale.

Implements the measurements of *The Platonic Representation Hypothesis* (Huh, Cheung, Wang,
Isola, ICML 2024) with the reference's semantics (see ``prh_fast.metrics``), without N x N
matrices. ``import prh_fast`` never touches CUDA, and it does not import torch either: the
settings, the errors and the version are loaded at once, every other public name (and the
``knn`` / ``metrics`` subpackages) on first use, so ``prh-fast --help`` and argument errors
answer without the cost of importing torch.

Importing the package has no side effects: it writes nothing into ``os.environ``, configures
no logging (``prh_fast`` logs through ``logging.getLogger("prh_fast")`` and its children, with
the application's configuration), changes no thread count, and does not load the native
module (the first computation does). To make idle OpenMP threads sleep on a shared machine,
call :func:`prefer_passive_wait` before ``import torch`` (the ``prh-fast`` command does), or set
``OMP_WAIT_POLICY=passive``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from prh_fast import errors
from prh_fast._config import config_context, get_config, set_config
from prh_fast._threads import prefer_passive_wait
from prh_fast._version import __version__
from prh_fast.errors import (
    BackendUnavailableError,
    DestinationLocked,
    DistributedError,
    InputError,
    PrhFastError,
    StoreError,
)

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and readers
    from prh_fast import (  # noqa: F401  (subpackages reachable as attributes)
        distributed,
        extract,
        grid,
        knn,
        metrics,
        prepare,
        reference,
        store,
        testing,
    )
    from prh_fast._align import AlignmentResult, align, compute_score
    from prh_fast._info import info
    from prh_fast.grid import Alignment, GridResult, align_models
    from prh_fast.metrics import SUPPORTED_METRICS, AlignmentMetrics, measure
    from prh_fast.prepare import prepare_features
    from prh_fast.probe import Probe
    from prh_fast.store import load_features, save_features

#: Public name -> (module, attribute); attribute None: the name is the module itself.
_LAZY: dict[str, tuple[str, str | None]] = {
    "knn": ("prh_fast.knn", None),
    "metrics": ("prh_fast.metrics", None),
    # submodules reachable as attributes of the package (store, grid and prepare always were)
    "store": ("prh_fast.store", None),
    "grid": ("prh_fast.grid", None),
    "prepare": ("prh_fast.prepare", None),
    "distributed": ("prh_fast.distributed", None),
    "extract": ("prh_fast.extract", None),
    "reference": ("prh_fast.reference", None),
    "testing": ("prh_fast.testing", None),
    "info": ("prh_fast._info", "info"),
    "align": ("prh_fast._align", "align"),
    "AlignmentResult": ("prh_fast._align", "AlignmentResult"),
    "compute_score": ("prh_fast._align", "compute_score"),
    "align_models": ("prh_fast.grid", "align_models"),
    "Alignment": ("prh_fast.grid", "Alignment"),
    "GridResult": ("prh_fast.grid", "GridResult"),
    "Probe": ("prh_fast.probe", "Probe"),
    "prepare_features": ("prh_fast.prepare", "prepare_features"),
    "load_features": ("prh_fast.store", "load_features"),
    "save_features": ("prh_fast.store", "save_features"),
    "measure": ("prh_fast.metrics", "measure"),
    "AlignmentMetrics": ("prh_fast.metrics", "AlignmentMetrics"),
    "SUPPORTED_METRICS": ("prh_fast.metrics", "SUPPORTED_METRICS"),
}


def __getattr__(name: str) -> Any:
    """Load a public name on first use (PEP 562) and keep it as a module attribute."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'prh_fast' has no attribute {name!r}") from None
    if module == "prh_fast._align":
        # align() on store folders / feature files runs the model grid's path for one pair,
        # which prh_fast.grid (a layer above _align) registers when it is imported
        importlib.import_module("prh_fast.grid")
    value = importlib.import_module(module)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "Probe",
    "metrics",
    "knn",
    "info",
    "get_config",
    "set_config",
    "config_context",
    "prefer_passive_wait",
    "align",
    "AlignmentResult",
    "compute_score",
    "align_models",
    "Alignment",
    "GridResult",
    "prepare_features",
    "load_features",
    "save_features",
    "measure",
    "AlignmentMetrics",
    "SUPPORTED_METRICS",
    "errors",
    "PrhFastError",
    "InputError",
    "StoreError",
    "BackendUnavailableError",
    "DistributedError",
    "DestinationLocked",
]
