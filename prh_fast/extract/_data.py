"""Paired image-caption data: easy-VQA, a folder with a captions file, or a saved HF data set.

``load_pairs(source, split=, n=, caption_level=, seed=)`` returns a :class:`PairedDataset`
whose ``captions(idx)`` and ``images(idx)`` give the pairs (images as PIL RGB, loaded on
demand). Sources:

* ``"easy-vqa"``: the 5,000 64x64 images of the PyPI package ``easy-vqa`` (4,000 train,
  1,000 test; ``split`` "train" (default), "test" or "all"), with one caption per image
  generated here at a level of detail chosen by ``caption_level`` (see below).
* a folder holding the images and ``captions.jsonl`` (one JSON object per line) or
  ``captions.csv`` (a header row), each record naming an image file (relative to the folder)
  and its caption; or the path of that captions file itself. ``split``, when given, selects
  the sub-folder ``<folder>/<split>``.
* a folder written by Hugging Face ``datasets`` ``save_to_disk`` (a ``Dataset``, or a
  ``DatasetDict`` with ``split`` naming the split); needs ``pip install datasets``.

Columns / keys: the image column is the first of ``image, image_path, img, file, filename,
path, file_name`` that exists (for HF data sets, first a column of ``Image`` type), the
caption column the first of ``caption, captions, text, sentence, sentences, description``;
``image_column=`` / ``caption_column=`` name them explicitly. For folder and HF sources
``caption_level`` is another way to name the caption column (so a data set with one caption
column per level of detail works with the same option as easy-VQA). A caption given as a list
(several captions per image) contributes its first entry.

Subsets: ``n=None`` keeps every pair in source order. ``n=k`` draws ``k`` pairs at random with
``numpy.random.default_rng(seed)`` (a permutation of all pairs, first ``k`` kept), so for one
seed the subsets are nested: the first ``j`` pairs of ``n=k`` are the pairs of ``n=j``. The
draw depends only on the number of pairs, not on the caption level, so every level of
easy-VQA pairs the same images in the same order. The subset is part of the data set's
``name`` (``easy-vqa/train-n1024-seed0/full``), which names the feature-file folder.

easy-VQA captions (``EASY_VQA_LEVELS``, least to most detailed; each level's caption contains
the words of the one before)::

    colour    a red shape
    shape     a red circle
    full      a large red circle in the top left
    detailed  a large red circle in the top left, covering 12% of the image, on a light blue
              background

Colour and shape come from the data set's own answers (direct questions such as "what color
is the shape?" and the yes/no questions, e.g. "is there not a circle?" -> "no"), and are
checked against the pixels: the background is the most common colour of the image border, the
shape's colour is the most common colour far from it (the package draws eight exact RGB
colours), the mask is every pixel closer to the shape colour than to the background (which
splits the anti-aliased edge at half), and the shape follows from how much of its bounding box
the mask fills (a triangle about 1/2, a circle about pi/4, a rectangle 1). Where the answers
say nothing (about one image in ten) the pixels decide; a disagreement would be logged and
counted in ``meta["disagreements"]`` (there are none in the package's data). Size is the
mask's share of the image (small < 5% <= medium < 10% <= large, roughly the tertiles of the
train images); position is the 3x3 cell of the mask's centroid; the background is named from
its hue. Attributes are computed once per image file (about 0.6 ms per image: 2.8 s for all 5,000 on
an idle 2-core CPU, 0.75 s for a 1,024-image subset) and kept in memory for later calls.
"""
from __future__ import annotations

import colorsys
import csv
import json
import logging
import numbers
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Optional

import numpy as np

from prh_fast._io import confined
from prh_fast.errors import DataNotFoundError, InputError

__all__ = ["PairedDataset", "load_pairs", "EASY_VQA_LEVELS", "DataNotFoundError",
           "easy_vqa_attributes", "easy_vqa_caption"]

log = logging.getLogger(__name__)

EASY_VQA_LEVELS = ("colour", "shape", "full", "detailed")
_LEVEL_ALIASES = {"color": "colour"}
EASY_VQA_SPLITS = ("train", "test", "all")

