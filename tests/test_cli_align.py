"""`prh-fast align` end to end on small generated feature files (run in-process)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from prh_fast import store
from prh_fast.cli import main
from prh_fast.grid import align_models

N = 64


def _feats(seed, layers, d):
    g = torch.Generator().manual_seed(99)
    z = torch.randn(N, 6, generator=g)
    g = torch.Generator().manual_seed(seed)
    x = torch.tanh(z @ torch.randn(6, layers * d, generator=g)).reshape(N, layers, d)
    return x + 0.4 * torch.randn(N, layers, d, generator=g)


@pytest.fixture()
def feature_dir(tmp_path):
    """The reference's layout: <input_dir>/<dataset>/<subset>/<model>_pool-<p>_prompt-False.pt"""
    sub = tmp_path / "features" / "prh" / "wit_1024"
    for i, name in enumerate(["llama", "bloom"]):
        store.save_features(sub / f"{name}_pool-avg_prompt-False.pt", _feats(i, 3, 16),
                            num_params=1)
    for i, name in enumerate(["dino", "clip"]):
        torch.save({"feats": _feats(10 + i, 2, 24), "num_params": 1},
                   sub / f"{name}_pool-cls_prompt-False.pt")
    return tmp_path / "features"


def test_align_folder_discovery_writes_outputs(feature_dir, tmp_path, capsys):
    out = tmp_path / "alignment"
    rc = main(["align", "--input_dir", str(feature_dir), "--output_dir", str(out),
               "--no-progress", "--heatmap"])
    text = capsys.readouterr().out
    assert rc == 0
    run = out / "language_pool-avg_vision_pool-cls"
    for name in ("mutual_knn_k10.npy", "mutual_knn_k10.json", "mutual_knn_k10.csv",
                 "mutual_knn_k10.png"):
        assert (run / name).is_file(), name
    pngs = sorted(p.name for p in (run / "mutual_knn_k10_layers").iterdir())
    assert len(pngs) == 4 and all(p.endswith(".png") for p in pngs)
    d = np.load(run / "mutual_knn_k10.npy", allow_pickle=True).item()
    assert d["scores"].shape == (2, 2) and d["indices"].shape == (2, 2, 2)
    # model names drop the reference's _pool-/_prompt- suffix; the table shows them
    assert "llama" in text and "dino" in text and "wrote:" in text
    # same numbers as the library with the CLI's default clipping (q = 0.95)
    sub = feature_dir / "prh" / "wit_1024"
    xs = {n: str(sub / f"{n}_pool-avg_prompt-False.pt") for n in ("bloom", "llama")}
    ys = {n: str(sub / f"{n}_pool-cls_prompt-False.pt") for n in ("clip", "dino")}
    res = align_models(xs, ys, "mutual_knn", topk=10, q=0.95, progress=False)
    np.testing.assert_array_equal(d["scores"], res.scores)

    # a second run resumes instead of recomputing
    rc = main(["align", "--input_dir", str(feature_dir), "--output_dir", str(out),
               "--no-progress"])
    assert rc == 0 and "existing result loaded" in capsys.readouterr().out


def test_align_explicit_files_and_options(feature_dir, tmp_path, capsys):
    sub = feature_dir / "prh" / "wit_1024"
    files = [str(sub / "llama_pool-avg_prompt-False.pt"),
             str(sub / "bloom_pool-avg_prompt-False.pt")]
    out = tmp_path / "o"
    rc = main(["align", "--x", *files, "--y", *files, "--metric", "cka", "--q", "1",
               "--output_dir", str(out), "--no-progress", "--null-permutations", "3"])
    text = capsys.readouterr().out
    assert rc == 0
    assert (out / "cka.npy").is_file()  # explicit files: straight into --output_dir
    assert "1 mirrored" in text and "against 3 shuffled pairings: permutation p-value" in text
    d = np.load(out / "cka.npy", allow_pickle=True).item()
    np.testing.assert_allclose(np.diag(d["scores"]), 1.0, atol=1e-6)


def test_pool_filter_falls_back_to_all_files(feature_dir, tmp_path, capsys):
    rc = main(["align", "--input_dir", str(feature_dir), "--pool_x", "last", "--y",
               str(feature_dir / "prh" / "wit_1024" / "dino_pool-cls_prompt-False.pt"),
               "--output_dir", str(tmp_path / "o"), "--no-progress", "--metric", "cycle_knn",
               "--topk", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "no file under" in out and "pool-last" in out
    assert (tmp_path / "o" / "language_pool-last_vision_pool-cls" / "cycle_knn_k5.npy").is_file()


def test_bad_file_exit_code_2_names_it(feature_dir, tmp_path, capsys):
    bad = tmp_path / "short.pt"
    store.save_features(bad, _feats(5, 2, 8)[:40], num_params=1)
    good = str(feature_dir / "prh" / "wit_1024" / "llama_pool-avg_prompt-False.pt")
    rc = main(["align", "--x", good, "--y", str(bad), "--output_dir", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "short.pt" in err and "N = 40" in err and "Traceback" not in err

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    rc = main(["align", "--x", good, "--y", str(corrupt), "--output_dir", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "corrupt.pt" in err

    rc = main(["align", "--x", good, "--y", str(tmp_path / "missing.pt"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pt" in err

    rc = main(["align", "--input_dir", str(tmp_path / "nowhere"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "nowhere" in err

    (tmp_path / "emptydir").mkdir()
    rc = main(["align", "--input_dir", str(tmp_path / "emptydir"), "--no-progress"])
    assert rc == 2 and "no .pt feature files" in capsys.readouterr().err


def test_console_entry_point_exit_code():
    """Through the interpreter, as a user runs it: exit status 2, one-line error."""
    p = subprocess.run([sys.executable, "-m", "prh_fast.cli", "align", "--x", "nope.pt",
                        "--y", "nope.pt", "--no-progress"], capture_output=True, text=True)
    assert p.returncode == 2
    assert "nope.pt" in p.stderr and "Traceback" not in p.stderr


def test_memory_budget_flag_and_deprecated_stream_budget(feature_dir, tmp_path, capsys):
    """``--memory-budget`` is the flag; ``--stream-budget`` (hidden from --help) still works
    with a notice naming the new flag; both together is a usage error."""
    sub = feature_dir / "prh" / "wit_1024"
    files = [str(sub / "llama_pool-avg_prompt-False.pt")]
    base = ["align", "--x", *files, "--y", *files, "--metric", "cka", "--no-progress"]
    rc = main(base + ["--output_dir", str(tmp_path / "a"), "--memory-budget", "4096"])
    assert rc == 0
    capsys.readouterr()
    rc = main(base + ["--output_dir", str(tmp_path / "b"), "--stream-budget", "4096"])
    captured = capsys.readouterr()
    assert rc == 0 and "--memory-budget" in captured.err
    a = np.load(tmp_path / "a" / "cka.npy", allow_pickle=True).item()
    b = np.load(tmp_path / "b" / "cka.npy", allow_pickle=True).item()
    np.testing.assert_array_equal(a["scores"], b["scores"])
    rc = main(base + ["--output_dir", str(tmp_path / "c"), "--stream-budget", "4096",
                      "--memory-budget", "4096"])
    assert rc == 2 and "--memory-budget" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["align", "--help"])
    text = capsys.readouterr().out
    assert "--memory-budget" in text and "--stream-budget" not in text
