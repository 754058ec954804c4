"""Tile sizes from a memory budget."""
from __future__ import annotations


def square_tile(n: int, itemsize: int, budget: int, *, buffers: int = 2,
                minimum: int = 64, maximum: int = 4096) -> int:
    """Side ``b`` of a ``b x b`` score tile such that ``buffers`` tiles fit in ``budget`` bytes."""
    b = int((budget / (buffers * itemsize)) ** 0.5)
    return max(1, min(n, max(minimum, min(b, maximum))))


def block_rows(n_cols: int, itemsize: int, budget: int, *, buffers: int = 2,
               minimum: int = 16) -> int:
    """Rows of a ``rows x n_cols`` tile such that ``buffers`` tiles fit in ``budget`` bytes."""
    return max(minimum, int(budget // (buffers * itemsize * max(1, n_cols))))
