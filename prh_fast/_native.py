"""Access to the compiled module ``prh_fast._C``.

``import prh_fast`` must work without it (pure-torch fallbacks, one warning). Nothing here
touches CUDA: whether CUDA kernels were compiled is a build fact (``_C.has_cuda_kernels``),
whether a GPU is usable is asked only when a CUDA tensor arrives.
"""
from __future__ import annotations

import importlib
import warnings

try:  # pragma: no cover - exercised by whichever build is installed
    _C = importlib.import_module("prh_fast._C")

    NATIVE_ERROR = None
except ImportError as exc:  # pragma: no cover
    _C = None
    NATIVE_ERROR = exc
    warnings.warn(
        "prh_fast: the native module prh_fast._C is not available "
        f"({exc}); falling back to pure-torch kernels, which are slower. "
        "Reinstall with `pip install .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )

HAS_NATIVE = _C is not None
HAS_CUDA_KERNELS = bool(getattr(_C, "has_cuda_kernels", False))


def native():
    """Return the native module or raise a clear error if it was not built."""
    if _C is None:
        raise RuntimeError(
            f"prh_fast._C is not available ({NATIVE_ERROR}); reinstall prh_fast with "
            "`pip install .` to build the native kernels"
        )
    return _C
