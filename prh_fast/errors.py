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
    """Root of every error prh_fast raises on purpose."""


class InputError(PrhFastError, ValueError):
    """Bad input: an argument's value or shape, or the contents of a file (names which)."""


class StoreError(InputError):
    """A store folder that is missing, malformed, truncated or corrupt (names the file)."""


class DataNotFoundError(InputError, FileNotFoundError):
    """A data source that is not there (missing folder, file or package)."""


class ModelNotAvailableError(InputError, FileNotFoundError):
    """The weights are neither on disk nor fetchable; the message lists what was tried."""


class BackendUnavailableError(PrhFastError, RuntimeError):
    """A backend the caller asked for by name cannot run here (the message says why)."""


class DistributedError(PrhFastError, RuntimeError):
    """A collective failed: a peer rank died, was killed, or did not answer in time."""


class DestinationLocked(PrhFastError, BlockingIOError):
    """Another writer holds the destination (the message names the destination and holder).

    A ``BlockingIOError`` (an ``OSError``): the destination is busy, not wrong; retry later."""

    def __init__(self, destination: str, holder: str):
        self.destination = destination
        self.holder = holder
        super().__init__(f"{destination}: another writer is using it ({holder}); wait for it to "
                         f"finish, or write somewhere else")
