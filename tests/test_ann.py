"""Approximate FAISS backends (faiss-ivf, faiss-ivfpq, faiss-hnsw) and their recall report.

Oracles: the float64 reference lists (``prh_fast.reference.knn``) and direct set arithmetic on
the returned lists. Data has real structure (low-rank + noise, clusters), where an IVF or HNSW
index behaves as it would on model features; pure noise would make every index look bad.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from _data import HAS_FAISS, assert_knn_lists_match, paired_features, with_duplicates

from prh_fast import align, align_models, metrics, reference, store
from prh_fast.cli import _knn_backend, _UserError, main
from prh_fast.knn import AnnParams, knn
from prh_fast.knn import _backends as _backend

needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss not installed")
ANN = ["faiss-ivf", "faiss-ivfpq", "faiss-hnsw"]
K = 10


def clustered(n, d, centres=12, spread=0.35, seed=0):
    """Gaussian clusters of unequal sizes around random centres, rows L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(centres, d, generator=g, dtype=torch.float64)
    w = torch.rand(centres, generator=g, dtype=torch.float64) + 0.2
    lab = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    X = C[lab] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(X, dim=1).float()


@pytest.fixture(scope="module")
def pair():
    return paired_features(1500, 32, 48, latent=6, noise=0.3, seed=3)


def exact_sample_ok(rep, X, tol=1e-5):
    """``rep.exact`` equals the float64 oracle's lists of the sample rows, up to near-ties."""
    X64 = X.double()
    ref = reference.knn(X64, rep.k)[rep.sample]
    G = X64[rep.sample] @ X64.T
    rows = (rep.exact != ref).any(dim=1).nonzero().flatten()
    for r in rows.tolist():
        dev = (G[r, rep.exact[r]] - G[r, ref[r]]).abs().max().item()
        assert dev <= tol, f"sample row {int(rep.sample[r])}: exact list off by {dev}"


def set_recall(approx, exact):
    return [len(set(a) & set(e)) / len(e) for a, e in zip(approx.tolist(), exact.tolist())]


# ---------------------------------------------------------------------------- accuracy
@needs_faiss
def test_ivf_flat_probing_every_cell_is_exact(pair):
    A, _ = pair
    p = AnnParams("faiss-ivf", nlist=16, nprobe=16)
    idx, vals, rep = knn(A, K, backend=p, return_scores=True, return_report=True)
    assert idx.dtype == torch.int64 and idx.shape == (A.shape[0], K)
    assert_knn_lists_match(idx, A, exact=False, what="faiss-ivf nprobe=nlist")
    torch.testing.assert_close(vals.double(), (A.double()[:, None, :] * A.double()[idx]).sum(-1),
                               rtol=0, atol=1e-5)
    assert rep.recall >= 0.999 and rep.rows_completed == 0


@needs_faiss
@pytest.mark.parametrize("params", [
    AnnParams("faiss-hnsw", ef_search=256),
    AnnParams("faiss-ivfpq", nlist=16, nprobe=16, refine=30),
], ids=["hnsw", "ivfpq"])
def test_generous_parameters_reach_high_recall(pair, params):
    A, _ = pair
    idx, vals, rep = knn(A, K, backend=params, return_scores=True, return_report=True)
    assert rep.recall >= 0.97, rep.summary()
    assert not (idx == torch.arange(A.shape[0])[:, None]).any(), "self in a list"
    assert (idx.sort(dim=1).values.diff(dim=1) != 0).all(), "repeated neighbour"
    # returned scores are exact inner products (IVF-PQ re-scores its candidates)
    torch.testing.assert_close(vals.double(), (A.double()[:, None, :] * A.double()[idx]).sum(-1),
                               rtol=0, atol=1e-5)


@needs_faiss
def test_tight_parameters_lose_recall_and_say_so():
    _, loose = knn(clustered(3000, 32), K, backend="faiss-ivf:nprobe=1,nlist=64",
                   return_report=True)
    _, tight = knn(clustered(3000, 32), K, backend="faiss-ivf:nprobe=64,nlist=64",
                   return_report=True)
    assert loose.recall < tight.recall
    assert tight.recall >= 0.999


