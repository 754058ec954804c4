"""The extraction loop (batches, writing, resume, reuse) with stand-in encoders.

The encoders here follow the loaders' interface but compute features from a hash of the input,
so the loop is tested on its own; the loaders have their own tests with real (tiny) models.
"""
import math
import os

import pytest
import torch

from prh_fast.extract._runner import extract_images, extract_text, feature_path, safe_name
from prh_fast.extract._writer import PtWriter
from prh_fast.store import load_features


class Pairs:
    def __init__(self, n, name="toy/test"):
        self.name = name
        self.meta = {"ids": list(range(n)), "source": "toy"}
        self._caps = [f"a {'big ' * (i % 4)}shape number {i}" for i in range(n)]

    def __len__(self):
        return len(self._caps)

    def captions(self, idx):
        return [self._caps[i] for i in idx]

    def images(self, idx):
        return [("img", i) for i in idx]


def _vec(key, d, layer):
    g = torch.Generator().manual_seed(hash((key, layer)) % (2**31))
    return torch.randn(d, generator=g)


class Batch:
    def __init__(self, feats, nll_sum, n_tokens, n_bytes):
        self.feats, self.nll_sum, self.n_tokens, self.n_bytes = feats, nll_sum, n_tokens, n_bytes


class FakeText:
    name = "org/fake-lm"
    source = "memory"
    num_params = 1234
    dims = [8, 8, 8]
    num_layers = 3
    causal = True
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, fail_after=None):
        self.calls = 0
        self.seen = []
        self.fail_after = fail_after

    def encode(self, texts, pool="avg"):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.seen.extend(texts)
        feats = [torch.stack([_vec(t, d, l) for t in texts]) for l, d in enumerate(self.dims)]
        ntok = torch.tensor([len(t.split()) for t in texts], dtype=torch.int64)
        nll = ntok.to(torch.float64) * 1.5
        nbytes = torch.tensor([len(t.encode()) for t in texts], dtype=torch.int64)
        return Batch(feats, nll, ntok, nbytes)


class FakeVision:
    name = "fake_vit"
    source = "memory"
    num_params = 99
    dims = [4, 6]
    num_layers = 2
    pool = "cls"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self):
        self.calls = 0

    def encode(self, images):
        self.calls += 1
        return [torch.stack([_vec(im, d, l) for im in images]) for l, d in enumerate(self.dims)]


def test_text_file_layout_contents_and_loss(tmp_path):
    ds = Pairs(23)
    enc = FakeText()
    path = extract_text(enc, ds, pool="avg", features_dir=tmp_path, batch_size=5,
                        progress=False)
    assert path == feature_path(tmp_path, "toy/test", "org/fake-lm", "avg", False)
    assert path.endswith(os.path.join("toy", "test", "org_fake-lm_pool-avg_prompt-False.pt"))
    rec = load_features(path)
    assert rec["feats"].shape == (23, 3, 8)
    # partial last batch: 5 batches of 5,5,5,5,3
    assert enc.calls == 5
    # every (distinct) caption once, longest first (this encoder gives no token counts: bytes)
    assert enc.seen == sorted(ds.captions(range(23)), key=lambda c: -len(c.encode()))
    for i in (0, 7, 22):
        for layer in range(3):
            torch.testing.assert_close(rec["feats"][i, layer], _vec(ds._caps[i], 8, layer))
    ntok = sum(len(c.split()) for c in ds._caps)
    nbytes = sum(len(c.encode()) for c in ds._caps)
    assert rec["loss"] == pytest.approx(1.5)
    assert rec["bpb"] == pytest.approx(1.5 * ntok / math.log(2) / nbytes)
    assert rec["num_params"] == 1234 and rec["n"] == 23 and rec["dims"] == [8, 8, 8]
    assert rec["dataset"] == "toy/test" and rec["pool"] == "avg"
    assert not os.path.exists(path + ".partial")


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    ds = Pairs(31)
    ref = extract_text(FakeText(), ds, features_dir=tmp_path / "a", batch_size=4,
                       progress=False)
    broken = FakeText(fail_after=3)
    with pytest.raises(KeyboardInterrupt):
        extract_text(broken, ds, features_dir=tmp_path / "b", batch_size=4, progress=False)
    partial = feature_path(tmp_path / "b", "toy/test", "org/fake-lm", "avg") + ".partial"
    assert len([f for f in os.listdir(partial) if f.startswith("part-")]) == 3
    again = FakeText()
    path = extract_text(again, ds, features_dir=tmp_path / "b", batch_size=4, progress=False)
    longest_first = sorted(ds.captions(range(31)), key=lambda c: -len(c.encode()))
    assert again.seen == longest_first[12:]          # only the rows not yet written
    a, b = load_features(ref), load_features(path)
    assert torch.equal(a["feats"], b["feats"])
    assert a["loss"] == b["loss"] and a["bpb"] == b["bpb"]


