"""The estimate of a long exact CPU search and its one warning (prh_fast.knn._estimate)."""
from __future__ import annotations

import logging
import math
import threading
import time

import pytest
import torch

from prh_fast.knn import _estimate as est
from prh_fast.knn import knn
from prh_fast.knn._backends import resolve
from prh_fast.testing import paired_features

LOGGER = "prh_fast.knn._estimate"


@pytest.fixture
def probe(monkeypatch):
    """A fresh process state with a probe that returns a fixed rate and counts its calls."""
    calls = []

    def fake(rate=1e9):
        calls.append(rate)
        return rate

    state = {"rate": 1e9}
    monkeypatch.setattr(est, "_rates", {})
    monkeypatch.setattr(est, "_warned", set())
    monkeypatch.setattr(est, "_probe_gemm", lambda: fake(state["rate"]))
    return calls, state


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno == logging.WARNING]


def test_flops_and_seconds_formula(probe):
    calls, state = probe
    state["rate"] = 2.5e9
    n, d = 12_345, 77
    assert est.search_flops(n, d) == 2.0 * n * n * d
    assert est.search_flops(n, d, search="faiss") == 2.0 * n * n * d
    # the cpu backend's symmetric tiles score each pair once: half the products
    assert est.search_flops(n, d, search="cpu") == 1.0 * n * n * d
    # a cross search: every query against every key, also for cpu (no symmetry)
    assert est.search_flops(n, d, search="cpu", n_keys=999) == 2.0 * n * 999 * d
    assert math.isclose(est.estimate_seconds(n, d), 2.0 * n * n * d / 2.5e9, rel_tol=1e-12)
    assert math.isclose(est.estimate_seconds(n, d, search="cpu"), n * n * d / 2.5e9,
                        rel_tol=1e-12)
    assert math.isclose(est.estimate_seconds(n, d, rate=1e6), 2.0 * n * n * d / 1e6,
                        rel_tol=1e-12)
    assert len(calls) == 1  # measured once, cached for later calls
    est.gemm_rate()
    assert len(calls) == 1


def test_warning_names_backend_and_target(probe, caplog):
    calls, state = probe
    state["rate"] = 1e11
    n, d = 1_000_000, 128
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        choice = resolve("cpu", torch.device("cpu"), k=10, n=n, dim=d)
    assert choice.name == "cpu" and choice.search == "cpu"  # never switched
    (msg,) = _warnings(caplog)
    assert "'cpu'" in msg
    assert 'backend="faiss-ivf:target_recall=0.95"' in msg
    assert "--backend faiss-ivf --knn-option target_recall=0.95" in msg
    expected = n * n * d / 1e11  # cpu: half of 2·N²·D, at the patched rate
    assert f"at least {expected / 60:.0f} min" in msg
    assert "100 GFLOP/s" in msg


def test_auto_and_torch_warn_once_per_size_and_backend(probe, caplog):
    calls, state = probe
    state["rate"] = 1e10
    dev = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        a = resolve("auto", dev, k=10, n=400_000, dim=256)
        resolve("auto", dev, k=10, n=400_000, dim=256)  # same search: no second line
        t = resolve("torch", dev, k=10, n=400_000, dim=256)
        resolve("torch", dev, k=10, n=400_000, dim=512)
    assert a.requested == "auto" and a.search in ("cpu", "torch")
    assert t.search == "torch"
    msgs = _warnings(caplog)
    assert len(msgs) == 3 - (a.search == "torch")
    assert any("'torch'" in m and "D = 512" in m for m in msgs)
    assert len(calls) == 1


def test_no_warning_below_threshold(probe, caplog):
    calls, state = probe
    state["rate"] = 1e15  # fast enough that the search is short
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        seconds = est.warn_if_slow("torch", "cpu", 1_000_000, 128)
        resolve("torch", torch.device("cpu"), k=10, n=1_000_000, dim=128)
    assert seconds == pytest.approx(2.0 * 1e12 * 128 / 1e15)
    assert seconds < est.SLOW_SEARCH_SECONDS
    assert _warnings(caplog) == []
    assert len(calls) == 1  # the estimate needed the rate: measured once