@needs_faiss
def test_rows_with_too_few_results_are_completed_exactly():
    X = clustered(400, 16, centres=10, spread=0.2, seed=5)
    k = 30
    idx, rep = knn(X, k, backend=AnnParams("faiss-ivf", nlist=10, nprobe=1, recall_sample=400),
                   return_report=True)
    assert rep.rows_completed > 0
    assert (idx >= 0).all() and not (idx == torch.arange(400)[:, None]).any()
    assert (idx.sort(dim=1).values.diff(dim=1) != 0).all()
    # completed rows are exact, so at least that many rows of the (full) sample are exact
    assert rep.rows_equal * 400 >= rep.rows_completed
    # no cell holds k + 1 = 201 points: every row is completed, and all lists are exact
    idx, rep = knn(X, 200, backend=AnnParams("faiss-ivf", nlist=10, nprobe=1),
                   return_report=True)
    assert rep.rows_completed == 400 and rep.recall == 1.0
    assert_knn_lists_match(idx, X, exact=False, what="completed rows")


@needs_faiss
@pytest.mark.parametrize("backend", ANN)
def test_lists_are_ordered_by_score_then_index(backend):
    X, _ = with_duplicates(300, 8, n_unique=60)
    X = torch.nn.functional.normalize(X, dim=1)
    idx, vals = knn(X, 7, backend=backend + ":recall_sample=50", return_scores=True)
    assert (vals.diff(dim=1) <= 0).all()
    tie = vals.diff(dim=1) == 0
    assert (idx.diff(dim=1)[tie] > 0).all(), "equal scores not in index order"


@needs_faiss
def test_cross_search_with_keys(pair):
    A, _ = pair
    Q, Kx = A[:200], A[200:]
    idx, rep = knn(Q, K, keys=Kx, backend="faiss-ivf:nlist=16,nprobe=16", return_report=True)
    ref = knn(Q, K, keys=Kx, backend="torch")
    assert idx.shape == (200, K)
    assert np.mean(set_recall(idx, ref)) >= 0.999
    assert rep.n == 200 and rep.n_keys == Kx.shape[0]


# ---------------------------------------------------------------------------- the report
@needs_faiss
@pytest.mark.parametrize("backend", ANN)
def test_report_matches_a_direct_computation(pair, backend):
    A, _ = pair
    idx, rep = knn(A, K, backend=backend + ":recall_sample=300,seed=4", return_report=True)
    s = rep.sample
    assert s.numel() == 300 and (s.diff() > 0).all() and 0 <= int(s.min())
    assert int(s.max()) < A.shape[0]
    assert torch.equal(rep.approx, idx[s])
    exact_sample_ok(rep, A)
    rec = set_recall(rep.approx, rep.exact)
    assert rep.recall == pytest.approx(np.mean(rec), abs=1e-12)
    assert rep.rows_equal == pytest.approx(np.mean([r == 1.0 for r in rec]), abs=1e-12)
    d = rep.to_dict()
    assert d["sample_size"] == 300 and d["params"]["seed"] == 4 and d["backend"] == backend
    assert {"train", "add", "search", "report"} <= set(d["timings"])


@needs_faiss
def test_report_is_logged(pair, caplog):
    A, _ = pair
    with caplog.at_level(logging.WARNING, logger="prh_fast"):
        knn(A, K, backend="faiss-ivf:nprobe=2")
    assert any("recall@10" in r.getMessage() and "faiss-ivf" in r.getMessage()
               for r in caplog.records)


@needs_faiss
def test_exact_backends_report_none(pair):
    A, _ = pair
    idx, rep = knn(A, K, backend="torch", return_report=True)
    assert rep is None and idx.shape == (A.shape[0], K)


@needs_faiss
@pytest.mark.parametrize("metric", ["mutual_knn", "lcs_knn", "edit_distance_knn", "cycle_knn",
                                    "cknna"])
