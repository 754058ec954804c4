"""Paired data (prh_fast.extract._data): easy-VQA captions, folders with captions files, saved
Hugging Face data sets, subsets and errors."""
from __future__ import annotations

import csv
import importlib.util
import json
import os

import numpy as np
import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image, ImageDraw  # noqa: E402

from prh_fast.extract._data import (  # noqa: E402
    EASY_VQA_LEVELS,
    DataNotFoundError,
    PairedDataset,
    easy_vqa_attributes,
    easy_vqa_caption,
    load_pairs,
)

HAS_EASY_VQA = importlib.util.find_spec("easy_vqa") is not None
needs_easy_vqa = pytest.mark.skipif(not HAS_EASY_VQA, reason="pip install --no-deps easy-vqa")


# ----------------------------------------------------------------------------- pixels

def _draw(shape, colour, box, bg=(240, 250, 245), size=64):
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "rectangle":
        d.rectangle(box, fill=colour)
    else:
        x0, y0, x1, y1 = box
        d.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)
    return im


@pytest.mark.parametrize("shape,colour,name,box,position,size", [
    ("circle", (255, 0, 0), "red", (2, 2, 14, 14), "in the top left", "small"),
    ("rectangle", (0, 128, 128), "teal", (40, 24, 62, 40), "on the right", "medium"),
    ("triangle", (165, 42, 42), "brown", (10, 30, 54, 62), "at the bottom", "large"),
    ("circle", (128, 128, 128), "gray", (22, 22, 42, 42), "in the center", "medium"),
    ("rectangle", (255, 255, 0), "yellow", (0, 50, 20, 63), "in the bottom left", "medium"),
])
def test_attributes_of_drawn_shapes(shape, colour, name, box, position, size):
    im = _draw(shape, colour, box)
    a = easy_vqa_attributes(im)
    assert (a["shape"], a["colour"], a["position"], a["size"]) == (shape, name, position, size)
    # hand check of area and centroid from the pure-colour pixels
    arr = np.asarray(im)
    pure = (arr == np.array(colour, dtype=np.uint8)).all(-1)
    assert abs(a["area"] - pure.sum()) <= 0.1 * pure.sum() + 4
    ys, xs = np.nonzero(pure)
    assert abs(a["centroid"][0] - (xs.mean() + 0.5)) < 1.0
    assert abs(a["centroid"][1] - (ys.mean() + 0.5)) < 1.0
    assert a["background_rgb"] == (240, 250, 245)


def test_attributes_errors():
    with pytest.raises(ValueError, match="no shape"):
        easy_vqa_attributes(Image.new("RGB", (16, 16), (250, 250, 250)))
    with pytest.raises(ValueError, match="RGB"):
        easy_vqa_attributes(np.zeros((4, 4), np.uint8))


def test_caption_levels_text():
    a = {"colour": "red", "shape": "circle", "size": "large", "position": "in the top left",
         "area_frac": 0.123, "background": "light blue"}
    caps = [easy_vqa_caption(a, lv) for lv in EASY_VQA_LEVELS]
    assert caps[:3] == ["a red shape", "a red circle", "a large red circle in the top left"]
    assert caps[3] == ("a large red circle in the top left, covering 12% of the image, on a "
                       "light blue background")
    assert easy_vqa_caption(a, "color") == caps[0]
    with pytest.raises(ValueError, match="caption_level"):
        easy_vqa_caption(a, "everything")


# ----------------------------------------------------------------------------- easy-VQA

@needs_easy_vqa
def test_easy_vqa_levels_nest_and_agree_with_answers():
    sets = {lv: load_pairs("easy-vqa", split="test", n=300, caption_level=lv, seed=3)
            for lv in EASY_VQA_LEVELS}
    ref = sets[EASY_VQA_LEVELS[0]]
    for lv, ds in sets.items():
        assert len(ds) == 300 and ds.ids == ref.ids          # same images for every level
        assert ds.name == f"easy-vqa/test-n300-seed3/{lv}"
        assert ds.meta["disagreements"] == 0
        assert ds.meta["attribute_sources"]["answers"] > 0.8 * 600
    caps = [sets[lv].captions(range(300)) for lv in EASY_VQA_LEVELS]
    for i in range(300):
        a = ref.attributes[i]
        for lo, hi in zip(caps, caps[1:]):
            assert a["colour"] in lo[i] and a["colour"] in hi[i]
            assert set(lo[i].replace("shape", "").split()) <= set(hi[i].replace(",", "").split())
        assert caps[1][i] == f"a {a['colour']} {a['shape']}"
        assert caps[3][i].startswith(caps[2][i] + ",")
    # the captions vary: every colour and shape occurs, several sizes and positions
    assert len(set(caps[0])) == 8 and len(set(caps[1])) == 24
    assert len({a["position"] for a in ref.attributes}) == 9
    assert {a["size"] for a in ref.attributes} == {"small", "medium", "large"}


