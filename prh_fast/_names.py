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

#: The demo's shuffled pairings: of the neighbour-list metrics (a shuffle relabels the lists;
#: p-values down to 1/101) and of the others (a shuffle rescores every layer pair; down to
#: 1/21): what fits a run of about a minute on two CPU cores once the features are cached.
DEMO_NULL_PERMUTATIONS = 100
DEMO_KERNEL_NULL_PERMUTATIONS = 20
