"""Feature extraction from language and vision models, offline first.

``extract_text`` / ``extract_images`` run a model over a paired data set and write one feature
file per (data set, model, pooling): the reference's ``.pt`` layout, written atomically and
resumable. Loaders live in ``_text`` (transformers LMs and encoders) and ``_vision`` (timm and
Hugging Face vision towers); data sources in ``_data``.
"""

# Public names, imported on first use so that ``import prh_fast.extract`` needs neither
# transformers nor timm (the ``extract`` extra) until a loader is called.
_EXPORTS = {
    "extract_text": "_runner", "extract_images": "_runner", "feature_path": "_runner",
    "extract_sharded": "_runner",
    "load_text_model": "_text", "TextEncoder": "_text", "ModelNotAvailableError": "_text",
    "load_vision_model": "_vision", "ImageEncoder": "_vision",
    "load_pairs": "_data", "PairedDataset": "_data", "DataNotFoundError": "_data",
    "EASY_VQA_LEVELS": "_data",
    "MODEL_SETS": "_registry", "resolve_model_set": "_registry",
    "check_available": "_registry",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"prh_fast.extract.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'prh_fast.extract' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
