"""Ties through the pipeline: ``align`` / ``align_models`` / the CLI report each layer's tie
structure, ``ties="expected"`` equals a direct computation of the expectation, and the
shuffled-pairing null gives permutation p-values."""
import json
import logging

import numpy as np
import pytest
import torch

import prh_fast
from prh_fast._align import permutation_p
from prh_fast.errors import InputError
from prh_fast.metrics._ties import neighbour_ties, relabel_ties


def _binary_layers(n=90, seed=0):
    """Two models' layers of 0/1 features (many exact ties that are not duplicates: a dot
    product counts shared ones) plus duplicated rows; every score is an exact small integer."""
    g = np.random.default_rng(seed)
    base = g.integers(0, 2, size=(n, 7)).astype(np.float64)
    base[10:30] = base[10]  # a block of duplicates
    other = base.copy()
    flip = g.random(other.shape) < 0.2
    other[flip] = 1 - other[flip]
    wide = np.concatenate([base, g.integers(0, 2, size=(n, 3))], axis=1)
    return [torch.tensor(base), torch.tensor(wide)], [torch.tensor(other)]


def _direct_expected(A: np.ndarray, B: np.ndarray, k: int) -> float:
    """mean_i sum_j p_A(i, j) p_B(i, j) / k from the dense float64 scores (exact here)."""
    def probs(X):
        S = X @ X.T
        np.fill_diagonal(S, -np.inf)
        P = np.zeros_like(S)
        for i in range(len(S)):
            sk = np.sort(S[i])[::-1][k - 1]
            G, T = S[i] > sk, S[i] == sk
            P[i, G] = 1.0
            P[i, T] = (k - G.sum()) / T.sum()
        return P

    return float((probs(A) * probs(B)).sum() / (len(A) * k))


def _direct_ties(X: np.ndarray, k: int):
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    srt = -np.sort(-S, axis=1)
    tied = int((srt[:, k - 1] == srt[:, k]).sum())
    return len(np.unique(X, axis=0)), tied


@pytest.mark.parametrize("k", [1, 4, 9])
def test_align_expected_matches_direct_expectation(k):
    xs, ys = _binary_layers()
    r = prh_fast.align(xs, ys, "mutual_knn", topk=k, normalize=False, ties="expected")
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            want = _direct_expected(x.numpy(), y.numpy(), k)
            assert abs(float(r.scores[i, j]) - want) < 1e-12
    assert r.ties["mode"] == "expected"
    rule = prh_fast.align(xs, ys, "mutual_knn", topk=k, normalize=False)
    assert not torch.allclose(rule.scores, r.scores)  # the tie rule decides here


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_align_tie_diagnostics_match_direct_count(k, dtype):
    xs, ys = _binary_layers(seed=1)
    r = prh_fast.align([x.to(dtype) for x in xs], [y.to(dtype) for y in ys], "lcs_knn", topk=k,
                       normalize=False)
    for side, layers in (("x", xs), ("y", ys)):
        for t, x in zip(r.ties[side], layers):
            distinct, tied = _direct_ties(x.numpy(), k)
            assert t["distinct_rows"] == distinct
            assert t["tied_rows"] == tied and t["n"] == x.shape[0]
            assert t["tied_fraction"] == pytest.approx(tied / x.shape[0])


def test_k_plus_one_search_keeps_the_lists():
    g = torch.Generator().manual_seed(3)
    X = torch.randint(0, 3, (70, 5), generator=g).float()
    r = prh_fast.align([X], [X], "mutual_knn", topk=6, normalize=False)
    assert float(r.scores[0, 0]) == 1.0
    from prh_fast.metrics import mutual_knn

    Y = X + 0.01 * torch.randn(70, 5, generator=g)
    r = prh_fast.align([X], [Y], "mutual_knn", topk=6, normalize=False)
    assert float(r.scores[0, 0]) == pytest.approx(mutual_knn(X, Y, 6), abs=0)
    # no (k+1)-th neighbour when k = N - 1: nothing is tied
    r = prh_fast.align([X[:8]], [Y[:8]], "mutual_knn", topk=7, normalize=False)
    assert r.ties["x"][0]["tied_rows"] == 0


