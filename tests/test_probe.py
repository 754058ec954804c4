"""prh_fast.probe.Probe: the reference side prepared once gives the same results as align."""
import threading

import pytest
import torch
from _data import paired_features

import prh_fast
import prh_fast.probe as probe_mod
from prh_fast.errors import InputError
from prh_fast.metrics import SUPPORTED_METRICS
from prh_fast.prepare import prepare_features
from prh_fast.probe import Probe


def models(n=120, seed=0, dtype=torch.float32):
    """X: ``[N, 3, 24]`` tensor; Y: list of layers of widths 16, 40, 30 (views of one latent,
    so the neighbourhoods are shared in part)."""
    xs, ys = [], []
    for s, (da, db) in enumerate([(24, 16), (24, 40), (24, 30)]):
        A, B = paired_features(n, da, db, seed=seed + s, noise=0.3 + 0.2 * s, dtype=dtype)
        xs.append(A)
        ys.append(B)
    return torch.stack(xs, dim=1), ys


def same(a, b):
    """``a`` (from the probe) and ``b`` (from align) are the same result."""
    assert a.metric == b.metric
    assert a.scores.dtype == b.scores.dtype
    assert torch.equal(a.scores, b.scores), (a.metric, a.scores, b.scores)
    assert a.best_score == b.best_score and a.best_pair == b.best_pair
    assert a.x_layers == b.x_layers and a.y_layers == b.y_layers
    assert a.topk == b.topk
    assert a.ties == b.ties
    assert untimed(a.ann_report) == untimed(b.ann_report)


def untimed(report):
    """An ``ann_report`` without its per-layer timings (seconds differ run to run)."""
    if report is None:
        return None
    return {k: ([{a: v for a, v in lay.items() if a != "timings"} for lay in val]
                if k in ("x_layers", "y_layers") else val) for k, val in report.items()}


def clip(feats, q):
    return feats if q is None else prepare_features(feats, q=q)


@pytest.mark.parametrize("q", [None, 0.95])
@pytest.mark.parametrize("reference_as", ["tensor", "list"])
def test_every_metric_equals_align(q, reference_as):
    X, ys = models()
    Y = torch.stack([y[:, :16] for y in ys], dim=1) if reference_as == "tensor" else ys
    probe = Probe(Y, metrics=SUPPORTED_METRICS, topk=7, q=q)
    out = probe.score(X)
    assert list(out) == list(SUPPORTED_METRICS)
    for m in SUPPORTED_METRICS:
        same(out[m], prh_fast.align(clip(X, q), clip(Y, q), m, topk=7))


def test_second_score_on_new_features_reuses_the_reference(monkeypatch):
    X, ys = models()
    X2, _ = models(seed=5)
    probe = Probe(ys, metrics=("mutual_knn", "cycle_knn", "cknna", "cka"), topk=5)
    calls = []
    knn_side, cknna_side = probe_mod._knn_side, probe_mod._cknna_side
    monkeypatch.setattr(probe_mod, "_knn_side",
                        lambda xs, *a, **k: calls.append(len(xs)) or knn_side(xs, *a, **k))
    monkeypatch.setattr(probe_mod, "_cknna_side",
                        lambda xs, *a, **k: calls.append(len(xs)) or cknna_side(xs, *a, **k))
    for feats in (X, X2, X[:, 1:]):
        out = probe.score(feats)
        for m in probe.metrics:
            same(out[m], prh_fast.align(feats, ys, m, topk=5))
    # one search per score for the two knn metrics (shared) and one for cknna: new side only
    assert calls == [3, 3, 3, 3, 2, 2]


def test_concat_and_list_features_with_per_layer_clipping():
    X, ys = models(n=90)
    xl = [X[:, 0], X[:, 1, :10]]
    probe = Probe(ys, metrics=("mutual_knn", "svcca", "unbiased_cka"), topk=4, q=0.9,
                  concat=True, cca_dim=5)
    out = probe.score(xl)
    for m in probe.metrics:
        kw = {"cca_dim": 5} if m == "svcca" else {}
        same(out[m], prh_fast.align(prepare_features(xl, q=0.9), prepare_features(ys, q=0.9),
                                    m, topk=4, concat=True, **kw))
    assert out["mutual_knn"].x_layers == [-1, 0, 1]


