"""prh_fast's configuration (``prh_fast._config``): environment read once into one object,
``set_config`` over it, ``config_context`` over that, explicit arguments over everything."""
import threading
import warnings

import pytest
import torch

import prh_fast
from prh_fast import _config
from prh_fast.errors import InputError


def test_defaults_without_environment(monkeypatch):
    for var in list(_config.ENV_VARS.values()) + list(_config.DEPRECATED_ENV):
        monkeypatch.delenv(var, raising=False)
    cfg = prh_fast.get_config()
    assert cfg.as_dict() == _config.DEFAULTS
    assert cfg.origin("backend") == "default"


def test_environment_is_read_into_the_config(monkeypatch):
    monkeypatch.setenv("PRH_FAST_BACKEND", "torch")
    monkeypatch.setenv("PRH_FAST_STREAM", "Yes")
    monkeypatch.setenv("PRH_FAST_MEMORY_BUDGET", "1048576")
    monkeypatch.setenv("PRH_FAST_DIST_TIMEOUT", "12.5")
    monkeypatch.setenv("PRH_FAST_DIST_BACKEND", "GLOO")
    monkeypatch.setenv("PRH_FAST_CACHE", "/tmp/somewhere")
    monkeypatch.setenv("PRH_FAST_TRACEBACK", "1")
    cfg = prh_fast.get_config()
    assert (cfg.backend, cfg.stream, cfg.memory_budget, cfg.dist_timeout, cfg.dist_backend,
            cfg.cache_dir, cfg.traceback) == ("torch", "on", 1 << 20, 12.5, "gloo",
                                               "/tmp/somewhere", True)
    assert cfg.origin("stream") == "PRH_FAST_STREAM"
    monkeypatch.setenv("PRH_FAST_TRACEBACK", "0")
    assert prh_fast.get_config().traceback is False


def test_environment_is_parsed_once(monkeypatch):
    monkeypatch.setenv("PRH_FAST_STREAM", "off")
    calls = []
    real = _config._parse_environment
    monkeypatch.setattr(_config, "_parse_environment", lambda raw: calls.append(1) or real(raw))
    _config.reload_environment()
    for _ in range(5):
        assert prh_fast.get_config().stream == "off"
    assert len(calls) == 1
    monkeypatch.setenv("PRH_FAST_STREAM", "on")  # a changed variable is read again
    assert prh_fast.get_config().stream == "on" and len(calls) == 2
    _config.reload_environment()
    prh_fast.get_config()
    assert len(calls) == 3


@pytest.mark.parametrize("var, value, match", [
    ("PRH_FAST_STREAM", "sometimes", "PRH_FAST_STREAM"),
    ("PRH_FAST_MEMORY_BUDGET", "lots", "PRH_FAST_MEMORY_BUDGET"),
    ("PRH_FAST_MEMORY_BUDGET", "-5", "PRH_FAST_MEMORY_BUDGET"),
    ("PRH_FAST_DIST_TIMEOUT", "soon", "PRH_FAST_DIST_TIMEOUT"),
    ("PRH_FAST_DIST_TIMEOUT", "-1", "PRH_FAST_DIST_TIMEOUT"),
    ("PRH_FAST_DIST_BACKEND", "mpi", "PRH_FAST_DIST_BACKEND"),
])
def test_invalid_environment_names_the_variable_when_used(monkeypatch, var, value, match):
    monkeypatch.setenv(var, value)
    cfg = prh_fast.get_config()  # other settings stay readable
    assert cfg.backend is not None
    field = next(f for f, v in _config.ENV_VARS.items() if v == var)
    with pytest.raises(InputError, match=match):
        getattr(cfg, field)


def test_invalid_backend_variable_fails_at_the_dispatch(monkeypatch):
    monkeypatch.setenv("PRH_FAST_BACKEND", "bogus")
    with pytest.raises(InputError, match="PRH_FAST_BACKEND"):
        prh_fast.knn.knn(torch.randn(10, 3), 2)


