"""A requested recall (``target_recall``) and the uncertainty of the approximate search's report.

Oracles: the tuning is checked against explicit searches one step below the chosen setting;
the intervals against direct computations (numpy) on the report's own lists; the grown samples
against the exact float64 lists of ``prh_fast.reference`` and the returned lists. Data have real
shared structure (``paired_features``: one latent seen through two nonlinear maps).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from _data import HAS_FAISS, paired_features, with_duplicates

from prh_fast import align, reference
from prh_fast._align import ann_pair_report
from prh_fast.cli import _knn_backend
from prh_fast.errors import InputError
from prh_fast.knn import AnnParams, knn
from prh_fast.knn._faiss_ann import (
    DEFAULT_TARGET_RECALL,
    mean_ci,
    recall_at_k,
    sample_rows,
    tune_query,
)
from prh_fast.metrics._neighbours import row_values_torch

needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
K = 10
Z = 1.959963984540054


@pytest.fixture(scope="module")
def pair():
    return paired_features(3000, 32, 40, latent=8, noise=0.3, seed=5)


def knn_report(X, backend):
    return knn(X, K, backend=backend, return_report=True)


# ---------------------------------------------------------------------------- parameters
def test_parse_target_recall_from_specs_and_the_cli():
    p = AnnParams.parse("faiss-ivf:target_recall=0.9,nlist=64")
    assert (p.target_recall, p.nlist, p.nprobe) == (0.9, 64, None)
    assert AnnParams.parse("hnsw:target=0.8").target_recall == 0.8
    assert AnnParams.parse(p.spec()) == p
    assert AnnParams.from_options("faiss-ivfpq", {"target_recall": 1}).target_recall == 1.0
    assert _knn_backend("faiss-ivf", ["target_recall=0.97"]) == AnnParams(
        "faiss-ivf", target_recall=0.97)
    assert AnnParams("faiss-ivf", target_recall=0.9).to_dict()["target_recall"] == 0.9


@pytest.mark.parametrize("spec", ["faiss-ivf:target_recall=0", "faiss-ivf:target_recall=1.5",
                                  "faiss-ivf:target_recall=x", "faiss-ivf:target_recall=-0.1",
                                  "faiss-ivf:target_recall=nan"])
def test_bad_target_recall_names_the_argument(spec):
    with pytest.raises(InputError, match="target_recall"):
        AnnParams.parse(spec)


def test_bad_target_recall_types():
    for bad in (True, "0.9", [0.9]):
        with pytest.raises(InputError, match="target_recall"):
            AnnParams("faiss-ivf", target_recall=bad)


@pytest.mark.parametrize("backend, kwargs", [
    ("faiss-ivf", {"nprobe": 4}),
    ("faiss-ivfpq", {"nprobe": 4}),
    ("faiss-ivfpq", {"refine": 8}),
    ("faiss-hnsw", {"ef_search": 40}),
])
def test_explicit_query_parameters_and_a_target_is_an_error(backend, kwargs):
    with pytest.raises(InputError, match="target_recall") as err:
        AnnParams(backend, target_recall=0.9, **kwargs)
    assert next(iter(kwargs)) in str(err.value)
    with pytest.raises(InputError, match="target_recall"):
        _knn_backend(backend, ["target_recall=0.9"] + [f"{a}={v}" for a, v in kwargs.items()])


def test_which_target_applies():
    assert AnnParams("faiss-ivf").target() == DEFAULT_TARGET_RECALL == 0.95
    assert AnnParams("faiss-ivf", nlist=64, seed=3).target() == 0.95  # build-time only
    assert AnnParams("faiss-ivf", nprobe=3).target() is None
    assert AnnParams("faiss-ivfpq", refine=2).target() is None
    assert AnnParams("faiss-hnsw", hnsw_m=8).target() == 0.95
    assert AnnParams("faiss-hnsw", ef_search=20).target() is None
    assert AnnParams("faiss-hnsw", target_recall=0.5).target() == 0.5


# ---------------------------------------------------------------------------- nested samples
@pytest.mark.parametrize("n, seed", [(10, 0), (1000, 3), (54321, 7)])
def test_samples_are_nested_sorted_and_seeded(n, seed):
    prev = None
    for size in (1, 5, 9, 64, 500, n, n + 5):
        s = sample_rows(n, size, seed)
        assert s.dtype == torch.int64 and s.numel() == min(size, n)
        assert (s.diff() > 0).all() and int(s.min()) >= 0 and int(s.max()) < n
        assert torch.equal(s, sample_rows(n, size, seed))
        if prev is not None:
            assert torch.isin(prev, s).all(), "a larger sample lost rows of a smaller one"
        prev = s
    assert torch.equal(sample_rows(n, n, seed), torch.arange(n))
    if n > 100:
        assert not torch.equal(sample_rows(n, 50, seed), sample_rows(n, 50, seed + 1))


# ---------------------------------------------------------------------------- intervals
def test_mean_ci_against_a_direct_computation():
    rng = np.random.default_rng(0)
    v = rng.random(137)
    m, se, lo, hi = mean_ci(torch.from_numpy(v))
    sd = np.std(v, ddof=1)
    assert m == pytest.approx(v.mean(), abs=1e-15)
    assert se == pytest.approx(sd / math.sqrt(137), rel=1e-12)
    assert (lo, hi) == pytest.approx((m - Z * se, m + Z * se), rel=1e-12)
    # drawn without replacement from 500 rows: the finite-population factor
    _, se_f, _, _ = mean_ci(torch.from_numpy(v), population=500)
    assert se_f == pytest.approx(se * math.sqrt((500 - 137) / 499), rel=1e-12)
    # every row: known exactly
    assert mean_ci(torch.from_numpy(v), population=137)[1] == 0.0
    assert mean_ci(torch.tensor([0.25]))[1:] == (0.0, 0.25, 0.25)
    with pytest.raises(InputError, match="values"):
        mean_ci(torch.empty(0))


def test_recall_counts_ties_with_the_kth_score():
    approx = torch.tensor([[1, 2, 7], [4, 5, -1]])
    exact = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert recall_at_k(approx, exact).tolist() == pytest.approx([2 / 3, 2 / 3])
    # 7 scores as the 3rd exact neighbour (a tie); -1 (no neighbour) never counts
    scores = torch.tensor([[0.9, 0.8, 0.5], [0.9, 0.8, float("-inf")]], dtype=torch.float64)
    kth = torch.tensor([0.5, 0.4], dtype=torch.float64)
    assert recall_at_k(approx, exact, scores, kth).tolist() == pytest.approx([1.0, 2 / 3])


# ---------------------------------------------------------------------------- tuning
def curve(recall_of):
    """A fake index: ``recall_of(q) -> r`` gives lists of ``round(r·k)`` exact neighbours."""
    exact = torch.arange(40 * K).view(40, K)

    def search(q):
        hits = round(recall_of(q) * K)
        out = exact.clone()
        out[:, hits:] += 100_000
        return out

    return search, exact


@pytest.mark.parametrize("target, want", [(0.5, 5), (0.55, 6), (0.1, 1), (1.0, 10), (0.95, 10)])
def test_tuning_picks_the_smallest_setting(target, want):
    search, exact = curve(lambda q: min(1.0, q.nprobe / 10))
    p = AnnParams("faiss-ivf", nlist=16, target_recall=target).resolved(10_000, 8, K)
    q, tuning = tune_query(p, search, exact, K)
    assert q.nprobe == want and q.target_recall is None
    tried = dict((t[0]["nprobe"], t[1]) for t in tuning["trials"])
    assert tried[want] >= target and (want == 1 or tried[want - 1] < target)
    assert tuning["chosen"] == {"nprobe": want} and tuning["target"] == target
    assert tuning["recall"] == tried[want] and tuning["sample_size"] == 40
    assert len(tuning["trials"]) <= 2 * math.ceil(math.log2(16)) + 1
    json.dumps(tuning)


def test_tuning_error_names_the_target_and_the_best_recall():
    search, exact = curve(lambda q: min(0.7, q.ef_search / 1000))
    p = AnnParams("faiss-hnsw", target_recall=0.9).resolved(500, 8, K)
    with pytest.raises(InputError, match=r"target_recall: 0.9 not reached") as err:
        tune_query(p, search, exact, K, n_keys=500)
    msg = str(err.value)
    assert "best recall@10 on 40 sampled rows = 0.5000 at ef_search=500" in msg
    assert "ef_search up to 500" in msg


def test_ivfpq_tuning_raises_refine_when_nprobe_is_not_enough():
    # recall grows with nprobe and saturates at 0.025 · refine (0.4 at 16, 0.8 at 32)
    search, exact = curve(lambda q: min(0.025 * q.refine, q.nprobe / 8))
    p = AnnParams("faiss-ivfpq", nlist=8, target_recall=0.5).resolved(10_000, 16, K)
    q, tuning = tune_query(p, search, exact, K)
    assert (q.nprobe, q.refine) == (4, 32)
    # each refine first at nprobe = nlist; the last one is then tuned
    assert [tuple(t[0].values()) for t in tuning["trials"]][:4] == [(8, 4), (8, 8), (8, 16),
                                                                     (8, 32)]


def test_no_target_no_tuning():
    p = AnnParams("faiss-ivf", nprobe=3).resolved(1000, 8, K)
    assert tune_query(p, lambda q: 1 / 0, torch.zeros(3, K, dtype=torch.int64), K) == (p, None)


@needs_faiss
@pytest.mark.parametrize("params, knob", [
    (AnnParams("faiss-ivf", nlist=64, target_recall=0.9, recall_sample=600), "nprobe"),
    (AnnParams("faiss-hnsw", hnsw_m=4, ef_construction=8, target_recall=0.95,
               recall_sample=600), "ef_search"),
], ids=["ivf", "hnsw"])
def test_target_is_reached_with_the_smallest_setting(pair, params, knob):
    A, _ = pair
    idx, rep = knn_report(A, params)
    chosen = rep.params[knob]
    assert rep.recall >= params.target_recall and rep.target_recall == params.target_recall
    assert rep.tuning["chosen"][knob] == chosen and rep.tuning["recall"] == rep.recall
    lo, hi = rep.recall_ci
    assert lo <= rep.recall <= hi
    # the report's own recall is the tuning's trial at the chosen setting (same rows, lists)
    tried = {t[0][knob]: t[1] for t in rep.tuning["trials"]}
    assert tried[chosen] == rep.recall
    # one step lower, searched with explicit parameters: below the target
    lower = AnnParams.parse(rep_spec(rep, knob, chosen - 1))
    _, rep_lo = knn_report(A, lower)
    floor = 1 if knob == "nprobe" else K + 1
    assert chosen == max(floor, 16 if knob == "ef_search" else 1) or \
        rep_lo.recall < params.target_recall
    # the chosen parameters, given explicitly, reproduce the search without tuning
    again_idx, again = knn_report(A, AnnParams.parse(rep_spec(rep, knob, chosen)))
    assert again.tuning is None and torch.equal(again_idx, idx)


def rep_spec(rep, knob, value):
    kv = {a: v for a, v in rep.params.items()
          if a not in ("backend", "target_recall") and v is not None}
    kv[knob] = value
    return rep.backend + ":" + ",".join(f"{a}={v}" for a, v in kv.items())


@needs_faiss
def test_ivfpq_target_is_reached(pair):
    A, _ = pair
    p = AnnParams("faiss-ivfpq", nlist=16, pq_m=4, pq_nbits=4, target_recall=0.9,
                  recall_sample=300)
    idx, rep = knn_report(A[:2000], p)
    assert rep.recall >= 0.9 and rep.params["refine"] >= 4
    tried = {(t[0]["nprobe"], t[0]["refine"]): t[1] for t in rep.tuning["trials"]}
    n, r = rep.params["nprobe"], rep.params["refine"]
    assert tried[(n, r)] >= 0.9 and (n == 1 or tried[(n - 1, r)] < 0.9)


@needs_faiss
def test_unreachable_target_is_an_error_with_the_best_recall(pair):
    A, _ = pair
    # one cell, one bit per code: the re-scored candidates are close to a random subset
    p = AnnParams("faiss-ivfpq", nlist=1, pq_m=1, pq_nbits=1, target_recall=0.99,
                  recall_sample=200)
    with pytest.raises(InputError, match="target_recall: 0.99 not reached by faiss-ivfpq") \
            as err:
        knn(A, K, backend=p)
    assert "best recall@10 on 200 sampled rows = 0." in str(err.value)
    assert "refine=64" in str(err.value)


@needs_faiss
@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-ivfpq", "faiss-hnsw"])
def test_the_default_target_applies(pair, backend):
    A, _ = pair
    _, rep = knn_report(A[:2000], backend + ":recall_sample=300")
    assert rep.target_recall == 0.95 and rep.tuning is not None
    assert rep.recall >= 0.95
    d = rep.to_dict()
    assert d["target_recall"] == 0.95 and len(d["recall_ci"]) == 2 and d["tuning"]["trials"]
    assert "tune" in d["timings"] and "seconds" not in d["tuning"]
    json.dumps(d)
    assert "tuned to target 0.95" in rep.summary()
    # an explicit query-time parameter: used as given
    explicit = {"faiss-ivf": "nprobe=2", "faiss-ivfpq": "nprobe=2",
                "faiss-hnsw": "ef_search=11"}[backend]
    _, rep2 = knn_report(A[:2000], f"{backend}:{explicit},recall_sample=300")
    assert rep2.target_recall is None and rep2.tuning is None
    assert rep2.to_dict()["tuning"] is None


@needs_faiss
def test_duplicated_rows_reach_the_target():
    # exact duplicates: neighbours tied with the k-th are as good as the exact list's
    X, _ = with_duplicates(600, 8, n_unique=100)
    X = torch.nn.functional.normalize(X, dim=1)
    _, rep = knn(X, 7, backend="faiss-ivf", return_report=True)
    assert rep.recall >= 0.95


@needs_faiss
def test_report_recall_ci_against_a_direct_computation(pair):
    A, _ = pair
    _, rep = knn_report(A, "faiss-ivf:nprobe=2,recall_sample=400")
    per_row = np.array([len(set(a) & set(e)) / K
                        for a, e in zip(rep.approx.tolist(), rep.exact.tolist())])
    n, s = A.shape[0], 400
    se = per_row.std(ddof=1) / math.sqrt(s) * math.sqrt((n - s) / (n - 1))
    assert rep.recall == pytest.approx(per_row.mean(), abs=1e-12)
    assert rep.recall_ci == pytest.approx((per_row.mean() - Z * se, per_row.mean() + Z * se),
                                          abs=1e-12)


# ---------------------------------------------------------------------------- metric error
def paired_errors(x_rep, y_rep, n):
    """Direct: mutual_knn per-row differences of the two reports' lists."""
    va = np.array([len(set(a) & set(b)) / K
                   for a, b in zip(x_rep.approx.tolist(), y_rep.approx.tolist())])
    ve = np.array([len(set(a) & set(b)) / K
                   for a, b in zip(x_rep.exact.tolist(), y_rep.exact.tolist())])
    d = va - ve
    s = d.size
    se = d.std(ddof=1) / math.sqrt(s) * math.sqrt((n - s) / (n - 1))
    return d.mean(), se


