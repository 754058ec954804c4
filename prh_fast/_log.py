"""Logging helpers: the package's root logger and a once-per-message warning.

Every module logs on its own logger, ``logging.getLogger(__name__)`` (``prh_fast.knn._backends``,
``prh_fast.store._stream``, ...), so a user can tune one part with the standard ``logging``
configuration; all of them propagate to ``prh_fast``. The package configures no logging:
no handler, no level; what is shown and where is the application's choice.

The set of messages already warned is shared by every thread; a lock makes "warn once" hold
when several threads reach the same warning at once.
"""
from __future__ import annotations

import logging
import threading

#: The package's root logger; modules log on their own children of it.
logger = logging.getLogger("prh_fast")
_logged: set[str] = set()
_logged_lock = threading.Lock()


def _log_once(msg: str, log: logging.Logger | None = None) -> None:
    """Warn ``msg`` once per process, on ``log`` (default: the package's root logger).

    Args:
        msg: the message; a message already warned is skipped.
        log: the calling module's logger.

    Example:
        >>> import logging
        >>> from prh_fast._log import _log_once
        >>> _log_once("prh_fast: an example notice", logging.getLogger("prh_fast.example"))
    """
    with _logged_lock:
        if msg in _logged:
            return
        _logged.add(msg)
    (log or logger).warning(msg)