def test_metric_options_shared_and_per_metric():
    X, ys = models(n=80)
    probe = Probe(ys, metrics={"mutual_knn": {"ties": "expected"}, "lcs_knn": None,
                               "cknna": {"unbiased": False}, "cka": {}, "svcca": {}},
                  topk=6, normalize_lcs=True, kernel_metric="rbf", rbf_sigma=0.8, cca_dim=3)
    out = probe.score(X)
    expected = {"mutual_knn": {"ties": "expected"}, "lcs_knn": {"normalize_lcs": True},
                "cknna": {"unbiased": False},
                "cka": {"kernel_metric": "rbf", "rbf_sigma": 0.8}, "svcca": {"cca_dim": 3}}
    for m, kw in expected.items():
        same(out[m], prh_fast.align(X, ys, m, topk=6, **kw))
    assert out["mutual_knn"].ties["mode"] == "expected"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes(dtype):
    X, ys = models(n=70, dtype=torch.float64)
    X, ys = X.to(dtype), [y.to(dtype) for y in ys]
    probe = Probe(ys, metrics=("mutual_knn", "cknna", "cka", "svcca"), topk=5,
                  normalize=dtype == torch.float64)
    out = probe.score(X)
    for m in probe.metrics:
        same(out[m], prh_fast.align(X, ys, m, topk=5, normalize=dtype == torch.float64))


