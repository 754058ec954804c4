"""CPU threads: how many, and how they wait. One home for both.

**How many.** torch's intra-op pool (``torch.mm``, elementwise ops) and the native kernels
(``prh_fast._C``, OpenMP) share one OpenMP runtime in a normal install: ``_C`` links
``libgomp.so.1`` and torch's wheel ships the same soname, so the process loads it once and one
pool of threads serves both. Every prh_fast computation runs with ``torch.get_num_threads()``
threads in total -- or with the ``num_threads`` setting (``PRH_FAST_NUM_THREADS``,
:func:`prh_fast.set_config`) when it is given, which :func:`limit_threads` applies to both
torch and the native kernels for the duration of the call and then restores. The native
kernels are told the same count on every call, so even a build whose native module got a
runtime of its own cannot run more threads than torch's count.

**How they wait.** An OpenMP worker that finishes its share of a parallel region waits for
the next one. GNU OpenMP's default is to spin (busy-wait) for a while first -- about
300,000 polls, milliseconds on a loaded core -- before it sleeps. On an idle machine that
saves a wake-up; on a shared one the spinning threads take the cores that busy processes and
the threads still working need, and a parallel region's barrier can wait a scheduler time
slice for a descheduled thread. Measured on 2 cores with 4 busy processes
(``benchmarks/bench_contention.py``; the fair share is 3x the idle time): an 8 x 8 layer grid at
``N = 1024`` with every search parallel inside took 9.7-45x its idle time with spinning
threads and 4.8-6.2x with sleeping ones; with the layers side by side (below) 5.2x and 2.7x.
A search at ``N = 16384`` (few, large regions): 3.9x spinning, 3.1x sleeping. Idle times were
the same within noise either way.

**Side by side.** A layer grid searches every layer of a side; at small ``N`` each search is
hundreds of small parallel regions, so :func:`map_layers` runs whole searches side by side, one
thread each, instead (same results, no barrier per tile; the 8 x 8 grid above took 0.284 s
instead of 0.358 s on the idle machine, measured in one process).

The runtime reads its wait policy once, when it is loaded, so the policy has to be in the
environment before that. ``import prh_fast`` changes nothing (no environment write, and it
loads neither torch nor the native module, hence no OpenMP runtime). The ``prh-fast`` command
calls :func:`prefer_passive_wait` first thing, before anything loads the runtime. A library
user opts in the same way -- ``import prh_fast; prh_fast.prefer_passive_wait()`` before
``import torch`` -- or sets ``OMP_WAIT_POLICY=passive`` in the environment of the process.
:func:`prefer_passive_wait` leaves a user's own ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``
alone, and does nothing once an OpenMP runtime is in the process (too late to change).
:func:`wait_policy` says which policy holds and who decided (``prh-fast info`` shows it); when
idle threads spin, the first computation on a busy machine (1-minute load above the cores) logs
one warning that says how to avoid it.

**Module state.** The wait-policy decision (``_STATE``) is written once, under a lock, by
:func:`prefer_passive_wait`; the torch thread-count switch of :func:`map_layers` is shared under
``_switch_lock``; ``_spin_checked`` is a once-per-process flag (two threads racing on it at
worst both run the check, and :func:`prh_fast._log._log_once` still warns once).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar

from prh_fast._config import config_context, get_config

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

__all__ = ["wait_policy", "prefer_passive_wait", "limit_threads", "with_threads",
           "effective_threads", "map_layers"]

log = logging.getLogger(__name__)

_RUNTIMES = ("libgomp", "libiomp", "libomp.so")

#: ``(policy, why)`` decided by :func:`prefer_passive_wait` (once per process); None until then.
_STATE: tuple[str, str] | None = None
_state_lock = threading.Lock()


def _runtime_loaded() -> str | None:
    """The path of an OpenMP runtime already mapped into this process, if any (Linux); else
    ``"torch"`` when torch is imported (its runtime loads with it), else None."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if any(r in line for r in _RUNTIMES):
                    return line.split()[-1]
    except OSError:
        pass
    return "torch" if "torch" in sys.modules else None


