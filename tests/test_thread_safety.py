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
