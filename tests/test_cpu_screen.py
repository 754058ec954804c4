"""The CPU search's bfloat16 screen: candidates from bfloat16 products under a certified margin,
the same exact lists as the float32 screen (fixed-order re-score, certificate, sweep); the one
error bound shared with the triton backend; the choice of screen (setting, CPU flags)."""
from __future__ import annotations

import logging

import pytest
import torch
from _data import HAS_NATIVE, with_duplicates

import prh_fast
from prh_fast import reference
from prh_fast.knn import _bound, _cpu, _exact, _triton
from prh_fast.testing import integer_features, latent, layer_features, paired_features

pytestmark = pytest.mark.skipif(not HAS_NATIVE, reason="native prh_fast._C not built")

BUDGET = 1 << 24


def _lists(X, k, screen):
    """``prh_fast.knn.knn`` lists and scores under a forced CPU screen."""
    with prh_fast.config_context(cpu_screen=screen):
        return prh_fast.knn.knn(X, k, backend="cpu", return_scores=True)


def _unit(X):
    return torch.nn.functional.normalize(X.double(), dim=1).float()


def _near_tie_data():
    g = torch.Generator().manual_seed(7)
    base = _unit(torch.randn(101, 48, generator=g))
    dup, _ = with_duplicates(203, 24, n_unique=40, seed=3)
    pert3 = torch.cat([base, base + 1e-3 * torch.randn(base.shape, generator=g)])
    pert6 = torch.cat([base, base + 1e-6 * torch.randn(base.shape, generator=g)])
    quant = (torch.round(_unit(torch.randn(257, 32, generator=g)) * 4) / 4)
    lowrank = torch.randn(199, 2, generator=g) @ torch.randn(2, 64, generator=g)
    z = latent(333, 12, clusters=24, spread=0.5, seed=5)
    struct = layer_features(z, 96, seed=6)
    A, _ = paired_features(211, 40, 24, seed=4)
    return {
        "exact_duplicates": dup,
        "perturbed_1e-3": pert3,
        "perturbed_1e-6": pert6,
        "quantised": quant,
        "integer": integer_features(151, 16, seed=9),
        "low_rank": lowrank,
        "all_equal": torch.ones(57, 20) * 0.3,
        "structured": struct,
        "paired": A,
    }


DATA = _near_tie_data()


# --------------------------------------------------------------------------------------------
# the lists: bfloat16 screen == float32 screen, by construction


@pytest.mark.parametrize("name", sorted(DATA))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bf16_screen_lists_equal_float32_lists(name, dtype):
    X = DATA[name].to(dtype)
    n = X.shape[0]
    for k in sorted({1, 5, min(40, n - 1), n - 1}):
        i32, v32 = _lists(X, k, "float32")
        i16, v16 = _lists(X, k, "bfloat16")
        assert torch.equal(i16, i32), f"{name} k={k}: lists differ"
        assert torch.equal(v16, v32), f"{name} k={k}: scores differ"
        if dtype == torch.float64:
            assert torch.equal(i16, reference.knn(X, k)), f"{name} k={k}: not the oracle's lists"


@pytest.mark.parametrize("n", [2, 3, 65, 517])
def test_bf16_screen_odd_sizes(n):
    X = _unit(torch.randn(n, 33, generator=torch.Generator().manual_seed(n)))
    for k in sorted({1, n - 1, min(7, n - 1)}):
        i32, _, st32 = _cpu.knn_cpu(X, k, BUDGET, screen=torch.float32, return_stats=True)
        i16, _, st16 = _cpu.knn_cpu(X, k, BUDGET, screen=torch.bfloat16, return_stats=True)
        assert torch.equal(i16, i32)
        assert torch.equal(i16, reference.knn(X.double(), k)) or n > 100
        assert st16.screen == "bfloat16" and st32.screen == "float32"


def test_bf16_and_half_features_use_the_screen():
    X = _unit(torch.randn(300, 40, generator=torch.Generator().manual_seed(2)))
    for dt in (torch.bfloat16, torch.float16):
        a = _lists(X.to(dt), 6, "float32")[0]
        b = _lists(X.to(dt), 6, "bfloat16")[0]
        assert torch.equal(a, b)
        assert torch.equal(a, reference.knn(X.to(dt).double(), 6))


# --------------------------------------------------------------------------------------------
# the certificate catches the rows bfloat16 products reorder