@needs_faiss
def test_metric_error_uncertainty_against_a_direct_computation(pair):
    A, B = pair
    be = "faiss-ivf:nprobe=2,recall_sample=500"
    xr = [knn_report(A, be)[1], knn_report(A + 0.05 * torch.randn_like(A), be)[1]]
    yr = [knn_report(B, be)[1]]
    rep = ann_pair_report("mutual_knn", K, xr, yr, error_tolerance=1.0)  # no growth
    m = rep["metrics"]["mutual_knn"]
    assert rep["sample_size"] == rep["sample_initial"] == 500
    for i, x in enumerate(xr):
        mean, se = paired_errors(x, yr[0], A.shape[0])
        assert m["error"][i][0] == pytest.approx(abs(mean), abs=1e-12)
        assert m["error_se"][i][0] == pytest.approx(se, rel=1e-9, abs=1e-15)
        assert m["error_ci"][i][0] == pytest.approx([mean - Z * se, mean + Z * se], abs=1e-12)
        assert m["error_bound"][i][0] == pytest.approx(abs(mean) + Z * se, abs=1e-12)
        assert m["resolved"][i][0] is True
        lo, hi = m["error_ci"][i][0]
        assert m["biased"][i][0] == (lo > 0 or hi < 0)
    assert rep["resolved"] is True and m["resolved_all"] is True
    assert m["error_bound_max"] == max(b for row in m["error_bound"] for b in row)
    json.dumps(rep)
    # a tolerance below the half-width: resolved only when the interval lies beyond it
    for tol in (1e-12, 0.01, 0.02):
        t = ann_pair_report("mutual_knn", K, xr, yr, error_tolerance=tol, max_sample=500)
        for i, row in enumerate(t["metrics"]["mutual_knn"]["resolved"]):
            lo, hi = t["metrics"]["mutual_knn"]["error_ci"][i][0]
            assert row[0] == ((hi - lo) / 2 <= tol or lo > tol or hi < -tol)


