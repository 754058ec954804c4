"""How long an exact CPU search will take, and one warning when that is long.

An exact self search of ``N`` rows of dimension ``D`` computes every inner product once per
ordered pair: ``2·N²·D`` floating-point operations (one multiply and one add per term). The
native ``cpu`` backend scores each pair of row tiles once for both rows (symmetric tiles), so it
does about half of that, ``N²·D``; a cross search of ``N`` queries against ``M`` keys does
``2·N·M·D``. Dividing by the float32 matrix-product (GEMM) rate of this machine gives the time
of the products alone: a lower bound of the search's time, since keeping the running top-k of
every row adds to it (most at small ``D``).

:func:`warn_if_slow` is called by the backend registry's dispatch point
(:func:`prh_fast.knn._backends.resolve`) when the caller says how large the search is: when an
exact search on CPU tensors is estimated to take at least :data:`SLOW_SEARCH_SECONDS`, it logs
one warning with the estimate and suggests an approximate backend with a recall target
(``backend="faiss-ivf:target_recall=0.95"``). It never changes the backend.

The GEMM rate is measured once per process and thread count (:func:`gemm_rate`: a timed float32
matmul of about 2 GFLOP, thread-safe, cached), and only when a cheap upper bound of the time
(the products at :data:`FLOOR_FLOPS_PER_THREAD` per thread) says the search could reach the
threshold: small searches never pay for the measurement.
"""
from __future__ import annotations

import importlib.util
import logging
import threading
import time

import torch

__all__ = ["SLOW_SEARCH_SECONDS", "FLOOR_FLOPS_PER_THREAD", "EXACT_CPU_SEARCHES",
           "search_flops", "gemm_rate", "estimate_seconds", "slow_search_message",
           "warn_if_slow"]

logger = logging.getLogger(__name__)

#: An exact CPU search estimated to take at least this many seconds gets the warning.
SLOW_SEARCH_SECONDS: float = 120.0

#: A float32 GEMM rate every CPU thread this package runs on exceeds (flop/s per thread; a
#: vectorised GEMM reaches tens of GFLOP/s per core): at this rate a search's products take an
#: upper bound of their time, and a search whose bound is below the threshold is skipped
#: without measuring anything.
FLOOR_FLOPS_PER_THREAD: float = 1.0e9

#: The exact searches the estimate covers (on CPU tensors).
EXACT_CPU_SEARCHES = ("cpu", "torch", "faiss")

_PROBE_ROWS, _PROBE_DIM = 2048, 256  # 2·2048²·256 = 2.1 GFLOP per product
_rates: dict = {}  # torch thread count -> measured flop/s
_rate_lock = threading.Lock()
_warned: set = set()  # (N, keys, D, search) already warned about
_warn_lock = threading.Lock()


def search_flops(n: int, dim: int, *, search: str = "torch", n_keys: int | None = None) -> float:
    """Floating-point operations of the inner products of an exact search.

    Args:
        n: query rows (the rows of a self search).
        dim: feature dimension ``D``.
        search: the search that runs (``"cpu"``: symmetric tiles, half the products of a
            self search; any other: every product).
        n_keys: key rows of a cross search (``None``: a self search, keys = queries).

    Returns:
        ``2·n·keys·D``, halved for the ``cpu`` self search.

    Example:
        >>> search_flops(1000, 128)
        256000000.0
        >>> search_flops(1000, 128, search="cpu")
        128000000.0
    """
    keys = n if n_keys is None else n_keys
    flops = 2.0 * float(n) * float(keys) * float(dim)
    if search == "cpu" and n_keys is None:
        flops /= 2.0
    return flops