def test_align_carries_the_metric_error(pair, metric):
    A, B = pair
    xs = [A, A + 0.05 * torch.randn_like(A)]
    ys = [B]
    be = "faiss-ivf:nprobe=2,recall_sample=400"
    res = align(xs, ys, metric=metric, topk=K, backend=be)
    rep = res.ann_report
    assert rep is not None and rep["backend"] == "faiss-ivf" and rep["sample_size"] == 400
    assert len(rep["x_layers"]) == 2 and len(rep["y_layers"]) == 1
    # direct computation from the same searches (deterministic, so a rerun gives the lists)
    xr = [knn(torch.nn.functional.normalize(x, dim=1), K, backend=be, return_report=True)[1]
          for x in xs]
    yr = [knn(torch.nn.functional.normalize(ys[0], dim=1), K, backend=be,
              return_report=True)[1]]
    assert [lay["recall"] for lay in rep["x_layers"]] == [r.recall for r in xr]
    assert rep["recall_min"] == min(r.recall for r in xr + yr)
    m = rep["metrics"]["mutual_knn"]
    for i, a in enumerate(xr):
        approx = np.mean(set_recall(a.approx, yr[0].approx))  # |a_i ∩ b_i| / k
        exact = np.mean(set_recall(a.exact, yr[0].exact))
        assert m["approx"][i][0] == pytest.approx(approx, abs=1e-12)
        assert m["exact"][i][0] == pytest.approx(exact, abs=1e-12)
        assert m["error"][i][0] == pytest.approx(abs(approx - exact), abs=1e-12)
    assert m["error_max"] == max(e for row in m["error"] for e in row)
    if metric in ("lcs_knn", "edit_distance_knn"):
        assert set(rep["metrics"]) == {"mutual_knn", metric}
    else:
        assert set(rep["metrics"]) == {"mutual_knn"}
    assert "ann_report" in res.to_dict()


@needs_faiss
def test_generous_parameters_give_no_metric_error(pair):
    A, B = pair
    res = align([A], [B], backend=AnnParams("faiss-ivf", nlist=16, nprobe=16))
    assert res.ann_report["metrics"]["mutual_knn"]["error_max"] <= 0.002
    exact = align([A], [B], backend="torch")
    assert exact.ann_report is None
    assert float(res.scores[0, 0]) == pytest.approx(float(exact.scores[0, 0]), abs=0.002)


@needs_faiss
def test_grid_records_the_report(pair):
    A, B = pair
    x = {"a": torch.stack([A, A.flip(1)], 1)}
    y = {"b": B[:, None, :]}
    res = align_models(x, y, backend="faiss-hnsw:recall_sample=200", progress=False)
    ann = res.options["ann"]
    assert ann["backend"] == "faiss-hnsw" and ann["sample_size"] == 200
    assert len(ann["models"]["a"]) == 2 and len(ann["models"]["b"]) == 1
    (p,) = ann["pairs"]
    assert p["x"] == "a" and len(p["mutual_knn_error"]) == 2
    assert ann["mutual_knn_error_max"] == p["mutual_knn_error_max"]
    exact = align_models(x, y, backend="cpu", progress=False)
    assert "ann" not in exact.options


# ---------------------------------------------------------------------------- parameters
def test_defaults_follow_n():
    # no query-time parameter given: the default target applies and they stay unset (tuned)
    p = AnnParams("faiss-ivf").resolved(1_000_000, 128, 10)
    assert (p.nlist, p.nprobe, p.train_size, p.recall_sample) == (4096, None, 262144, 1000)
    assert p.target_recall == 0.95
    small = AnnParams("faiss-ivf").resolved(500, 16, 10)
    assert small.nlist == 500 // 39 and small.train_size == 500 and small.recall_sample == 500
    pq = AnnParams("faiss-ivfpq").resolved(1_000_000, 128, 10)
    assert (pq.pq_m, pq.pq_nbits, pq.refine, pq.nprobe) == (32, 8, None, None)
    assert AnnParams("faiss-ivfpq").resolved(2000, 96, 10).pq_nbits < 8
    h = AnnParams("faiss-hnsw").resolved(1000, 8, 50)
    assert (h.hnsw_m, h.ef_construction, h.ef_search) == (32, 40, None)
    # one query-time parameter given: no target, the others take their defaults
    p = AnnParams("faiss-ivf", nlist=4096, nprobe=64).resolved(1_000_000, 128, 10)
    assert (p.nprobe, p.target_recall) == (64, None)
    pq = AnnParams("faiss-ivfpq", nprobe=8).resolved(1_000_000, 128, 10)
    assert (pq.nprobe, pq.refine, pq.target_recall) == (8, 4, None)
    pq = AnnParams("faiss-ivfpq", refine=2).resolved(1_000_000, 128, 10)
    assert (pq.nprobe, pq.refine, pq.target_recall) == (64, 2, None)
    h = AnnParams("faiss-hnsw", ef_search=30).resolved(1000, 8, 50)
    assert (h.ef_search, h.target_recall) == (30, None)