@needs_faiss
def test_unresolved_errors_grow_the_sample(pair):
    A, B = pair
    n = A.shape[0]
    # recall ~0.99: errors of a few 0.001, within noise on 300 rows
    be = "faiss-ivf:nprobe=12,recall_sample=300"
    (ia, xa), (ib, yb) = knn_report(A, be), knn_report(B, be)
    first = xa.sample.clone()
    rep = ann_pair_report("lcs_knn", K, [xa], [yb], error_tolerance=0.001, max_sample=1000)
    # 300 -> 600 -> 1000 (the cap), every report on the same nested rows
    assert rep["sample_initial"] == 300 and rep["sample_size"] == 1000
    assert rep["sample_max"] == 1000 and set(rep["metrics"]) == {"mutual_knn", "lcs_knn"}
    assert torch.equal(xa.sample, yb.sample) and torch.equal(xa.sample, sample_rows(n, 1000, 0))
    assert torch.isin(first, xa.sample).all()
    # the grown rows: the returned approximate lists and the exact lists of those rows
    assert torch.equal(xa.approx, ia[xa.sample]) and torch.equal(yb.approx, ib[yb.sample])
    ref = reference.knn(A.double(), K)[xa.sample]
    assert (xa.exact.sort(1).values == ref.sort(1).values).all(1).double().mean() > 0.99
    assert rep["x_layers"][0]["sample_size"] == 1000 and "grow" in xa.timings
    mean, se = paired_errors(xa, yb, n)
    assert rep["metrics"]["mutual_knn"]["error_se"][0][0] == pytest.approx(se, rel=1e-9)
    # lcs_knn's error from the grown lists, against row values computed directly
    va = row_values_torch("lcs", xa.approx, yb.approx).double()
    ve = row_values_torch("lcs", xa.exact, yb.exact).double()
    assert rep["metrics"]["lcs_knn"]["error"][0][0] == pytest.approx(
        abs(float((va - ve).mean())), abs=1e-12)
    # the whole data set as the sample: known exactly, hence resolved
    xa.grow(n)
    yb.grow(n)
    full = ann_pair_report("mutual_knn", K, [xa], [yb], error_tolerance=1e-12)
    assert full["sample_size"] == n and full["resolved"] is True
    assert full["metrics"]["mutual_knn"]["error_se"] == [[0.0]]