def _users_policy() -> tuple[str, str] | None:
    """The policy the environment gives (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``), if any."""
    user = os.environ.get("OMP_WAIT_POLICY")
    if user:
        return user.strip().lower(), "OMP_WAIT_POLICY set by the user"
    if os.environ.get("GOMP_SPINCOUNT"):
        return ("default (spin, then sleep)",
                f"GOMP_SPINCOUNT={os.environ['GOMP_SPINCOUNT']} set by the user")
    return None


def prefer_passive_wait() -> tuple[str, str]:
    """Ask the OpenMP runtime to put idle threads to sleep at once (module docstring).

    Sets ``OMP_WAIT_POLICY=PASSIVE`` in this process's environment when the user set neither
    ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` and no OpenMP runtime is loaded yet (so call it
    before ``import torch``). The ``prh-fast`` command calls it before anything else;
    ``import prh_fast`` does not (importing the package changes nothing in the process).
    The first call decides; later calls return the same answer.

    Returns:
        ``(policy, why)`` as :func:`wait_policy`.

    Example:
        >>> import prh_fast
        >>> prh_fast.prefer_passive_wait()[0] in (
        ...     "passive", "active", "default (spin, then sleep)")
        True
    """
    global _STATE
    with _state_lock:
        if _STATE is not None:
            return _STATE
        decided = _users_policy()
        if decided is None:
            loaded = _runtime_loaded()
            if loaded is None:
                os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
                decided = ("passive", "set by prh_fast before the OpenMP runtime loaded")
            else:
                decided = ("default (spin, then sleep)",
                           f"the OpenMP runtime was loaded before prefer_passive_wait() "
                           f"({loaded}); call prh_fast.prefer_passive_wait() before importing "
                           f"torch, or set OMP_WAIT_POLICY=passive, to make idle threads sleep")
        _STATE = decided
        return _STATE


def wait_policy() -> tuple[str, str]:
    """``(policy, why)``: how this process's OpenMP threads wait between parallel regions.

    ``policy`` is ``"passive"`` (they sleep at once), ``"active"`` (they spin), or
    ``"default (spin, then sleep)"``; ``why`` says who decided. Reading it changes nothing.

    Returns:
        The decision of :func:`prefer_passive_wait` if it was called, else what the
        environment gives (the runtime's default when it gives nothing).

    Example:
        >>> from prh_fast._threads import wait_policy
        >>> isinstance(wait_policy()[1], str)
        True
    """
    state = _STATE
    if state is not None:
        return state
    return _users_policy() or (
        "default (spin, then sleep)",
        "OMP_WAIT_POLICY is not set; call prh_fast.prefer_passive_wait() before importing "
        "torch, or set OMP_WAIT_POLICY=passive, to make idle threads sleep (the prh-fast "
        "command does)")


def effective_threads() -> int:
    """Threads a prh_fast computation uses: the ``num_threads`` setting, else
    ``torch.get_num_threads()``.

    Example:
        >>> effective_threads() >= 1
        True
    """
    n = get_config().num_threads
    if n is None:
        import torch

        n = torch.get_num_threads()
    return int(n)


_spin_checked = False


def _warn_if_spinning_on_a_busy_machine() -> None:
    """Once per process: when idle threads spin (no passive policy was asked for before the
    runtime loaded) and the machine is busy (1-minute load above its cores), say what that
    costs and how to avoid it. On an idle machine spinning costs nothing, so nothing is said."""
    global _spin_checked
    if _spin_checked:
        return
    policy, why = wait_policy()
    if not policy.startswith("default"):
        return
    try:
        load = os.getloadavg()[0]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    except OSError:
        return
    if load > cpus:
        from prh_fast._log import _log_once

        _spin_checked = True
        _log_once(f"prh_fast: this machine is busy (load {load:.1f} on {cpus} cores) and idle "
                  f"OpenMP threads spin in this process ({why}); spinning threads can "
                  f"make the CPU kernels several times slower here", log)


def _native_set(n: int) -> None:
    from prh_fast import _native

    if _native.HAS_NATIVE:
        _native.native().set_num_threads(int(n))


