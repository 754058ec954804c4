"""Process groups, rank arithmetic and failure reporting for the distributed paths.

Everything here is plain ``torch.distributed``: the process group is the one ``torchrun`` (or the
caller) set up, ``gloo`` between CPU processes and ``nccl`` between GPUs. Two rules hold for every
distributed function in this package:

- *Errors reach every rank.* Bad input is detected on the rank that holds it, then shared (one
  small object all-gather), so every rank raises the same ``ValueError`` instead of some ranks
  raising and the others waiting in a collective until a timeout.
- *A dead or stuck peer is named.* A collective that fails (a peer's connection closed, or the
  process group's timeout expired) is re-raised as :class:`DistributedError` naming this rank,
  what it was doing, and which ranks are missing, as far as the rendezvous store can tell.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from typing import Any

import torch

from prh_fast import _config
from prh_fast.errors import DistributedError, InputError

logger = logging.getLogger(__name__)

__all__ = [
    "DistributedError",
    "shard_range",
    "world",
    "launched_by_torchrun",
    "init_from_env",
    "default_timeout",
]

#: Seconds a collective may wait for a peer before the job fails (``PRH_FAST_DIST_TIMEOUT``).
#: Generous, because ranks wait for each other at the end of unevenly sized work; a rank that
#: *dies* is noticed much sooner (its connections close; torchrun also stops the job).
DEFAULT_TIMEOUT_S = 1800.0


def _dist():
    import torch.distributed as dist

    return dist


def shard_range(n: int, rank: int, world_size: int) -> tuple:
    """Rows ``[start, stop)`` of rank ``rank`` when ``n`` rows are split over ``world_size``
    ranks: contiguous, in rank order, sizes differing by at most one (the first ``n % world``
    ranks get one more). Ranks beyond ``n`` get empty ranges ``(n, n)``.

    Args:
        n: number of rows, ``>= 0``.
        rank: this rank, ``0 <= rank < world_size``.
        world_size: number of ranks, ``>= 1``.

    Returns:
        ``(start, stop)``.

    Raises:
        InputError: naming the argument that is not an integer in range.

    Example:
        >>> [shard_range(10, r, 3) for r in range(3)]
        [(0, 4), (4, 7), (7, 10)]
    """
    for v, name in ((n, "n"), (rank, "rank"), (world_size, "world_size")):
        if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
            raise InputError(f"{name}: expected an integer, got {v!r}")
    n, rank, world_size = int(n), int(rank), int(world_size)
    if n < 0:
        raise InputError(f"n: expected a number of rows >= 0, got {n}")
    if world_size < 1:
        raise InputError(f"world_size: expected >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise InputError(f"rank: expected 0 <= rank < world_size = {world_size}, got {rank}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def world(group: Any = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (default group); ``(0, 1)`` without a process group.

    Example:
        >>> world()  # no process group here
        (0, 1)
    """
    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise InputError(f"{name}: expected an integer in the environment, got {raw!r}") from None


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one rank (``WORLD_SIZE > 1``, as set by
    ``torchrun`` or a cluster launcher).

    Example:
        >>> import os
        >>> launched_by_torchrun() == (int(os.environ.get("WORLD_SIZE") or 1) > 1)
        True
    """
    return _env_int("WORLD_SIZE", 1) > 1


def default_timeout() -> datetime.timedelta:
    """The timeout of every collective: the configured ``dist_timeout``
    (``config_context(dist_timeout=...)``, ``set_config``, ``PRH_FAST_DIST_TIMEOUT`` in
    seconds), else 30 minutes.

    Returns:
        A ``datetime.timedelta``.

    Raises:
        InputError: naming ``PRH_FAST_DIST_TIMEOUT`` when it is not a positive number.

    Example:
        >>> import prh_fast
        >>> with prh_fast.config_context(dist_timeout=90):
        ...     default_timeout().total_seconds()
        90.0
    """
    s = _config.get_config().dist_timeout
    return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S if s is None else s)


def _pick_backend(backend):
    if backend:
        name = _config.parse_dist_backend(backend, "backend")
    else:
        name = _config.get_config().dist_backend
    if name == "auto":
        # GPUs are used when this rank has one of its own (LOCAL_RANK < visible devices).
        local = _env_int("LOCAL_RANK", 0)
        if torch.cuda.is_available() and local < torch.cuda.device_count():
            return "nccl"
        return "gloo"
    return name


def init_from_env(backend: str | None = None,
                  timeout: float | datetime.timedelta | None = None) -> bool:
    """Initialise the default process group from the environment (``torchrun``'s ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).

    Args:
        backend: ``"auto"`` (nccl when this rank has a GPU, else gloo), ``"gloo"`` or
            ``"nccl"``; ``None``: the configured ``dist_backend`` (``config_context``,
            ``set_config``, ``PRH_FAST_DIST_BACKEND``), else ``"auto"``. With nccl the rank's
            device is ``cuda:{LOCAL_RANK}``.
        timeout: seconds or a ``timedelta`` for every collective; ``None``:
            :func:`default_timeout` (the configured ``dist_timeout``, else 30 minutes).

    Returns:
        True if this call created the group (the caller then destroys it), False if one
        already existed.

    Example:
        >>> init_from_env()  # inside a torchrun job  # doctest: +SKIP
        True
    """
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        return False
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise InputError(f"{var}: not set in the environment; launch with torchrun "
                             f"(torchrun --nproc-per-node=G -m prh_fast.cli ...)")
    name = _pick_backend(backend)
    if timeout is None:
        timeout = default_timeout()
    elif not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    kw = {}
    if name == "nccl":
        local = _env_int("LOCAL_RANK", 0)
        torch.cuda.set_device(local)
        kw["device_id"] = torch.device("cuda", local)
    dist.init_process_group(name, timeout=timeout, **kw)
    logger.info("prh_fast: rank %d of %d joined (%s, timeout %s)", dist.get_rank(),
                dist.get_world_size(), name, timeout)
    return True


def comm_device(group=None) -> torch.device:
    """Where tensors must live for this group's collectives: the current GPU for nccl, else
    the CPU."""
    dist = _dist()
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# failure reporting
# --------------------------------------------------------------------------------------------
def _store():
    try:
        return _dist().distributed_c10d._get_default_store()
    except Exception:  # no default store (custom groups) or a torch without the helper
        return None


def mark_done(tag: str, group=None) -> None:
    """Record in the rendezvous store that this rank finished ``tag`` (used to name the ranks
    that did not, when a later collective fails)."""
    rank, P = world(group)
    st = _store()
    if P > 1 and st is not None:
        try:
            st.set(f"prh_fast/{tag}/done/{rank}", "1")
        except Exception:
            pass


def _missing(tag: str, group=None):
    rank, P = world(group)
    st = _store()
    if st is None:
        return None
    out = []
    try:
        for r in range(P):
            if not st.check([f"prh_fast/{tag}/done/{r}"]):
                out.append(r)
    except Exception:
        return None
    return out


@contextlib.contextmanager
def collective(what: str, *, peers=None, tag: str | None = None, group=None):
    """Run collectives under a clear failure message: ``rank R: <what> failed ...``."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ConnectionError, TimeoutError) as err:
        rank, P = world(group)
        who = ""
        if tag is not None:
            missing = _missing(tag, group)
            if missing:
                who = (f" Rank(s) {missing} did not finish their share (died, were killed or "
                       f"are stuck).")
        if not who and peers:
            who = f" Waiting on rank(s) {sorted(set(peers))}: one of them died or is stuck."
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedError(
            f"rank {rank} of {P}: {what} failed: {first}.{who} The job cannot continue; what "
            f"was already written is kept, and rerunning the same command resumes from it."
        ) from err


def agree(error, group=None, what: str = "input check"):
    """Share each rank's error (``None`` or an exception) with every rank; if any rank has one,
    raise it everywhere (``ValueError`` / ``TypeError`` / ``FileNotFoundError`` keep their type,
    prefixed by the rank that saw it; anything else becomes :class:`DistributedError`)."""
    rank, P = world(group)
    if P == 1:
        if error is not None:
            raise error
        return
    mine = None if error is None else (type(error).__name__, str(error))
    got = [None] * P
    with collective(f"sharing the {what}", group=group):
        _dist().all_gather_object(got, mine, group=group)
    bad = [(r, e) for r, e in enumerate(got) if e is not None]
    if not bad:
        return
    r, (kind, msg) = bad[0]
    if error is not None and r == rank:
        raise error
    where = f"(on rank {r}) "
    types = {"ValueError": ValueError, "TypeError": TypeError,
             "FileNotFoundError": FileNotFoundError}
    raise types.get(kind, DistributedError)(where + msg)


def broadcast_object(obj, src: int = 0, group=None, what: str = "broadcast"):
    rank, P = world(group)
    if P == 1:
        return obj
    box = [obj if rank == src else None]
    with collective(what, peers=[src], group=group):
        _dist().broadcast_object_list(box, src=src, group=group)
    return box[0]
