"""Regenerate ``tests/golden/demo.json`` (run by hand after an intended change in loading or
preprocessing, and say why in the commit message):

    python tests/golden/make_demo_golden.py
"""
from __future__ import annotations

import json
import os
import platform
import sys
import tempfile

import torch

from prh_fast.demo import golden_numbers


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = golden_numbers(tmp, progress=True)
    out["made_with"] = {"torch": torch.__version__, "python": platform.python_version(),
                        "machine": platform.machine()}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.json")
    tmp_path = path + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.replace(tmp_path, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
