"""File helpers: atomic writes (every file prh_fast writes goes through ``atomic_write``) and
the confinement of paths read from untrusted folders (``confined``).

The content is written to a temporary file beside the target, flushed and fsynced, given the
mode a plain ``open()`` would have produced, renamed over the target (``os.replace``), and the
folder is fsynced so the rename survives a crash. A failure at any point leaves the previous
file untouched and no temporary file behind.
"""
from __future__ import annotations

import os
import tempfile


def _umask() -> int:
    # Read without changing it where possible (os.umask(x) changes it process-wide).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def atomic_write(path, write) -> str:
    """Call ``write(f)`` on a binary file object, then move the result to ``path``.

    The file appears complete or not at all: a failure inside ``write`` (or a crash) leaves
    any previous ``path`` untouched and no temporary file behind.

    Args:
        path: The file to write (str or path-like); its folder is created if needed.
        write: A callable taking the open binary file object and writing the content.

    Returns:
        ``path`` as a string.

    Example:
        >>> import os, tempfile
        >>> from prh_fast._io import atomic_write
        >>> path = os.path.join(tempfile.mkdtemp(), "out", "notes.txt")
        >>> atomic_write(path, lambda f: f.write(b"hello")) == path
        True
        >>> open(path, "rb").read()
        b'hello'
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give it the mode a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX; not possible on every platform)
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def confined(root, rel, *, direct: bool = False) -> str | None:
    """``root/rel`` when it stays inside ``root`` once symlinks and ``..`` are resolved.

    For paths named by files inside a folder a user hands us (a store index, a captions file),
    which must not lead the reader elsewhere on the machine.

    Args:
        root: The folder the path must stay in.
        rel: The relative path read from the untrusted file.
        direct: Require ``rel`` to name an entry of ``root`` itself (no sub-folders).

    Returns:
        The joined path (unresolved), or None when ``rel`` is empty, absolute, contains a NUL
        byte, or leads outside ``root``.

    Example:
        >>> import tempfile
        >>> from prh_fast._io import confined
        >>> root = tempfile.mkdtemp()
        >>> confined(root, "shard-00000.safetensors") is not None
        True
        >>> print(confined(root, "../etc/passwd"), confined(root, "/etc/passwd"))
        None None
        >>> print(confined(root, "sub/file.bin", direct=True))
        None
    """
    rel = os.fspath(rel)
    if not rel or os.path.isabs(rel) or "\0" in rel:
        return None
    full = os.path.join(os.fspath(root), rel)
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if direct:
        return full if os.path.dirname(real) == real_root else None
    return full if real.startswith(real_root.rstrip(os.sep) + os.sep) else None