@contextlib.contextmanager
def limit_threads() -> Iterator[int]:
    """Run the block with :func:`effective_threads` threads in torch and in the native kernels;
    torch's count is restored afterwards. Nested blocks cost two integer reads.

    Example:
        >>> from prh_fast import config_context
        >>> import torch
        >>> before = torch.get_num_threads()
        >>> with config_context(num_threads=1), limit_threads():
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    import torch

    _warn_if_spinning_on_a_busy_machine()
    want = effective_threads()
    have = torch.get_num_threads()
    if want != have:
        torch.set_num_threads(want)
    _native_set(want)
    try:
        yield want
    finally:
        if want != have:
            torch.set_num_threads(have)
            _native_set(have)


def with_threads(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``fn`` inside :func:`limit_threads` (public entry points use it).

    Example:
        >>> @with_threads
        ... def f():
        ...     return 1
        >>> f()
        1
    """
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with limit_threads():
            return fn(*args, **kwargs)

    return wrapper


#: Largest ``N`` whose layers :func:`map_layers` searches side by side: below it a search is
#: many small parallel regions (a tile product and a merge per 256-row tile), each ending in a
#: barrier; above it the tiles are large and one search uses the threads well by itself (and
#: side-by-side searches would multiply the scratch memory).
LAYER_PARALLEL_MAX_N = 8192


def map_layers(fn: Callable[[T], R], items: Sequence[T], n: int, *,
               parallel: bool = True) -> list[R]:
    """``[fn(x) for x in items]``, with independent items run side by side when that pays.

    With ``T = effective_threads() >= 2``, at least two items, ``n <= LAYER_PARALLEL_MAX_N`` and
    ``parallel``, ``T`` worker threads each run whole items with one compute thread (torch's
    pool and the native kernels): the GIL is released inside the products and the native
    kernels, so the items overlap, and no item waits at a barrier for a thread the operating
    system has descheduled -- on a busy machine, small searches lose most of their time there.
    The results (and their order) are those of the plain loop; each worker runs in a copy of
    the caller's context (``config_context`` settings hold there too).

    Args:
        fn: the function of one item.
        items: the items (e.g. one side's layers).
        n: the items' size (rows), compared with :data:`LAYER_PARALLEL_MAX_N`.
        parallel: ``False`` runs the plain loop (e.g. a backend that is not the CPU one).

    Returns:
        ``[fn(x) for x in items]``.

    Example:
        >>> map_layers(lambda x: x * x, [1, 2, 3], n=10)
        [1, 4, 9]
    """
    t = effective_threads()
    if not parallel or t < 2 or len(items) < 2 or n > LAYER_PARALLEL_MAX_N:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    import torch

    workers = min(t, len(items))
    _single_threaded_enter(torch)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = []
            for x in items:
                ctx = contextvars.copy_context()
                # inside the workers, the public entry points keep one thread each
                futures.append(pool.submit(ctx.run, _with_one_thread, fn, x))
            return [f.result() for f in futures]
    finally:
        _single_threaded_leave(torch)


# torch's thread count is process-wide: map_layers calls running at the same time (a user's
# own threads) share one switch to a single thread, and the last to finish restores the count
# the first one found.
_switch_lock = threading.Lock()
_switch_depth = 0
_switch_saved = 0


def _single_threaded_enter(torch: Any) -> None:
    global _switch_depth, _switch_saved
    with _switch_lock:
        if _switch_depth == 0:
            _switch_saved = torch.get_num_threads()
            torch.set_num_threads(1)
        _switch_depth += 1


def _single_threaded_leave(torch: Any) -> None:
    global _switch_depth
    with _switch_lock:
        _switch_depth -= 1
        if _switch_depth == 0:
            torch.set_num_threads(_switch_saved)
            _native_set(_switch_saved)


def _with_one_thread(fn: Callable[[T], R], x: T) -> R:
    """``fn(x)`` in a worker: one native thread, and public entry points keep one too."""
    _native_set(1)
    with config_context(num_threads=1):
        return fn(x)