def _bf16_reordered(n_close=120, d=32, seed=0):
    """A query row and ``n_close`` keys equal to it within far less than bfloat16's resolution:
    their bfloat16 products tie, the true order is set by the perturbation, and the best keys
    sit at the highest indices (a screen keeping the lower index at ties misses them)."""
    g = torch.Generator().manual_seed(seed)
    q = _unit(torch.randn(1, d, generator=g))
    eps = torch.linspace(0.0, 1.0, n_close).unsqueeze(1) * 1e-5
    keys = q * (1.0 + eps)  # score grows with the index, all round to the same bfloat16 row
    far = _unit(torch.randn(60, d, generator=g))
    return torch.cat([q, keys, far])


def test_certificate_sweeps_rows_whose_bf16_products_reorder_the_top_k():
    X = _bf16_reordered()
    Xs = X.to(torch.bfloat16)
    assert torch.equal(Xs[1], Xs[50])  # the premise: bfloat16 cannot tell the keys apart
    k = 5
    idx, _, st = _cpu.knn_cpu(X, k, BUDGET, screen=torch.bfloat16, return_stats=True)
    ref = reference.knn(X.double(), k)
    assert torch.equal(idx, ref)
    assert min(idx[0].tolist()) > 100  # the best keys sit at the end
    assert st.swept >= 1  # the query row (at least) could not be certified


def test_a_zero_margin_would_be_wrong(monkeypatch):
    """The sweep above is the certificate's doing: with no margin the screen's lists are wrong
    on the same data."""
    X = _bf16_reordered()
    k = 5
    monkeypatch.setattr(_exact, "margins",
                        lambda q, *a, **kw: torch.zeros_like(q, dtype=torch.float64))
    idx, _, st = _cpu.knn_cpu(X, k, BUDGET, screen=torch.bfloat16, return_stats=True)
    assert not torch.equal(idx, reference.knn(X.double(), k))


@pytest.mark.parametrize("name", ["structured", "perturbed_1e-3", "quantised", "paired"])
def test_bf16_products_stay_inside_the_margin(name):
    """The bound against this machine's real bfloat16 ``torch.mm`` rounding, every pair."""
    X = DATA[name].float()
    Xs = X.to(torch.bfloat16)
    A = (Xs @ Xs.T).to(torch.float64)
    n = X.shape[0]
    i, j = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    F = _exact.fixed_dots(X, X, i.reshape(-1), j.reshape(-1)).view(n, n)
    qn = prh_fast.prepare.row_norms(X)
    rho = _bound.input_rounding(X, Xs, qn)
    assert 0 <= rho < _bound.U_BF16
    for r in (None, rho):  # the worst case and the measured rounding the search uses
        e = _exact.margins(qn, float(qn.max()), X.shape[1], X.dtype, torch.bfloat16, r)
        err = (A - F).abs()
        assert bool((err <= e.unsqueeze(1)).all())
    if name != "quantised":  # quarters: every bfloat16 product is exact
        assert float(err.max()) > 0  # the products really were rounded


# --------------------------------------------------------------------------------------------
# one bound for both paths


@pytest.mark.parametrize("d", [1, 64, 768, 4096])
def test_triton_coefficient_is_the_shared_bound(d):
    for u in (0.0, 2.0**-8, 2.0**-10, 2.0**-24):
        for rd in (torch.float64, torch.float32):
            legacy_acc = 2.0 * _bound.gamma(d + 32, 2.0**-23) * (1.0 + u) ** 2
            ur = 2.0**-53 if rd == torch.float64 else 2.0**-24
            legacy = 2.0 * u + u * u + legacy_acc + _bound.gamma(d + 1, ur)
            assert _triton.margin_coefficient(u, d, rd) == legacy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_margins_are_the_recursive_summation_bound(dtype):
    d = 300
    qn = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    uacc = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    c = (_bound.gamma(d + 2, uacc) + _bound.gamma(d + 1, 2.0**-53)) * (1.0 + 2.0**-20)
    eta = 4.0 * (d + 2) * (torch.finfo(dtype).tiny + torch.finfo(torch.float64).tiny)
    want = qn * (c * 3.0) + eta
    torch.testing.assert_close(_exact.margins(qn, 3.0, d, dtype), want, rtol=1e-15, atol=0)


