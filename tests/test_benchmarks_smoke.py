"""The GPU benchmarks' logic at tiny sizes on the CPU (Triton's interpreter): they run end to
end as ``python -m benchmarks.<name>`` from the repository root, write JSON with the fields the
README table and docs/gpu.md read, and their correctness checks pass. Subprocesses:
``TRITON_INTERPRET`` must be set before triton is imported."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def _run(module, args, out):
    """``python -m benchmarks.<module> ARGS --out OUT`` from the repository root."""
    assert (BENCH / f"{module}.py").is_file(), module
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args, "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
@pytest.mark.slow
def test_bench_knn_gpu_suite_small_on_cpu(tmp_path):
    out = _run("bench_knn", ["--suite", "gpu", "--device", "cpu", "--small", "--n", "96",
                                "160", "--d", "16", "--k", "4", "--max-full-n", "96",
                                "--check-rows", "24"], tmp_path)
    assert "checks_passed: True" in out
    data = json.loads((tmp_path / "bench_knn_gpu_small.json").read_text())
    assert data["benchmark"] == "knn_gpu" and data["checks_passed"] is True
    assert {"bf16", "tf32", "fp32", "size"} <= set(data["ceilings"])
    assert {"env", "gpu", "args", "rows", "table"} <= set(data)
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert {r["mode"] for r in rows} >= {"triton_exact_bf16", "triton_exact_tf32",
                                         "triton_fast_bf16", "triton_fast_tf32", "torch_fp32"}
    assert {(r["N"], r["extrapolated"]) for r in rows} == {(96, False), (160, True)}
    for r in rows:
        assert {"seconds", "tflops", "frac_ceiling", "ceiling_tflops", "timed_rows",
                "check"} <= set(r), r
        c = r["check"]
        assert {"sample_rows", "rows_equal_fp64", "rows_equal_fp32", "recall_fp64"} <= set(c)
        if r["mode"].startswith("triton_exact"):
            assert c["passed"] is True and c["rows_equal_fp64"] == c["sample_rows"]
            assert r["stats"]["KP"] >= 4
    sampled = [r for r in rows if r["extrapolated"]]
    assert all(r["timed_rows"] < r["N"] for r in sampled)


@pytest.mark.slow
def test_bench_grid_gpu_small_on_cpu(tmp_path):
    args = ["--device", "cpu", "--small", "--replicate-to", "3", "3", "--cache", "disk",
            "--cache-dir", str(tmp_path / "cache")]
    if not HAS_TRITON:
        args += ["--knn-backend", "cpu"]
    out = _run("bench_grid_gpu", args, tmp_path)
    assert "checks_passed: True" in out
    data = json.loads((tmp_path / "bench_grid_gpu_small.json").read_text())
    assert data["benchmark"] == "grid_gpu" and data["checks_passed"] is True
    assert [r["status"] for r in data["layers"]] == ["ok"] * 4
    assert all({"generate_seconds", "knn_seconds", "cache_seconds"} <= set(r)
               for r in data["layers"])
    sc = data["scores"]
    assert sc["pairs"] == 9 and sc["replicated"] is True and sc["setops"] in ("cpu", "torch")
    assert len(sc["mutual_knn"]) == 3 and all(0 <= v <= 1 for row in sc["mutual_knn"]
                                              for v in row)
    assert data["checks"]["pairs_vs_cpu"]["passed"] is True
    assert data["checks"]["knn_X0"]["passed"] is True and data["checks"]["knn_Y0"]["passed"]
    assert "not a measurement" in data["projection"]["what"]
    # a rerun reuses the cached lists
    _run("bench_grid_gpu", args, tmp_path)
    data = json.loads((tmp_path / "bench_grid_gpu_small.json").read_text())
    assert [r["status"] for r in data["layers"]] == ["cached"] * 4


def test_every_benchmark_imports_as_a_module_of_the_package():
    names = sorted(p.stem for p in BENCH.glob("*.py") if p.stem != "__init__")
    assert {"_harness", "_gpu", "bench_knn", "bench_metrics", "bench_align"} <= set(names)
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n" \
           "    importlib.import_module('benchmarks.' + name)\nprint('ok')"
    done = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


_FAKE_REFERENCE = '''\
import torch
import torchaudio.functional as TAF


class AlignmentMetrics:
    SUPPORTED_METRICS = ["cycle_knn", "mutual_knn", "lcs_knn", "cka", "unbiased_cka", "cknna",
                         "svcca", "edit_distance_knn"]

    @staticmethod
    def measure(metric, A, B, **kw):
        if metric == "edit_distance_knn":
            return 1.0 - TAF.edit_distance([1, 2, 3, 4], [1, 3, 4, 5]) / 4
        return float((A * B).sum() / A.shape[0])
'''


@pytest.mark.slow
def test_bench_compare_quick_against_a_fake_reference(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "metrics.py").write_text(_FAKE_REFERENCE)
    out = _run("bench_compare", ["--quick", "--against", str(ref)], tmp_path)
    data = json.loads((tmp_path / "bench_compare.json").read_text())
    assert data["benchmark"] == "compare" and {"env", "args", "sections", "rows"} <= set(data)
    # prh_fast is imported before torch, so it chose the OpenMP wait policy (unless the caller's
    # environment set one)
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        assert data["omp_wait_policy"][0] == "passive"
    assert list(data["sections"]) == ["reference", "grid", "knn", "cka"]
    sec = data["sections"]
    for s in sec.values():
        assert len(s["load_before"]) == 3 and len(s["load_after"]) == 3
        assert s["table"].startswith("| ") and s["table"] in out
    one = {r["metric"]: r for r in sec["reference"]["rows"]}
    assert set(one) == {"cycle_knn", "mutual_knn", "lcs_knn", "edit_distance_knn", "cka",
                        "unbiased_cka", "cknna", "svcca"}
    for r in one.values():
        assert "error" not in r, r
        assert math.isfinite(r["speedup"]) and r["speedup"] > 0
        assert math.isfinite(r["abs_diff"])
    # the fake's edit distance: "1234" -> "1345" is two edits
    assert one["edit_distance_knn"]["reference_value"] == 0.5
    assert "randomised" in one["svcca"]["note"]
    grid = sec["grid"]["rows"]
    assert [g["metric"] for g in grid] == ["mutual_knn"] and math.isfinite(grid[0]["speedup"])
    # no measure_alignment.py: the reference's loop is reproduced, and the output says so
    assert grid[0]["reference_ran"] == "loop over AlignmentMetrics.measure"
    knn_rows = {r["method"]: r for r in sec["knn"]["rows"]}
    assert knn_rows["prh_fast.knn.knn"]["rows_equal"] == 1.0
    timed = [r for r in knn_rows.values() if "seconds" in r]
    assert len(timed) >= 2 and all(math.isfinite(r["prh_fast_speedup"]) for r in timed)
    for name, module in (("scikit-learn", "sklearn"), ("faiss-cpu", "faiss")):
        row = next(r for m, r in knn_rows.items() if m.startswith(name))
        if importlib.util.find_spec(module) is None:
            assert "not installed" in row["skipped"]
        else:
            assert row["rows_same_set"] > 0.9
    cka = {r["implementation"]: r for r in sec["cka"]["rows"]}
    assert abs(cka["prh_fast.metrics.cka"]["value"] - cka["dense torch float64"]["value"]) < 1e-5
    assert all(math.isfinite(r["prh_fast_speedup"]) for r in cka.values())
    if importlib.util.find_spec("torchaudio") is None:
        assert data["torchaudio_stub"] is True
        assert any("stand-in" in n for n in data["notes"]) and "stand-in" in out
        assert "stand-in" in one["edit_distance_knn"]["note"]


@pytest.mark.slow
def test_bench_compare_skips_reference_sections_without_a_checkout(tmp_path):
    _run("bench_compare", ["--quick", "--sections", "reference", "cka"], tmp_path)
    data = json.loads((tmp_path / "bench_compare.json").read_text())
    assert data["sections"]["reference"] == {"skipped": "no --against checkout given", "rows": []}
    assert [r["section"] for r in data["rows"]] == ["cka"] * 3


def test_drop_self():
    from benchmarks.bench_compare import drop_self

    idx = torch.tensor([[0, 2, 1], [0, 1, 2], [3, 1, 0], [1, 0, 2]])
    # a row's own index goes wherever it sits; without it the last entry goes
    assert drop_self(idx, 2).tolist() == [[2, 1], [0, 2], [3, 1], [1, 0]]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
def test_bench_ann_small(tmp_path):
    from benchmarks.bench_ann import features
    from prh_fast.metrics import cknna, mutual_knn

    n, d, k = 3000, 16, 10
    out = _run("bench_ann", ["--n", str(n), "--d", str(d), "--exact-sub", "1500",
                             "--groups", "4", "--name", "ann_t"], tmp_path)
    assert "targets:" in out
    data = json.loads((tmp_path / "ann_t.json").read_text())
    rows = {(r["method"], r.get("exact")): r for r in data["rows"]}
    full = rows[("exact cpu", "measured")]
    sub = rows[("exact cpu", "extrapolated")]
    assert full["params"] == "all rows" and sub["subset_rows"] == 1500
    A, B = features(n, d)
    ann = [r for r in data["rows"] if r["method"] != "exact cpu"]
    assert [r["method"] for r in ann] == ["faiss-ivf", "faiss-ivfpq", "faiss-hnsw"]
    for r in ann:
        # the exact lists of all rows give the library's metrics (float32 vs float64 scores)
        assert r["mutual_exact_all"] == pytest.approx(mutual_knn(A, B, topk=k), abs=1e-12)
        assert r["cknna_exact_all"] == pytest.approx(cknna(A, B, topk=k), rel=1e-4)
        assert r["dcknna_all"] == pytest.approx(abs(r["cknna_approx_all"]
                                                    - r["cknna_exact_all"]), abs=1e-15)
        # no parameter given: the default target applies and is reached on the sample
        assert r["target_recall"] == 0.95 and r["recall"] >= 0.95
        assert r["recall_ci_low"] <= r["recall"] <= 1.0
        lo, hi = r["dmutual_ci"]
        assert lo <= r["dmutual_signed"] <= hi and r["dmutual"] == abs(r["dmutual_signed"])
        assert r["dmutual_resolved"] == (-0.005 <= lo and hi <= 0.005)
        assert r["exact"] == "measured" and r["speedup"] == pytest.approx(
            full["total_s"] / r["total_s"])
        assert set(r["checks"]) == {"recall>=0.95", "|dmutual|<=0.005 resolved",
                                    "time<=exact/10"}
        assert r["targets"].count("met") == 3
        assert math.isfinite(r["dcknna_est"]) and r["sample"] >= 1000
        assert r["load1"] is None or r["load1"] >= 0
