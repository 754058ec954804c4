"""The ``prh_fast`` logger and its once-per-message warning, shared by the backend registry
(``prh_fast.knn._backends``) and the backends themselves (``prh_fast.knn``, ``prh_fast.store``)."""
from __future__ import annotations

import logging

logger = logging.getLogger("prh_fast")
_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        logger.warning(msg)
