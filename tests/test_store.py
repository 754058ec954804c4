"""Reference feature files: round trips, atomic writes, and errors that name the file."""
from __future__ import annotations

import fractions
import os

import pytest
import torch

from prh_fast.store import check_same_samples, feature_info, load_features, save_features


def _feats(n=6, layers=3, d=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, layers, d, generator=g).to(dtype)


def _listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_tensor(tmp_path, dtype):
    x = _feats(dtype=dtype)
    mask = torch.ones(6, 9, dtype=torch.bool)
    path = tmp_path / "sub" / "dir" / "model.pt"  # parents are created
    save_features(path, x, num_params=1234, mask=mask, loss=torch.tensor(2.5), bpb=0.75)
    rec = load_features(path)
    assert set(rec) == {"feats", "num_params", "mask", "loss", "bpb"}
    assert rec["feats"].dtype == dtype and torch.equal(rec["feats"], x)
    assert rec["num_params"] == 1234 and rec["bpb"] == 0.75
    assert torch.equal(rec["mask"], mask) and float(rec["loss"]) == 2.5
    assert _listing(path.parent) == ["model.pt"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_list(tmp_path, dtype):
    layers = [torch.randn(7, d).to(dtype) for d in (3, 8, 1)]
    path = tmp_path / "m.pt"
    save_features(path, layers, num_params=5)
    rec = load_features(str(path))
    assert isinstance(rec["feats"], list) and len(rec["feats"]) == 3
    for got, want in zip(rec["feats"], layers):
        assert got.dtype == dtype and torch.equal(got, want)
    info = feature_info(path)
    assert info == {"n": 7, "num_layers": 3, "dims": [3, 8, 1], "dtype": str(dtype),
                    "layout": "list", "keys": ["feats", "num_params"], "num_params": 5}


def test_reads_files_written_by_plain_torch_save(tmp_path):
    """Files exactly as the reference writes them, zip and legacy formats."""
    x = _feats(n=4, layers=2, d=3)
    for legacy in (False, True):
        path = tmp_path / f"ref_{legacy}.pt"
        torch.save({"feats": x, "num_params": 10}, path,
                   _use_new_zipfile_serialization=not legacy)
        assert torch.equal(load_features(path)["feats"], x)
        info = feature_info(path)
        assert (info["n"], info["num_layers"], info["dims"]) == (4, 2, [3, 3])
        assert info["layout"] == "tensor" and info["dtype"] == "torch.float32"


def test_view_is_saved_compact(tmp_path):
    big = torch.randn(50, 4, 1000)
    view = big[:8, :, :3]
    path = tmp_path / "v.pt"
    save_features(path, view)
    assert os.path.getsize(path) < 20_000  # not the whole 800 kB storage
    assert torch.equal(load_features(path)["feats"], view)


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_features(path, _feats(seed=1), num_params=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a record")
        f.flush()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_features(path, _feats(seed=2), num_params=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["model.pt"]  # no temporary file left behind
    assert load_features(path)["num_params"] == 1


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_features(path)


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pt"
    save_features(path, _feats(n=50, d=40), num_params=3)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.pt: corrupt or truncated"):
        load_features(path)
    with pytest.raises(ValueError, match="cut.pt: corrupt or truncated"):
        feature_info(path)


@pytest.mark.parametrize("content", [b"", b"x" * 100, bytes(range(256)) * 4, b"PK\x03\x04junk"])
def test_garbage_file(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="garbage.pt: corrupt or truncated"):
        load_features(path)
    with pytest.raises(ValueError, match="garbage.pt: corrupt or truncated"):
        load_features(path, trust=True)


def test_unsupported_type_needs_trust(tmp_path):
    path = tmp_path / "odd.pt"
    x = _feats()
    torch.save({"feats": x, "num_params": 1, "note": fractions.Fraction(1, 3)}, path)
    with pytest.raises(ValueError, match="odd.pt: .*trust=True"):
        load_features(path)
    rec = load_features(path, trust=True)
    assert rec["note"] == fractions.Fraction(1, 3) and torch.equal(rec["feats"], x)


@pytest.mark.parametrize("record, message", [
    ([1, 2, 3], "expected a dict"),
    ({"num_params": 3}, "no 'feats' key"),
    ({"feats": torch.ones(4, 5)}, "2-D tensor"),
    ({"feats": torch.ones(4, 2, 5, 1)}, "4-D tensor"),
    ({"feats": torch.ones(4, 2, 5, dtype=torch.int32)}, "floating point"),
    ({"feats": torch.ones(4, 0, 5)}, "no layers"),
    ({"feats": [torch.ones(4, 5), torch.ones(3, 5)]}, r"'feats'\[1\] has 3 samples"),
    ({"feats": [torch.ones(4, 5, 2)]}, "must be a \\[N, D\\] tensor"),
    ({"feats": [torch.ones(4, 5, dtype=torch.int64)]}, "floating point"),
    ({"feats": []}, "empty list"),
    ({"feats": "abc"}, "got str"),
])
def test_bad_records(tmp_path, record, message):
    path = tmp_path / "bad.pt"
    torch.save(record, path)
    with pytest.raises(ValueError, match=f"bad.pt: .*{message}"):
        load_features(path)


def test_save_rejects_bad_feats(tmp_path):
    path = tmp_path / "x.pt"
    with pytest.raises(ValueError, match="x.pt"):
        save_features(path, torch.ones(3, 4))
    with pytest.raises(ValueError, match="x.pt"):
        save_features(path, [torch.ones(3, 4), torch.ones(2, 4)])
    assert _listing(tmp_path) == []


def test_check_same_samples(tmp_path):
    paths = []
    for i, n in enumerate((8, 8, 8)):
        paths.append(tmp_path / f"m{i}.pt")
        save_features(paths[-1], _feats(n=n, layers=i + 1, d=3 + i))
    rec = load_features(paths[0])
    assert check_same_samples(paths) == 8
    assert check_same_samples([rec, paths[1], str(paths[2])]) == 8

    odd = tmp_path / "odd_one.pt"
    save_features(odd, [torch.ones(9, 3)])
    with pytest.raises(ValueError, match="odd_one.pt: has N = 9 .*m0.pt has N = 8"):
        check_same_samples([paths[0], paths[1], odd])
    with pytest.raises(ValueError, match=r"paths_or_dicts\[1\]: has N = 2"):
        check_same_samples([rec, {"feats": torch.ones(2, 1, 3)}])
    with pytest.raises(ValueError, match="at least one"):
        check_same_samples([])
    with pytest.raises(FileNotFoundError, match="gone.pt"):
        check_same_samples([paths[0], tmp_path / "gone.pt"])
