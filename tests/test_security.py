"""Nothing prh_fast reads from disk may run code or lead it outside the folder it was given.

Real files, real (hostile) contents: a pickled ``.npy`` whose unpickling would create a marker
file, store indexes naming paths outside the store (checked also under ``python -O``), shards
swapped or taken from another store, symlinks leaving the folder, captions naming images
elsewhere on the machine.
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import prh_fast
from prh_fast.grid import GridResult, align_models
from prh_fast.store import StoreError, StoreWriter, open_store

ROOT = pathlib.Path(__file__).resolve().parent.parent


class _Payload:
    """Unpickling this creates ``path``: proof that loading the file ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _hostile_npy(path, marker):
    arr = np.empty((), dtype=object)
    arr[()] = _Payload(marker)
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=True)


def _feats(seed, n=40, layers=2, d=8):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 4, generator=g)
    return torch.stack([z @ torch.randn(4, d, generator=g) + 0.3 * torch.randn(n, d, generator=g)
                        for _ in range(layers)], dim=1)


# --------------------------------------------------------------------------------------------
# grid outputs: resume from JSON only; the reference's pickled .npy only with trust=True
# --------------------------------------------------------------------------------------------
def test_hostile_npy_in_output_dir_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    out.mkdir()
    _hostile_npy(out / "mutual_knn_k5.npy", marker)
    models = {"a": _feats(0)}, {"b": _feats(1)}
    with pytest.raises(ValueError, match=r"mutual_knn_k5\.npy: holds a pickled.*trust=True"):
        align_models(*models, "mutual_knn", topk=5, progress=False, output_dir=out)
    with pytest.raises(ValueError, match="pickled"):
        GridResult.load(out, "mutual_knn", 5)
    assert not marker.exists()
    # recomputing replaces it, and the run after resumes from the JSON (no pickle involved)
    res = align_models(*models, "mutual_knn", topk=5, progress=False, output_dir=out,
                       force_remake=True)
    again = align_models(*models, "mutual_knn", topk=5, progress=False, output_dir=out)
    assert again.options["resumed_from"].endswith(".json")
    assert again.scores.tolist() == res.scores.tolist()
    assert not marker.exists()


