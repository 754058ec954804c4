"""One error hierarchy: every deliberate error is a PrhFastError and keeps the built-in type
callers already catch."""
from __future__ import annotations

import pytest

import prh_fast
from prh_fast import errors


def test_hierarchy_keeps_builtin_types():
    e = errors
    assert issubclass(e.InputError, ValueError) and issubclass(e.InputError, e.PrhFastError)
    assert issubclass(e.StoreError, e.InputError)
    for cls in (e.DataNotFoundError, e.ModelNotAvailableError):
        assert issubclass(cls, FileNotFoundError) and issubclass(cls, e.InputError)
    assert issubclass(e.DistributedError, RuntimeError)
    assert issubclass(e.BackendUnavailableError, RuntimeError)
    assert issubclass(e.DestinationLocked, BlockingIOError)
    for cls in (e.StoreError, e.DataNotFoundError, e.ModelNotAvailableError, e.DistributedError,
                e.BackendUnavailableError, e.DestinationLocked):
        assert issubclass(cls, e.PrhFastError), cls


def test_one_class_per_concept_everywhere():
    from prh_fast import store
    from prh_fast._lock import DestinationLocked
    from prh_fast.distributed import DistributedError
    from prh_fast.extract import DataNotFoundError, ModelNotAvailableError

    assert store.StoreError is errors.StoreError is prh_fast.StoreError
    assert DistributedError is errors.DistributedError
    assert DestinationLocked is errors.DestinationLocked is prh_fast.DestinationLocked
    assert DataNotFoundError is errors.DataNotFoundError
    assert ModelNotAvailableError is errors.ModelNotAvailableError


def test_raised_errors_are_caught_by_the_root(tmp_path):
    with pytest.raises(errors.PrhFastError):
        prh_fast.store.open_store(tmp_path)          # a folder with no index: StoreError
    (tmp_path / "x").mkdir()
    with pytest.raises(errors.PrhFastError):
        with prh_fast._lock.exclusive_lock(tmp_path / "d", folder=False):
            prh_fast._lock.acquire(tmp_path / "d", folder=False)
    with pytest.raises(ValueError):                  # still a ValueError for old callers
        prh_fast.store.open_store(tmp_path)