def test_null_permutations_equal_align():
    X, ys = models(n=60)
    probe = Probe(ys, metrics=("mutual_knn", "cka", "cknna", "svcca"), topk=5)
    out = probe.score(X, null_permutations=7, seed=3)
    for m in probe.metrics:
        ref = prh_fast.align(X, ys, m, topk=5, null_permutations=7, seed=3)
        same(out[m], ref)
        for key, v in ref.null.items():
            w = out[m].null[key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w or v != v


def test_threads_give_sequential_results():
    X, ys = models(n=100)
    feats = [X, models(n=100, seed=3)[0], X[:, :2]]
    probe = Probe(ys, metrics=("mutual_knn", "cknna", "cka", "svcca"), topk=5)
    expected = [probe.score(f) for f in feats]
    got: dict = {}

    def work(i):
        got[i] = probe.score(feats[i % len(feats)])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(6):
        for m in probe.metrics:
            same(got[i][m], expected[i % len(feats)][m])


def test_errors_name_the_argument():
    X, ys = models(n=50)
    with pytest.raises(InputError, match="metrics: unknown metric 'nope'"):
        Probe(ys, metrics=("mutual_knn", "nope"))
    with pytest.raises(InputError, match="metrics: expected at least one"):
        Probe(ys, metrics=())
    with pytest.raises(InputError, match="cca_dim: not an option of any requested metric"):
        Probe(ys, metrics=("mutual_knn", "cka"), cca_dim=3)
    with pytest.raises(InputError, match="ties: 'expected' is defined for mutual_knn only"):
        Probe(ys, metrics=("mutual_knn", "cycle_knn"), ties="expected")
    with pytest.raises(InputError, match="unbiased: unbiased_cka is always unbiased"):
        Probe(ys, metrics=("unbiased_cka",), unbiased=False)
    with pytest.raises(InputError, match=r"metrics\['cka'\]: cka takes no option 'ties'"):
        Probe(ys, metrics={"cka": {"ties": "rule"}})
    with pytest.raises(InputError, match="topk"):
        Probe(ys, metrics=("mutual_knn",), topk=50)
    with pytest.raises(InputError, match="q"):
        Probe(ys, q=1.5)
    with pytest.raises(InputError, match="reference_feats"):
        Probe(torch.zeros(5, 3))
    with pytest.raises(InputError, match="cca_dim"):
        Probe(ys, metrics=("svcca",), cca_dim=17)
    with pytest.raises(InputError, match="cca_dim"):
        Probe(ys, metrics=("svcca",), cca_dim=12).score(X[:, :, :8])
    probe = Probe(ys, metrics=("mutual_knn",), topk=5)
    with pytest.raises(InputError, match="feats: has N = 49 samples, the probe's reference "
                                         "has N = 50"):
        probe.score(X[:49])
    with pytest.raises(InputError, match="feats"):
        probe.score("not features")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_align():
    X, ys = models(n=300)
    X, ys = X.cuda(), [y.cuda() for y in ys]
    probe = Probe(ys, metrics=SUPPORTED_METRICS, topk=10, q=0.95)
    out = probe.score(X)
    for m in SUPPORTED_METRICS:
        same(out[m], prh_fast.align(clip(X, 0.95), clip(ys, 0.95), m, topk=10))
    with pytest.raises(InputError, match="feats: on cpu"):
        probe.score(X.cpu())


def test_save_load_round_trip(tmp_path):
    X, ys = models(n=90)
    metrics = {"mutual_knn": {"ties": "expected"}, "cycle_knn": {}, "cknna": {},
               "cka": {}, "svcca": {"cca_dim": 4}}
    probe = Probe(ys, metrics=metrics, topk=5, q=0.95)
    folder = probe.save(tmp_path / "probe")
    assert sorted(p.name for p in (tmp_path / "probe").iterdir()
                  if not p.name.startswith(".")) == ["probe.json", "probe.safetensors"]
    loaded = Probe.load(folder, ys, metrics=metrics, topk=5, q=0.95)
    a, b = probe.score(X), loaded.score(X)
    for m in metrics:
        same(b[m], a[m])
    assert loaded.metrics == probe.metrics and loaded.n == 90
    # nothing in the folder is a pickle
    assert not any(p.read_bytes()[:2] == b"\x80\x04" for p in (tmp_path / "probe").iterdir()
                   if p.is_file())


def test_load_rejects_what_does_not_match(tmp_path):
    X, ys = models(n=60)
    folder = Probe(ys, metrics=("mutual_knn", "cka"), topk=5).save(tmp_path / "p")
    with pytest.raises(InputError, match="topk: the saved probe has topk=5, expected 6"):
        Probe.load(folder, topk=6)
    with pytest.raises(InputError, match="q: the saved probe has q=None"):
        Probe.load(folder, q=0.9)
    with pytest.raises(InputError, match="metrics: the saved probe has metrics"):
        Probe.load(folder, metrics=("mutual_knn",))
    with pytest.raises(InputError, match="metrics: the saved probe has metrics"):
        Probe.load(folder, kernel_metric="rbf")
    with pytest.raises(InputError, match="reference_feats: do not match"):
        Probe.load(folder, [y + 0.01 for y in ys])
    with pytest.raises(InputError, match="reference_feats: has N = 59"):
        Probe.load(folder, [y[:59] for y in ys])
    with pytest.raises(InputError, match="folder: .* holds no readable saved probe"):
        Probe.load(tmp_path / "missing")
    other = Probe([y + 1.0 for y in ys], metrics=("mutual_knn", "cka"), topk=5)
    other.save(tmp_path / "q")
    (tmp_path / "p" / "probe.safetensors").write_bytes(
        (tmp_path / "q" / "probe.safetensors").read_bytes())
    with pytest.raises(InputError, match="probe.safetensors does not belong to probe.json"):
        Probe.load(folder)
    (tmp_path / "p" / "probe.json").write_text('{"format": 99}')
    with pytest.raises(InputError, match="unknown probe format 99"):
        Probe.load(folder)


def test_approximate_search_reports_equal_align():
    pytest.importorskip("faiss")
    from prh_fast.testing import drifting_layers

    ref = drifting_layers(3000, 2, 32, seed=1)
    feats = drifting_layers(3000, 2, 32, seed=2)
    probe = Probe(ref, metrics=("mutual_knn", "cknna"), topk=5, backend="faiss-ivf")
    out = probe.score(feats)
    for m in probe.metrics:
        ref_res = prh_fast.align(feats, ref, m, topk=5, backend="faiss-ivf")
        assert ref_res.ann_report is not None
        same(out[m], ref_res)


def test_numpy_features_with_clipping():
    X, ys = models(n=64)
    Y = torch.stack([y[:, :16] for y in ys], dim=1)
    probe = Probe(Y.numpy(), metrics=("mutual_knn", "cka"), topk=5, q=0.9)
    out = probe.score(X.numpy())
    for m in probe.metrics:
        same(out[m], prh_fast.align(prepare_features(X.numpy(), q=0.9),
                                    prepare_features(Y.numpy(), q=0.9), m, topk=5))


def test_paths_as_reference_and_features(tmp_path):
    from prh_fast.store import pt_to_store

    X, ys = models(n=80)
    Y = torch.stack([y[:, :16] for y in ys], dim=1)
    xp, yp = str(tmp_path / "x.pt"), str(tmp_path / "y.pt")
    prh_fast.save_features(xp, X)
    prh_fast.save_features(yp, Y)
    folder = str(tmp_path / "y_store")
    pt_to_store(yp, folder)
    for reference in (yp, folder):
        probe = Probe(reference, metrics=("mutual_knn", "cka", "svcca"), topk=5)
        out = probe.score(xp)
        for m in probe.metrics:
            same(out[m], prh_fast.align(X, Y, m, topk=5))
    with pytest.raises(InputError, match="feats: cannot read features"):
        probe.score(str(tmp_path / "missing.pt"))


@pytest.mark.parametrize("metric", ["mutual_knn", "cycle_knn", "cka", "unbiased_cka", "cknna",
                                    "svcca"])
def test_against_the_float64_oracle(metric):
    import torch.nn.functional as F

    from prh_fast import reference

    X, ys = models(n=72, dtype=torch.float64)
    probe = Probe(ys, metrics=(metric,), topk=6)
    got = probe.score(X)[metric].scores
    kw = {"topk": 6} if "knn" in metric else {}
    for i in range(X.shape[1]):
        for j, y in enumerate(ys):
            want = reference.measure(metric, F.normalize(X[:, i], dim=-1),
                                     F.normalize(y, dim=-1), **kw)
            assert abs(float(got[i, j]) - float(want)) < 1e-9, (metric, i, j)
