"""One writer per destination: an exclusive, non-blocking lock held while a result is written.

Every writer of a destination that outlives the process (a store folder, an extraction's
``.pt`` file and its parts, a grid's output files) takes :func:`exclusive_lock` on it first.
A second writer of the same destination fails at once with :class:`DestinationLocked`, which
names the destination and the process holding it, instead of interleaving its rows or files
with the first writer's.

Mechanism: ``flock(LOCK_EX | LOCK_NB)`` on a small lock file (``<folder>/.prh_fast.lock`` for a
folder, ``<dir>/.<name>.lock`` for a file). The kernel drops the lock when its holder exits,
however it exits (``kill -9`` included), so a crashed writer never leaves a destination locked:
the next writer takes the lock and the stale holder line in the file is simply overwritten.
The lock file is removed on release; to make removal safe, an acquirer that wins the lock
checks that the path still names the file it locked (another holder may have just removed it)
and starts over if not.

Locks are per open file description, so two lock objects in one process exclude each other too.
``flock`` works on local file systems and on NFSv4 (Linux maps it to a byte-range lock there).
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from typing import TypeVar

from prh_fast.errors import DestinationLocked

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["DestinationLocked", "HoldsLock", "acquire", "release", "exclusive_lock",
           "lock_path"]

LOCK_NAME = ".prh_fast.lock"


def lock_path(destination, *, folder: bool | None = None) -> str:
    """The lock file of ``destination``.

    Args:
        destination: The folder or file a writer is about to write.
        folder: Whether ``destination`` is (or will be) a folder; None looks at the disk.

    Returns:
        ``<destination>/.prh_fast.lock`` for a folder, ``<dir>/.<name>.lock`` (hidden, beside
        it) for a file; absolute.

    Example:
        >>> import os
        >>> from prh_fast._lock import lock_path
        >>> os.path.basename(lock_path("/data/features.pt", folder=False))
        '.features.pt.lock'
        >>> os.path.basename(lock_path("/data/store", folder=True))
        '.prh_fast.lock'
    """
    dest = os.path.abspath(os.fspath(destination))
    if folder is None:
        folder = os.path.isdir(dest)
    if folder:
        return os.path.join(dest, LOCK_NAME)
    head, name = os.path.split(dest)
    return os.path.join(head, f".{name}.lock")


def _holder_text() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                       "command": " ".join(sys.argv)[:300]})


def _describe_holder(path: str) -> str:
    try:
        with open(path, "rb") as f:
            info = json.loads(f.read(4096).decode("utf-8", "replace") or "{}")
        cmd = info.get("command") or "?"
        return (f"process {info.get('pid', '?')} on {info.get('host', '?')} since "
                f"{info.get('started', '?')}: {cmd}")
    except (OSError, ValueError, AttributeError):
        return f"lock file {path}"


class _Held:
    """An acquired lock: the open descriptor and the path it was taken on."""

    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            # Remove the file while still holding it: a process that opened it meanwhile fails
            # its identity check after locking and retries on a fresh file.
            os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1


# flock excludes open file descriptions, also within one process; this set only makes the
# error say "this process" when the holder is ourselves (e.g. a writer opened twice).
_HELD: set = set()
_HELD_GUARD = threading.Lock()


def acquire(destination, *, folder: bool | None = None) -> _Held:
    """Take the lock of ``destination`` without waiting.

    Args:
        destination: The folder or file to lock (its parent folders are created).
        folder: As in :func:`lock_path`.

    Returns:
        The held lock; give it to :func:`release` when done.

    Raises:
        DestinationLocked: Another writer (another process, or another lock object in this
            one) holds it; the message names the holder.

    Example:
        >>> import os, tempfile
        >>> from prh_fast._lock import acquire, release
        >>> held = acquire(os.path.join(tempfile.mkdtemp(), "grid"), folder=True)
        >>> os.path.exists(held.path)
        True
        >>> release(held)
        >>> os.path.exists(held.path)
        False
    """
    dest = os.path.abspath(os.fspath(destination))
    path = lock_path(dest, folder=folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fcntl is None:  # pragma: no cover - no advisory locks on this platform
        return _Held(-1, path)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            with _HELD_GUARD:
                mine = path in _HELD
            holder = "this process" if mine else _describe_holder(path)
            raise DestinationLocked(dest, holder) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:  # the previous holder removed the file after we opened it: start over
            os.close(fd)
            continue
        text = _holder_text().encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        with _HELD_GUARD:
            _HELD.add(path)
        return _Held(fd, path)
    raise DestinationLocked(dest, f"lock file {path} keeps being replaced")


def release(held: _Held) -> None:
    """Release a lock taken by :func:`acquire` and remove its lock file.

    Args:
        held: What :func:`acquire` returned. Releasing twice is harmless.

    Example:
        >>> import os, tempfile
        >>> from prh_fast._lock import acquire, release
        >>> out = os.path.join(tempfile.mkdtemp(), "features.pt")
        >>> release(acquire(out, folder=False))
        >>> release(acquire(out, folder=False))  # free again once released
    """
    with _HELD_GUARD:
        _HELD.discard(held.path)
    held.release()


_Self = TypeVar("_Self", bound="HoldsLock")


class HoldsLock:
    """Base class of writers that hold their destination's lock while open.

    A subclass stores what :func:`acquire` returned in ``self._held`` when it opens and calls
    :meth:`close` when it finishes; ``with`` blocks and the finaliser close it too.

    Example:
        >>> import os, tempfile
        >>> from prh_fast._lock import HoldsLock, acquire
        >>> class Writer(HoldsLock):
        ...     def __init__(self, path):
        ...         self._held = acquire(path, folder=False)
        >>> path = os.path.join(tempfile.mkdtemp(), "out.bin")
        >>> with Writer(path) as w:
        ...     held = w._held is not None
        >>> held, w._held
        (True, None)
    """

    _held = None

    def close(self) -> None:
        """Release the destination's lock (``finish`` does). What was made durable stays, and
        a new writer of the same path resumes from it."""
        held, self._held = self._held, None
        if held is not None:
            release(held)

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass


@contextmanager
def exclusive_lock(destination, *, folder: bool | None = None):
    """Hold the lock of ``destination`` for a ``with`` block.

    Args:
        destination: The folder or file to lock.
        folder: As in :func:`lock_path`.

    Yields:
        The held lock.

    Raises:
        DestinationLocked: Another writer holds it.

    Example:
        >>> import os, tempfile
        >>> from prh_fast._lock import exclusive_lock
        >>> out = os.path.join(tempfile.mkdtemp(), "store")
        >>> with exclusive_lock(out, folder=True) as held:
        ...     print(os.path.basename(held.path))
        .prh_fast.lock
    """
    held = acquire(destination, folder=folder)
    try:
        yield held
    finally:
        release(held)
