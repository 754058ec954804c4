"""The GPU benchmarks' logic at tiny sizes on the CPU (Triton's interpreter): they run end to
end as ``python -m benchmarks.<name>`` from the repository root, write JSON with the fields the
README table and docs/gpu.md read, and their correctness checks pass. Subprocesses:
``TRITON_INTERPRET`` must be set before triton is imported."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