@needs_easy_vqa
def test_easy_vqa_answers_match_pixels_on_every_test_image():
    ds = load_pairs("easy-vqa", split="test")
    assert len(ds) == 1000 and ds.meta["disagreements"] == 0
    assert all(a["colour_distance"] == 0 for a in ds.attributes)   # exact palette colours
    root = ds.meta["root"]
    with open(os.path.join(root, "test", "questions.json")) as f:
        qs = json.load(f)
    direct = {}
    for q, ans, iid in qs:
        if q in ("what color is the shape?", "what is the color of the shape?"):
            direct.setdefault(iid, {})["colour"] = ans
        if q in ("what shape is in the image?", "what shape does the image contain?",
                 "what shape is present?"):
            direct.setdefault(iid, {})["shape"] = ans
    pos = {iid: k for k, iid in enumerate(int(x.split("/")[1]) for x in ds.ids)}
    assert len(direct) > 500
    for iid, facts in direct.items():
        for key, val in facts.items():
            assert ds.attributes[pos[iid]][key] == val


@needs_easy_vqa
def test_easy_vqa_hand_checked_images():
    # Looked at by eye: train/0 a big blue rectangle low and right of centre, train/4 a big
    # red circle in the middle, train/7 a small black circle low on the left.
    root = load_pairs("easy-vqa", split="test", n=1).meta["root"]
    caps = {}
    for i in (0, 4, 7):
        with Image.open(os.path.join(root, "train", "images", f"{i}.png")) as im:
            caps[i] = easy_vqa_caption(easy_vqa_attributes(im), "full")
    assert caps == {0: "a large blue rectangle at the bottom",
                    4: "a large red circle in the center",
                    7: "a small black circle in the bottom left"}
    ds = load_pairs("easy-vqa", split="test")
    img = ds.images([7])[0]
    assert ds.ids[7] == "test/7" and img.mode == "RGB" and img.size == (64, 64)
    raw = np.asarray(Image.open(os.path.join(root, "test", "images", "7.png")).convert("RGB"))
    assert np.array_equal(np.asarray(img), raw)
    assert ds.captions([7])[0] == easy_vqa_caption(easy_vqa_attributes(raw), "full")


@needs_easy_vqa
def test_easy_vqa_subsets():
    a = load_pairs("easy-vqa", split="test", n=50, seed=1)
    b = load_pairs("easy-vqa", split="test", n=50, seed=1)
    c = load_pairs("easy-vqa", split="test", n=50, seed=2)
    small = load_pairs("easy-vqa", split="test", n=10, seed=1)
    assert a.ids == b.ids and a.captions(range(50)) == b.captions(range(50))
    assert a.ids != c.ids
    assert small.ids == a.ids[:10]                      # nested for one seed
    assert len(set(a.ids)) == 50
    full = load_pairs("easy-vqa", split="test")
    assert full.ids[:3] == ["test/0", "test/1", "test/2"] and full.name == "easy-vqa/test/full"
    both = load_pairs("easy-vqa", split="all", n=600)
    assert len(set(both.ids)) == 600
    assert {i.split("/")[0] for i in both.ids} == {"train", "test"}
    assert load_pairs("easy-vqa", n=3).meta["split"] == "train"


@needs_easy_vqa
def test_easy_vqa_errors():
    with pytest.raises(ValueError, match="n: 1001"):
        load_pairs("easy-vqa", split="test", n=1001)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="n:"):
            load_pairs("easy-vqa", split="test", n=bad)
    with pytest.raises(ValueError, match="split"):
        load_pairs("easy-vqa", split="validation")
    with pytest.raises(ValueError, match="caption_level"):
        load_pairs("easy-vqa", split="test", caption_level="level9")
    with pytest.raises(ValueError, match="seed"):
        load_pairs("easy-vqa", split="test", n=3, seed=-1)
    ds = load_pairs("easy-vqa", split="test", n=4)
    with pytest.raises(ValueError, match="idx"):
        ds.captions([4])
    with pytest.raises(TypeError, match="idx"):
        ds.images([1.0])


@needs_easy_vqa
def test_shuffled_control():
    ds = load_pairs("easy-vqa", split="test", n=40, seed=0, caption_level="full")
    sh = ds.shuffled(seed=5)
    assert sh.ids == ds.ids and sh.name == ds.name + "-shuffled5"
    perm = sh.meta["caption_permutation"]
    assert sorted(perm) == list(range(40)) and all(p != i for i, p in enumerate(perm))
    caps, scaps = ds.captions(range(40)), sh.captions(range(40))
    assert scaps == [caps[p] for p in perm]
    assert ds.shuffled(5).meta["caption_permutation"] == perm      # deterministic


# ----------------------------------------------------------------------------- folders

