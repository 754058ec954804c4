"""Feature extraction from language and vision models, offline first (issue 5).

``extract_text`` / ``extract_images`` run a model over a paired data set and write one feature
file per (data set, model, pooling): the reference's ``.pt`` layout, written atomically and
resumable. Loaders live in ``_text`` (transformers LMs and encoders) and ``_vision`` (timm and
Hugging Face vision towers); data sources in ``_data``.
"""