@needs_faiss
def test_released_reports_do_not_grow_and_say_so(pair):
    A, B = pair
    be = "faiss-ivf:nprobe=12,recall_sample=200"
    xa, yb = knn_report(A, be)[1], knn_report(B, be)[1]
    xa.release()
    assert not xa.can_grow
    with pytest.raises(InputError, match="cannot grow"):
        xa.grow(400)
    lo, hi = ann_pair_report("mutual_knn", K, [xa], [yb],
                             error_tolerance=1.0)["metrics"]["mutual_knn"]["error_ci"][0][0]
    tol = 0.99 * (hi - lo) / 2  # just below the half-width
    assert not (lo > tol or hi < -tol), "the interval lies beyond the tolerance: pick another"
    rep = ann_pair_report("mutual_knn", K, [xa], [yb], error_tolerance=tol)
    assert rep["sample_size"] == 200 and rep["resolved"] is False
    # a report that grew alone is compared with the other on their common rows
    yb.grow(400)
    rep = ann_pair_report("mutual_knn", K, [xa], [yb], error_tolerance=1.0)
    assert rep["sample_size"] == 200


@needs_faiss
def test_pickled_report_keeps_the_sample_not_the_search(pair):
    import pickle

    A, _ = pair
    rep = knn_report(A, "faiss-ivf:nprobe=12,recall_sample=200")[1]
    assert rep.can_grow
    back = pickle.loads(pickle.dumps(rep))  # what torch.distributed's object gathers do
    assert not back.can_grow and rep.can_grow
    assert torch.equal(back.sample, rep.sample) and torch.equal(back.approx, rep.approx)
    assert back.to_dict() == rep.to_dict()


@needs_faiss
def test_align_reports_resolution_and_sample(pair):
    A, B = pair
    res = align([A, A.flip(1)], [B], metric="mutual_knn", topk=K,
                backend="faiss-ivf:nprobe=2,recall_sample=250")
    rep = res.ann_report
    assert rep["sample_initial"] == 250 and rep["sample_size"] >= 250
    m = rep["metrics"]["mutual_knn"]
    assert len(m["error_se"]) == 2 and len(m["error_ci"][0][0]) == 2
    assert rep["resolved"] == all(v for row in m["resolved"] for v in row)
    assert rep["resolved"] or rep["sample_size"] == min(A.shape[0], 32_000)
    lay = rep["x_layers"][0]
    assert {"target_recall", "recall_ci", "tuning", "sample_size"} <= set(lay)
    assert lay["sample_size"] == rep["sample_size"]
    json.dumps(res.to_dict())