def _make_folder(root, n=7, fmt="jsonl", caption_key="caption", image_key="image"):
    os.makedirs(os.path.join(root, "imgs"), exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        arr = rng.integers(0, 256, size=(5 + i, 9, 3), dtype=np.uint8)
        rel = f"imgs/im{i}.png"
        Image.fromarray(arr).save(os.path.join(root, rel))
        recs.append({image_key: rel, caption_key: f"picture number {i}, «ünïcode»",
                     "other": i})
    if fmt == "jsonl":
        with open(os.path.join(root, "captions.jsonl"), "w", encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        with open(os.path.join(root, "captions.csv"), "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(recs[0]))
            w.writeheader()
            w.writerows(recs)
    return recs


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_round_trip(tmp_path, fmt):
    root = tmp_path / "mydata"
    recs = _make_folder(str(root), fmt=fmt)
    ds = load_pairs(str(root))
    assert isinstance(ds, PairedDataset) and len(ds) == 7 and ds.name == "mydata"
    assert ds.captions(range(7)) == [r["caption"] for r in recs]
    for i, img in enumerate(ds.images(range(7))):
        raw = np.asarray(Image.open(root / recs[i]["image"]))
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), raw)
    sub = load_pairs(str(root), n=3, seed=4)
    assert sub.name == "mydata-n3-seed4" and len(sub) == 3
    pick = [ds.ids.index(i) for i in sub.ids]
    assert sub.captions(range(3)) == ds.captions(pick)
    # the captions file itself as source
    same = load_pairs(str(root / f"captions.{fmt}"))
    assert same.captions(range(7)) == ds.captions(range(7))


def test_folder_columns_and_split(tmp_path):
    root = tmp_path / "d"
    _make_folder(str(root / "val"), n=4, caption_key="text", image_key="file_name")
    ds = load_pairs(str(root), split="val")
    assert ds.name == "d/val" and ds.meta["caption_column"] == "text"
    assert ds.meta["image_column"] == "file_name"
    named = load_pairs(str(root), split="val", caption_column="text", image_column="file_name")
    assert named.captions([0, 1]) == ds.captions([0, 1])
    lv = load_pairs(str(root), split="val", caption_level="text")
    assert lv.name == "d/val/text"


def test_folder_errors(tmp_path):
    with pytest.raises(DataNotFoundError, match="source"):
        load_pairs(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError, match="captions.jsonl"):
        load_pairs(str(empty))
    root = tmp_path / "x"
    _make_folder(str(root), n=3, caption_key="label")
    with pytest.raises(ValueError, match="caption_column.*no caption column"):
        load_pairs(str(root))
    with pytest.raises(ValueError, match="caption_column.*'title'"):
        load_pairs(str(root), caption_column="title")
    with pytest.raises(ValueError, match="n: 4 pairs requested"):
        load_pairs(str(root), caption_column="label", n=4)
    with pytest.raises(DataNotFoundError, match="split"):
        load_pairs(str(root), split="train", caption_column="label")
    os.remove(root / "imgs" / "im1.png")
    with pytest.raises(DataNotFoundError, match="im1.png"):
        load_pairs(str(root), caption_column="label")
    both = tmp_path / "both"
    _make_folder(str(both), n=2, fmt="csv")
    _make_folder(str(both), n=2, fmt="jsonl")
    with pytest.raises(ValueError, match="both"):
        load_pairs(str(both))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "captions.jsonl").write_text('{"image": "a.png", "caption": "x"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_pairs(str(bad))
    with pytest.raises(TypeError, match="source"):
        load_pairs(3)


# ----------------------------------------------------------------------------- HF datasets

def test_hf_saved_dataset(tmp_path):
    if importlib.util.find_spec("datasets") is None:
        # Without the package: a clear ImportError that says what to install.
        folder = tmp_path / "hfds"
        folder.mkdir()
        (folder / "state.json").write_text("{}")
        with pytest.raises(ImportError, match="pip install datasets"):
            load_pairs(str(folder))
        return
    import datasets

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (8, 6, 3), dtype=np.uint8)) for _ in range(5)]
    caps = [f"caption {i}" for i in range(5)]
    feats = datasets.Features({"picture": datasets.Image(), "sentences":
                               datasets.Sequence(datasets.Value("string")),
                               "caption": datasets.Value("string")})
    cols = feats.encode_batch({"picture": imgs, "sentences": [[c, "other"] for c in caps],
                               "caption": caps})
    # built with an explicit fingerprint: no hashing of the table (dill) needed
    d = datasets.Dataset(datasets.table.InMemoryTable.from_pydict(
        cols, schema=feats.arrow_schema),
                         info=datasets.DatasetInfo(features=feats), fingerprint="prh-test")
    datasets.DatasetDict({"test": d, "train": d}).save_to_disk(str(tmp_path / "dd"))
    d.save_to_disk(str(tmp_path / "single"))
    ds = load_pairs(str(tmp_path / "dd"), split="test")
    assert ds.name == "dd/test" and ds.meta["image_column"] == "picture"
    assert ds.captions(range(5)) == caps
    for a, b in zip(ds.images(range(5)), imgs):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    alt = load_pairs(str(tmp_path / "single"), caption_level="sentences", n=2, seed=1)
    assert all(c.startswith("caption ") for c in alt.captions(range(2)))
    with pytest.raises(ValueError, match="split"):
        load_pairs(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match="caption_column"):
        load_pairs(str(tmp_path / "single"), caption_column="nope")