def test_hostile_npy_through_the_cli(tmp_path):
    marker = tmp_path / "pwned"
    feats = tmp_path / "feats"
    feats.mkdir()
    for i, name in enumerate(["x", "y"]):
        prh_fast.save_features(feats / f"{name}.pt", _feats(i), num_params=1)
    out = tmp_path / "out"
    out.mkdir()
    _hostile_npy(out / "cka.npy", marker)
    r = subprocess.run([sys.executable, "-m", "prh_fast.cli", "align", "--x", str(feats / "x.pt"),
                        "--y", str(feats / "y.pt"), "--metric", "cka", "--output_dir", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "pickled" in r.stderr, r.stderr
    assert not marker.exists()


def test_trust_reads_a_reference_npy_written_by_us(tmp_path):
    models = {"a": _feats(0)}, {"b": _feats(1), "c": _feats(2)}
    res = align_models(*models, "cka", progress=False, output_dir=tmp_path)
    (tmp_path / "cka.json").unlink()
    back = align_models(*models, "cka", progress=False, output_dir=tmp_path, trust=True)
    assert back.options["resumed_from"].endswith(".npy")
    np.testing.assert_array_equal(back.scores, res.scores)
    assert (tmp_path / "cka.json").exists()  # the missing file is written again


@pytest.mark.parametrize("text", ["{", '{"metric": "cka"}', "[1, 2]",
                                  '{"metric": 3, "x_names": 1}'])
def test_malformed_saved_json_is_a_named_error(tmp_path, text):
    (tmp_path / "cka.json").write_text(text)
    with pytest.raises(ValueError, match=r"cka\.json: unreadable or malformed"):
        GridResult.load(tmp_path, "cka")


# --------------------------------------------------------------------------------------------
# .pt files: weights_only, and trust=True says what it does
# --------------------------------------------------------------------------------------------
def test_pt_with_code_is_refused_and_trust_explains_missing_classes(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "f.pt"
    torch.save({"feats": _feats(0), "x": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="safe loader refuses.*trust=True"):
        prh_fast.load_features(path)
    assert not marker.exists()
    # a class that cannot be imported here: not reported as "corrupt or truncated"
    script = ("import torch\nclass Gone: pass\n"
              f"torch.save({{'feats': torch.zeros(3, 1, 2), 'g': Gone()}}, {str(path)!r})\n")
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    with pytest.raises(ValueError, match="trust=True: the file holds objects of a class that "
                                         "cannot be imported") as info:
        prh_fast.load_features(path, trust=True)
    assert "corrupt" not in str(info.value)


# --------------------------------------------------------------------------------------------
# store indexes: explicit checks (also under python -O), paths confined to the folder
# --------------------------------------------------------------------------------------------
def _store(path, seed=0, n=30, shard_rows=10):
    feats = _feats(seed, n=n)
    w = StoreWriter(path, dims=[8, 8], shard_rows=shard_rows)
    w.append(list(feats.unbind(1)))
    w.finish({"mask": torch.ones(n), "num_params": 3})
    return feats


def _edit_index(path, fn):
    ipath = os.path.join(path, "prh_store.json")
    with open(ipath) as f:
        idx = json.load(f)
    fn(idx)
    with open(ipath, "w") as f:
        json.dump(idx, f)


def _set(*keys, value):
    def fn(idx):
        d = idx
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return fn


@pytest.mark.parametrize("edit, field", [
    (_set("shards", 0, "file", value="../other/shard-000000.safetensors"), "file"),
    (_set("shards", 0, "file", value="/etc/passwd"), "file"),
    (_set("extras", "file", value="../other/extras.safetensors"), "extras"),
    (_set("extras", "file", value="/etc/passwd"), "extras"),
    (_set("n", value="30"), "'n'"),
    (_set("n", value=31), "'n'"),
    (_set("dims", value="88"), "dims"),
    (_set("dims", value=[8, 0]), "dims"),
    (_set("num_layers", value=True), "num_layers"),
    (_set("dtype", value="int8"), "dtype"),
    (_set("layout", value=3), "layout"),
    (_set("complete", value="yes"), "complete"),
    (_set("shards", value={"a": 1}), "shards"),
    (_set("shards", 1, value=[1]), r"shards'\[1\]"),
    (_set("shards", 1, "rows", value="10"), "rows"),
    (_set("shards", 1, "start", value=11), "start"),
    (_set("shards", 2, "file", value="shard-000000.safetensors"), "file"),
    (_set("shards", 0, "bytes", value=None), "bytes"),
    (_set("meta", value=[1]), "meta"),
    (_set("version", value="1"), "version"),
    (_set("store_id", value=5), "store_id"),
])
def test_bad_index_fields_are_store_errors(tmp_path, edit, field):
    path = tmp_path / "s"
    _store(path)
    _edit_index(path, edit)
    with pytest.raises(StoreError, match=field):
        open_store(path).verify()


def test_index_checks_hold_under_python_O(tmp_path):
    path = tmp_path / "s"
    _store(path)
    other = tmp_path / "other"
    other.mkdir()
    _edit_index(path, _set("shards", 0, "file", value="../other/shard-000000.safetensors"))
    code = ("import sys\nfrom prh_fast.store import open_store, StoreError\n"
            f"try:\n    open_store({str(path)!r})\nexcept StoreError as e:\n"
            "    print('refused:', e); sys.exit(0)\nsys.exit(3)\n")
    r = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "refused:" in r.stdout, r.stdout + r.stderr


def test_no_validation_asserts_in_the_package():
    found = []
    for py in (ROOT / "prh_fast").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(), str(py))):
            if isinstance(node, ast.Assert):
                found.append(f"{py.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"assert statements vanish under python -O: {found}"


def test_symlinks_leaving_the_store_are_refused(tmp_path):
    path = tmp_path / "s"
    _store(path)
    outside = tmp_path / "outside.safetensors"
    os.replace(path / "shard-000001.safetensors", outside)
    os.symlink(outside, path / "shard-000001.safetensors")
    with pytest.raises(StoreError, match="shard-000001.*outside the store"):
        open_store(path).layer(0)
    # the extras file too
    path2 = tmp_path / "s2"
    _store(path2)
    os.replace(path2 / "extras.safetensors", tmp_path / "extras.safetensors")
    os.symlink(tmp_path / "extras.safetensors", path2 / "extras.safetensors")
    with pytest.raises(StoreError, match="extras.*outside the store"):
        open_store(path2).extras()
    # and a cache folder that leads elsewhere is never written into
    path3 = tmp_path / "s3"
    _store(path3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, path3 / "cache")
    with pytest.raises(StoreError, match="cache folder leads outside"):
        open_store(path3).cache_save("x.safetensors", {"a": torch.zeros(2)}, {})
    assert not os.listdir(elsewhere)


def test_swapped_or_foreign_shards_are_named(tmp_path):
    path = tmp_path / "s"
    feats = _store(path)
    np.testing.assert_array_equal(open_store(path).layer(1).numpy(), feats[:, 1].numpy())
    a, b = path / "shard-000000.safetensors", path / "shard-000001.safetensors"
    assert a.stat().st_size == b.stat().st_size
    tmp = path / "swap"
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    with pytest.raises(StoreError, match=r"shard-000000\.safetensors: not the shard the index "
                                         r"names"):
        open_store(path).layer(0)
    os.replace(a, tmp)
    os.replace(b, a)
    os.replace(tmp, b)
    assert open_store(path).layer(0).shape == (30, 8)
    # the same shard of another store with the same shape: same size, same rows
    other = tmp_path / "o"
    _store(other, seed=5)
    os.replace(other / "shard-000002.safetensors", path / "shard-000002.safetensors")
    with pytest.raises(StoreError, match="shard-000002.*store_id"):
        open_store(path).layer(0, slice(20, 30))
    with pytest.raises(StoreError, match="shard-000002"):
        open_store(path, mmap=True).layer(1, slice(25, 30))


def test_captions_cannot_name_images_outside_their_folder(tmp_path):
    pytest.importorskip("PIL")
    from PIL import Image

    from prh_fast.extract import load_pairs

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (4, 4)).save(data / "a.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(secret)
    for bad in [str(secret), "../secret.png"]:
        (data / "captions.jsonl").write_text(
            json.dumps({"image": "a.png", "caption": "ok"}) + "\n"
            + json.dumps({"image": bad, "caption": "sneaky"}) + "\n")
        with pytest.raises(ValueError, match="outside the folder"):
            load_pairs(str(data))
    os.symlink(secret, data / "link.png")
    (data / "captions.jsonl").write_text(json.dumps({"image": "link.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="outside the folder"):
        load_pairs(str(data))
    (data / "captions.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    assert len(load_pairs(str(data))) == 1


def test_distributed_parts_with_wrong_types_are_recomputed(tmp_path):
    from prh_fast.distributed._grid import _load_part

    for d in [{"fingerprint": "f", "mat": "x", "best": 1, "pair": None},
              {"fingerprint": "f", "mat": [[1.0]], "best": "n", "pair": None},
              {"fingerprint": "f", "mat": [[1.0]], "best": 1.0, "pair": 3},
              [1, 2]]:
        p = tmp_path / "part.json"
        p.write_text(json.dumps(d))
        assert _load_part(str(p), "f") is None
    p.write_text(json.dumps({"fingerprint": "f", "mat": [[1.0]], "best": 1.0, "pair": [0, 0]}))
    assert _load_part(str(p), "f")[1] == 1.0


def test_payload_really_runs_code_when_unpickled(tmp_path):
    # guards the tests above: the payload is live, so "marker absent" means "not unpickled"
    marker = tmp_path / "m"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()
