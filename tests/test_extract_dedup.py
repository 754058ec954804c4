"""Each distinct input extracted once, longest first, rows scattered back to every sample.

The oracle is the plain loop: every sample encoded in sample order, in fixed-size batches.
Tiny random models (a GPT-2-style causal LM and a BERT-style encoder, saved and loaded through
the real loader) keep the tests fast; the packaged MiniLM and SmolLM2 are checked under the
``models`` marker.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from prh_fast.extract import _runner
from prh_fast.extract._runner import extract_images, extract_text, feature_path
from prh_fast.extract._writer import PtWriter
from prh_fast.store import load_features

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from prh_fast.extract._text import load_text_model  # noqa: E402

CORPUS = ["a red circle in the top left corner", "a small blue square at the bottom",
          "a large green triangle near the centre", "the shape is brown and it is a circle",
          "what colour is the shape? it is gray", "un café au lait, s'il vous plaît"]
DISTINCT = ["red", "a blue square", "a large green triangle near the centre of the image",
            "gray", "the shape is brown and it is a circle", "café ☕ naïve", "a red circle",
            "a small blue square at the bottom of the image, near the left edge"]


class Pairs:
    """Captions with repeats in a scrambled order; image ids that repeat too."""

    def __init__(self, n=37, seed=0, name="toy/dups"):
        g = torch.Generator().manual_seed(seed)
        pick = torch.randint(0, len(DISTINCT), (n,), generator=g).tolist()
        self._caps = [DISTINCT[j] for j in pick]
        self.name = name
        self.meta = {"ids": [f"img{j % 5}" for j in pick], "source": "toy"}

    def __len__(self):
        return len(self._caps)

    def captions(self, idx):
        return [self._caps[i] for i in idx]

    def images(self, idx):
        return [self.meta["ids"][i] for i in idx]


def _tokenizer(kind):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "[CLS]", "[SEP]", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "gpt2":   # no BOS, no pad token (EOS stands in)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")),
                                                 ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> folder of a tiny saved model and tokenizer."""
    root = tmp_path_factory.mktemp("tiny_dedup")
    out = {}
    for kind in ("gpt2", "bert"):
        tok = _tokenizer(kind)
        torch.manual_seed(7)
        if kind == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                initializer_range=0.2, bos_token_id=1, eos_token_id=1))
        else:
            model = transformers.BertModel(transformers.BertConfig(
                vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=128, initializer_range=0.2))
        model.eval().save_pretrained(root / kind)
        tok.save_pretrained(root / kind)
        out[kind] = str(root / kind)
    return out


@pytest.fixture(scope="module")
def encoders(saved):
    return {k: load_text_model(p) for k, p in saved.items()}


def _plain(enc, captions, pool, batch_size):
    """The oracle: every sample encoded, in sample order, ``batch_size`` at a time."""
    parts = [enc.encode(captions[i:i + batch_size], pool=pool)
             for i in range(0, len(captions), batch_size)]
    feats = torch.stack([torch.cat([p.feats[layer] for p in parts])
                         for layer in range(len(parts[0].feats))], dim=1)

    def cat(name):
        if getattr(parts[0], name) is None:
            return None
        return torch.cat([getattr(p, name) for p in parts])

    return feats, cat("nll_sum"), cat("n_tokens"), cat("n_bytes")


class Recording:
    """An encoder that records the batches it is given."""

    def __init__(self, enc):
        self.enc, self.batches = enc, []
        for attr in ("name", "source", "num_params", "dims", "num_layers", "causal", "device",
                     "dtype"):
            setattr(self, attr, getattr(enc, attr))

    def token_lengths(self, texts, pool="avg"):
        return self.enc.token_lengths(texts, pool=pool)

    def encode(self, texts, pool="avg"):
        self.batches.append(list(texts))
        return self.enc.encode(texts, pool=pool)


def _assert_duplicates_identical(feats, captions):
    first = {}
    for i, c in enumerate(captions):
        j = first.setdefault(c, i)
        assert torch.equal(feats[i], feats[j]), (i, j, c)