@pytest.mark.parametrize("kwargs, n, d, match", [
    ({"nprobe": 300, "nlist": 256}, 20000, 16, "nprobe"),
    ({"nlist": 600}, 500, 16, "nlist"),
    ({"nlist": 64, "train_size": 32}, 5000, 16, "train_size"),
    ({"train_size": 6000}, 5000, 16, "train_size"),
    ({"recall_sample": 501}, 500, 16, "recall_sample"),
])
def test_resolution_errors_name_the_argument(kwargs, n, d, match):
    with pytest.raises(ValueError, match=match):
        AnnParams("faiss-ivf", **kwargs).resolved(n, d, 10)


def test_pq_m_must_divide_d():
    with pytest.raises(ValueError, match="pq_m: must divide"):
        AnnParams("faiss-ivfpq", pq_m=5).resolved(5000, 16, 10)


@pytest.mark.parametrize("backend, kwargs, match", [
    ("faiss-ivf", {"ef_search": 10}, "ef_search: applies to faiss-hnsw"),
    ("faiss-hnsw", {"nprobe": 4}, "nprobe: applies to"),
    ("faiss-ivf", {"pq_m": 4}, "pq_m: applies to faiss-ivfpq"),
    ("faiss-ivf", {"nprobe": 0}, "nprobe: expected an integer >= 1"),
    ("faiss-ivf", {"nprobe": 2.5}, "nprobe: expected an integer"),
    ("faiss-ivf", {"nprobe": True}, "nprobe: expected an integer"),
    ("faiss-hnsw", {"hnsw_m": 1}, "hnsw_m: expected an integer >= 2"),
    ("faiss-ivfpq", {"pq_nbits": 17}, "pq_nbits"),
    ("faiss-ivf", {"seed": -1}, "seed"),
    ("faiss-lsh", {}, "backend"),
])
def test_construction_errors_name_the_argument(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnnParams(backend, **kwargs)


def test_spec_strings_and_aliases():
    p = AnnParams.parse("faiss-ivfpq:nprobe=8,m=16,nbits=6,seed=3")
    assert (p.backend, p.nprobe, p.pq_m, p.pq_nbits, p.seed) == ("faiss-ivfpq", 8, 16, 6, 3)
    h = AnnParams.parse("hnsw:M=24,efSearch=100,efConstruction=80")
    assert (h.backend, h.hnsw_m, h.ef_search, h.ef_construction) == ("faiss-hnsw", 24, 100, 80)
    assert AnnParams.parse(p.spec()) == p
    assert AnnParams.parse("faiss-ivf") == AnnParams()
    with pytest.raises(ValueError, match="knn option 'nprob'"):
        AnnParams.parse("faiss-ivf:nprob=3")
    with pytest.raises(ValueError, match="nprobe: expected an integer, got 'x'"):
        AnnParams.parse("faiss-ivf:nprobe=x")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        AnnParams.parse("faiss-ivf:nprobe")
    with pytest.raises(ValueError, match="given twice"):
        AnnParams.parse("faiss-hnsw:M=4,hnsw_m=5")
    assert set(AnnParams("faiss-hnsw").to_dict()) == {
        "backend", "hnsw_m", "ef_construction", "ef_search", "seed", "recall_sample",
        "target_recall"}


@needs_faiss
def test_bad_spec_fails_at_the_dispatch(pair):
    A, _ = pair
    with pytest.raises(ValueError, match="nprobe: expected 1..16"):
        knn(A, K, backend="faiss-ivf:nlist=16,nprobe=17")
    with pytest.raises(ValueError, match="backend"):
        knn(A, K, backend="faiss-ivx:nprobe=1")


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setattr(_backend, "faiss_available", lambda: False)
    for name in ANN + ["faiss-ivf:nprobe=2"]:
        with pytest.raises(RuntimeError, match=r"pip install faiss-cpu"):
            _backend.resolve_knn_backend(name, torch.device("cpu"))


# ---------------------------------------------------------------------------- determinism
@needs_faiss
@pytest.mark.parametrize("backend", ANN)
def test_same_seed_same_lists(backend):
    X = clustered(1200, 24, seed=2)
    be = backend + ":recall_sample=100,seed=7"
    i1, v1, r1 = knn(X, K, backend=be, return_scores=True, return_report=True)
    i2, v2, r2 = knn(X, K, backend=be, return_scores=True, return_report=True)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)
    assert torch.equal(r1.sample, r2.sample) and r1.recall == r2.recall
    _, r3 = knn(X, K, backend=backend + ":recall_sample=100,seed=8", return_report=True)
    assert not torch.equal(r1.sample, r3.sample)