def test_bf16_margin_is_wider_and_includes_output_rounding():
    qn = torch.ones(2, dtype=torch.float64)
    e32 = _exact.margins(qn, 1.0, 768, torch.float32)
    e16 = _exact.margins(qn, 1.0, 768, torch.float32, torch.bfloat16)
    assert bool((e16 > 100 * e32).all())
    no_out = _bound.coefficient(768, _bound.ProductFormat(
        u_in=_bound.U_BF16, u_acc=2.0**-23, acc_terms=32, acc_scale=2.0))
    assert _bound.coefficient(768, _bound.BF16_CPU) > no_out + 0.9 * _bound.U_BF16


def test_dimension_too_large_is_an_input_error():
    with pytest.raises(prh_fast.InputError, match="dimension"):
        _bound.gamma(2**30, 2.0**-24)


# --------------------------------------------------------------------------------------------
# choosing the screen, counting the sweep


def test_screen_choice(monkeypatch):
    assert _cpu.cpu_screen(torch.float64, "bfloat16")[0] == torch.float64
    assert _cpu.cpu_screen(torch.float32, "float32")[0] == torch.float32
    assert _cpu.cpu_screen(torch.float32, "bfloat16")[0] == torch.bfloat16
    monkeypatch.setattr(_cpu, "cpu_bf16_support", lambda: (True, "AMX-BF16 on this CPU"))
    assert _cpu.cpu_screen(torch.float32, "auto") == (torch.bfloat16, "AMX-BF16 on this CPU")
    monkeypatch.setattr(_cpu, "cpu_bf16_support", lambda: (False, "no AMX/AVX512-BF16"))
    assert _cpu.cpu_screen(torch.float32, "auto")[0] == torch.float32
    with prh_fast.config_context(cpu_screen="bfloat16"):
        assert _cpu.cpu_screen(torch.float32)[0] == torch.bfloat16


def test_cpu_flags_match_proc_cpuinfo():
    fast, why = _cpu.cpu_bf16_support()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    has = " amx_bf16" in text or " avx512_bf16" in text
    assert fast == has
    assert ("no AMX" in why) != fast


def test_info_names_the_screen():
    import io

    out = io.StringIO()
    d = prh_fast.info(file=out)
    assert d["cpu_screen"]["float32"] in ("bfloat16", "float32")
    assert "cpu screen" in out.getvalue()
    assert d["cpu_screen"]["why"] in out.getvalue()


def test_sweep_count_is_logged(caplog):
    X = _bf16_reordered()
    with caplog.at_level(logging.DEBUG, logger="prh_fast.knn._exact"):
        _cpu.knn_cpu(X, 5, BUDGET, screen=torch.bfloat16)
    recs = [r for r in caplog.records if hasattr(r, "exact_stats")]
    assert recs and recs[-1].exact_stats["swept"] >= 1
    assert recs[-1].exact_stats["screen"] == "bfloat16"


def test_screen_rejects_float64_rows_for_bf16():
    X = torch.randn(10, 4, dtype=torch.float64)
    with pytest.raises(prh_fast.InputError, match="screen"):
        _cpu.cpu_candidates(X, 3, BUDGET, screen=torch.bfloat16)


def test_measured_rounding_is_zero_for_representable_rows_and_tighter_otherwise():
    X = DATA["quantised"].float()
    qn = prh_fast.prepare.row_norms(X)
    assert _bound.input_rounding(X, X.to(torch.bfloat16), qn) == 0.0
    Y = DATA["structured"].float()
    qy = prh_fast.prepare.row_norms(Y)
    rho = _bound.input_rounding(Y, Y.to(torch.bfloat16), qy)
    assert 0 < rho < 0.75 * _bound.U_BF16
    e_rho = _exact.margins(qy, 1.0, Y.shape[1], Y.dtype, torch.bfloat16, rho)
    e_max = _exact.margins(qy, 1.0, Y.shape[1], Y.dtype, torch.bfloat16)
    assert bool((e_rho < e_max).all())


def test_screen_benchmark_runs_and_its_lists_agree(tmp_path):
    """``python -m benchmarks.bench_knn --suite screen`` at a tiny size: both screens, the
    JSON rows, equal lists (its exit status)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_knn", "--suite", "screen", "--n", "301",
         "--d", "48", "--k", "5", "--extra", "8", "32", "--repeats", "1", "--warmup", "0",
         "--mm-size", "128", "--out", str(tmp_path)],
        cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = json.loads((tmp_path / "bench_knn_screen.json").read_text())["rows"]
    assert [r["screen"] for r in rows] == ["float32", "bfloat16", "bfloat16"]
    assert all(r["lists_equal"] for r in rows)
    assert [r["candidates"] for r in rows] == [13, 13, 37]
