"""prh_fast.testing: deterministic generators, the structure they promise, named input errors."""
from __future__ import annotations

import pytest
import torch

from prh_fast import metrics
from prh_fast.errors import InputError
from prh_fast.testing import (
    drifting_layers,
    independent_features,
    integer_features,
    latent,
    layer_features,
    paired_features,
    with_duplicates,
)


def test_generators_are_deterministic_and_shaped():
    A, B = paired_features(50, 6, 9, seed=3, dtype=torch.float64)
    A2, B2 = paired_features(50, 6, 9, seed=3, dtype=torch.float64)
    assert torch.equal(A, A2) and torch.equal(B, B2)
    assert A.shape == (50, 6) and B.shape == (50, 9) and A.dtype == torch.float64
    assert torch.allclose(A.norm(dim=1), torch.ones(50, dtype=torch.float64))
    z = latent(300, 8, clusters=16, spread=0.5, seed=1)
    X = layer_features(z, 12, seed=2)
    assert X.shape == (300, 12) and X.dtype == torch.float32
    assert torch.equal(X, layer_features(z, 12, seed=2))
    assert drifting_layers(20, 3, 5, seed=1).shape == (20, 3, 5)


def test_paired_views_align_above_chance():
    A, B = paired_features(300, 32, 48, seed=5)
    I, J = independent_features(300, 32, 48, seed=5)
    assert metrics.measure("mutual_knn", A, B, topk=10) > 2 * metrics.measure(
        "mutual_knn", I, J, topk=10)


def test_exact_tie_constructions():
    X = integer_features(40, 5, seed=1, dtype=torch.float16)
    assert torch.equal(X, X.round())
    D, groups = with_duplicates(30, 4, n_unique=6)
    for g in range(6):
        rows = D[groups == g]
        assert len(rows) >= 2 and torch.equal(rows, rows[:1].expand_as(rows))


@pytest.mark.parametrize("call, name", [
    (lambda: paired_features(0, 4, 4), "n:"),
    (lambda: paired_features(10, 4, 4, noise=-1), "noise:"),
    (lambda: paired_features(10, 4, 4, seed=1.5), "seed:"),
    (lambda: integer_features(3, 3, low=2, high=2), "low, high:"),
    (lambda: latent(10, 0), "rank:"),
    (lambda: layer_features(torch.zeros(3), 4), "z:"),
    (lambda: layer_features(torch.zeros(3, 2), 4, nonlinearity="gelu"), "nonlinearity:"),
    (lambda: layer_features(torch.zeros(3, 2), 4, out=torch.empty(2, 4)), "out:"),
])
def test_bad_arguments_are_named_input_errors(call, name):
    with pytest.raises(InputError, match=name):
        call()
