"""align / compute_score: every layer pair in one pass equals looping the oracle pair by pair."""
import math

import pytest
import torch
import torch.nn.functional as F
from _data import paired_features

import prh_fast
from prh_fast import reference
from prh_fast._align import _relabel, best_pair
from prh_fast.knn import knn


def models(n=90, seed=0, dtype=torch.float64):
    """X: [N, 3, 24] tensor; Y: list of layers of widths 16, 40 (both views of one latent)."""
    xs, ys = [], []
    for s, (da, db) in enumerate([(24, 16), (24, 40), (24, 30)]):
        A, B = paired_features(n, da, db, seed=seed + s, noise=0.3 + 0.2 * s, dtype=dtype)
        xs.append(A)
        ys.append(B)
    return torch.stack(xs, dim=1), ys[:2]


def oracle_grid(X, Y, metric, topk, concat=False, **kw):
    xl = [X[:, i] for i in range(X.shape[1])]
    yl = list(Y)
    if concat:
        xl = [X.flatten(1)] + xl
        yl = [torch.cat(yl, dim=1)] + yl
    out = torch.empty(len(xl), len(yl), dtype=torch.float64)
    for i, x in enumerate(xl):
        for j, y in enumerate(yl):
            kk = dict(kw)
            if "knn" in metric:
                kk["topk"] = topk
            out[i, j] = reference.measure(metric, F.normalize(x, dim=-1), F.normalize(y, dim=-1),
                                          **kk)
    return out


def assert_best(score, pair, want):
    """Same best pair as the reference rule on the oracle's matrix; same score to rounding."""
    w_score, w_pair = best_pair(want)
    assert pair == w_pair
    assert score == pytest.approx(w_score, rel=1e-8, abs=1e-12)


CASES = [
    ("mutual_knn", {}), ("cycle_knn", {}), ("lcs_knn", {}), ("edit_distance_knn", {}),
    ("cknna", {}), ("cknna", {"unbiased": False}), ("cknna", {"distance_agnostic": True}),
    ("cka", {}), ("unbiased_cka", {}), ("cka", {"kernel_metric": "rbf"}),
    ("unbiased_cka", {"kernel_metric": "rbf", "rbf_sigma": 0.7}), ("svcca", {"cca_dim": 5}),
]


@pytest.mark.parametrize("metric,kw", CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_align_equals_oracle_loop(metric, kw):
    X, Y = models()
    res = prh_fast.align(X, Y, metric, topk=6, **kw)
    want = oracle_grid(X, Y, metric, 6, **kw)
    assert res.scores.shape == (3, 2)
    if metric.endswith("_knn"):
        torch.testing.assert_close(res.scores, want, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(res.scores, want, rtol=1e-8, atol=1e-10)
    assert_best(res.best_score, res.best_pair, want)
    assert res.best_pair is not None
    assert set(res.timings) >= {"prepare", "score", "total"}


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
def test_cka_gram_and_feature_space_agree(metric):
    """Wide layers and few samples pick Gram space; narrow layers pick feature space."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, 300, generator=g, dtype=torch.float64)
    Y = X[:, :, :200] + 0.5 * torch.randn(40, 2, 200, generator=g, dtype=torch.float64)
    res = prh_fast.align(X, Y, metric)
    assert res.timings["space"] == "gram"
    torch.testing.assert_close(res.scores, oracle_grid(X, list(Y.unbind(1)), metric, None),
                               rtol=1e-8, atol=1e-10)
    small = prh_fast.align(X, Y, metric, memory_budget=4096)  # many row blocks
    torch.testing.assert_close(small.scores, res.scores, rtol=1e-10, atol=1e-12)
    Xn, Yn = models(n=300)
    assert prh_fast.align(Xn, Yn, metric).timings["space"] == "feature"


def test_concat_candidate_scanned_first():
    X, Y = models()
    res = prh_fast.align(X, Y, "mutual_knn", topk=5, concat=True)
    assert res.x_layers == [-1, 0, 1, 2] and res.y_layers == [-1, 0, 1]
    torch.testing.assert_close(res.scores, oracle_grid(X, Y, "mutual_knn", 5, concat=True),
                               rtol=1e-12, atol=1e-12)


def test_compute_score_matches_reference_rule():
    X, Y = models()
    for metric in ("mutual_knn", "cka", "cknna"):
        score, pair = prh_fast.compute_score(X, Y, metric, topk=6)
        assert_best(score, pair, oracle_grid(X, Y, metric, 6))
    # all non-positive scores: best stays 0 and there is no pair, as in the reference
    neg = torch.tensor([[-0.1, 0.0], [-2.0, float("nan")]], dtype=torch.float64)
    assert best_pair(neg) == (0.0, None)


def test_ties_between_pairs_keep_the_first():
    scores = torch.tensor([[0.5, 0.7], [0.7, 0.1]], dtype=torch.float64)
    assert best_pair(scores) == (0.7, (0, 1))


def test_relabel_equals_search_on_shuffled_samples():
    A, _ = paired_features(120, 16, 8, seed=4, dtype=torch.float64)
    perm = torch.randperm(120, generator=torch.Generator().manual_seed(0))
    lists = knn(A, 7)
    assert torch.equal(_relabel(lists, perm), knn(A[perm], 7))


@pytest.mark.parametrize("metric", ["mutual_knn", "cknna", "cka", "svcca"])
def test_null_permutations(metric):
    X, Y = models(n=150)
    res = prh_fast.align(X, Y, metric, topk=6, null_permutations=6, seed=3)
    null = res.null
    assert null["permutations"] == 6
    assert null["mean"].shape == res.scores.shape == null["z"].shape
    # shuffled pairings score far below the structured ones, and reproducibly
    assert float(null["mean"].max()) < res.best_score
    assert null["best_z"] > 3
    again = prh_fast.align(X, Y, metric, topk=6, null_permutations=6, seed=3).null
    torch.testing.assert_close(again["mean"], null["mean"])
    d = res.to_dict()
    assert d["null"]["best_z"] == null["best_z"] and len(d["scores"]) == 3


def test_float32_layers_and_numpy():
    X, Y = models(dtype=torch.float32)
    res = prh_fast.align(X.numpy(), [y.numpy() for y in Y], "cka")
    torch.testing.assert_close(res.scores, oracle_grid(X.double(), [y.double() for y in Y],
                                                       "cka", None), rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    X, Y = models()
    with pytest.raises(ValueError, match="metric"):
        prh_fast.align(X, Y, "jaccard")
    with pytest.raises(ValueError, match="same number of samples"):
        prh_fast.align(X, [y[:-1] for y in Y], "cka")
    with pytest.raises(ValueError, match="x_feats"):
        prh_fast.align(X[:, 0], Y, "cka")
    with pytest.raises(ValueError, match=r"y_feats\[1\]"):
        prh_fast.align(X, [Y[0], Y[1][:-2]], "cka")
    with pytest.raises(ValueError, match="topk"):
        prh_fast.align(X, Y, "mutual_knn", topk=0)
    with pytest.raises(ValueError, match="NaN"):
        bad = X.clone()
        bad[0, 0, 0] = math.nan
        prh_fast.align(bad, Y, "cka")
    with pytest.raises(ValueError, match="unexpected keyword"):
        prh_fast.align(X, Y, "mutual_knn", kernel_metric="rbf")
    with pytest.raises(ValueError, match="null_permutations"):
        prh_fast.align(X, Y, "cka", null_permutations=-1)