@pytest.mark.parametrize("kind,pool", [("gpt2", "avg"), ("gpt2", "last"), ("gpt2", "prompt"),
                                       ("bert", "avg")])
def test_dedup_matches_plain_loop(tmp_path, encoders, kind, pool):
    enc = encoders[kind]
    ds = Pairs(37, seed=1)
    caps = ds.captions(range(len(ds)))
    rec_enc = Recording(enc)
    path = extract_text(rec_enc, ds, pool=pool, features_dir=tmp_path, batch_size=3,
                        progress=False)
    rec = load_features(path)
    feats, nll, ntok, nbytes = _plain(enc, caps, pool, 3)
    assert rec["feats"].shape == feats.shape
    # Same features as encoding every sample (float32 rounding of other batch-mates aside).
    torch.testing.assert_close(rec["feats"], feats, rtol=1e-5, atol=1e-5)
    _assert_duplicates_identical(rec["feats"], caps)
    # Each distinct caption was encoded exactly once.
    seen = [t for b in rec_enc.batches for t in b]
    assert sorted(seen) == sorted(set(caps)) and rec["n_distinct"] == len(set(caps))
    assert torch.equal(rec["sample_n_bytes"], nbytes)
    if kind == "gpt2":
        assert torch.equal(rec["sample_n_tokens"], ntok)
        torch.testing.assert_close(rec["sample_nll_sum"], nll, rtol=1e-5, atol=1e-5)
        total = float(nll.sum())
        assert rec["loss"] == pytest.approx(total / int(ntok.sum()), rel=1e-6)
        assert rec["bpb"] == pytest.approx(total / math.log(2) / int(nbytes.sum()), rel=1e-6)
    else:
        assert "loss" not in rec and "sample_nll_sum" not in rec


def test_batches_longest_first_and_order_restored(tmp_path, encoders):
    enc = encoders["gpt2"]
    ds = Pairs(41, seed=2)
    caps = ds.captions(range(len(ds)))
    rec_enc = Recording(enc)
    path = extract_text(rec_enc, ds, pool="avg", features_dir=tmp_path, batch_size=2,
                        progress=False)
    lengths = [n for b in rec_enc.batches for n in enc.token_lengths(b)]
    assert lengths == sorted(lengths, reverse=True)
    feats = load_features(path)["feats"]
    # Row i holds caption i's features: compare with each caption encoded alone.
    alone = {c: enc.encode([c], pool="avg") for c in set(caps)}
    for i, c in enumerate(caps):
        torch.testing.assert_close(feats[i], torch.cat(alone[c].feats), rtol=1e-5, atol=1e-5)


def test_avg_pool_sorted_equals_unsorted(encoders):
    enc = encoders["bert"]
    texts = list(DISTINCT)
    order = sorted(range(len(texts)), key=lambda j: -enc.token_lengths([texts[j]])[0])
    unsorted = enc.encode(texts, pool="avg").feats
    by_length = enc.encode([texts[j] for j in order], pool="avg").feats
    back = torch.empty(len(order), dtype=torch.int64)
    back[torch.tensor(order)] = torch.arange(len(order))
    for u, s in zip(unsorted, by_length):
        torch.testing.assert_close(s[back], u, rtol=1e-5, atol=1e-5)


class FakeVision:
    name = "fake_cnn"
    source = "memory"
    num_params = 5
    dims = [3, 4]
    num_layers = 2
    pool = "avg"
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self):
        self.seen = []

    def encode(self, images):
        self.seen.extend(images)
        rows = [torch.tensor([float(int(im[3:]) + 1)] * 4) * (1 + torch.arange(4.0))
                for im in images]
        x = torch.stack(rows)
        return [x[:, :3], x]


def test_images_deduplicated_by_id(tmp_path):
    ds = Pairs(29, seed=3)
    enc = FakeVision()
    path = extract_images(enc, ds, pool="avg", features_dir=tmp_path, batch_size=2,
                          progress=False)
    rec = load_features(path)
    ids = ds.meta["ids"]
    assert sorted(enc.seen) == sorted(set(ids)) and rec["n_distinct"] == len(set(ids))
    layers = rec["feats"]   # widths differ: one [N, D_l] tensor per layer
    for i, im in enumerate(ids):
        want = FakeVision().encode([im])
        assert torch.equal(layers[0][i], want[0][0]) and torch.equal(layers[1][i], want[1][0])


