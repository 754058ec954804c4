"""prh_fast.torchmetrics: batch-wise metrics equal prh_fast.metrics on the concatenated rows, on
one process and on 2 gloo ranks (launched as test_distributed.py does: this file is also the
worker script, ``python test_torchmetrics.py <folder>``); moment states do not grow with the
number of batches; the classes work in a Lightning-style loop (forward / compute / reset).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchmetrics")

import prh_fast.metrics as M  # noqa: E402
from prh_fast.errors import InputError  # noqa: E402
from prh_fast.testing import paired_features  # noqa: E402
from prh_fast.torchmetrics import (  # noqa: E402
    CKA,
    CKNNA,
    SVCCA,
    CycleKNN,
    MutualKNN,
    UnbiasedCKA,
)

HERE = os.path.abspath(__file__)

#: (class, constructor kwargs, the prh_fast.metrics function on all rows)
CASES = {
    "cka": (CKA, {}, lambda a, b: M.cka(a, b)),
    "unbiased_cka": (UnbiasedCKA, {}, lambda a, b: M.unbiased_cka(a, b)),
    "svcca": (SVCCA, {"cca_dim": 5}, lambda a, b: M.svcca(a, b, cca_dim=5)),
    "mutual_knn": (MutualKNN, {"topk": 7}, lambda a, b: M.mutual_knn(a, b, topk=7)),
    "cycle_knn": (CycleKNN, {"topk": 7}, lambda a, b: M.cycle_knn(a, b, topk=7)),
    "cknna": (CKNNA, {"topk": 9}, lambda a, b: M.cknna(a, b, topk=9)),
}
MOMENT = ("cka", "unbiased_cka", "svcca")
#: odd batch sizes, one of a single row
SIZES = (37, 1, 50, 29, 64, 23)


def _data(dtype=torch.float64, offset=False, seed=3, n=None):
    n = sum(SIZES) if n is None else n
    a, b = paired_features(n, 24, 17, seed=seed, dtype=torch.float64)
    if offset:  # unnormalised features away from the origin
        a = 3.0 * a + torch.linspace(-0.5, 0.5, a.shape[1], dtype=torch.float64)
        b = 0.2 * b - 0.3
    return a.to(dtype), b.to(dtype)


def _batches(a, b, sizes=SIZES):
    out, s = [], 0
    for k in sizes:
        out.append((a[s:s + k], b[s:s + k]))
        s += k
    return out


def _feed(metric, a, b, sizes=SIZES):
    for x, y in _batches(a, b, sizes):
        metric.update(x, y)
    return float(metric.compute())


# ------------------------------------------------------------------------------------------
# one process
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("offset", [False, True])
def test_equals_metric_on_concatenation_float64(name, offset):
    cls, kw, fn = CASES[name]
    a, b = _data(torch.float64, offset)
    got = _feed(cls(**kw), a, b)
    want = fn(a, b)
    if name in MOMENT:
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    else:
        assert got == want
    if not offset:  # real shared structure: well above chance
        assert 0.2 < want <= 1.0 + 1e-9


@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_metric_on_concatenation_float32(name):
    cls, kw, fn = CASES[name]
    a, b = _data(torch.float32)
    got = _feed(cls(**kw), a, b)
    if name in MOMENT:
        # the moments are float64 sums of the float32 values: the metric on them in float64
        assert got == pytest.approx(fn(a.double(), b.double()), rel=1e-9, abs=1e-12)
        assert got == pytest.approx(fn(a, b), abs=2e-5)  # the float32 evaluation
    else:
        assert got == fn(a, b)


def test_declared_dims_and_lazy_dims_agree():
    a, b = _data()
    for cls, kw, _ in (CASES[m] for m in MOMENT):
        lazy = _feed(cls(**kw), a, b)
        declared = _feed(cls(dim_x=24, dim_y=17, **kw), a, b)
        half = _feed(cls(dim_y=17, **kw), a, b)
        assert lazy == declared == half


@pytest.mark.parametrize("name", MOMENT)
def test_center_keeps_far_from_origin_features_exact(name):
    """Features with column means 1000 times their spread: sums about a common centre (here
    the mean of one batch, as every rank could use) equal the metric to 1e-9; without it
    the value stays close (the documented loss of about ρ² or ρ⁴ float64 roundings)."""
    cls, kw, fn = CASES[name]
    a, b = _data(n=600)
    a = a + 1000 * a.std(0).mean()
    b = b - 1000 * b.std(0).mean()
    want = fn(a, b)
    centred = _feed(cls(center_x=a[:50].mean(0), center_y=b[:50].mean(0).numpy(), **kw), a, b,
                    (200, 199, 201))
    plain = _feed(cls(**kw), a, b, (200, 199, 201))
    assert centred == pytest.approx(want, rel=1e-9)
    assert plain == pytest.approx(want, rel=1e-4)


def test_center_is_invariant_and_checked():
    a, b = _data()
    for name in MOMENT:
        cls, kw, fn = CASES[name]
        got = _feed(cls(center_x=torch.full((24,), 0.3), center_y=-b[0], **kw), a, b)
        assert got == pytest.approx(fn(a, b), rel=1e-9, abs=1e-12), name
    with pytest.raises(InputError, match="center_x: expected 5 values"):
        CKA(dim_x=5, center_x=torch.zeros(4))
    with pytest.raises(InputError, match="center_y: .*NaN"):
        CKA(center_y=torch.tensor([0.0, float("nan")]))
    m = CKA(center_x=torch.zeros(24))
    with pytest.raises(InputError, match="x: expected 24 features"):
        m.update(a[:5, :3], b[:5])


def test_cknna_options_forwarded():
    a, b = _data()
    for kw in ({"topk": 6, "unbiased": False}, {"topk": 6, "distance_agnostic": True},
               {"topk": 6, "unbiased": False, "exclude_self": True}, {"topk": None}):
        got = _feed(CKNNA(**kw), a, b)
        opts = dict(kw)
        want = M.cknna(a, b, opts.pop("topk"), opts.pop("distance_agnostic", False),
                       opts.pop("unbiased", True), **opts)
        assert got == want


def test_mutual_knn_expected_ties():
    a, b = _data()
    a = torch.round(a * 4) / 4  # many exact ties
    got = _feed(MutualKNN(topk=5, ties="expected"), a, b)
    assert got == M.mutual_knn(a, b, topk=5, ties="expected")


def _state_numel(metric) -> int:
    return sum(getattr(metric, k).numel() for k in metric._defaults)


@pytest.mark.parametrize("name", MOMENT)
def test_moment_memory_independent_of_batches(name):
    cls, kw, fn = CASES[name]
    a, b = _data(n=310)
    m = cls(**kw)
    m.update(a[:10], b[:10])
    after_one = _state_numel(m)
    for x, y in _batches(a[10:], b[10:], (30,) * 10):
        m.update(x, y)
    assert _state_numel(m) == after_one
    dx, dy = 24, 17
    square = 1 + dx + dy + dx * dx + dy * dy + dx * dy
    extra = 5 + 2 * dx + 2 * dy if name == "unbiased_cka" else 0
    assert after_one == square + extra
    assert float(m.compute()) == pytest.approx(fn(a, b), rel=1e-9)


def test_neighbour_memory_is_the_features():
    a, b = _data()
    m = MutualKNN(topk=5)
    _feed(m, a, b)
    assert sum(t.numel() for t in m.x) == a.numel()
    assert sum(t.numel() for t in m.y) == b.numel()


def test_lightning_style_loop():
    """``metric(x, y)`` per step (the batch's value, states accumulate), ``compute()`` at the
    end of the epoch (the value a Lightning ``self.log(name, metric)`` logs), ``reset()``."""
    for name, (cls, kw, fn) in sorted(CASES.items()):
        metric = cls(**kw)
        for epoch in range(2):
            a, b = _data(seed=10 + epoch)
            for x, y in _batches(a, b, (60, 55, 56, 33)):
                step = metric(x, y)
                assert isinstance(step, torch.Tensor) and step.dim() == 0
                want = fn(x, y)
                if name in MOMENT:
                    assert float(step) == pytest.approx(want, rel=1e-9, abs=1e-12), name
                else:
                    assert float(step) == want, name
            total = metric.compute()
            assert total.dtype == torch.float64 and total.dim() == 0
            want = fn(a, b)
            if name in MOMENT:
                assert float(total) == pytest.approx(want, rel=1e-9, abs=1e-12), name
            else:
                assert float(total) == want, name
            metric.reset()


def test_metric_collection_and_clone():
    from torchmetrics import MetricCollection

    a, b = _data()
    col = MetricCollection({"cka": CKA(), "mknn": MutualKNN(topk=7)})
    for x, y in _batches(a, b):
        col.update(x, y)
    out = col.compute()
    assert float(out["cka"]) == pytest.approx(M.cka(a, b), rel=1e-9)
    assert float(out["mknn"]) == M.mutual_knn(a, b, topk=7)
    assert float(col["cka"].clone().compute()) == float(out["cka"])


def test_merge_state():
    a, b = _data()
    for name in MOMENT:
        cls, kw, fn = CASES[name]
        first, second, empty = cls(**kw), cls(**kw), cls(**kw)
        first.update(a[:90], b[:90])
        second.update(a[90:], b[90:])
        empty.merge_state(first)
        empty.merge_state(second)
        first.merge_state(cls(**kw))
        first.merge_state(second)
        for m in (empty, first):
            assert float(m.compute()) == pytest.approx(fn(a, b), rel=1e-9, abs=1e-12), name


def test_conventions():
    for cls, kw, _ in CASES.values():
        m = cls(**kw)
        assert m.full_state_update is False
        assert m.is_differentiable is False
        assert m.higher_is_better is True
        for attr, fx in m._reductions.items():
            assert fx is not None, attr
    assert CKA(dist_sync_on_step=True).dist_sync_on_step is True


def test_requires_grad_inputs_are_detached():
    a, b = _data()
    x = a.clone().requires_grad_(True)
    for cls, kw, _ in CASES.values():
        m = cls(**kw)
        m.update(x, b)
        assert not m.compute().requires_grad


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_device_move_cuda():
    a, b = _data()
    for name, (cls, kw, fn) in sorted(CASES.items()):
        m = cls(**kw).to("cuda")
        for x, y in _batches(a, b):
            m.update(x.cuda(), y.cuda())
        got = m.compute()
        assert got.device.type == "cuda"
        want = fn(a, b)
        if name in MOMENT:
            assert float(got) == pytest.approx(want, rel=1e-9, abs=1e-12), name
        else:
            assert float(got) == pytest.approx(want, abs=1e-6), name


def test_device_move_keeps_float64_states():
    m = CKA(dim_x=3, dim_y=2).to("cpu")
    assert m.gx.dtype == torch.float64 and m.gx.shape == (3, 3)
    m.reset()
    assert m.cxy.shape == (3, 2) and float(m.n) == 0


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_errors_name_the_argument(name):
    cls, kw, _ = CASES[name]
    a, b = _data()
    m = cls(**kw)
    with pytest.raises(InputError, match="x and y"):
        m.update(a[:5], b[:6])
    with pytest.raises(InputError, match="^x: .*2-D"):
        m.update(a[:5, :, None], b[:5])
    bad = b[:5].clone()
    bad[2, 3] = float("nan")
    with pytest.raises(InputError, match="^y: .*NaN"):
        m.update(a[:5], bad)
    bad[2, 3] = float("inf")
    with pytest.raises(InputError, match="^y: .*NaN or Inf"):
        m.update(a[:5], bad)
    m.update(a[:5], b[:5])
    with pytest.raises(InputError, match="^x: expected 24 features"):
        m.update(a[:5, :20], b[:5])
    with pytest.raises(InputError, match="^y: expected 17 features"):
        m.update(a[:5], b[:5, :3])


def test_option_and_size_errors():
    with pytest.raises(InputError, match="kernel_metric"):
        CKA(kernel_metric="rbf")
    with pytest.raises(InputError, match="dim_x"):
        CKA(dim_x=0)
    with pytest.raises(InputError, match="cca_dim"):
        SVCCA(cca_dim=0)
    with pytest.raises(InputError, match="topk"):
        MutualKNN(topk=0)
    with pytest.raises(InputError, match="ties"):
        MutualKNN(ties="random")
    with pytest.raises(InputError, match="topk"):
        CKNNA(topk=1)
    a, b = _data()
    m = CKA(dim_x=24)
    with pytest.raises(InputError, match="x: expected 24"):
        m.update(a[:4, :5], b[:4])
    u = UnbiasedCKA()
    u.update(a[:3], b[:3])
    with pytest.raises(InputError, match="N >= 4"):
        u.compute()
    s = SVCCA(cca_dim=5)
    s.update(a[:4], b[:4])
    with pytest.raises(InputError, match="cca_dim"):
        s.compute()
    k = MutualKNN(topk=7)
    k.update(a[:5], b[:5])
    with pytest.raises(InputError, match="topk"):
        k.compute()
    with pytest.raises(InputError, match="update"):
        CycleKNN(topk=3).compute()


def test_overflowing_features_are_refused():
    a, b = _data()
    m = CKA()
    m.update(a[:8] * 1e160, b[:8])
    with pytest.raises(InputError, match="overflow"):
        m.compute()


def test_import_prh_fast_does_not_import_torchmetrics():
    code = "import sys, prh_fast; print('torchmetrics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_missing_torchmetrics_is_a_clear_import_error():
    code = ("import sys; sys.modules['torchmetrics'] = None\n"
            "try:\n    import prh_fast.torchmetrics\n"
            "except ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert "pip install prh_fast[torchmetrics]" in out.stdout


# ------------------------------------------------------------------------------------------
# two gloo ranks
# ------------------------------------------------------------------------------------------
#: rows of each rank, in order (rank 0 first): uneven counts of odd-sized batches
RANK_SIZES = {0: (31, 1, 44), 1: (27, 50)}


def _rank_rows(rank: int):
    start = sum(sum(s) for r, s in RANK_SIZES.items() if r < rank)
    return start, RANK_SIZES[rank]


def _worker(folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    n = sum(sum(s) for s in RANK_SIZES.values())
    a, b = paired_features(n, 24, 17, seed=5, dtype=torch.float64)
    start, sizes = _rank_rows(rank)
    a, b = a[start:start + sum(sizes)], b[start:start + sum(sizes)]
    out = {}
    for name, (cls, kw, _) in sorted(CASES.items()):
        m = cls(**kw)
        for x, y in _batches(a, b, sizes):
            m.update(x, y)
        out[name] = float(m.compute())
        m.reset()
        # forward with dist_sync_on_step: every step is a collective, so both ranks take the
        # same number of steps; a step's value is the metric on that step's rows of all ranks
        m = cls(dist_sync_on_step=True, **kw)
        half = a.shape[0] // 2
        steps = [float(m(x, y)) for x, y in _batches(a, b, (half, a.shape[0] - half))]
        out[name + "_steps"] = steps
        out[name + "_synced_steps"] = float(m.compute())
    # moment states with declared dimensions on a rank that saw no batch
    m = CKA(dim_x=24, dim_y=17)
    if rank == 0:
        for x, y in _batches(a, b, sizes):
            m.update(x, y)
    out["cka_one_rank"] = float(m.compute())
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks(tmp_path):
    from test_distributed import _launch

    res = _launch(lambda r: [sys.executable, HERE, str(tmp_path)], 2)
    for r, (rc, o, e) in enumerate(res):
        assert rc == 0, f"rank {r} exited {rc}\nstdout:\n{o}\nstderr:\n{e[-4000:]}"
    n = sum(sum(s) for s in RANK_SIZES.values())
    a, b = paired_features(n, 24, 17, seed=5, dtype=torch.float64)
    n0 = sum(RANK_SIZES[0])
    for r in range(2):
        with open(tmp_path / f"rank{r}.json") as f:
            got = json.load(f)
        for name, (_, _, fn) in CASES.items():
            want = fn(a, b)
            # the first synced step: the first half of each rank's rows
            h0, h1 = n0 // 2, (n - n0) // 2
            rows = torch.cat([torch.arange(h0), torch.arange(n0, n0 + h1)])
            want_step = fn(a[rows], b[rows])
            for key, value, w in ((name, got[name], want),
                                  (name + "_synced_steps", got[name + "_synced_steps"], want),
                                  (name + "_step0", got[name + "_steps"][0], want_step)):
                if name in MOMENT:
                    assert value == pytest.approx(w, rel=1e-9, abs=1e-12), (r, key)
                else:
                    assert value == w, (r, key)
        assert got["cka_one_rank"] == pytest.approx(M.cka(a[:n0], b[:n0]), rel=1e-9)


if __name__ == "__main__":
    _worker(sys.argv[1])
