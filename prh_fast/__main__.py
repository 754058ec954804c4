"""``python -m prh_fast``: the ``prh-fast`` command (:func:`prh_fast.cli.main`)."""
from __future__ import annotations

if __name__ == "__main__":
    import sys

    from prh_fast.cli import main

    sys.exit(main())