def test_resume_and_old_partial(tmp_path, encoders):
    enc = encoders["gpt2"]
    ds = Pairs(33, seed=4)
    ref = load_features(extract_text(enc, ds, features_dir=tmp_path / "a", batch_size=2,
                                     progress=False))

    class Failing(Recording):
        def encode(self, texts, pool="avg"):
            if len(self.batches) == 2:
                raise KeyboardInterrupt("simulated interruption")
            return super().encode(texts, pool=pool)

    with pytest.raises(KeyboardInterrupt):
        extract_text(Failing(enc), ds, features_dir=tmp_path / "b", batch_size=2,
                     progress=False)
    path = feature_path(tmp_path / "b", ds.name, enc.name, "avg")
    with open(os.path.join(path + ".partial", "job.json")) as fh:
        assert json.load(fh)["layout"]["rows"] == len(set(ds.captions(range(33))))
    again = Recording(enc)
    got = load_features(extract_text(again, ds, features_dir=tmp_path / "b", batch_size=2,
                                     progress=False))
    assert sum(len(b) for b in again.batches) == len(set(ds.captions(range(33)))) - 4
    torch.testing.assert_close(got["feats"], ref["feats"], rtol=1e-5, atol=1e-5)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)

    # Parts written in sample order, without a layout, are not resumed: started over.
    fp = _runner._fingerprint("text", enc.name, "avg", ds, 33, "float32")
    path_c = feature_path(tmp_path / "c", ds.name, enc.name, "avg")
    with PtWriter(path_c, fingerprint=fp) as w:
        w.append([torch.full((4, d), 9.0) for d in enc.dims],
                 {"n_bytes": torch.zeros(4, dtype=torch.int64)})
    got = load_features(extract_text(enc, ds, features_dir=tmp_path / "c", batch_size=2,
                                     progress=False))
    torch.testing.assert_close(got["feats"], ref["feats"], rtol=1e-5, atol=1e-5)


def test_finished_plain_file_is_reused(tmp_path, encoders):
    # A file written by the plain loop has the same job fingerprint: it is reused as is.
    enc = encoders["bert"]
    ds = Pairs(12, seed=5)
    fp = _runner._fingerprint("text", enc.name, "avg", ds, 12, "float32")
    path = feature_path(tmp_path, ds.name, enc.name, "avg")
    feats, _, _, nbytes = _plain(enc, ds.captions(range(12)), "avg", 5)
    with PtWriter(path, fingerprint=fp) as w:
        w.append(list(feats.unbind(1)), {"n_bytes": nbytes})
        w.finish({"job": fp})
    calls = Recording(enc)
    assert extract_text(calls, ds, features_dir=tmp_path, progress=False) == path
    assert calls.batches == []


def test_progress_counts_distinct(tmp_path, encoders, monkeypatch):
    seen = {}
    real = _runner._progress

    def spy(total, initial, desc, enabled, unit="sample"):
        seen.update(total=total, desc=desc, unit=unit)
        return real(total, initial, desc, False, unit)

    monkeypatch.setattr(_runner, "_progress", spy)
    ds = Pairs(30, seed=6)
    n_distinct = len(set(ds.captions(range(30))))
    extract_text(encoders["bert"], ds, features_dir=tmp_path, progress=True)
    assert seen["total"] == n_distinct and seen["unit"] == "caption"
    assert f"{n_distinct} distinct captions of 30" in seen["desc"]


def test_loaded_model_kept_between_calls(saved, monkeypatch, tmp_path):
    from prh_fast.extract import _text

    calls = []
    real = _text.load_text_model

    def counting(name, **kw):
        calls.append(name)
        return real(name, **kw)

    monkeypatch.setattr(_text, "load_text_model", counting)
    _runner.release_cached_model()
    for seed in (7, 8):
        extract_text(saved["bert"], Pairs(10, seed=seed, name=f"toy/s{seed}"),
                     features_dir=tmp_path, progress=False)
    assert calls == [saved["bert"]]
    extract_text(saved["gpt2"], Pairs(10, seed=9), features_dir=tmp_path, progress=False)
    assert calls == [saved["bert"], saved["gpt2"]]
    assert len(_runner._MODEL_CACHE) == 1
    assert _runner.release_cached_model() and not _runner._MODEL_CACHE