# The eight colours easy-VQA draws (PIL colour names, exact RGB in the PNGs).
_PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42),
    "yellow": (255, 255, 0),
}
_SHAPES = ("circle", "rectangle", "triangle")
# Fill ratio (mask pixels / bounding-box pixels) cut points, measured on all 5,000 images:
# triangles 0.50-0.66, circles 0.74-0.91, rectangles 0.96-1.0.
_TRIANGLE_BELOW, _CIRCLE_BELOW = 0.70, 0.93
_SIZE_CUTS = ((0.05, "small"), (0.10, "medium"))     # else "large"
_POSITIONS = (("in the top left", "at the top", "in the top right"),
              ("on the left", "in the center", "on the right"),
              ("in the bottom left", "at the bottom", "in the bottom right"))
_IMAGE_KEYS = ("image", "image_path", "img", "file", "filename", "path", "file_name")
_CAPTION_KEYS = ("caption", "captions", "text", "sentence", "sentences", "description")


# ----------------------------------------------------------------------------- data set

class PairedDataset:
    """Image-caption pairs; made by :func:`load_pairs`.

    Args:
        name: Identifies the data (and subset) in file paths.
        meta: How it was made; ``meta["ids"]`` (one id per pair, used to fingerprint images)
            is added.
        captions: One caption per pair.
        image_fn: ``image_fn(id) -> PIL image``, called when an image is asked for.
        ids: One id per pair.

    Example:
        >>> import json, os, tempfile
        >>> from PIL import Image
        >>> from prh_fast.extract import load_pairs
        >>> root = tempfile.mkdtemp()
        >>> with open(os.path.join(root, "captions.jsonl"), "w") as f:
        ...     for i, colour in enumerate(["red", "green", "blue"]):
        ...         Image.new("RGB", (8, 8), colour).save(os.path.join(root, f"{i}.png"))
        ...         record = {"image": f"{i}.png", "caption": f"a {colour} square"}
        ...         _ = f.write(json.dumps(record) + "\\n")
        >>> data = load_pairs(root)
        >>> len(data), data.captions([0, 2])
        (3, ['a red square', 'a blue square'])
        >>> data.images([1])[0].getpixel((0, 0))
        (0, 128, 0)
        >>> data.shuffled(seed=0).captions([0, 1, 2]) != data.captions([0, 1, 2])
        True
    """

    def __init__(self, name: str, meta: dict, captions: Sequence[str],
                 image_fn: Callable[[int], Any] | None, ids: Sequence[Any]) -> None:
        self.name = name
        self.meta = dict(meta)
        self._captions = list(captions)
        self._image_fn = image_fn
        self._ids = list(ids)
        if len(self._captions) != len(self._ids):
            raise AssertionError("captions and ids differ in length")
        self.meta["ids"] = list(self._ids)

    def __len__(self) -> int:
        return len(self._captions)

    def __repr__(self) -> str:
        return f"PairedDataset({self.name!r}, {len(self)} pairs)"

    def _index(self, idx) -> list:
        if isinstance(idx, (str, bytes)) or not hasattr(idx, "__iter__"):
            raise TypeError(f"idx: expected a sequence of integer indices, got "
                            f"{type(idx).__name__}")
        out = []
        for i in (idx.tolist() if hasattr(idx, "tolist") else idx):
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"idx: expected integer indices, got {i!r}")
            if not 0 <= int(i) < len(self):
                raise InputError(f"idx: index {i} out of range for {len(self)} pairs")
            out.append(int(i))
        return out

    @property
    def ids(self) -> list:
        return list(self._ids)

    def captions(self, idx: Iterable[int]) -> list[str]:
        """The captions of some pairs.

        Args:
            idx: A sequence of pair indices.

        Returns:
            A list of str.
        """
        return [self._captions[i] for i in self._index(idx)]

    def images(self, idx: Iterable[int]) -> list[Any]:
        """The images of some pairs, read from disk on each call.

        Args:
            idx: A sequence of pair indices.

        Returns:
            A list of PIL RGB images.
        """
        return [self._image_fn(self._ids[i]) for i in self._index(idx)]

    def shuffled(self, seed: int = 0) -> "PairedDataset":
        """The same images with the captions permuted (a control with the pairing broken).

        The permutation is a derangement when there are at least two pairs: no image keeps
        its own caption.

        Args:
            seed: Seed of the permutation.

        Returns:
            A new :class:`PairedDataset` named ``<name>-shuffled<seed>``.
        """
        _check_seed(seed)
        n = len(self)
        perm = np.arange(n)
        if n > 1:
            rng = np.random.default_rng(seed)
            # Sattolo's algorithm: a uniformly random cyclic permutation (no fixed points).
            for i in range(n - 1, 0, -1):
                j = int(rng.integers(0, i))
                perm[i], perm[j] = perm[j], perm[i]
        meta = {k: v for k, v in self.meta.items() if k != "ids"}
        meta["shuffled_seed"] = seed
        meta["caption_permutation"] = perm.tolist()
        out = PairedDataset(f"{self.name}-shuffled{seed}", meta,
                            [self._captions[int(p)] for p in perm], self._image_fn, self._ids)
        for attr in ("attributes",):
            if hasattr(self, attr):  # per-image attributes still describe the images
                setattr(out, attr, getattr(self, attr))
        return out


