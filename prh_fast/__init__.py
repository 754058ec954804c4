"""prh_fast: fast, exact representational-alignment metrics at any scale.

Implements the measurements of *The Platonic Representation Hypothesis* (Huh, Cheung, Wang,
Isola, ICML 2024) with the reference's semantics (see ``prh_fast.metrics``), without N x N
matrices. ``import prh_fast`` never touches CUDA.
"""
from __future__ import annotations

from prh_fast import (  # subpackages: prh_fast.knn.knn(X, k) is the search
    _native,  # noqa: F401  (emits the one warning if _C is missing)
    knn,
    metrics,
)
from prh_fast._align import AlignmentResult, align, compute_score
from prh_fast._config import config_context, get_config, set_config
from prh_fast._info import info
from prh_fast._version import __version__
from prh_fast.errors import (
    BackendUnavailableError,
    DestinationLocked,
    DistributedError,
    InputError,
    PrhFastError,
    StoreError,
)
from prh_fast.grid import Alignment, GridResult, align_models
from prh_fast.metrics import SUPPORTED_METRICS, AlignmentMetrics, measure
from prh_fast.prepare import prepare_features
from prh_fast.store import load_features, save_features

__all__ = [
    "__version__",
    "metrics",
    "knn",
    "info",
    "get_config",
    "set_config",
    "config_context",
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