@pytest.mark.models
@pytest.mark.slow
@pytest.mark.parametrize("alias", ["all-minilm-l6-v2", "smollm2-135m"])
def test_packaged_models_dedup(tmp_path_factory, alias, monkeypatch):
    from prh_fast.extract import _text

    mod = _text.PACKAGED_TEXT_MODELS[alias][1]
    if _text._package_dir(mod) is None:
        pytest.skip(f"packaged model {alias} not installed")
    if alias.startswith("smollm2"):
        pytest.importorskip("gguf")
    if not os.environ.get("PRH_FAST_CACHE"):
        monkeypatch.setenv("PRH_FAST_CACHE", str(tmp_path_factory.mktemp("prh_fast_cache")))
    enc = load_text_model(alias)
    ds = Pairs(24, seed=10)
    caps = ds.captions(range(24))
    rec = load_features(extract_text(enc, ds, features_dir=tmp_path_factory.mktemp("f"),
                                     batch_size=8, progress=False))
    feats, nll, ntok, _ = _plain(enc, caps, "avg", 8)
    torch.testing.assert_close(rec["feats"], feats, rtol=1e-4, atol=1e-4)
    _assert_duplicates_identical(rec["feats"], caps)
    if nll is not None:
        assert torch.equal(rec["sample_n_tokens"], ntok)
        torch.testing.assert_close(rec["sample_nll_sum"], nll, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("crop_pct,size", [(0.875, 224), (1.0, 37)])
def test_batched_image_preprocessing_is_exact(crop_pct, size):
    pytest.importorskip("timm")
    import numpy as np
    from PIL import Image
    from timm.data import create_transform

    from prh_fast.extract._vision import _batched_preprocess

    tf = create_transform(input_size=(3, size, size), interpolation="bicubic",
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          crop_pct=crop_pct, is_training=False)
    g = np.random.default_rng(0)
    images = [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in ((64, 64), (31, 77), (50, 20))]
    run = _batched_preprocess(tf)
    assert torch.equal(run(images), torch.stack([tf(im) for im in images]))
    # A pipeline without a final Normalize runs image by image, unchanged.
    from torchvision import transforms as T

    plain = T.Compose([T.Resize((size, size)), T.ToTensor()])
    assert torch.equal(_batched_preprocess(plain)(images), torch.stack([plain(im)
                                                                        for im in images]))


def test_cnn_on_cpu_chunked_channels_last_matches_plain():
    timm = pytest.importorskip("timm")
    import numpy as np
    from PIL import Image

    from prh_fast.extract._vision import _CPU_CNN_CHUNK, _timm_encoder

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3,
                              pretrained_cfg_overlay={"input_size": (3, 40, 40),
                                                      "crop_pct": 1.0})
    enc = _timm_encoder(model, name="tiny", source="memory", pool="avg",
                        device=torch.device("cpu"), dtype=torch.float32)
    assert enc._cnn["channels_last"]
    g = np.random.default_rng(1)
    images = [Image.fromarray(g.integers(0, 256, (40, 40, 3), dtype=np.uint8))
              for _ in range(2 * _CPU_CNN_CHUNK + 3)]
    many = enc.encode(images)                       # in chunks, channels-last
    alone = [enc.encode([im]) for im in images]
    for layer, f in enumerate(many):
        assert f.shape[0] == len(images)
        torch.testing.assert_close(f, torch.cat([a[layer] for a in alone]), rtol=1e-5,
                                   atol=1e-6)
    # The plain layout (contiguous NCHW, the whole batch at once) gives the same features.
    enc.model.to(memory_format=torch.contiguous_format)
    enc._cnn["channels_last"] = False
    plain = enc.encode(images)
    for f, p in zip(many, plain):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-5)