def test_finished_file_is_reused_and_force_recomputes(tmp_path):
    ds = Pairs(10)
    extract_text(FakeText(), ds, features_dir=tmp_path, batch_size=4, progress=False)
    enc = FakeText()
    extract_text(enc, ds, features_dir=tmp_path, batch_size=4, progress=False)
    assert enc.calls == 0
    extract_text(enc, ds, features_dir=tmp_path, batch_size=4, progress=False, force=True)
    assert enc.calls == 3
    # different settings (fewer samples) are not mistaken for the finished file
    enc2 = FakeText()
    extract_text(enc2, ds, features_dir=tmp_path, n=6, batch_size=4, progress=False)
    assert enc2.calls == 2


def test_unfinished_job_with_other_settings_is_refused(tmp_path):
    ds = Pairs(12)
    with pytest.raises(KeyboardInterrupt):
        extract_text(FakeText(fail_after=1), ds, features_dir=tmp_path, batch_size=4,
                     progress=False)
    with pytest.raises(ValueError, match=r"differs in: .*n"):
        extract_text(FakeText(), ds, features_dir=tmp_path, n=8, batch_size=4, progress=False)
    path = extract_text(FakeText(), ds, features_dir=tmp_path, n=8, batch_size=4,
                        progress=False, force=True)
    assert load_features(path)["feats"].shape[0] == 8


def test_images_and_mixed_widths(tmp_path):
    ds = Pairs(9, name="toy")
    enc = FakeVision()
    path = extract_images(enc, ds, pool="cls", features_dir=tmp_path, batch_size=4,
                          progress=False, storage_dtype="float16")
    rec = load_features(path)
    assert isinstance(rec["feats"], list) and [t.shape for t in rec["feats"]] == [(9, 4), (9, 6)]
    assert rec["feats"][0].dtype == torch.float16
    torch.testing.assert_close(rec["feats"][1][5], _vec(("img", 5), 6, 1).half())
    assert "loss" not in rec and enc.calls == 3


@pytest.mark.parametrize("kw, match", [
    ({"batch_size": 0}, "batch_size"), ({"batch_size": 2.5}, "batch_size"),
    ({"n": 0}, "n:"), ({"n": 100}, "only 5"), ({"pool": "max"}, "pool"),
    ({"storage_dtype": "int8"}, "storage_dtype"),
])
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        extract_text(FakeText(), Pairs(5), features_dir=tmp_path, progress=False, **kw)


def test_bad_data_type(tmp_path):
    with pytest.raises(TypeError, match="data"):
        extract_text(FakeText(), [1, 2, 3], features_dir=tmp_path, progress=False)


def test_writer_drops_gap_and_rejects_bad_shapes(tmp_path):
    w = PtWriter(tmp_path / "f.pt", fingerprint={"a": 1})
    w.append([torch.ones(2, 3)])
    w.append([torch.ones(3, 3)])
    os.remove(w._parts[0][2])            # lose the first part: the second no longer counts
    w.close()                            # (one writer at a time: the first lets go)
    w2 = PtWriter(tmp_path / "f.pt", fingerprint={"a": 1})
    assert w2.rows_done == 0
    with pytest.raises(ValueError, match=r"layers\[1\]"):
        w2.append([torch.ones(2, 3), torch.ones(3, 3)])
    with pytest.raises(ValueError, match="extras"):
        w2.append([torch.ones(2, 3)], {"x": torch.ones(3)})
    with pytest.raises(ValueError, match="nothing was extracted"):
        w2.finish({})


def test_safe_name():
    assert safe_name("openlm-research/open_llama_3b") == "openlm-research_open_llama_3b"
    assert safe_name("../x y") == "_x_y"


def test_failure_before_any_row_leaves_no_partial_extraction(tmp_path):
    out = tmp_path / "f.pt"
    with pytest.raises(RuntimeError, match="model failed"):
        with PtWriter(out, fingerprint={"a": 1}):
            raise RuntimeError("model failed to load")
    assert not os.path.exists(str(out) + ".partial") and not out.exists()
    # once a row is written, a failure keeps the parts for a resume
    with pytest.raises(RuntimeError):
        with PtWriter(out, fingerprint={"a": 1}) as w:
            w.append([torch.ones(2, 3)])
            raise RuntimeError("interrupted")
    assert PtWriter(out, fingerprint={"a": 1}).rows_done == 2