def test_small_search_does_not_measure(probe, caplog):
    calls, state = probe
    X, _ = paired_features(300, 16, 12, seed=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert est.warn_if_slow("cpu", "cpu", 20_000, 64) is None
        resolve("auto", torch.device("cpu"), k=5, n=20_000, dim=64)
        knn(X, 5)
        knn(X, 5, backend="torch")
    assert calls == []  # the upper bound already says "short": nothing timed
    assert _warnings(caplog) == []


def test_knn_logs_and_returns_the_exact_lists(probe, caplog, monkeypatch):
    calls, state = probe
    state["rate"] = 1e6  # a slow machine: 2·300²·16 flops take ~3 s at this rate
    X, _ = paired_features(300, 16, 12, seed=5)
    plain = knn(X, 5, backend="torch")  # the default threshold: no warning
    plain_keys = knn(X[:200], 5, backend="torch", keys=X)
    assert calls == []
    monkeypatch.setattr(est, "SLOW_SEARCH_SECONDS", 1.0)
    monkeypatch.setattr(est, "FLOOR_FLOPS_PER_THREAD", 1e3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        idx = knn(X, 5, backend="torch")
        keys = knn(X[:200], 5, backend="torch", keys=X)
    assert torch.equal(idx, plain)  # the warning changes nothing in the search
    assert torch.equal(keys, plain_keys)
    msgs = _warnings(caplog)
    assert len(msgs) == 2
    assert "'torch' search of N = 300 rows at D = 16" in msgs[0]
    assert "200 query rows x 300 keys" in msgs[1]


def test_not_for_approximate_cuda_or_distributed(probe, caplog):
    calls, state = probe
    state["rate"] = 1e9
    big = dict(n=10**7, dim=1024)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for name in ("faiss-ivf", "faiss-hnsw", "faiss-ivfpq"):
            try:
                resolve(name, torch.device("cpu"), k=10, **big)
            except Exception:  # FAISS missing: unavailable, not what is tested here
                pass
        assert est.warn_if_slow("torch", "cuda", **big) is None
        assert est.warn_if_slow("triton", "cpu", **big) is None
        resolve("torch", torch.device("cpu"), k=10, distributed=True, **big)
        resolve("torch", torch.device("cpu"), k=10)  # size unknown
    assert _warnings(caplog) == []
    assert calls == []


def test_message_says_when_faiss_is_missing(probe, caplog, monkeypatch):
    monkeypatch.setattr(est, "_faiss_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        est.warn_if_slow("torch", "cpu", 2_000_000, 768)
    (msg,) = _warnings(caplog)
    assert "not installed" in msg and "pip install faiss-cpu" in msg
    text = est.slow_search_message("torch", 10, 4, 1.0, 1e9, faiss_installed=True)
    assert "not installed" not in text


def test_concurrent_first_calls_measure_once(monkeypatch):
    monkeypatch.setattr(est, "_rates", {})
    calls = []

    def slow_probe():
        calls.append(1)
        time.sleep(0.05)
        return 3e9

    monkeypatch.setattr(est, "_probe_gemm", slow_probe)
    out = []
    threads = [threading.Thread(target=lambda: out.append(est.gemm_rate())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [3e9] * 6
    assert len(calls) == 1


def test_real_probe_is_a_positive_rate():
    rate = est._probe_gemm()
    assert math.isfinite(rate) and rate > 1e8


def test_grid_warns_once_per_shape(probe, caplog, monkeypatch):
    import prh_fast

    calls, state = probe
    state["rate"] = 1e6
    monkeypatch.setattr(est, "SLOW_SEARCH_SECONDS", 1.0)
    monkeypatch.setattr(est, "FLOOR_FLOPS_PER_THREAD", 1e3)
    a1, b1 = paired_features(240, 16, 12, seed=7)
    a2, b2 = paired_features(240, 16, 12, seed=8)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = prh_fast.align([a1, a2], [b1, b2], "mutual_knn", topk=5, backend="torch")
    assert res.scores.shape == (2, 2)
    msgs = _warnings(caplog)
    # two layer shapes (D = 16 and D = 12), each warned about once, whatever the layer count
    assert len(msgs) == 2
    assert any("D = 16" in m for m in msgs) and any("D = 12" in m for m in msgs)
    assert all("'torch'" in m for m in msgs)
    assert len(calls) == 1


def test_streamed_store_search_warns(probe, caplog, monkeypatch, tmp_path):
    from prh_fast.store import StoreWriter, stream_knn

    calls, state = probe
    state["rate"] = 1e6
    X, _ = paired_features(300, 16, 12, seed=7)
    w = StoreWriter(tmp_path / "s", dtype="float32", shard_rows=97)
    w.append([X])
    w.finish()
    plain = stream_knn(tmp_path / "s", 0, 5, backend="cpu", cache=False)[0]
    assert calls == []
    monkeypatch.setattr(est, "SLOW_SEARCH_SECONDS", 1.0)
    monkeypatch.setattr(est, "FLOOR_FLOPS_PER_THREAD", 1e3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        again = stream_knn(tmp_path / "s", 0, 5, backend="cpu", cache=False)[0]
    assert torch.equal(again, plain)  # the warning changes nothing in the search
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "N = 300 rows at D = 16" in msgs[0], msgs