# ----------------------------------------------------------------------------- helpers

def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise InputError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def _subset(total: int, n, seed, where: str) -> tuple:
    """-> (order, suffix): indices into the source, and the name suffix of the subset."""
    seed = _check_seed(seed)
    if n is None:
        return list(range(total)), ""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise InputError(f"n: expected a positive integer or None, got {n!r}")
    if n > total:
        raise InputError(f"n: {n} pairs requested but {where} has only {total}")
    order = np.random.default_rng(seed).permutation(total)[: int(n)]
    return [int(i) for i in order], f"-n{int(n)}-seed{seed}"


def _open_rgb(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _import_pil():
    try:
        import PIL  # noqa: F401
    except ImportError as e:
        raise ImportError("image data needs pillow: pip install pillow") from e


# ----------------------------------------------------------------------------- easy-VQA

def _easy_vqa_root() -> str:
    import importlib.util

    # find_spec locates the package folder without running its __init__.
    try:
        spec = importlib.util.find_spec("easy_vqa")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataNotFoundError("source: 'easy-vqa' needs the PyPI package easy-vqa (its data "
                                "ship inside it): pip install --no-deps easy-vqa")
    root = os.path.join(list(spec.submodule_search_locations)[0], "data")
    for s in ("train", "test"):
        if not os.path.isfile(os.path.join(root, s, "questions.json")):
            raise DataNotFoundError(f"source: the easy-vqa package at {root} has no "
                                    f"{s}/questions.json; reinstall it with `pip install "
                                    f"--no-deps --force-reinstall easy-vqa`")
    return root


def _answers_by_image(questions: list) -> dict:
    """image id -> {"colour": name or None, "shape": name or None} from the Q&A pairs."""
    facts: dict = {}
    for q, a, iid in questions:
        f = facts.setdefault(int(iid), {"colour": set(), "shape": set(),
                                        "not_colour": set(), "not_shape": set()})
        if a in _PALETTE:
            f["colour"].add(a)
        elif a in _SHAPES:
            f["shape"].add(a)
        elif a in ("yes", "no"):
            words = q.rstrip("?").split()
            negated = "not" in words or "no" in words
            present = (a == "yes") != negated
            for w in words:
                if w in _PALETTE:
                    f["colour" if present else "not_colour"].add(w)
                elif w in _SHAPES:
                    f["shape" if present else "not_shape"].add(w)
    out = {}
    for iid, f in facts.items():
        got = {}
        for key, universe in (("colour", set(_PALETTE)), ("shape", set(_SHAPES))):
            yes, no = f[key], f["not_" + key]
            if len(yes) > 1 or yes & no:
                raise InputError(f"easy-vqa: contradictory answers about the {key} of image "
                                 f"{iid}: {sorted(yes)} / not {sorted(no)}")
            left = universe - no
            got[key] = next(iter(yes)) if yes else (next(iter(left)) if len(left) == 1
                                                     else None)
        out[iid] = got
    return out


def _background_name(rgb) -> str:
    r, g, b = (float(c) / 255.0 for c in rgb)
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    if max(rgb) - min(rgb) <= 6:
        return "white" if v >= 0.95 else "light gray"
    hue = h * 360.0
    for upper, name in ((20, "pink"), (50, "peach"), (70, "cream"), (160, "mint green"),
                        (200, "light cyan"), (250, "light blue"), (300, "lavender"),
                        (340, "pink"), (361, "pink")):
        if hue < upper:
            return name
    return "pink"


def easy_vqa_attributes(image) -> dict:
    """Colour, shape, size, position and background of one easy-VQA image, from its pixels.

    Args:
        image: A PIL image or an ``[H, W, 3]`` uint8 array.

    Returns:
        A dict with ``colour``, ``shape``, ``size``, ``position``, ``row``/``col`` (3x3
        cell), ``area`` (mask pixels), ``area_frac``, ``centroid`` (x, y in pixels), ``fill``
        (mask / bounding box), ``background`` (a name), ``background_rgb``, ``shape_rgb`` and
        ``colour_distance``.

    Raises:
        ValueError: Not an RGB image, or no shape distinct from the background.

    Example:
        >>> import numpy as np
        >>> from prh_fast.extract._data import easy_vqa_attributes
        >>> img = np.full((64, 64, 3), 255, dtype=np.uint8)
        >>> img[4:24, 40:60] = (255, 0, 0)  # a red square in the top right
        >>> a = easy_vqa_attributes(img)
        >>> a["colour"], a["shape"], a["size"], a["position"]
        ('red', 'rectangle', 'medium', 'in the top right')
    """
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim != 3 or a.shape[2] != 3:
        raise InputError(f"image: expected an RGB image, got an array of shape {a.shape}")
    a = a.astype(np.int32)
    H, W = a.shape[:2]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    vals, counts = np.unique(border, axis=0, return_counts=True)
    bg = vals[counts.argmax()]
    far = np.abs(a - bg).sum(-1) > 100
    if not far.any():
        raise InputError("image: no shape found (every pixel is close to the background)")
    vals, counts = np.unique(a[far], axis=0, return_counts=True)
    fg = vals[counts.argmax()]
    # Pixel p belongs to the shape when it is nearer the shape colour than the background
    # along the line between them (anti-aliased edge pixels split at the midpoint).
    d = (fg - bg).astype(np.float64)
    t = ((a - bg).astype(np.float64) @ d) / float(d @ d)
    mask = t >= 0.5
    ys, xs = np.nonzero(mask)
    area = int(mask.sum())
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = area / float(box)
    shape = ("triangle" if fill < _TRIANGLE_BELOW else
             "circle" if fill < _CIRCLE_BELOW else "rectangle")
    names = list(_PALETTE)
    dist = [int(np.abs(fg - np.array(_PALETTE[c])).sum()) for c in names]
    colour = names[int(np.argmin(dist))]
    frac = area / float(H * W)
    size = next((name for cut, name in _SIZE_CUTS if frac < cut), "large")
    cx, cy = float(xs.mean() + 0.5), float(ys.mean() + 0.5)   # pixel centres
    col, row = min(int(cx * 3 // W), 2), min(int(cy * 3 // H), 2)
    return {"colour": colour, "shape": shape, "size": size, "position": _POSITIONS[row][col],
            "row": row, "col": col, "area": area, "area_frac": frac, "centroid": (cx, cy),
            "fill": fill, "background": _background_name(bg.tolist()),
            "background_rgb": tuple(int(c) for c in bg), "shape_rgb": tuple(int(c) for c in fg),
            "colour_distance": int(min(dist))}


def easy_vqa_caption(attrs: dict, level: str) -> str:
    """The caption of one image's attributes at a level of detail.

    Args:
        attrs: What :func:`easy_vqa_attributes` returns.
        level: One of ``EASY_VQA_LEVELS`` (``"color"`` is accepted for ``"colour"``).

    Returns:
        The caption.

    Raises:
        ValueError: An unknown level.

    Example:
        >>> from prh_fast.extract._data import easy_vqa_caption
        >>> attrs = {"colour": "red", "shape": "circle", "size": "large",
        ...          "position": "in the top left", "area_frac": 0.12, "background": "pink"}
        >>> easy_vqa_caption(attrs, "shape")
        'a red circle'
        >>> easy_vqa_caption(attrs, "detailed")
        'a large red circle in the top left, covering 12% of the image, on a pink background'
    """
    level = _check_level(level)
    c, s = attrs["colour"], attrs["shape"]
    if level == "colour":
        return f"a {c} shape"
    if level == "shape":
        return f"a {c} {s}"
    full = f"a {attrs['size']} {c} {s} {attrs['position']}"
    if level == "full":
        return full
    pct = max(1, int(round(100 * attrs["area_frac"])))
    return f"{full}, covering {pct}% of the image, on a {attrs['background']} background"


def _check_level(level) -> str:
    if not isinstance(level, str):
        raise InputError(f"caption_level: expected one of {list(EASY_VQA_LEVELS)}, got {level!r}")
    key = _LEVEL_ALIASES.get(level.strip().lower(), level.strip().lower())
    if key not in EASY_VQA_LEVELS:
        raise InputError(f"caption_level: unknown easy-vqa level {level!r}; levels, least to "
                         f"most detailed: {list(EASY_VQA_LEVELS)}")
    return key


# Per-process caches of pure functions of a file's content (keyed by path, mtime and size);
# threads may race to fill an entry: both compute the same value, setdefault keeps the first.
_ATTR_CACHE: dict = {}      # (png path, mtime_ns, size) -> attributes from pixels
_QA_CACHE: dict = {}        # (questions.json path, mtime_ns, size) -> answers by image id


def _file_key(path: str) -> tuple:
    st = os.stat(path)
    return path, st.st_mtime_ns, st.st_size


def _split_answers(root: str, split: str) -> dict:
    key = _file_key(os.path.join(root, split, "questions.json"))
    found = _QA_CACHE.get(key)
    if found is None:
        with open(key[0]) as f:
            found = _QA_CACHE.setdefault(key, _answers_by_image(json.load(f)))
    return found


def _image_attributes(path: str) -> dict:
    key = _file_key(path)
    found = _ATTR_CACHE.get(key)
    if found is None:
        from PIL import Image

        with Image.open(path) as im:
            found = _ATTR_CACHE.setdefault(key, easy_vqa_attributes(im))
    return found


def _load_easy_vqa(split, n, caption_level, seed) -> PairedDataset:
    _import_pil()
    split = "train" if split is None else split
    if split not in EASY_VQA_SPLITS:
        raise InputError(f"split: easy-vqa has splits {list(EASY_VQA_SPLITS)}, got {split!r}")
    level = _check_level("full" if caption_level is None else caption_level)
    root = _easy_vqa_root()
    entries = []                                  # (split, image id) in source order
    for s in (("train", "test") if split == "all" else (split,)):
        folder = os.path.join(root, s, "images")
        ids = sorted(int(f[:-4]) for f in os.listdir(folder)
                     if f.endswith(".png") and f[:-4].isdigit())
        entries += [(s, i) for i in ids]
    order, suffix = _subset(len(entries), n, seed, f"easy-vqa split {split!r}")
    chosen = [entries[i] for i in order]
    answers = {s: _split_answers(root, s) for s in {s for s, _ in chosen}}
    attrs, captions = [], []
    sources = {"answers": 0, "pixels": 0}
    disagreements = []
    for s, i in chosen:
        a = dict(_image_attributes(os.path.join(root, s, "images", f"{i}.png")))
        told = answers[s].get(i, {})
        for key in ("colour", "shape"):
            if told.get(key) is not None:
                sources["answers"] += 1
                if told[key] != a[key]:
                    disagreements.append(f"{s}/{i} {key}: answers {told[key]!r}, "
                                         f"pixels {a[key]!r}")
                    a[key] = told[key]
            else:
                sources["pixels"] += 1
        attrs.append(a)
        captions.append(easy_vqa_caption(a, level))
    if disagreements:
        log.warning("easy-vqa: the answers and the pixels disagree on %d attribute(s) (the "
                    "answers win): %s", len(disagreements), "; ".join(disagreements[:5]))
    ids = [f"{s}/{i}" for s, i in chosen]
    meta = {"source": "easy-vqa", "root": root, "split": split, "n": len(chosen),
            "seed": seed if n is not None else None, "caption_level": level,
            "levels": list(EASY_VQA_LEVELS), "attribute_sources": sources,
            "disagreements": len(disagreements)}

    def image(id_: str):
        s, i = id_.split("/")
        return _open_rgb(os.path.join(root, s, "images", f"{i}.png"))

    ds = PairedDataset(f"easy-vqa/{split}{suffix}/{level}", meta, captions, image, ids)
    ds.attributes = attrs        # per pair, in the data set's order
    return ds


# ----------------------------------------------------------------------------- folders

def _pick_column(columns, explicit, candidates, what: str, where: str, arg: str) -> str:
    if explicit is not None:
        if explicit not in columns:
            raise InputError(f"{arg}: {where} has no {what} column {explicit!r}; columns: "
                             f"{list(columns)}")
        return explicit
    for c in candidates:
        if c in columns:
            return c
    raise InputError(f"{arg}: {where} has no {what} column (looked for {list(candidates)}); "
                     f"columns: {list(columns)}; name it with {arg}=")


def _first_caption(value, where: str) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            raise InputError(f"{where}: empty list of captions")
        value = value[0]
    if not isinstance(value, str):
        raise InputError(f"{where}: caption is not text: {value!r}")
    return value


def _read_records(path: str) -> tuple:
    """-> (records as dicts, column names) of a captions .jsonl or .csv file."""
    if path.endswith(".jsonl"):
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"source: {path} line {lineno} is not JSON: {e}") from None
                if not isinstance(rec, dict):
                    raise InputError(f"source: {path} line {lineno}: expected a JSON object")
                records.append(rec)
        cols = []
        for r in records:
            cols += [k for k in r if k not in cols]
        return records, cols
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        records = list(reader)
        return records, list(reader.fieldnames or [])


def _load_folder(folder: str, captions_file: Optional[str], split, n, caption_level, seed,
                 image_column, caption_column) -> PairedDataset:
    _import_pil()
    if split is not None:
        if not isinstance(split, str) or not split or os.sep in split:
            raise InputError(f"split: expected a sub-folder name, got {split!r}")
        folder = os.path.join(folder, split)
        if not os.path.isdir(folder):
            raise DataNotFoundError(f"split: no sub-folder {folder}")
    if captions_file is None:
        found = [os.path.join(folder, f) for f in ("captions.jsonl", "captions.csv")
                 if os.path.isfile(os.path.join(folder, f))]
        if not found:
            raise DataNotFoundError(f"source: folder {folder} has no captions.jsonl or "
                                    f"captions.csv (nor is it a Hugging Face save_to_disk "
                                    f"folder)")
        if len(found) > 1:
            raise InputError(f"source: folder {folder} has both captions.jsonl and "
                             f"captions.csv; pass the path of the one to use")
        captions_file = found[0]
    caption_column = _caption_column_arg(caption_level, caption_column)
    records, cols = _read_records(captions_file)
    if not records:
        raise InputError(f"source: {captions_file} has no records")
    where = os.path.basename(captions_file)
    img_col = _pick_column(cols, image_column, _IMAGE_KEYS, "image", where, "image_column")
    cap_col = _pick_column(cols, caption_column, _CAPTION_KEYS, "caption", where,
                           "caption_column")
    order, suffix = _subset(len(records), n, seed, captions_file)
    paths, captions = [], []
    for i in order:
        rec = records[i]
        rel, cap = rec.get(img_col), rec.get(cap_col)
        if not isinstance(rel, str) or not rel:
            raise InputError(f"source: record {i} of {where} has no image in column {img_col!r}")
        # Image paths stay inside the captions file's folder: a captions file from elsewhere
        # must not make us read (and embed) any file on the machine.
        path = confined(os.path.dirname(os.path.abspath(captions_file)), rel)
        if path is None:
            raise InputError(f"source: record {i} of {where} names image {rel!r}, which is "
                             f"outside the folder of {where} (absolute, '..' or a symlink "
                             f"leading out); image paths must be relative and inside it")
        if not os.path.isfile(path):
            raise DataNotFoundError(f"source: record {i} of {where} names image {rel!r}, "
                                    f"which is not a file ({path})")
        paths.append(os.path.normpath(path))
        captions.append(_first_caption(cap, f"source: record {i} of {where}, column "
                                            f"{cap_col!r}"))
    base = os.path.basename(os.path.normpath(os.path.dirname(captions_file) if split is None
                                             else os.path.dirname(folder)))
    name = base + (f"/{split}" if split is not None else "") + suffix
    if caption_level is not None:
        name += f"/{cap_col}"
    meta = {"source": "folder", "root": os.path.dirname(os.path.abspath(captions_file)),
            "captions_file": os.path.abspath(captions_file), "split": split,
            "n": len(order), "seed": seed if n is not None else None,
            "image_column": img_col, "caption_column": cap_col}
    ids = [os.path.relpath(p, meta["root"]) for p in paths]
    lookup = dict(zip(ids, paths))
    return PairedDataset(name, meta, captions, lambda id_: _open_rgb(lookup[id_]), ids)


def _caption_column_arg(caption_level, caption_column):
    if caption_level is not None and caption_column is not None and \
            caption_level != caption_column:
        raise InputError(f"caption_level: {caption_level!r} and caption_column "
                         f"{caption_column!r} disagree (for this source both name the "
                         f"caption column)")
    return caption_column if caption_column is not None else caption_level


# ----------------------------------------------------------------------------- HF datasets

def _is_hf_saved(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f))
               for f in ("dataset_dict.json", "state.json"))