def test_deprecated_stream_budget_alias(monkeypatch):
    monkeypatch.delenv("PRH_FAST_MEMORY_BUDGET", raising=False)
    monkeypatch.setenv("PRH_FAST_STREAM_BUDGET", "4096")
    monkeypatch.setattr(_config, "_warned_deprecated", set())
    with pytest.warns(DeprecationWarning, match="PRH_FAST_MEMORY_BUDGET"):
        cfg = prh_fast.get_config()
    assert cfg.memory_budget == 4096 and cfg.origin("memory_budget") == "PRH_FAST_STREAM_BUDGET"
    monkeypatch.setenv("PRH_FAST_MEMORY_BUDGET", "8192")  # the new name wins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prh_fast.get_config().memory_budget == 8192


def test_precedence_argument_context_set_config_environment(monkeypatch):
    from prh_fast._stream_align import StreamPolicy, stream_mode

    monkeypatch.setenv("PRH_FAST_STREAM", "on")
    assert stream_mode() == "on"
    prh_fast.set_config(stream="off")
    assert stream_mode() == "off" and prh_fast.get_config().origin("stream") == "set_config"
    with prh_fast.config_context(stream="auto") as cfg:
        assert cfg.stream == "auto" and stream_mode() == "auto"
        with prh_fast.config_context(memory_budget=1 << 20):
            assert stream_mode() == "auto"  # inner blocks keep outer overrides
            assert StreamPolicy().budget == 1 << 20
            assert StreamPolicy(budget=1 << 21).budget == 1 << 21  # the argument wins
        assert stream_mode(True) == "on"
    assert stream_mode() == "off"
    _config.reset_config()
    assert stream_mode() == "on"


def test_memory_budget_reaches_the_stream_policy(monkeypatch):
    from prh_fast._stream_align import StreamPolicy
    from prh_fast.store._stream import DEFAULT_STREAM_BUDGET

    monkeypatch.delenv("PRH_FAST_MEMORY_BUDGET", raising=False)
    monkeypatch.delenv("PRH_FAST_STREAM_BUDGET", raising=False)
    assert StreamPolicy().budget == DEFAULT_STREAM_BUDGET
    monkeypatch.setenv("PRH_FAST_MEMORY_BUDGET", str(3 << 20))
    assert StreamPolicy().budget == 3 << 20
    with pytest.raises(ValueError, match="memory_budget"):
        StreamPolicy(budget=-1)


def test_bad_overrides_name_the_setting():
    with pytest.raises(InputError, match="stream"):
        prh_fast.set_config(stream="maybe")
    with pytest.raises(InputError, match="memory_budget"):
        with prh_fast.config_context(memory_budget=0):
            pass
    with pytest.raises(InputError, match="dist_backend"):
        prh_fast.set_config(dist_backend="mpi")
    with pytest.raises(TypeError):
        prh_fast.set_config(colour="blue")
    assert prh_fast.get_config().origin("stream") != "set_config"


def test_config_is_read_only():
    cfg = prh_fast.get_config()
    with pytest.raises(AttributeError):
        cfg.stream = "on"
    with pytest.raises(AttributeError):
        _ = cfg.no_such_setting


def test_context_is_per_thread():
    seen = {}
    with prh_fast.config_context(backend="torch"):
        t = threading.Thread(target=lambda: seen.setdefault("b", prh_fast.get_config().backend))
        t.start()
        t.join()
        assert prh_fast.get_config().backend == "torch"
    assert seen["b"] == _config._environment()[0]["backend"]


def test_config_feeds_every_former_reader(monkeypatch, tmp_path):
    from prh_fast import _cli_common
    from prh_fast.distributed import default_timeout
    from prh_fast.distributed._env import _pick_backend
    from prh_fast.extract._text import cache_root

    with prh_fast.config_context(dist_timeout=7, dist_backend="gloo", cache_dir=str(tmp_path),
                                 traceback=True):
        assert default_timeout().total_seconds() == 7
        assert _pick_backend(None) == "gloo"
        assert cache_root() == str(tmp_path)
        assert _cli_common._show_traceback()
    monkeypatch.setenv("PRH_FAST_DIST_BACKEND", "nccl")
    assert _pick_backend(None) == "nccl"
    assert _pick_backend("gloo") == "gloo"  # the argument wins


def test_public_exports():
    for name in ("get_config", "set_config", "config_context"):
        assert name in prh_fast.__all__ and callable(getattr(prh_fast, name))
