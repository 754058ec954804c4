"""Several Python threads calling the public entry points at once get the same results as
sequential calls (the engine's shared state -- thread settings, caches, logging -- is guarded)."""
import concurrent.futures as cf

import torch

import prh_fast
from prh_fast.knn import knn
from prh_fast.metrics import cka, cknna, mutual_knn, svcca


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(300, 12, generator=g)
    X = torch.stack([base @ torch.randn(12, 24, generator=g) for _ in range(3)], 1)
    Y = torch.stack([base[:, :8] + 0.2 * torch.randn(300, 8, generator=g) for _ in range(2)], 1)
    return X, Y


def _jobs():
    out = []
    for seed in range(3):
        X, Y = _data(seed)
        out += [
            (f"knn{seed}", lambda X=X: knn(X[:, 0], 7)),
            (f"mutual{seed}", lambda X=X, Y=Y: mutual_knn(X[:, 0], Y[:, 0], 7)),
            (f"cka{seed}", lambda X=X, Y=Y: cka(X[:, 1], Y[:, 1])),
            (f"cknna{seed}", lambda X=X, Y=Y: cknna(X[:, 2], Y[:, 0], topk=9)),
            (f"svcca{seed}", lambda X=X, Y=Y: svcca(X[:, 0], Y[:, 1], cca_dim=4)),
            (f"align_m{seed}", lambda X=X, Y=Y: prh_fast.align(X, Y, "mutual_knn", topk=5,
                                                               null_permutations=3).scores),
            (f"align_c{seed}", lambda X=X, Y=Y: prh_fast.align(X, Y, "unbiased_cka").scores),
        ]
    return out


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_concurrent_calls_equal_sequential():
    jobs = _jobs()
    threads_before = torch.get_num_threads()
    want = {name: fn() for name, fn in jobs}
    with cf.ThreadPoolExecutor(max_workers=6) as pool:
        for _ in range(2):
            futures = {pool.submit(fn): name for name, fn in jobs * 2}
            for fut in cf.as_completed(futures):
                name = futures[fut]
                assert _same(fut.result(), want[name]), name
    # the process-wide thread setting is restored after the concurrent calls
    assert torch.get_num_threads() == threads_before


def test_thread_count_restored_when_blocks_of_two_threads_interleave():
    # A enters with 1 thread, C with 3, A leaves first, then C: each block runs with its own
    # count, and the calling thread's count is where it started once both are done.
    import threading

    from prh_fast import config_context
    from prh_fast._threads import limit_threads

    start = torch.get_num_threads()
    a_in, c_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def a():
        with config_context(num_threads=1), limit_threads() as n:
            seen["a"] = n
            a_in.set()
            c_in.wait(30)
        a_out.set()

    def c():
        a_in.wait(30)
        with config_context(num_threads=3), limit_threads() as n:
            seen["c"] = n
            c_in.set()
            a_out.wait(30)

    ts = [threading.Thread(target=a), threading.Thread(target=c)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert seen == {"a": 1, "c": 3}
    assert torch.get_num_threads() == start


def test_log_once_from_many_threads_warns_once(monkeypatch, caplog):
    import threading

    from prh_fast import _log

    monkeypatch.setattr(_log, "_logged", set())
    barrier = threading.Barrier(8)

    def warn():
        barrier.wait(30)
        for i in range(200):
            _log._log_once(f"prh_fast: thread-safety notice {i % 5}")

    with caplog.at_level("WARNING", logger="prh_fast"):
        ts = [threading.Thread(target=warn) for _ in range(8)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    said = sorted(m for m in (r.getMessage() for r in caplog.records) if "safety notice" in m)
    assert said == [f"prh_fast: thread-safety notice {i}" for i in range(5)]


def test_set_config_while_other_threads_read_it():
    import threading

    from prh_fast._config import get_config, reset_config, set_config

    stop = threading.Event()
    errors = []

    def read():
        while not stop.is_set():
            try:
                cfg = get_config()
                if cfg.stream not in ("auto", "on", "off"):
                    errors.append(cfg.stream)
            except Exception as err:  # noqa: BLE001 - any error here is the failure
                errors.append(repr(err))

    readers = [threading.Thread(target=read) for _ in range(4)]
    for t in readers:
        t.start()
    try:
        for i in range(2000):
            set_config(stream=("on", "off")[i % 2], num_threads=1 + i % 3)
            reset_config()
    finally:
        stop.set()
        for t in readers:
            t.join(60)
        reset_config()
    assert errors == []
    assert get_config().origin("stream") != "set_config"


def test_prefer_passive_wait_from_many_threads_decides_once():
    from prh_fast._threads import prefer_passive_wait, wait_policy

    with cf.ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda _: prefer_passive_wait(), range(32)))
    assert len(set(answers)) == 1 and answers[0] == wait_policy()
