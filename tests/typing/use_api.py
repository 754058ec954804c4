"""The public API used as a user would, for the typing check (tests/test_typing.py runs mypy on
this file with the [tool.mypy] section of pyproject.toml; it is never imported by pytest).

Every variable is annotated with the type the documentation promises, so a wrong hint in the
package (a return type, a parameter's type, a field) fails the check.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np
import torch

import prh_fast
from prh_fast import metrics
from prh_fast.errors import InputError, PrhFastError
from prh_fast.grid import Alignment, GridResult
from prh_fast.knn import DEFAULT_MEMORY_BUDGET, knn
from prh_fast.probe import Probe
from prh_fast.store import FeatureStore, StoreWriter, load_features, open_store, save_features
from prh_fast.torchmetrics import CKA, CKNNA, SVCCA, CycleKNN, MutualKNN, UnbiasedCKA


def features() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x: torch.Tensor = torch.randn(64, 3, 16, generator=g)
    y: torch.Tensor = torch.randn(64, 2, 12, generator=g)
    return x, y


def use_align() -> None:
    x, y = features()
    res: prh_fast.AlignmentResult = prh_fast.align(x, y, "mutual_knn", topk=5)
    scores: torch.Tensor = res.scores
    best: float = res.best_score
    pair: tuple[int, int | None] | None = res.best_pair
    metric: str = res.metric
    topk: int | None = res.topk
    timings: dict[str, float] = res.timings
    null: dict[str, Any] | None = res.null
    as_dict: dict[str, Any] = res.to_dict()
    again: prh_fast.AlignmentResult = prh_fast.AlignmentResult.from_dict(as_dict)
    np_res: prh_fast.AlignmentResult = prh_fast.align(x.numpy(), y.numpy(), "cka",
                                                      null_permutations=3, seed=1)
    one: tuple[float, tuple[int, int] | None] = prh_fast.compute_score(x, y, "cka")
    print(scores, best, pair, metric, topk, timings, null, again, np_res, one)


def use_align_models(folder: str) -> None:
    x, y = features()
    save_features(os.path.join(folder, "a.pt"), x)
    save_features(os.path.join(folder, "b.pt"), y)
    grid: GridResult = prh_fast.align_models({"a": x}, {"b": y}, "cka", progress=False)
    names: list[str] = grid.x_names
    table: np.ndarray = grid.scores
    as_dict: dict[str, Any] = grid.to_dict()
    back: GridResult = GridResult.from_dict(as_dict)
    paths: dict[str, str] = grid.save(folder)
    loaded: GridResult = GridResult.load(folder, "cka")
    runner = Alignment([os.path.join(folder, "a.pt")], metric="cka")
    scored: dict[str, tuple[float, tuple[int, int] | None]] = runner.score(x)
    models: list[str] = runner.models
    print(names, table, back, paths, loaded, scored, models)


def use_probe(folder: str) -> None:
    x, y = features()
    probe = Probe(x, metrics=("mutual_knn", "cka"), topk=5)
    out: dict[str, prh_fast.AlignmentResult] = probe.score(y)
    where: str = probe.save(folder)
    same: Probe = Probe.load(where, x)
    print(out["cka"].best_score, same)


def use_knn() -> None:
    x, _ = features()
    idx: torch.Tensor = knn(x[:, 0], 5)
    pair: tuple[torch.Tensor, torch.Tensor] = knn(x[:, 0], 5, return_scores=True)
    budget: int = DEFAULT_MEMORY_BUDGET
    also: torch.Tensor = prh_fast.knn.knn(x[:, 1], 3, backend="torch", memory_budget=budget)
    print(idx, pair, also)


def use_metrics() -> None:
    x, y = features()
    a, b = x[:, 0], y[:, 0]
    values: list[float] = [
        metrics.mutual_knn(a, b, topk=5),
        metrics.cycle_knn(a, b, topk=5),
        metrics.lcs_knn(a, b, topk=5),
        metrics.edit_distance_knn(a, b, topk=5),
        metrics.cka(a, b),
        metrics.unbiased_cka(a, b),
        metrics.cknna(a, b, topk=5),
        metrics.svcca(a, b, cca_dim=4),
        metrics.measure("cka", a, b),
        prh_fast.measure("mutual_knn", a, b, topk=5),
        prh_fast.AlignmentMetrics.cka(a, b),
    ]
    names: list[str] = metrics.SUPPORTED_METRICS
    print(values, names)


def use_store(folder: str) -> None:
    x, _ = features()
    path = os.path.join(folder, "feats.pt")
    save_features(path, x, note="typing check")
    loaded: dict[str, Any] = load_features(path)
    with StoreWriter(os.path.join(folder, "store")) as writer:
        writer.append(x)
        done: str = writer.finish()
    store: FeatureStore = open_store(os.path.join(folder, "store"))
    rows: int = store.n
    layer: torch.Tensor = store.layer(0, slice(0, 4))
    print(loaded, rows, done, layer)


def use_torchmetrics() -> None:
    x, y = features()
    kinds = [MutualKNN(topk=5), CycleKNN(topk=5), CKNNA(topk=5), CKA(), UnbiasedCKA(),
             SVCCA(cca_dim=4)]
    for m in kinds:
        m.update(x[:, 0], y[:, 0])
        value: torch.Tensor = m.compute()
        m.reset()
        print(value)


def use_config() -> None:
    with prh_fast.config_context(backend="torch", num_threads=1) as cfg:
        backend: object = cfg.backend
        print(backend)
    prh_fast.set_config(stream="off")
    now: prh_fast._config.Config = prh_fast.get_config()
    print(now)
    policy: tuple[str, str] = prh_fast.prefer_passive_wait()
    print(policy)


def use_errors() -> None:
    try:
        metrics.cka(torch.randn(3, 2), torch.randn(4, 2))
    except InputError as err:
        base: PrhFastError = err
        print(base)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        use_align()
        use_align_models(folder)
        use_probe(os.path.join(folder, "probe"))
        use_knn()
        use_metrics()
        use_store(folder)
        use_torchmetrics()
        use_config()
        use_errors()
    info: dict[str, Any] = prh_fast.info()
    version: str = prh_fast.__version__
    print(info, version)


if __name__ == "__main__":
    main()