def _load_hf(folder: str, split, n, caption_level, seed, image_column,
             caption_column) -> PairedDataset:
    _import_pil()
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"source: {folder} was written by Hugging Face datasets "
                          f"(save_to_disk); reading it needs: pip install datasets") from e
    obj = datasets.load_from_disk(folder)
    if isinstance(obj, datasets.DatasetDict):
        splits = list(obj.keys())
        if split is None:
            if len(splits) != 1:
                raise InputError(f"split: {folder} holds splits {splits}; choose one with "
                                 f"split=")
            split = splits[0]
        if split not in obj:
            raise InputError(f"split: {folder} has no split {split!r}; splits: {splits}")
        ds = obj[split]
    else:
        if split is not None:
            raise InputError(f"split: {folder} holds a single Dataset (no splits); got "
                             f"split={split!r}")
        ds = obj
    cols = list(ds.column_names)
    where = f"data set {folder}"
    if image_column is None:
        typed = [c for c in cols if isinstance(ds.features.get(c), datasets.Image)]
        image_column = typed[0] if typed else None
    img_col = _pick_column(cols, image_column, _IMAGE_KEYS, "image", where, "image_column")
    cap_col = _pick_column(cols, _caption_column_arg(caption_level, caption_column),
                           _CAPTION_KEYS, "caption", where, "caption_column")
    order, suffix = _subset(len(ds), n, seed, where)
    all_caps = list(ds[cap_col])
    captions = [_first_caption(all_caps[i], f"source: row {i}, column {cap_col!r}")
                for i in order]
    root = os.path.abspath(folder)

    def image(id_: str):
        value = ds[int(id_)][img_col]
        return _as_rgb(value, root, f"row {id_}, column {img_col!r}")

    name = os.path.basename(os.path.normpath(folder)) + (f"/{split}" if split else "") + suffix
    if caption_level is not None:
        name += f"/{cap_col}"
    meta = {"source": "hf-datasets", "root": root, "split": split, "n": len(order),
            "seed": seed if n is not None else None, "image_column": img_col,
            "caption_column": cap_col}
    return PairedDataset(name, meta, captions, image, [str(i) for i in order])