# ---------------------------------------------------------------------------- dispatch
@needs_faiss
@pytest.mark.parametrize("backend", ANN)
def test_names_dispatch_through_the_public_api(pair, backend):
    A, B = pair
    idx = knn(A, K, backend=backend)
    assert idx.shape == (A.shape[0], K) and idx.dtype == torch.int64
    s = metrics.mutual_knn(A, B, K, backend=backend)
    s_exact = metrics.mutual_knn(A, B, K, backend="torch")
    assert 0.0 < s <= 1.0 and abs(s - s_exact) < 0.1
    assert align([A], [B], backend=backend).ann_report["backend"] == backend


@needs_faiss
def test_environment_variable_carries_the_parameters(pair, monkeypatch):
    A, _ = pair
    monkeypatch.setenv("PRH_FAST_BACKEND", "faiss-ivf:nlist=8,nprobe=3,recall_sample=50")
    _, rep = knn(A, K, return_report=True)
    assert rep.params["nlist"] == 8 and rep.params["nprobe"] == 3
    assert rep.sample.numel() == 50


@needs_faiss
def test_float64_input(pair):
    A, _ = pair
    idx, vals = knn(A.double(), K, backend="faiss-hnsw", return_scores=True)
    assert vals.dtype == torch.float64 and idx.shape == (A.shape[0], K)


# ---------------------------------------------------------------------------- CLI
def test_cli_option_parsing():
    p = _knn_backend("faiss-ivf", ["nprobe=16", "nlist=128"])
    assert p == AnnParams("faiss-ivf", nprobe=16, nlist=128)
    assert _knn_backend("faiss-hnsw:M=8", ["efSearch=40"]) == AnnParams(
        "faiss-hnsw", hnsw_m=8, ef_search=40)
    assert _knn_backend("faiss-ivf", []) == "faiss-ivf"
    assert _knn_backend(None, []) is None
    with pytest.raises(_UserError, match="--knn-option"):
        _knn_backend("cpu", ["nprobe=2"])
    with pytest.raises(_UserError, match="--knn-option"):
        _knn_backend(None, ["nprobe=2"])
    with pytest.raises(ValueError, match="ef_search"):
        _knn_backend("faiss-ivf", ["efSearch=2"])


@pytest.fixture()
def feature_files(tmp_path):
    A, B = paired_features(600, 24, 32, latent=5, noise=0.3, seed=1)
    fx, fy = tmp_path / "x.pt", tmp_path / "y.pt"
    store.save_features(fx, torch.stack([A, A.flip(1)], 1), num_params=1)
    store.save_features(fy, B[:, None, :], num_params=1)
    return str(fx), str(fy)


@needs_faiss
def test_cli_align_with_an_approximate_backend(feature_files, tmp_path, capsys):
    fx, fy = feature_files
    out = tmp_path / "out"
    rc = main(["align", "--x", fx, "--y", fy, "--output_dir", str(out), "--no-progress",
               "--knn-backend", "faiss-ivf", "--knn-option", "nprobe=2",
               "--knn-option", "recall_sample=100"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "approximate kNN faiss-ivf" in text and "nprobe=2" in text and "recall@10" in text
    import json

    d = json.loads((out / "mutual_knn_k10.json").read_text())
    assert d["options"]["ann"]["params"]["nprobe"] == 2
    # 100 rows at first; the sample grows (to at most N = 600) while a metric error is not
    # resolved
    assert 100 <= d["options"]["ann"]["sample_size"] <= 600


@pytest.mark.parametrize("extra, match", [
    (["--backend", "cpu", "--knn-option", "nprobe=2"], "--knn-option: applies to"),
    (["--backend", "faiss-ivf", "--knn-option", "nprob=2"], "knn option 'nprob'"),
    (["--backend", "faiss-ivf", "--knn-option", "nprobe"], "KEY=VALUE"),
])
def test_cli_rejects_bad_options(feature_files, tmp_path, capsys, extra, match):
    fx, fy = feature_files
    rc = main(["align", "--x", fx, "--y", fy, "--output_dir", str(tmp_path / "o"),
               "--no-progress"] + extra)
    assert rc == 2
    assert match in capsys.readouterr().err


@needs_faiss
def test_distributed_search_refuses_approximate_backends(pair):
    from prh_fast.distributed import knn as dknn

    A, _ = pair
    with pytest.raises(ValueError, match="approximate 'faiss-ivf'"):
        dknn(A, K, backend="faiss-ivf:nprobe=2")
