"""CPU threads (``prh_fast._threads``): the wait policy the CLI asks for, one thread count for torch
and the native kernels, and results that do not depend on either."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import prh_fast
from prh_fast import _native, config_context
from prh_fast._threads import effective_threads, limit_threads, wait_policy
from prh_fast.errors import InputError
from prh_fast.testing import drifting_layers

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    base.update(env)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=_ROOT, env=base, check=True)
    return out.stdout.strip()


def test_import_alone_leaves_the_policy_to_the_runtime():
    out = _run("import os, prh_fast\n"
               "from prh_fast._threads import wait_policy\n"
               "p, why = wait_policy()\n"
               "print('OMP_WAIT_POLICY' in os.environ, p, '|', why)")
    unset, rest = out.split(" ", 1)
    assert unset == "False"
    assert rest.startswith("default (spin, then sleep) |")
    assert "prefer_passive_wait()" in rest


def test_prefer_passive_wait_before_torch_makes_idle_threads_sleep():
    out = _run("import os, prh_fast\n"
               "first = prh_fast.prefer_passive_wait()\n"
               "import torch\n"
               "from prh_fast._threads import wait_policy\n"
               "assert prh_fast.prefer_passive_wait() == first == wait_policy()\n"
               "print(os.environ['OMP_WAIT_POLICY'], wait_policy()[0])")
    assert out == "PASSIVE passive"


def test_the_command_asks_for_sleeping_threads():
    for cmd in (["-m", "prh_fast", "info", "--json"], ["-m", "prh_fast.cli", "info", "--json"]):
        res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=_ROOT,
                             env={k: v for k, v in os.environ.items()
                                  if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
                             check=True)
        policy = json.loads(res.stdout)["omp_wait_policy"]
        assert policy["policy"] == "passive", cmd
        assert policy["why"] == "set by prh_fast before the OpenMP runtime loaded"


def test_users_policy_stands():
    out = _run("import os, prh_fast\n"
               "from prh_fast._threads import wait_policy\n"
               "print(wait_policy()[1], '|', prh_fast.prefer_passive_wait()[1])\n"
               "print(os.environ['OMP_WAIT_POLICY'], '|', wait_policy()[1])",
               OMP_WAIT_POLICY="active")
    assert out.splitlines() == ["OMP_WAIT_POLICY set by the user | OMP_WAIT_POLICY set by the "
                                "user", "active | OMP_WAIT_POLICY set by the user"]
    out = _run("import os, prh_fast\n"
               "prh_fast.prefer_passive_wait()\n"
               "print('OMP_WAIT_POLICY' in os.environ)", GOMP_SPINCOUNT="1000")
    assert out == "False"


def test_too_late_after_torch_is_said():
    out = _run("import os, torch, prh_fast\n"
               "from prh_fast._threads import wait_policy\n"
               "prh_fast.prefer_passive_wait()\n"
               "p, why = wait_policy()\n"
               "print('OMP_WAIT_POLICY' in os.environ, p, '|', why)")
    unset, rest = out.split(" ", 1)
    assert unset == "False"
    assert rest.startswith("default (spin, then sleep) |")
    assert "call prh_fast.prefer_passive_wait() before importing torch" in rest


def test_wait_policy_in_this_process_is_known():
    policy, why = wait_policy()
    # conftest calls prefer_passive_wait() before torch: passive, unless the caller set one
    assert policy == "passive" or why.endswith("set by the user")


def test_num_threads_applies_to_torch_and_native_then_restores():
    before = torch.get_num_threads()
    with config_context(num_threads=1):
        assert effective_threads() == 1
        with limit_threads() as n:
            assert n == 1 and torch.get_num_threads() == 1
            if _native.HAS_NATIVE:
                assert _native.native().build_info()["omp_max_threads"] == 1
    assert torch.get_num_threads() == before
    if _native.HAS_NATIVE:
        assert _native.native().build_info()["omp_max_threads"] == before


def test_public_entry_points_run_with_the_setting(monkeypatch):
    seen = []
    real = torch.mm

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    X = torch.nn.functional.normalize(drifting_layers(300, 1, 48, seed=3)[:, 0], dim=1)
    want = prh_fast.knn.knn(X, 5)
    monkeypatch.setattr(torch, "mm", spy)
    with config_context(num_threads=1):
        got = prh_fast.knn.knn(X, 5)
    assert seen and set(seen) == {1}
    assert torch.equal(got, want)


def test_scores_do_not_depend_on_the_thread_count():
    A, B = drifting_layers(257, 3, 40, seed=1), drifting_layers(257, 3, 40, seed=2)
    for metric in ("mutual_knn", "cka", "cknna"):
        ref = prh_fast.align(A, B, metric, topk=7).scores
        with config_context(num_threads=1):
            one = prh_fast.align(A, B, metric, topk=7).scores
        torch.testing.assert_close(one, ref, rtol=1e-5, atol=1e-6)


def test_bad_thread_count_is_named(monkeypatch):
    with pytest.raises(InputError, match="num_threads"):
        with config_context(num_threads=0):
            pass
    monkeypatch.setenv("PRH_FAST_NUM_THREADS", "many")
    X = torch.randn(20, 4)
    with pytest.raises(InputError, match="PRH_FAST_NUM_THREADS"):
        prh_fast.knn.knn(X, 3)


def test_spinning_on_a_busy_machine_is_said_once(monkeypatch, caplog):
    from prh_fast import _log, _threads

    monkeypatch.setattr(_threads, "_STATE", ("default (spin, then sleep)", "loaded before"))
    monkeypatch.setattr(_threads, "_spin_checked", False)
    monkeypatch.setattr(_log, "_logged", set())
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    X = torch.randn(30, 4)
    with caplog.at_level("WARNING", logger="prh_fast"):
        prh_fast.knn.knn(X, 3)
        prh_fast.knn.knn(X, 3)
    said = [r.getMessage() for r in caplog.records if "spin" in r.getMessage()]
    assert len(said) == 1 and "busy (load 64.0" in said[0] and "loaded before" in said[0]


def test_nothing_said_when_threads_sleep_or_the_machine_is_idle(monkeypatch, caplog):
    from prh_fast import _log, _threads

    monkeypatch.setattr(_log, "_logged", set())
    X = torch.randn(30, 4)
    for state, load in ((("passive", "set by prh_fast"), 64.0),
                        (("default (spin, then sleep)", "loaded before"), 0.0)):
        monkeypatch.setattr(_threads, "_STATE", state)
        monkeypatch.setattr(_threads, "_spin_checked", False)
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
        with caplog.at_level("WARNING", logger="prh_fast"):
            prh_fast.knn.knn(X, 3)
    assert not [r for r in caplog.records if "spin" in r.getMessage()]


def test_map_layers_keeps_order_settings_and_thread_count(monkeypatch):
    import threading

    from prh_fast import _threads
    from prh_fast._config import get_config
    from prh_fast._threads import map_layers

    monkeypatch.setattr(_threads, "effective_threads", lambda: 2)
    before = torch.get_num_threads()
    seen = []

    def fn(x):
        seen.append((threading.get_ident(), torch.get_num_threads(), get_config().stream))
        return x * 10

    with config_context(stream="off"):
        out = map_layers(fn, [3, 1, 2, 5], n=100)
    assert out == [30, 10, 20, 50]
    assert {s[1:] for s in seen} == {(1, "off")}  # one thread each, the caller's settings
    assert torch.get_num_threads() == before
    # large items, one item, or parallel=False: the plain loop in this thread
    seen.clear()
    assert map_layers(fn, [1, 2], n=10**6) == [10, 20]
    assert map_layers(fn, [4], n=10) == [40]
    assert map_layers(fn, [1, 2], n=10, parallel=False) == [10, 20]
    assert {s[0] for s in seen} == {threading.get_ident()}


def test_map_layers_reraises_a_workers_error(monkeypatch):
    from prh_fast import _threads
    from prh_fast._threads import map_layers

    monkeypatch.setattr(_threads, "effective_threads", lambda: 2)

    def fn(x):
        if x == 2:
            raise InputError("x: bad layer")
        return x

    before = torch.get_num_threads()
    with pytest.raises(InputError, match="bad layer"):
        map_layers(fn, [1, 2, 3], n=10)
    assert torch.get_num_threads() == before


def test_layer_grids_side_by_side_equal_the_plain_loop(monkeypatch):
    from prh_fast import _threads

    A, B = drifting_layers(300, 4, 48, seed=5), drifting_layers(300, 3, 48, seed=6)
    monkeypatch.setattr(_threads, "effective_threads", lambda: 2)
    got = {m: prh_fast.align(A, B, m, topk=6) for m in ("mutual_knn", "cknna", "lcs_knn")}
    monkeypatch.setattr(_threads, "LAYER_PARALLEL_MAX_N", 0)
    for m, res in got.items():
        want = prh_fast.align(A, B, m, topk=6)
        assert torch.equal(res.scores, want.scores), m


def test_concurrent_grids_restore_torchs_thread_count(monkeypatch):
    # a user's own threads running grids at the same time: one shared switch to one thread,
    # restored by the last one out (torch's count is process-wide)
    import threading

    from prh_fast import _threads

    monkeypatch.setattr(_threads, "effective_threads", lambda: 2)
    A, B = drifting_layers(200, 3, 32, seed=7), drifting_layers(200, 3, 32, seed=8)
    want = prh_fast.align(A, B, "mutual_knn", topk=5).scores
    before = torch.get_num_threads()
    results, errors = [], []

    def run():
        try:
            for _ in range(3):
                results.append(prh_fast.align(A, B, "mutual_knn", topk=5).scores)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 9 and all(torch.equal(r, want) for r in results)
    assert torch.get_num_threads() == before