def _probe_gemm() -> float:
    """One measurement of the float32 GEMM rate (flop/s) with torch's current threads: the
    best of three timed ``[2048, 256] x [256, 2048]`` products after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(_PROBE_ROWS, _PROBE_DIM, generator=g)
    b = torch.randn(_PROBE_DIM, _PROBE_ROWS, generator=g)
    out = torch.empty(_PROBE_ROWS, _PROBE_ROWS)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * _PROBE_ROWS * _PROBE_ROWS * _PROBE_DIM / max(best, 1e-9)


def gemm_rate() -> float:
    """This machine's float32 GEMM rate in flop/s, with torch's current thread count.

    Measured once per process and thread count (a timed matmul of about 2 GFLOP, some tens of
    milliseconds); later calls return the cached value. Thread-safe: concurrent first calls
    measure once.

    Returns:
        flop/s.

    Example:
        >>> gemm_rate() > 0
        True
    """
    threads = torch.get_num_threads()
    rate = _rates.get(threads)
    if rate is None:
        with _rate_lock:
            rate = _rates.get(threads)
            if rate is None:
                rate = float(_probe_gemm())
                _rates[threads] = rate
    return rate


def estimate_seconds(n: int, dim: int, *, search: str = "torch", n_keys: int | None = None,
                     rate: float | None = None) -> float:
    """Seconds the inner products of an exact search take at this machine's GEMM rate (a lower
    bound of the search's time: keeping the top-k lists adds to it).

    Args:
        n: query rows.
        dim: feature dimension.
        search: the search that runs (``"cpu"`` does half the products of a self search).
        n_keys: key rows of a cross search (``None``: a self search).
        rate: flop/s to divide by (default :func:`gemm_rate`, measured here).

    Returns:
        Seconds.

    Example:
        >>> estimate_seconds(1000, 128, rate=1e9)
        0.256
    """
    rate = gemm_rate() if rate is None else float(rate)
    return search_flops(n, dim, search=search, n_keys=n_keys) / rate


def _faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def slow_search_message(search: str, n: int, dim: int, seconds: float, rate: float, *,
                        n_keys: int | None = None, faiss_installed: bool = True) -> str:
    """The warning's text: the estimate, and the approximate backend with a target to use.

    Args:
        search: the exact search that will run.
        n: query rows.
        dim: feature dimension.
        seconds: the estimate (:func:`estimate_seconds`).
        rate: the GEMM rate it used, flop/s.
        n_keys: key rows of a cross search.
        faiss_installed: whether FAISS can be imported (else the text says to install it).

    Returns:
        One line.

    Example:
        >>> "faiss-ivf:target_recall=0.95" in slow_search_message("cpu", 10**6, 128, 1600.0,
        ...                                                        8e10)
        True
    """
    shape = (f"N = {n:,} rows" if n_keys is None else f"{n:,} query rows x {n_keys:,} keys")
    flops = search_flops(n, dim, search=search, n_keys=n_keys)
    text = (f"prh_fast: the exact {search!r} search of {shape} at D = {dim} is estimated to "
            f"take at least {_duration(seconds)} on this machine ({flops:.2g} flops of inner "
            f"products at the measured float32 GEMM rate of {rate / 1e9:.0f} GFLOP/s with "
            f"{torch.get_num_threads()} threads; keeping the top-k lists adds to that). An "
            f"approximate search tuned to a recall target is usually far faster: "
            f"backend=\"faiss-ivf:target_recall=0.95\" (command line: --backend faiss-ivf "
            f"--knn-option target_recall=0.95)")
    if not faiss_installed:
        text += "; it needs FAISS, which is not installed here (pip install faiss-cpu)"
    return text + ". The exact search runs as requested."


def warn_if_slow(search: str, device: torch.device | str, n: int | None, dim: int | None, *,
                 n_keys: int | None = None, threshold: float | None = None) -> float | None:
    """Log one warning when an exact CPU search is estimated to take long; never changes it.

    Nothing happens for an approximate or non-CPU search, an unknown size, or a search whose
    products would take less than ``threshold`` even at the slow rate
    :data:`FLOOR_FLOPS_PER_THREAD` per thread (then the GEMM rate is not measured). Each
    ``(n, n_keys, dim, search)`` is warned about once per process.

    Args:
        search: the search that will run (``"cpu"``, ``"torch"``, ``"faiss"``, ...).
        device: the features' device.
        n: query rows (``None``: unknown, nothing to estimate).
        dim: feature dimension (``None``: unknown).
        n_keys: key rows of a cross search (``None``: a self search).
        threshold: seconds from which to warn (default :data:`SLOW_SEARCH_SECONDS`).

    Returns:
        The estimate in seconds when it was computed (the GEMM rate measured), else ``None``.

    Example:
        >>> warn_if_slow("cpu", "cpu", 1000, 64) is None  # far below the threshold: no probe
        True
    """
    if search not in EXACT_CPU_SEARCHES or n is None or dim is None:
        return None
    if torch.device(device).type != "cpu":
        return None
    limit = SLOW_SEARCH_SECONDS if threshold is None else float(threshold)
    flops = search_flops(n, dim, search=search, n_keys=n_keys)
    if flops / (FLOOR_FLOPS_PER_THREAD * max(1, torch.get_num_threads())) < limit:
        return None
    key = (int(n), None if n_keys is None else int(n_keys), int(dim), search)
    with _warn_lock:
        if key in _warned:
            return None
    rate = gemm_rate()
    seconds = flops / rate
    if seconds < limit:
        return seconds
    with _warn_lock:
        if key in _warned:
            return seconds
        _warned.add(key)
    logger.warning(slow_search_message(search, n, dim, seconds, rate, n_keys=n_keys,
                                       faiss_installed=_faiss_installed()))
    return seconds
