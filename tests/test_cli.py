"""`prh-fast info` and `prh-fast example` run end to end."""
import json
import subprocess
import sys

import pytest

import prh_fast


def _run(*args):
    return subprocess.run([sys.executable, "-m", "prh_fast.cli", *args], capture_output=True,
                          text=True, check=True).stdout


def test_info_text_and_json():
    text = _run("info")
    assert f"prh_fast {prh_fast.__version__}" in text
    assert "native CPU kernels" in text and "visible GPUs" in text
    data = json.loads(_run("info", "--json"))
    assert data["prh_fast"] == prh_fast.__version__
    if data["native"]:
        b = data["build"]
        assert {"cuda", "openmp", "omp_max_threads", "compiler"} <= set(b)


def test_info_function_returns_dict(capsys):
    d = prh_fast.info()
    assert "torch" in d and "gpus" in d
    assert "prh_fast" in capsys.readouterr().out


@pytest.mark.slow
def test_example_prints_every_metric():
    out = _run("example", "--n", "300", "--topk", "5")
    for m in prh_fast.SUPPORTED_METRICS:
        assert m in out
    # paired features align better than unpaired ones on mutual_knn
    line = next(line for line in out.splitlines() if line.strip().startswith("mutual_knn"))
    paired, unpaired = map(float, line.split()[1:3])
    assert paired > unpaired + 0.05
