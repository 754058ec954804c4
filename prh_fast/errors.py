"""prh_fast's exceptions: one root, and the built-in types callers already catch.

Every error prh_fast raises on purpose derives from :class:`PrhFastError`, so
``except prh_fast.PrhFastError`` catches them all. Each also keeps the built-in type that
describes it, so existing code that catches ``ValueError`` (bad input), ``FileNotFoundError``
(something missing) or ``OSError`` (a busy destination) keeps working::

    PrhFastError
    ├── InputError (ValueError)                 bad argument, shape, value or file contents
    │   ├── StoreError                          a store folder missing, malformed or damaged
    │   ├── DataNotFoundError (FileNotFoundError)   a data source that is not there
    │   └── ModelNotAvailableError (FileNotFoundError)  weights neither on disk nor fetchable
    ├── BackendUnavailableError (RuntimeError)  an explicitly requested backend cannot run here
    ├── DistributedError (RuntimeError)         a collective failed: a rank died or stalled
    └── DestinationLocked (BlockingIOError)     another writer holds the output

Argument checks raise ``TypeError`` for a wrong type and ``InputError`` (a ``ValueError``) for a
bad value, as scikit-learn's ``check_scalar`` does. This module imports nothing from prh_fast.
"""
from __future__ import annotations

__all__ = ["PrhFastError", "InputError", "StoreError", "DataNotFoundError",
           "ModelNotAvailableError", "BackendUnavailableError", "DistributedError",
           "DestinationLocked"]


class PrhFastError(Exception):
    """Root of every error prh_fast raises on purpose.

    Example:
        >>> from prh_fast.errors import InputError, PrhFastError
        >>> issubclass(InputError, PrhFastError)
        True
    """


class InputError(PrhFastError, ValueError):
    """Bad input: an argument's value or shape, or the contents of a file (names which).

    A ``ValueError``, so callers that catch ``ValueError`` keep working.

    Example:
        >>> import tempfile
        >>> import prh_fast
        >>> try:
        ...     prh_fast.store.open_store(tempfile.mkdtemp())  # a folder with no store index
        ... except prh_fast.InputError as err:
        ...     print(type(err).__name__, isinstance(err, ValueError))
        StoreError True
    """


class StoreError(InputError):
    """A store folder that is missing, malformed, truncated or corrupt (names the file).

    Example:
        >>> import tempfile
        >>> from prh_fast.store import open_store
        >>> from prh_fast.errors import StoreError
        >>> try:
        ...     open_store(tempfile.mkdtemp())
        ... except StoreError:
        ...     print("not a store")
        not a store
    """


class DataNotFoundError(InputError, FileNotFoundError):
    """A data source that is not there (missing folder, file or package).

    Example:
        >>> from prh_fast.errors import DataNotFoundError
        >>> issubclass(DataNotFoundError, FileNotFoundError)
        True
    """


class ModelNotAvailableError(InputError, FileNotFoundError):
    """The weights are neither on disk nor fetchable; the message lists what was tried.

    Example:
        >>> from prh_fast.errors import ModelNotAvailableError
        >>> issubclass(ModelNotAvailableError, FileNotFoundError)
        True
    """


class BackendUnavailableError(PrhFastError, RuntimeError):
    """A backend the caller asked for by name cannot run here (the message says why).

    Example:
        >>> from prh_fast.errors import BackendUnavailableError
        >>> err = BackendUnavailableError("backend='faiss': faiss is not installed")
        >>> isinstance(err, RuntimeError)
        True
    """


class DistributedError(PrhFastError, RuntimeError):
    """A collective failed: a peer rank died, was killed, or did not answer in time.

    Example:
        >>> from prh_fast.errors import DistributedError
        >>> isinstance(DistributedError("rank 1 did not answer"), RuntimeError)
        True
    """


class DestinationLocked(PrhFastError, BlockingIOError):
    """Another writer holds the destination (the message names the destination and holder).

    A ``BlockingIOError`` (an ``OSError``): the destination is busy, not wrong; retry later.

    Args:
        destination: The path another writer is using.
        holder: Who holds it (process, host, start time and command, when known).

    Example:
        >>> import os, tempfile
        >>> from prh_fast._lock import exclusive_lock
        >>> from prh_fast.errors import DestinationLocked
        >>> out = os.path.join(tempfile.mkdtemp(), "store")
        >>> with exclusive_lock(out, folder=True):
        ...     try:
        ...         with exclusive_lock(out, folder=True):
        ...             pass
        ...     except DestinationLocked as err:
        ...         print(err.holder)
        this process
    """

    def __init__(self, destination: str, holder: str):
        self.destination = destination
        self.holder = holder
        super().__init__(f"{destination}: another writer is using it ({holder}); wait for it to "
                         f"finish, or write somewhere else")
