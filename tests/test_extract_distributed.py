"""Extraction split by sample range over ranks (``prh-fast extract`` under torchrun, gloo on
the CPU): the merged file equals the single-process file (features, loss, bits per byte, job
fingerprint, so a later single-process run reuses it), and ranges restart cleanly."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
PIL = pytest.importorskip("PIL")

from test_extract_text import _model, _tokenizer  # noqa: E402

from prh_fast.extract import extract_text, load_pairs  # noqa: E402
from prh_fast.extract._runner import extract_images, extract_sharded  # noqa: E402
from prh_fast.store import load_features  # noqa: E402

CAPTIONS = ["a red circle", "a small blue square at the bottom of the image", "green",
            "there is a yellow rectangle near the centre and a brown circle", "a large shape",
            "what colour is the shape? it is gray", "a circle", "the shape is brown",
            "a small green triangle in the top left corner", "café naïve", "red", "blue"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_extract")
    tok = _tokenizer("gpt2")
    model = _model("gpt2", len(tok)).eval()
    model.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    data = root / "pairs"
    data.mkdir()
    from PIL import Image

    with open(data / "captions.jsonl", "w") as f:
        for i, c in enumerate(CAPTIONS):
            Image.new("RGB", (8, 8), (20 * i, 255 - 20 * i, 7 * i)).save(data / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": c}) + "\n")
    return root


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, nproc: int):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "prh_fast.cli",
           *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PRH_FAST_DIST_TIMEOUT="60",
               PRH_FAST_DIST_BACKEND="gloo")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_text_extraction_equals_one_process(setup, tmp_path):
    model, data = str(setup / "gpt2"), str(setup / "pairs")
    single = extract_text(model, data, features_dir=tmp_path / "one", batch_size=4,
                          progress=False)
    p = _torchrun(["extract", "--modality", "language", "--model", model, "--data", data,
                   "--output_dir", str(tmp_path / "three"), "--batch-size", "4",
                   "--no-progress"], 3)
    assert p.returncode == 0, p.stderr[-3000:]
    merged = p.stdout.strip().splitlines()[-1].split(": ", 1)[1]
    assert os.path.relpath(merged, tmp_path / "three") == os.path.relpath(single,
                                                                          tmp_path / "one")
    assert not os.path.exists(merged + ".ranges")  # parts removed after the merge
    a, b = load_features(single), load_features(merged)
    # Features must not depend on batch-mates; ranks see different batches, so compare to
    # float32 rounding of the tiny model.
    torch.testing.assert_close(b["feats"], a["feats"], rtol=1e-5, atol=1e-5)
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["bpb"] == pytest.approx(a["bpb"], rel=1e-6)
    assert b["job"] == a["job"] and b["n"] == a["n"] == len(CAPTIONS) and b["ranks"] == 3
    torch.testing.assert_close(b["sample_nll_sum"], a["sample_nll_sum"], rtol=1e-5, atol=1e-5)
    # The merged file is the one a single process would reuse.
    mtime = os.stat(merged).st_mtime_ns
    again = extract_text(model, data, features_dir=tmp_path / "three", batch_size=5,
                         progress=False)
    assert again == merged and os.stat(merged).st_mtime_ns == mtime


def test_sharded_in_one_process_and_stale_file(setup, tmp_path):
    """Without a process group extract_sharded runs the whole range; an existing file made
    from other data is replaced, not returned."""
    model, data = str(setup / "gpt2"), str(setup / "pairs")
    path = extract_sharded("text", model, data, features_dir=tmp_path, n=6, batch_size=4,
                           progress=False)
    rec = load_features(path)
    assert rec["feats"].shape[0] == 6 and rec["job"]["n"] == 6
    ref = load_features(extract_text(model, data, out=tmp_path / "ref.pt", n=6, batch_size=6,
                                     progress=False))
    torch.testing.assert_close(rec["feats"], ref["feats"], rtol=1e-5, atol=1e-5)
    # same path, different n: the stale file is replaced
    path2 = extract_sharded("text", model, data, features_dir=tmp_path, n=8, batch_size=4,
                            progress=False)
    assert path2 == path and load_features(path)["feats"].shape[0] == 8


def test_rows_argument(setup, tmp_path):
    model, data = str(setup / "gpt2"), str(setup / "pairs")
    part = extract_text(model, data, out=tmp_path / "p.pt", rows=(3, 7), batch_size=2,
                        progress=False)
    full = extract_text(model, data, out=tmp_path / "f.pt", batch_size=2, progress=False)
    a, b = load_features(part), load_features(full)
    torch.testing.assert_close(a["feats"], b["feats"][3:7], rtol=1e-5, atol=1e-5)
    assert a["job"]["rows"] == [3, 7] and a["n"] == 4
    for bad in [(5, 5), (-1, 3), (0, 13), (1,), "ab"]:
        with pytest.raises(ValueError, match="rows"):
            extract_text(model, data, out=tmp_path / "x.pt", rows=bad, progress=False)
    with pytest.raises(ValueError, match="rows: give out="):
        extract_text(model, data, rows=(0, 2), progress=False)


def test_sharded_images(tmp_path):
    """The vision path through the same merge (a tiny timm CNN saved to a file)."""
    timm = pytest.importorskip("timm")
    data_dir = tmp_path / "pairs"
    data_dir.mkdir()
    from PIL import Image

    with open(data_dir / "captions.jsonl", "w") as f:
        for i in range(5):
            Image.new("RGB", (16, 16), (40 * i, 10, 200 - 30 * i)).save(data_dir / f"{i}.png")
            f.write(json.dumps({"image": f"{i}.png", "caption": f"c{i}"}) + "\n")
    ds = load_pairs(str(data_dir))
    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False).eval()
    ckpt = tmp_path / "resnet10t.pth"
    torch.save(net.state_dict(), ckpt)
    name = f"resnet10t@{ckpt}"
    one = load_features(extract_images(name, ds, pool="avg", out=tmp_path / "one.pt",
                                       batch_size=5, progress=False))
    two = load_features(extract_sharded("vision", name, ds, pool="avg",
                                        out=tmp_path / "two.pt", batch_size=2, progress=False))
    a = one["feats"] if isinstance(one["feats"], list) else list(one["feats"].unbind(1))
    b = two["feats"] if isinstance(two["feats"], list) else list(two["feats"].unbind(1))
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert two["job"] == one["job"]


def test_checkpoint_that_does_not_fit_is_a_named_error(tmp_path):
    timm = pytest.importorskip("timm")
    from prh_fast.extract import load_vision_model

    net = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    ckpt = tmp_path / "r.pth"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(ValueError, match=r"checkpoint: .*r\.pth does not fit timm's 'resnet10t'"):
        load_vision_model(f"resnet10t@{ckpt}")