def _as_rgb(value, root: str, where: str):
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            import io

            with Image.open(io.BytesIO(value["bytes"])) as im:
                return im.convert("RGB")
        value = value["path"]
    if isinstance(value, str):
        path = value if os.path.isabs(value) else os.path.join(root, value)
        if not os.path.isfile(path):
            raise DataNotFoundError(f"source: {where} names image {value!r}, not a file")
        return _open_rgb(path)
    raise InputError(f"source: {where} is not an image ({type(value).__name__})")


# ----------------------------------------------------------------------------- entry point

def load_pairs(source: str | os.PathLike[str], *, split: str | None = None,
               n: int | None = None, caption_level: str | None = None, seed: int = 0,
               image_column: Optional[str] = None,
               caption_column: Optional[str] = None) -> PairedDataset:
    """Image-caption pairs from ``source`` (see the module docstring for sources and rules).

    Args:
        source: ``"easy-vqa"``, a folder with ``captions.jsonl`` / ``captions.csv`` (or that
            file), or a folder written by ``datasets``' ``save_to_disk``.
        split: easy-VQA ``"train"`` (default) | ``"test"`` | ``"all"``; a sub-folder for
            folders; a split of a saved ``DatasetDict``.
        n: A seeded random subset of that many pairs (None: all, in source order).
        caption_level: An easy-VQA level (default ``"full"``), or the caption column for
            other sources.
        seed: The subset's random seed.
        image_column: The image column, when not one of the usual names.
        caption_column: The caption column, when not one of the usual names.

    Returns:
        A :class:`PairedDataset`.

    Raises:
        DataNotFoundError: The source, a file it names, or the easy-vqa package is missing.
        ValueError: A bad option, or a malformed captions file.
        TypeError: ``source`` is not a name or a path.

    Example:
        >>> import json, os, tempfile
        >>> from PIL import Image
        >>> from prh_fast.extract import load_pairs
        >>> root = tempfile.mkdtemp()
        >>> with open(os.path.join(root, "captions.jsonl"), "w") as f:
        ...     for i, colour in enumerate(["red", "green", "blue"]):
        ...         Image.new("RGB", (8, 8), colour).save(os.path.join(root, f"{i}.png"))
        ...         record = {"image": f"{i}.png", "caption": f"a {colour} square"}
        ...         _ = f.write(json.dumps(record) + "\\n")
        >>> data = load_pairs(root, n=2, seed=0)
        >>> len(data), data.name.endswith("-n2-seed0")
        (2, True)
    """
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a data-set name or a path, got "
                        f"{type(source).__name__}")
    src = os.fspath(source)
    if not src.strip():
        raise InputError("source: empty")
    _check_seed(seed)
    if src.strip().lower() in ("easy-vqa", "easy_vqa", "easyvqa"):
        if image_column is not None or caption_column is not None:
            raise InputError("image_column/caption_column: easy-vqa has fixed columns")
        return _load_easy_vqa(split, n, caption_level, seed)
    path = os.path.abspath(os.path.expanduser(src))
    if os.path.isfile(path):
        if not path.endswith((".jsonl", ".csv")):
            raise InputError(f"source: {path} is a file but not a captions .jsonl or .csv")
        if split is not None:
            raise InputError("split: not used when source is a captions file; pass the folder")
        return _load_folder(os.path.dirname(path), path, None, n, caption_level, seed,
                            image_column, caption_column)
    if not os.path.isdir(path):
        raise DataNotFoundError(f"source: {src!r} is neither 'easy-vqa' nor an existing folder "
                                f"or captions file ({path} does not exist)")
    if _is_hf_saved(path):
        return _load_hf(path, split, n, caption_level, seed, image_column, caption_column)
    return _load_folder(path, None, split, n, caption_level, seed, image_column,
                        caption_column)
