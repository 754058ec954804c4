"""Every code block of docs/pipelines.md runs: the first two in a fresh interpreter, the third
on two processes started the way torchrun starts them."""
import os
import re
import subprocess
import sys

import pytest

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "pipelines.md")


def _blocks():
    with open(DOC) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_page_has_three_examples():
    assert len(_blocks()) == 3


@pytest.mark.parametrize("i", [0, 1])
def test_single_process_examples_run(i, tmp_path):
    if i == 1:
        pytest.importorskip("torchmetrics")
    script = tmp_path / "example.py"
    script.write_text(_blocks()[i])
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == (3 if i == 0 else 2)
    if i == 0:
        assert all(0.0 <= float(line.split()[1]) <= 1.0 for line in lines)


def test_torchrun_example_runs_on_two_ranks(tmp_path):
    from tests.test_distributed import _launch

    script = tmp_path / "grid.py"
    script.write_text(_blocks()[2])
    res = _launch(lambda r: [sys.executable, str(script)], 2)
    for r, (rc, _out, err) in enumerate(res):
        assert rc == 0, f"rank {r}: {err[-3000:]}"
    assert "vit0" in res[0][1] and "lm1" in res[0][1]
    assert res[1][1].strip() == ""
