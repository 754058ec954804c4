"""Bad input never crashes and never yields a silent number: every case raises ValueError whose
message names the offending argument."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _data import paired_features

from prh_fast import metrics
from prh_fast.knn import knn

N = 10
ALL = ["cycle_knn", "mutual_knn", "lcs_knn", "cka", "unbiased_cka", "cknna", "svcca",
       "edit_distance_knn"]
KNN_METRICS = ["cycle_knn", "mutual_knn", "lcs_knn", "edit_distance_knn"]
TOPK_METRICS = KNN_METRICS + ["cknna"]


def _kw(metric):
    if metric in TOPK_METRICS:
        return {"topk": 3}
    if metric == "svcca":
        return {"cca_dim": 2}
    return {}


def good():
    return paired_features(N, 4, 5)


def _raises(match, metric, A, B, **kwargs):
    with pytest.raises(ValueError, match=match):
        metrics.measure(metric, A, B, **kwargs)


# --------------------------------------------------------------------------- the features
BAD_FEATURES = {
    "rank1": lambda X: X[:, 0],
    "rank3": lambda X: X.unsqueeze(0),
    "scalar": lambda X: X[0, 0],
    "no_rows": lambda X: X[:0],
    "no_columns": lambda X: X[:, :0],
    "nan": lambda X: torch.where(torch.arange(X.numel()).view(X.shape) == 7, math.nan, X),
    "inf": lambda X: torch.where(torch.arange(X.numel()).view(X.shape) == 3, -math.inf, X),
    "int64": lambda X: (X * 10).long(),
    "int32_numpy": lambda X: (X * 10).int().numpy(),
    "bool": lambda X: X > 0,
    "numpy_nan": lambda X: np.where(np.arange(X.numel()).reshape(X.shape) == 2, np.nan, X.numpy()),
    "list": lambda X: X.tolist(),
}


@pytest.mark.parametrize("bad", list(BAD_FEATURES))
@pytest.mark.parametrize("metric", ALL)
def test_bad_feats_A(metric, bad):
    A, B = good()
    _raises("feats_A", metric, BAD_FEATURES[bad](A), B, **_kw(metric))


@pytest.mark.parametrize("bad", ["rank3", "no_columns", "nan", "inf", "int64", "bool"])
@pytest.mark.parametrize("metric", ALL)
def test_bad_feats_B(metric, bad):
    A, B = good()
    _raises("feats_B", metric, A, BAD_FEATURES[bad](B), **_kw(metric))


@pytest.mark.parametrize("metric", ALL)
def test_mismatched_sample_counts(metric):
    A, B = good()
    with pytest.raises(ValueError) as err:
        metrics.measure(metric, A, B[:-1], **_kw(metric))
    msg = str(err.value)
    assert ("feats_A" in msg and "feats_B" in msg) or "sample" in msg, msg


# ------------------------------------------------------------------------------------ topk
@pytest.mark.parametrize("topk", [0, -1, N, N + 5, 2.5, "3", None, True, 3.0])
@pytest.mark.parametrize("metric", KNN_METRICS)
def test_bad_topk(metric, topk):
    A, B = good()
    _raises("topk", metric, A, B, topk=topk)


@pytest.mark.parametrize("topk", [0, 1, -3, N, 2.5, True])
def test_bad_cknna_topk(topk):
    A, B = good()
    _raises("topk", "cknna", A, B, topk=topk)


def test_topk_with_too_few_samples():
    A, B = paired_features(1, 4, 4)
    _raises("topk", "mutual_knn", A, B, topk=1)
    A, B = paired_features(2, 4, 4)
    _raises("topk", "cknna", A, B, topk=2, unbiased=False)


# --------------------------------------------------------------------------- other arguments
@pytest.mark.parametrize("cca_dim", [0, -2, 2.5, "3", None, 6, 100])
def test_bad_cca_dim(cca_dim):
    A, B = good()  # Da = 4, Db = 5, N = 10: cca_dim must be in 1..4
    _raises("cca_dim", "svcca", A, B, cca_dim=cca_dim)


def test_cca_dim_above_n_minus_1():
    A, B = paired_features(5, 8, 8)
    _raises("cca_dim", "svcca", A, B, cca_dim=5)


@pytest.mark.parametrize("kernel_metric", ["poly", "IP ", "", None, 1])
@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
def test_bad_kernel_metric(metric, kernel_metric):
    A, B = good()
    _raises("kernel_metric", metric, A, B, kernel_metric=kernel_metric)


@pytest.mark.parametrize("sigma", [0.0, -1.0, math.nan, math.inf])
def test_bad_rbf_sigma(sigma):
    A, B = good()
    _raises("rbf_sigma", "cka", A, B, kernel_metric="rbf", rbf_sigma=sigma)


@pytest.mark.parametrize("metric", ["no_such_metric", "CKA", "", None, "mutual-knn"])
def test_unknown_metric(metric):
    A, B = good()
    with pytest.raises(ValueError, match="metric"):
        metrics.measure(metric, A, B)
    with pytest.raises(ValueError, match="metric"):
        metrics.AlignmentMetrics.measure(metric, A, B)


@pytest.mark.parametrize("backend", ["gpu", "FAISS-GPU", "", 3])
@pytest.mark.parametrize("metric", TOPK_METRICS)
def test_unknown_backend(metric, backend):
    A, B = good()
    _raises("backend", metric, A, B, topk=3, backend=backend)


# ----------------------------------------------------------------------- unbiased needs N >= 4
@pytest.mark.parametrize("call", [
    lambda A, B: metrics.unbiased_cka(A, B),
    lambda A, B: metrics.cka(A, B, unbiased=True),
    lambda A, B: metrics.unbiased_cka(A, B, kernel_metric="rbf"),
    lambda A, B: metrics.cknna(A, B, topk=2),
    lambda A, B: metrics.cknna(A, B),
], ids=["unbiased_cka", "cka_unbiased", "unbiased_cka_rbf", "cknna", "cknna_default"])
def test_unbiased_estimators_need_four_samples(call):
    A, B = paired_features(3, 4, 4)
    with pytest.raises(ValueError, match=r"N >= 4|at least 4"):
        call(A, B)


def test_biased_estimators_work_with_few_samples():
    A, B = paired_features(3, 4, 4)
    assert isinstance(metrics.cka(A, B), float)
    assert isinstance(metrics.cknna(A, B, topk=2, unbiased=False), float)


# ------------------------------------------------------------------------------------- knn
@pytest.mark.parametrize("bad", ["rank1", "rank3", "no_rows", "nan", "int64", "list"])
def test_knn_bad_X(bad):
    X, _ = good()
    with pytest.raises(ValueError, match=r"\bX\b"):
        knn(BAD_FEATURES[bad](X), 2)


@pytest.mark.parametrize("k", [0, -1, N, 2.5, None, True])
def test_knn_bad_k(k):
    X, _ = good()
    with pytest.raises(ValueError, match=r"\bk\b"):
        knn(X, k)


@pytest.mark.parametrize("budget", [0, -5])
def test_knn_bad_memory_budget(budget):
    X, _ = good()
    with pytest.raises(ValueError, match="memory_budget"):
        knn(X, 2, memory_budget=budget)


def test_knn_bad_backend():
    X, _ = good()
    with pytest.raises(ValueError, match="backend"):
        knn(X, 2, backend="nope")


def test_inputs_are_not_modified():
    A, B = good()
    A0, B0 = A.clone(), B.clone()
    for m in ALL:
        metrics.measure(m, A, B, **_kw(m))
    assert torch.equal(A, A0) and torch.equal(B, B0)


def test_cca_dim_above_the_numerical_rank():
    # rank-2 features: a third canonical direction does not exist
    A, B = paired_features(50, 6, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    A = A[:, :2] @ torch.randn(2, 6, generator=g, dtype=torch.float64)
    _raises("cca_dim", "svcca", A, B, cca_dim=3)