def test_tie_warning_logged(caplog):
    xs, ys = _binary_layers()
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        prh_fast.align(xs, ys, "mutual_knn", topk=4, normalize=False)
    assert any("ties at the k-th neighbour" in r.getMessage() and "ties='expected'" in
               r.getMessage() for r in caplog.records)
    caplog.clear()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 8, generator=g)
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        r = prh_fast.align([X], [X + 0.1], "mutual_knn", topk=4)
    assert r.ties["x"][0]["tied_rows"] == 0 and r.ties["x"][0]["distinct_rows"] == 60
    assert not any("ties at" in r.getMessage() for r in caplog.records)


def test_ties_option_errors():
    xs, ys = _binary_layers()
    with pytest.raises(InputError, match="ties: 'expected' is defined for mutual_knn only"):
        prh_fast.align(xs, ys, "cycle_knn", topk=3, ties="expected")
    with pytest.raises(InputError, match="ties: only for the neighbour metrics"):
        prh_fast.align(xs, ys, "cka", ties="rule")
    with pytest.raises(InputError, match="ties: expected one of"):
        prh_fast.align(xs, ys, "mutual_knn", topk=3, ties="random")


def test_relabel_ties_matches_a_new_boundary():
    xs, _ = _binary_layers(seed=2)
    X = xs[0]
    t = neighbour_ties(X, 5)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        perm = torch.randperm(X.shape[0], generator=g)
        a, b = relabel_ties(t, perm), neighbour_ties(X[perm], 5)
        for f in ("n_greater", "n_tied", "indptr", "keys", "tied"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_expected_null_relabels():
    xs, ys = _binary_layers()
    r = prh_fast.align(xs, ys, "mutual_knn", topk=4, normalize=False, ties="expected",
                       null_permutations=5, seed=3)
    g = torch.Generator().manual_seed(3)  # the null's permutations, in order
    draws = [_direct_expected(xs[0].numpy(), ys[0][torch.randperm(xs[0].shape[0], generator=g)]
                              .numpy(), 4) for _ in range(5)]
    assert float(r.null["mean"][0, 0]) == pytest.approx(np.mean(draws), abs=1e-12)
    assert float(r.null["std"][0, 0]) == pytest.approx(np.std(draws, ddof=1), abs=1e-12)


def test_permutation_p_values():
    assert permutation_p(1.0, torch.zeros(9)) == pytest.approx(0.1)
    assert permutation_p(0.0, torch.zeros(9)) == 1.0  # ties count against the observation
    g = torch.Generator().manual_seed(0)
    base = torch.randn(120, 16, generator=g)
    X = torch.stack([base, base + 0.2 * torch.randn(120, 16, generator=g)], 1)
    Y = torch.stack([base + 0.3 * torch.randn(120, 16, generator=g)], 1)
    r = prh_fast.align(X, Y, "mutual_knn", topk=5, null_permutations=99)
    assert r.null["best_p"] == pytest.approx(0.01)  # every shuffle scores lower
    assert r.null["best_low"] <= r.null["best_mean"] <= r.null["best_high"] < r.best_score
    assert r.null["p"].shape == r.scores.shape and float(r.null["p"].min()) >= 0.01
    noise = torch.randn(120, 1, 16, generator=g)
    r = prh_fast.align(X, noise, "mutual_knn", topk=5, null_permutations=99)
    assert r.null["best_p"] > 0.01  # unrelated features: the observed best is not extreme
    for metric in ("cka", "svcca"):
        kw = {"cca_dim": 4} if metric == "svcca" else {}
        r = prh_fast.align(X, Y, metric, null_permutations=19, **kw)
        assert r.null["best_p"] == pytest.approx(0.05) and r.null["permutations"] == 19


def test_grid_ties_and_p_values(tmp_path):
    xs, ys = _binary_layers()
    X = torch.stack([xs[0], xs[0] * 2], 1)
    Y = torch.stack(ys, 1)
    r = prh_fast.align_models({"a": X}, {"b": Y}, "mutual_knn", topk=4, progress=False,
                              null_permutations=20, output_dir=tmp_path, ties="expected")
    t = r.options["ties"]
    assert t["mode"] == "expected" and set(t["models"]) == {"a", "b"}
    assert t["models"]["a"][0]["distinct_rows"] == len(np.unique(xs[0].numpy(), axis=0))
    assert 0 < r.null["best_p"][0, 0] <= 1 and "best_high" in r.null
    saved = json.loads((tmp_path / "mutual_knn_k4.json").read_text())
    assert "best_p" in saved["null"]
    # the same folder with the other tie mode is not silently resumed
    with pytest.raises(InputError, match="computed with ties='expected'"):
        prh_fast.align_models({"a": X}, {"b": Y}, "mutual_knn", topk=4, progress=False,
                              output_dir=tmp_path, ties="rule")
    again = prh_fast.align_models({"a": X}, {"b": Y}, "mutual_knn", topk=4, progress=False,
                                  output_dir=tmp_path, ties="expected")
    assert again.options.get("resumed_from")


def test_cli_ties_and_p_values(tmp_path, capsys):
    from prh_fast.cli import main

    xs, ys = _binary_layers()
    fx, fy = tmp_path / "x.pt", tmp_path / "y.pt"
    torch.save({"feats": torch.stack([xs[0], xs[0]], 1)}, fx)
    torch.save({"feats": torch.stack(ys, 1)}, fy)
    rc = main(["align", "--x", str(fx), "--y", str(fy), "--topk", "4", "--q", "1",
               "--output_dir", str(tmp_path / "out"), "--null-permutations", "30",
               "--ties", "expected", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ties: x: layer 0 has" in out and "expectation over tie breaks" in out
    assert "permutation p-value" in out and "smallest possible 0.0323" in out


@pytest.mark.parametrize("k", [1, 3, 8])
def test_rule_mutual_from_the_boundary_equals_the_search(k):
    """``expected_mutual(..., mode="rule")`` and a grid scored from cached boundaries give
    exactly the lists' mutual_knn (ties to the lower index), nulls included."""
    from prh_fast._align import _align_prepared, _knn_side, _metric_options
    from prh_fast.metrics import mutual_knn
    from prh_fast.metrics._ties import expected_mutual

    xs, ys = _binary_layers(seed=5)
    for x in xs:
        for y in ys:
            got = expected_mutual(neighbour_ties(x, k), neighbour_ties(y, k), mode="rule")
            assert got == pytest.approx(mutual_knn(x, y, k), abs=1e-12)
    kk, opts = _metric_options("mutual_knn", xs[0].shape[0], k, {})
    bx = _knn_side(xs, kk, None, ties="expected")
    by = _knn_side(ys, kk, None, ties="expected")
    idx = list(range(len(xs))), list(range(len(ys)))
    got = _align_prepared("mutual_knn", xs, ys, *idx, kk, opts, None, 7, 1, {},
                          x_cache=bx, y_cache=by)
    want = prh_fast.align(xs, ys, "mutual_knn", topk=k, normalize=False, null_permutations=7,
                          seed=1)
    assert torch.allclose(got.scores, want.scores, atol=1e-12, rtol=0)
    assert torch.allclose(got.null["mean"], want.null["mean"], atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_distinct_rows_is_exact(dtype):
    """Hash-then-compare counts exactly: duplicates, -0.0 equal to 0.0."""
    from prh_fast.metrics._ties import distinct_rows

    for seed in range(8):
        g = np.random.default_rng(seed)
        n, d = int(g.integers(1, 200)), int(g.integers(1, 7))
        X = torch.tensor(g.integers(-2, 3, size=(n, d)).astype(np.float64))
        X[torch.tensor(g.random((n, d)) < 0.2) & (X == 0)] = -0.0
        want = torch.unique(X + 0.0, dim=0).shape[0]
        assert distinct_rows(X.to(dtype)) == want


def test_alignment_result_json_round_trip():
    """to_dict -> JSON -> from_dict gives the same result (scores, pair, null, ties)."""
    from prh_fast._align import AlignmentResult

    xs, ys = _binary_layers()
    res = prh_fast.align(xs, ys, "mutual_knn", topk=4, normalize=False, null_permutations=9)
    back = AlignmentResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert torch.equal(back.scores, res.scores) and back.best_pair == res.best_pair
    assert back.best_score == res.best_score and back.ties == res.ties
    assert torch.equal(back.null["p"], res.null["p"]) and back.null["best_p"] == res.null["best_p"]
    with pytest.raises(InputError, match="d: scores of shape"):
        AlignmentResult.from_dict({**res.to_dict(), "x_layers": [0]})
    with pytest.raises(InputError, match="d: not an AlignmentResult"):
        AlignmentResult.from_dict({"metric": "cka"})
