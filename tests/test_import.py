"""``import prh_fast`` has no side effects: no environment writes, no logging configuration, no
thread-pool changes, and it stays light (neither torch nor the native module is loaded).

Each check runs in a fresh interpreter, so what the test process already imported does not
hide a side effect."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SNAPSHOT = '''
import logging, os, sys
def loggers():
    # the root logger, and every logger whose configuration is not the default one (creating
    # a logger with getLogger configures nothing; a NullHandler is allowed)
    out = {}
    for n in ["", "prh_fast"] + sorted(logging.root.manager.loggerDict):
        lg = logging.getLogger(n)
        if not isinstance(lg, logging.Logger):
            continue
        handlers = [type(h).__name__ for h in lg.handlers
                    if not isinstance(h, logging.NullHandler)]
        conf = [lg.level, lg.propagate, lg.disabled, handlers]
        if n == "" or conf != [0, True, False, []]:
            out[n or "root"] = conf
    return out
'''


def _run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    res = subprocess.run([sys.executable, "-c", _SNAPSHOT + code], capture_output=True,
                         text=True, cwd=_ROOT, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_changes_nothing_and_loads_no_torch():
    out = _run('''
import json
env = dict(os.environ)
logs = loggers()
import prh_fast
print(json.dumps({"env": dict(os.environ) == env,
                  "added": sorted(set(os.environ) - set(env)),
                  "logging": loggers() == logs or [logs, loggers()],
                  "torch": "torch" in sys.modules,
                  "native": "prh_fast._C" in sys.modules}))
''')
    assert out == {"env": True, "added": [], "logging": True, "torch": False, "native": False}


def test_touching_the_lazy_names_changes_nothing():
    out = _run('''
import json
import torch
env = dict(os.environ)
threads = (torch.get_num_threads(), torch.get_num_interop_threads())
logs = loggers()
import prh_fast
for name in sorted(set(prh_fast.__all__) | set(prh_fast._LAZY)):
    getattr(prh_fast, name)
import prh_fast.probe, prh_fast.store, prh_fast.grid, prh_fast.distributed
after = loggers()
changed = {n: [logs.get(n), after.get(n)] for n in set(logs) | set(after)
           if logs.get(n) != after.get(n)}
print(json.dumps({"env": sorted(k for k in set(os.environ) | set(env)
                                if os.environ.get(k) != env.get(k)),
                  "threads": [torch.get_num_threads(), torch.get_num_interop_threads()]
                             == list(threads),
                  "changed": changed}))
''')
    assert out == {"env": [], "threads": True, "changed": {}}


def test_package_logger_has_at_most_a_null_handler():
    out = _run('''
import json
import prh_fast, prh_fast.knn, prh_fast.metrics
lg = logging.getLogger("prh_fast")
print(json.dumps({"handlers": [type(h).__name__ for h in lg.handlers],
                  "level": lg.level, "root": [type(h).__name__ for h in logging.root.handlers],
                  "root_level": logging.root.level}))
''')
    assert set(out["handlers"]) <= {"NullHandler"}
    assert out["level"] == 0
    assert out["root"] == [] and out["root_level"] == 30  # the interpreter's own defaults


def test_first_computation_loads_the_native_module_and_warns_nothing_when_built():
    out = _run('''
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import prh_fast
    before = "prh_fast._C" in sys.modules
    import torch
    prh_fast.knn.knn(torch.randn(20, 4), 3)
print(json.dumps({"before": before, "native": prh_fast._native.HAS_NATIVE,
                  "loaded": "prh_fast._C" in sys.modules,
                  "warnings": [str(w.message) for w in caught
                               if "prh_fast" in str(w.message)]}))
''')
    assert out["before"] is False
    assert out["loaded"] == out["native"]
    if out["native"]:
        assert out["warnings"] == []
