"""Names the whole package (and the command line) agrees on, importable without torch.

``prh_fast.metrics.SUPPORTED_METRICS`` is this list; the command line builds its argument
choices from here so that ``prh-fast --help`` does not import torch.

Example:
    >>> from prh_fast._names import SUPPORTED_METRICS
    >>> SUPPORTED_METRICS[:2]
    ['cycle_knn', 'mutual_knn']
"""
from __future__ import annotations

#: The eight metrics, in the reference's order and with its names.
SUPPORTED_METRICS = [
    "cycle_knn",
    "mutual_knn",
    "lcs_knn",
    "cka",
    "unbiased_cka",
    "cknna",
    "svcca",
    "edit_distance_knn",
]
