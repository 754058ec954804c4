"""Model grids (prh_fast.grid): align_models against align per pair and against the plain
reference loop, the symmetric shortcut, one search per model, the reference's saved files,
resume, errors naming the file; the Alignment class; the heatmaps."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from prh_fast import reference, store
from prh_fast._align import align
from prh_fast.grid import Alignment, GridResult, align_models, output_stem
from prh_fast.prepare import prepare_features

N = 80


def _model(seed, layers=3, d=16, n=N, shared=0):
    """[n, layers, d] features: a shared latent (seed ``shared``) seen through a random map."""
    g = torch.Generator().manual_seed(1000 + shared)
    z = torch.randn(n, 6, generator=g)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, layers * d, generator=g)
    x = torch.tanh(z @ w).reshape(n, layers, d)
    return x + 0.5 * torch.randn(n, layers, d, generator=g)


@pytest.fixture(scope="module")
def models():
    return {"a": _model(1), "b": _model(2, layers=2, d=24), "c": _model(3, layers=4, d=8)}


def _check_pair(res, x, y, xf, yf, metric, reference_order=True, exact=True, **kw):
    if reference_order:
        ref = align(yf, xf, metric, **kw)
        mat = ref.scores.numpy().T
        pair = None if ref.best_pair is None else ref.best_pair[::-1]
    else:
        ref = align(xf, yf, metric, **kw)
        mat, pair = ref.scores.numpy(), ref.best_pair
    got = res.pair_scores[(x, y)]
    a, b = res.x_names.index(x), res.y_names.index(y)
    if exact:
        np.testing.assert_array_equal(got, mat)
        assert res.scores[a, b] == ref.best_score
        assert res.best(x, y) == (ref.best_score, pair)
    else:  # a mirrored pair: the metric is symmetric up to float32 rounding
        np.testing.assert_allclose(got, mat, rtol=0, atol=1e-6)
        assert res.scores[a, b] == pytest.approx(ref.best_score, abs=1e-6)


# ---------------------------------------------------------------------------- against align
@pytest.mark.parametrize("metric", ["mutual_knn", "cycle_knn", "lcs_knn", "cknna", "cka",
                                    "svcca"])
def test_grid_equals_align_per_pair(models, metric):
    xs = {"a": models["a"], "b": models["b"]}
    ys = {"c": models["c"], "b2": _model(4, layers=2)}
    kw = {"cca_dim": 4} if metric == "svcca" else {}
    res = align_models(xs, ys, metric, topk=5, progress=False, **kw)
    assert res.scores.shape == (2, 2) and res.indices.shape == (2, 2, 2)
    assert res.indices.dtype == np.int64
    for x, xf in xs.items():
        for y, yf in ys.items():
            _check_pair(res, x, y, xf, yf, metric, topk=5, **kw)


@pytest.mark.parametrize("metric", ["cycle_knn", "mutual_knn"])
def test_reference_order_false_reads_x_first(models, metric):
    xs, ys = {"a": models["a"]}, {"c": models["c"]}
    res = align_models(xs, ys, metric, topk=5, progress=False, reference_order=False)
    _check_pair(res, "a", "c", models["a"], models["c"], metric, reference_order=False, topk=5)


def test_cycle_knn_depends_on_the_order(models):
    """The reference scores entry [i, j] as compute_score(y_feats, x_feats): for the one
    asymmetric kNN metric the two orders give different numbers."""
    xs, ys = {"a": models["a"]}, {"c": models["c"]}
    ref = align_models(xs, ys, "cycle_knn", topk=3, progress=False)
    other = align_models(xs, ys, "cycle_knn", topk=3, progress=False, reference_order=False)
    assert not np.array_equal(ref.pair_scores[("a", "c")], other.pair_scores[("a", "c")])


def test_grid_with_clipping_equals_align_on_prepared(models):
    xs, ys = {"a": models["a"]}, {"b": models["b"], "c": models["c"]}
    res = align_models(xs, ys, "mutual_knn", topk=5, q=0.9, exact=True, progress=False)
    for y in ys:
        _check_pair(res, "a", y, prepare_features(xs["a"], 0.9, True),
                    prepare_features(ys[y], 0.9, True), "mutual_knn", topk=5)


@pytest.mark.parametrize("metric,kw", [("mutual_knn", {"topk": 4}), ("cycle_knn", {"topk": 4}),
                                       ("cka", {})])
def test_grid_equals_plain_reference_loop(metric, kw):
    """The reference's measure_alignment loop, written out with prh_fast.reference metrics:
    entry [i, j] = compute_score(y_feats, x_feats), tie rule over y layers then x layers."""
    xs = {"p": _model(7, layers=2, d=8, n=40), "q": _model(8, layers=3, d=8, n=40)}
    ys = {"r": _model(9, layers=2, d=12, n=40)}
    res = align_models(xs, ys, metric, progress=False, **{"topk": 10, **kw})
    for a, (x, xf) in enumerate(xs.items()):
        for b, (y, yf) in enumerate(ys.items()):
            best, pair = 0, None
            mat = np.zeros((xf.shape[1], yf.shape[1]))
            for j in range(yf.shape[1]):
                for i in range(xf.shape[1]):
                    s = reference.measure(metric, F.normalize(yf[:, j].double(), dim=-1),
                                          F.normalize(xf[:, i].double(), dim=-1), **kw)
                    mat[i, j] = s
                    if s > best:
                        best, pair = s, (j, i)
            np.testing.assert_allclose(res.pair_scores[(x, y)], mat, atol=1e-5)
            assert res.scores[a, b] == pytest.approx(best, abs=1e-5)
            assert tuple(res.indices[a, b]) == pair[::-1]


# ----------------------------------------------------------------------- symmetric shortcut
@pytest.mark.parametrize("metric", ["mutual_knn", "cka"])
def test_symmetric_shortcut_equals_full_loop(models, metric):
    res = align_models(models, models, metric, topk=5, progress=False)
    m = len(models)
    assert res.options["symmetric_shortcut"]
    assert res.timings["computed"] == m * (m + 1) // 2
    assert res.timings["mirrored"] == m * (m - 1) // 2
    clones = {k: v.clone() for k, v in models.items()}  # other objects: no mirroring
    full = align_models(models, clones, metric, topk=5, progress=False)
    assert full.timings["mirrored"] == 0
    for (x, y), mat in full.pair_scores.items():
        np.testing.assert_allclose(res.pair_scores[(x, y)], mat, rtol=0, atol=1e-6)
        if "knn" in metric:
            assert res.best(x, y) == full.best(x, y)
    # a mirrored pair against align itself
    _check_pair(res, "c", "a", models["c"], models["a"], metric, exact=False, topk=5)
    np.testing.assert_array_equal(res.scores, res.scores.T)
    np.testing.assert_allclose(res.scores, full.scores, rtol=0, atol=1e-6)
    if "knn" in metric:  # integer counts: exactly symmetric
        np.testing.assert_array_equal(res.scores, full.scores)


@pytest.mark.parametrize("metric,kw", [("cycle_knn", {}), ("cknna", {})])
def test_no_shortcut_for_asymmetric_metrics(models, metric, kw):
    res = align_models(models, models, metric, topk=5, progress=False, **kw)
    m = len(models)
    assert not res.options["symmetric_shortcut"]
    assert res.timings["computed"] == m * m and res.timings["mirrored"] == 0
    for x, xf in models.items():
        for y, yf in models.items():
            _check_pair(res, x, y, xf, yf, metric, topk=5, **kw)


def test_unbiased_cknna_is_asymmetric_biased_is_not(models):
    """Why the shortcut skips unbiased CKNNA: its 1ᵀK̃L̃1 term reads the masked kernels'
    row sums on one side and column sums on the other."""
    A, B = models["a"][:, 0], models["c"][:, 1]
    A, B = F.normalize(A.double(), dim=1), F.normalize(B.double(), dim=1)
    ab, ba = reference.cknna(A, B, topk=5), reference.cknna(B, A, topk=5)
    assert abs(ab - ba) > 1e-9
    ab, ba = (reference.cknna(A, B, topk=5, unbiased=False),
              reference.cknna(B, A, topk=5, unbiased=False))
    assert ab == pytest.approx(ba, abs=1e-12)
    res = align_models(models, models, "cknna", topk=5, progress=False, unbiased=False)
    assert res.options["symmetric_shortcut"] and res.timings["mirrored"] == 3


# ------------------------------------------------------------------------ one search per model
def _count_knn(monkeypatch):
    # every neighbour search (knn, and CKNNA's lists) goes through prh_fast.knn._search
    import prh_fast.knn as knn_mod

    calls = []
    real = knn_mod._search

    def counting(x, k, **kw):
        calls.append(x.shape)
        return real(x, k, **kw)

    monkeypatch.setattr(knn_mod, "_search", counting)
    return calls


@pytest.mark.parametrize("metric", ["mutual_knn", "cycle_knn", "cknna"])
def test_each_model_searched_once(models, monkeypatch, metric):
    calls = _count_knn(monkeypatch)
    res = align_models(models, models, metric, topk=5, progress=False)
    assert len(calls) == sum(f.shape[1] for f in models.values())  # 3 + 2 + 4 layers
    assert res.timings["searched_models"] == 3
    calls.clear()
    xs, ys = {"a": models["a"]}, {"b": models["b"], "c": models["c"]}
    align_models(xs, ys, metric, topk=5, progress=False)
    assert len(calls) == 3 + 2 + 4


def test_each_file_loaded_once(models, tmp_path, monkeypatch):
    paths = {}
    for name, f in models.items():
        paths[name] = str(tmp_path / f"{name}.pt")
        store.save_features(paths[name], f, num_params=1)
    loads = []
    real = store.load_features
    monkeypatch.setattr(store, "load_features",
                        lambda p, **kw: loads.append(p) or real(p, **kw))
    for metric in ("mutual_knn", "cka"):
        loads.clear()
        res = align_models(list(paths.values()), list(paths.values()), metric, topk=5,
                           progress=False)
        assert sorted(loads) == sorted(paths.values()), metric
        assert res.x_names == ["a", "b", "c"]  # names are the file stems


# ------------------------------------------------------------------------- files and resume
@pytest.mark.parametrize("metric,fname", [("mutual_knn", "mutual_knn_k10.npy"),
                                          ("cknna", "cknna_k10.npy"), ("cka", "cka.npy")])
def test_saved_npy_is_the_reference_dict(models, tmp_path, metric, fname):
    xs, ys = {"a": models["a"], "b": models["b"]}, {"c": models["c"]}
    res = align_models(xs, ys, metric, topk=10, progress=False, output_dir=tmp_path)
    assert output_stem(metric, 10) + ".npy" == fname
    d = np.load(tmp_path / fname, allow_pickle=True).item()
    assert set(d) == {"scores", "indices"}
    assert d["scores"].shape == (2, 1) and d["indices"].shape == (2, 1, 2)
    assert d["scores"].dtype == np.float64 and d["indices"].dtype == np.float64
    np.testing.assert_array_equal(d["scores"], res.scores)
    # The reference stores compute_score(y_feats, x_feats)'s tuple: (y layer, x layer).
    np.testing.assert_array_equal(d["indices"], res.indices[..., ::-1])
    stem = tmp_path / fname[:-4]
    j = json.loads(stem.with_suffix(".json").read_text())
    assert j["x_names"] == ["a", "b"] and j["metric"] == metric
    assert len(j["pair_scores"]) == 2
    rows = stem.with_suffix(".csv").read_text().splitlines()
    assert rows[0] == "x,y,score,i,j" and len(rows) == 3
    assert rows[1].startswith("a,c,")
    back = GridResult.load(tmp_path, metric, 10)
    np.testing.assert_array_equal(back.scores, res.scores)
    np.testing.assert_array_equal(back.indices, res.indices)
    for key, mat in res.pair_scores.items():
        np.testing.assert_array_equal(back.pair_scores[key], mat)


def test_no_pair_is_minus_one_in_memory_and_nan_on_disk(tmp_path):
    res = GridResult(metric="cka", topk=10, x_names=["a"], y_names=["b", "c"],
                     scores=np.array([[0.0, 0.5]]),
                     indices=np.array([[[-1, -1], [2, 1]]], dtype=np.int64))
    res.save(tmp_path)
    d = np.load(tmp_path / "cka.npy", allow_pickle=True).item()
    assert np.isnan(d["indices"][0, 0]).all()  # what the reference's float array holds
    assert d["indices"][0, 1].tolist() == [1.0, 2.0]
    assert res.best("a", "b") == (0.0, None)
    back = GridResult.load(tmp_path, "cka")
    assert back.indices[0, 0].tolist() == [-1, -1]
    assert json.loads((tmp_path / "cka.json").read_text())["indices"][0][0] is None
    assert (tmp_path / "cka.csv").read_text().splitlines()[1] == "a,b,0.0,,"
    # only the reference's .npy there (no .json): a pickle, read only when trusted; names
    # given by the caller
    (tmp_path / "cka.json").unlink()
    with pytest.raises(ValueError, match="pickled.*trust=True"):
        GridResult.load(tmp_path, "cka", x_names=["a"], y_names=["b", "c"])
    back = GridResult.load(tmp_path, "cka", x_names=["a"], y_names=["b", "c"], trust=True)
    assert back.indices.tolist() == res.indices.tolist() and back.y_names == ["b", "c"]


def test_resume_without_recomputation(models, tmp_path, monkeypatch, caplog):
    xs, ys = {"a": models["a"]}, {"b": models["b"], "c": models["c"]}
    first = align_models(xs, ys, "mutual_knn", topk=5, progress=False, output_dir=tmp_path)
    calls = _count_knn(monkeypatch)
    with caplog.at_level("WARNING", logger="prh_fast"):
        again = align_models(xs, ys, "mutual_knn", topk=5, progress=False, output_dir=tmp_path)
    assert calls == [] and "loaded it instead of recomputing" in caplog.text
    np.testing.assert_array_equal(again.scores, first.scores)
    np.testing.assert_array_equal(again.indices, first.indices)
    assert again.pair_scores.keys() == first.pair_scores.keys()
    align_models(xs, ys, "mutual_knn", topk=5, progress=False, output_dir=tmp_path,
                 force_remake=True)
    assert len(calls) == 3 + 2 + 4
    with pytest.raises(ValueError, match="other models.*force_remake"):
        align_models({"b": models["b"]}, ys, "mutual_knn", topk=5, progress=False,
                     output_dir=tmp_path)


def test_atomic_save_leaves_no_temporary_files(models, tmp_path):
    align_models({"a": models["a"]}, {"c": models["c"]}, "cka", progress=False,
                 output_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cka.csv", "cka.json", "cka.npy"]


# ------------------------------------------------------------------------------------ errors
def test_mismatched_n_names_the_file(models, tmp_path):
    good = [tmp_path / "a.pt", tmp_path / "b.pt"]
    store.save_features(good[0], models["a"], num_params=1)
    store.save_features(good[1], models["b"], num_params=1)
    bad = tmp_path / "short.pt"
    store.save_features(bad, _model(5, n=N - 10), num_params=1)
    with pytest.raises(ValueError, match=r"short\.pt.*N = 70"):
        align_models(good, [good[1], bad], progress=False)
    with pytest.raises(ValueError, match=r"model 'x'.*N = 70"):
        align_models(good, {"x": _model(5, n=N - 10)}, progress=False)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        align_models(good, [tmp_path / "nope.pt"], progress=False)


def test_bad_arguments(models):
    with pytest.raises(ValueError, match="metric"):
        align_models(models, models, "nope", progress=False)
    with pytest.raises(ValueError, match="x_models"):
        align_models([], models, progress=False)
    with pytest.raises(ValueError, match="list must hold feature-file paths"):
        align_models([models["a"]], models, progress=False)
    with pytest.raises(ValueError, match="unexpected keyword"):
        align_models(models, models, "mutual_knn", progress=False, cca_dim=3)
    with pytest.raises(ValueError, match=r"^a vs c: cca_dim"):  # model c has 8 dimensions
        align_models({"a": models["a"]}, {"c": models["c"]}, "svcca", progress=False)


def test_null_permutations(models):
    xs, ys = {"a": models["a"]}, {"c": models["c"]}
    res = align_models(xs, ys, "mutual_knn", topk=5, progress=False, null_permutations=4)
    ref = align(ys["c"], xs["a"], "mutual_knn", topk=5, null_permutations=4)
    assert res.null["best_z"][0, 0] == pytest.approx(ref.null["best_z"])
    assert math.isfinite(res.null["best_mean"][0, 0])


# ---------------------------------------------------------------------------------- Alignment
@pytest.fixture()
def ref_dir(models, tmp_path):
    for name, f in models.items():
        store.save_features(tmp_path / "feats" / f"{name}.pt", f, num_params=1)
    return tmp_path / "feats"


@pytest.mark.parametrize("metric", ["mutual_knn", "cknna", "cka"])
def test_alignment_score_equals_align(models, ref_dir, metric):
    al = Alignment(ref_dir)
    assert al.models == ["a", "b", "c"]
    query = _model(11, layers=3)
    got = al.score(query, metric=metric, topk=5)
    assert list(got) == ["a", "b", "c"]
    for name, f in models.items():
        r = align(query, f, metric, topk=5)
        assert got[name] == (r.best_score, r.best_pair)
    # again: the reference models' lists are reused, and a path works as the query
    store.save_features(ref_dir.parent / "q.pt", query, num_params=1)
    assert al.score(str(ref_dir.parent / "q.pt"), metric=metric, topk=5) == got


def test_alignment_reuses_reference_lists(ref_dir, monkeypatch):
    al = Alignment(ref_dir, metric="mutual_knn", topk=5)
    calls = _count_knn(monkeypatch)
    al.score(_model(11))
    assert len(calls) == 3 + (3 + 2 + 4)
    calls.clear()
    al.score(_model(12))
    assert len(calls) == 3  # only the query's layers


def test_alignment_errors_and_data(ref_dir, tmp_path):
    al = Alignment([ref_dir / "a.pt", ref_dir / "b.pt"])
    with pytest.raises(ValueError, match=r"features: has N = 30.*'a'"):
        al.score(_model(1, n=30))
    with pytest.raises(ValueError, match="no local paired data set"):
        al.get_data("image")
    al = Alignment(ref_dir, data={"image": ["i0", "i1"], "text": ["t0", "t1"]})
    assert al.get_data("text") == ["t0", "t1"]
    with pytest.raises(ValueError, match="modality"):
        al.get_data("audio")
    jl = tmp_path / "pairs.jsonl"
    jl.write_text('{"image": "x.png", "text": "a cat"}\n{"image": "y.png", "text": "a dog"}\n')
    al = Alignment(ref_dir, data=str(jl))
    assert al.get_data("image") == ["x.png", "y.png"]
    with pytest.raises(ValueError, match="no .pt feature files"):
        (tmp_path / "empty").mkdir()
        Alignment(tmp_path / "empty")


# ------------------------------------------------------------------------------------- plots
def test_plots_write_pngs(models, tmp_path):
    from prh_fast.plots import plot_grid, plot_layers

    res = align_models(models, models, "mutual_knn", topk=5, progress=False)
    p = plot_grid(res, tmp_path / "grid.png")
    q = plot_layers(res.pair_scores[("a", "c")], tmp_path / "sub" / "layers.png", "a", "c",
                    res.metric, best_pair=res.best("a", "c")[1], topk=5)
    for path in (p, q):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["grid.png", "sub"]


def test_import_prh_fast_does_not_import_matplotlib():
    code = ("import sys, prh_fast, prh_fast.grid, prh_fast.cli; "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_memory_budget_is_the_one_name_stream_budget_a_deprecated_alias(models, tmp_path):
    """``memory_budget`` (bytes of scratch memory) is the keyword of the grid, ``Alignment``
    and the distributed grid; ``stream_budget`` still works with a FutureWarning naming the
    new name; passing both is an InputError."""
    import warnings

    from prh_fast.distributed import align_models as dalign_models
    from prh_fast.errors import InputError

    xs = {"a": models["a"], "b": models["b"]}
    want = align_models(xs, xs, "cka", progress=False)
    got = align_models(xs, xs, "cka", progress=False, memory_budget=4096)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-10, atol=1e-12)
    assert got.options["metric_kwargs"]["memory_budget"] == 4096
    for fn in (align_models, dalign_models):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fn(xs, xs, "mutual_knn", progress=False, memory_budget=1 << 20)
        with pytest.warns(FutureWarning, match="memory_budget"):
            old = fn(xs, xs, "cka", progress=False, stream_budget=4096)
        np.testing.assert_array_equal(old.scores, got.scores)
        with pytest.raises(InputError, match="memory_budget"):
            fn(xs, xs, "cka", progress=False, stream_budget=4096, memory_budget=4096)
    with pytest.raises(ValueError, match="memory_budget"):
        align_models(xs, xs, "cka", progress=False, memory_budget=0)
    torch.save({"feats": models["a"]}, tmp_path / "a.pt")
    with pytest.warns(FutureWarning, match="memory_budget"):
        assert Alignment(str(tmp_path), stream_budget=1 << 20).memory_budget == 1 << 20
    with pytest.raises(InputError, match="memory_budget"):
        Alignment(str(tmp_path), stream_budget=1 << 20, memory_budget=1 << 20)


def test_align_memory_budget_alias_and_paths(models, tmp_path):
    """``align``: the same keyword for tensors (CKA row blocks) and for files (the grid's
    path), with the deprecated alias."""
    from prh_fast.errors import InputError

    X, Y = models["a"], models["b"]
    want = align(X, Y, "cka")
    with pytest.warns(FutureWarning, match="memory_budget"):
        old = align(X, Y, "cka", stream_budget=4096)
    torch.testing.assert_close(old.scores, want.scores, rtol=1e-10, atol=1e-12)
    with pytest.raises(InputError, match="memory_budget"):
        align(X, Y, "cka", stream_budget=4096, memory_budget=4096)
    assert align(X, Y, "mutual_knn", topk=5, memory_budget=1 << 20).scores.shape == (3, 2)
    torch.save({"feats": X}, tmp_path / "x.pt")
    torch.save({"feats": Y}, tmp_path / "y.pt")
    got = align(str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), "cka", memory_budget=4096)
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-10, atol=1e-12)
    with pytest.warns(FutureWarning, match="memory_budget"):
        align(str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), "mutual_knn", topk=5,
              stream_budget=1 << 20)


def test_one_by_one_heatmap_has_a_sensible_colour_scale(tmp_path):
    """A grid of one model pair (or a constant matrix) keeps a readable colour scale: the
    metric's own range when it holds the value, else a band around it; no offset label."""
    import types

    pytest.importorskip("matplotlib")
    from prh_fast.plots import colour_range, plot_grid

    assert colour_range([[0.42]], "mutual_knn") == (0.0, 1.0)
    assert colour_range([[7.5]], "lcs_knn", topk=10) == (0.0, 10.0)
    lo, hi = colour_range([[2.5]], "edit_distance_knn")
    assert lo < 2.5 < hi and hi - lo >= 0.1
    assert colour_range([[0.1, 0.9]], "cka") == (0.1, 0.9)  # a real range is kept
    assert colour_range([[float("nan")]]) == (0.0, 1.0)
    grid = types.SimpleNamespace(scores=[[2.5]], x_names=["a"], y_names=["b"],
                                 metric="edit_distance_knn", topk=10)
    path = plot_grid(grid, str(tmp_path / "one.png"))
    assert (tmp_path / "one.png").stat().st_size > 1000 and path.endswith("one.png")
