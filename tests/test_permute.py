"""Kernel-metric scorers of shuffled pairings (prh_fast.metrics._permute) against the scorers
they replace: CKA / unbiased CKA (linear and RBF kernels, every path) and SVCCA of the
permuted layers recomputed from scratch, on layers with shared structure, odd ``N``, ``Lx !=
Ly`` in both orders, float32 and float64, several permutations and the identity."""
from __future__ import annotations

import pytest
import torch

from prh_fast import reference as R
from prh_fast.errors import InputError
from prh_fast.metrics._kernel import cka_scores
from prh_fast.metrics._permute import cka_permutation_scorer, svcca_permutation_scorer
from prh_fast.metrics._svcca import svcca_scores
from prh_fast.testing import latent, layer_features, paired_features, with_duplicates

N = 97  # odd


def _layers(n=N, widths_x=(24, 40, 7), widths_y=(16, 33), dtype=torch.float32, seed=0):
    """Layers of two models built on one latent (real shared structure)."""
    z = latent(n, 6, clusters=9, spread=0.5, seed=seed)
    xs = [layer_features(z, d, seed=seed + 10 + i, dtype=torch.float64).to(dtype)
          for i, d in enumerate(widths_x)]
    ys = [layer_features(z, d, seed=seed + 50 + j, nonlinearity="relu", noise=0.8,
                         dtype=torch.float64).to(dtype) for j, d in enumerate(widths_y)]
    return xs, ys


def _perms(n, count=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [None] + [torch.randperm(n, generator=g) for _ in range(count)]


def _close(got, want, dtype):
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert got.shape == want.shape and got.dtype == torch.float64
    assert torch.isfinite(want).all()
    err = (got - want).abs() / want.abs().clamp_min(1.0)
    assert float(err.max()) <= tol, float(err.max())


BIG = 1 << 30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["ip", "rbf"])
@pytest.mark.parametrize("swap", [False, True])  # Lx > Ly (gathers y) and Lx < Ly (gathers x)
def test_cka_gram_path_matches_recompute(dtype, unbiased, kernel, swap):
    xs, ys = _layers(dtype=dtype)
    if swap:
        xs, ys = ys, xs
    kw = dict(kernel_metric=kernel, sigma=0.7, unbiased=unbiased, budget=BIG)
    score = cka_permutation_scorer(xs, ys, dtype, path="gram", **kw)
    assert score.path == "gram"
    for p in _perms(N):
        want = cka_scores(xs, ys if p is None else [y[p] for y in ys], dtype, space="auto",
                          **kw)[0]
        _close(score(p), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("swap", [False, True])
def test_cka_gram_path_in_blocks_and_groups(dtype, unbiased, swap):
    """A budget that fits the kernels but only part of the gathered ones at a time; several
    permutations scored together (``many``) equal the one-at-a-time scores."""
    xs, ys = _layers(dtype=dtype)
    if swap:
        xs, ys = ys, xs
    big = cka_permutation_scorer(xs, ys, dtype, unbiased=unbiased, budget=BIG, path="gram")
    spare = 1100 * big._col
    budget = BIG - big._spare + spare
    score = cka_permutation_scorer(xs, ys, dtype, unbiased=unbiased, budget=budget, path="gram")
    assert score._spare == spare and score._tri > 4 * 1100  # five blocks of packed columns
    perms = _perms(N, count=4)
    got = score.many(perms)
    assert got.shape == (len(perms), len(xs), len(ys))
    grouped = big.many(perms)
    for p, g, h in zip(perms, got, grouped):
        want = cka_scores(xs, ys if p is None else [y[p] for y in ys], dtype, unbiased=unbiased,
                          budget=budget)[0]
        _close(g, want, dtype)
        _close(h, want, dtype)
        _close(big(p), h, dtype)  # alone or in a group: the same up to rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("path", ["feature", "recompute"])
def test_cka_other_paths_match_recompute(dtype, unbiased, path):
    xs, ys = _layers(dtype=dtype)
    score = cka_permutation_scorer(xs, ys, dtype, unbiased=unbiased, budget=BIG, path=path)
    for p in _perms(N):
        want = cka_scores(xs, ys if p is None else [y[p] for y in ys], dtype,
                          unbiased=unbiased, budget=BIG)[0]
        _close(score(p), want, dtype)


@pytest.mark.parametrize("unbiased", [False, True])
def test_cka_identity_matches_float64_oracle(unbiased):
    A, B = paired_features(61, 20, 31, seed=4, dtype=torch.float64)
    score = cka_permutation_scorer([A], [B], torch.float64, unbiased=unbiased, budget=BIG,
                                   path="gram")
    want = R.cka(A, B, unbiased=unbiased)
    assert abs(float(score()[0, 0]) - want) <= 1e-10
    # a shuffled pairing is the oracle's value of the shuffled features
    p = torch.randperm(61, generator=torch.Generator().manual_seed(3))
    assert abs(float(score(p)[0, 0]) - R.cka(A, B[p], unbiased=unbiased)) <= 1e-10


def test_cka_null_is_lower_than_the_true_pairing():
    xs, ys = _layers(n=201)
    score = cka_permutation_scorer(xs, ys, torch.float32, budget=BIG)
    true = score()
    null = torch.stack([score(p) for p in _perms(201, count=5)[1:]])
    assert bool((null.amax(0) < true).all())


def test_cka_path_choice_follows_memory_and_cost():
    xs, ys = _layers()
    assert cka_permutation_scorer(xs, ys, torch.float32, budget=BIG).path == "gram"
    assert cka_permutation_scorer(xs, ys, torch.float32, budget=BIG).many([]).shape == (0, 3, 2)
    # the kernels do not fit: linear kernels take the feature space, RBF recomputes
    assert cka_permutation_scorer(xs, ys, torch.float32, budget=1 << 14).path == "feature"
    assert cka_permutation_scorer(xs, ys, torch.float32, kernel_metric="rbf",
                                  budget=1 << 14).path == "recompute"
    with pytest.raises(InputError, match="path"):
        cka_permutation_scorer(xs, ys, torch.float32, budget=1 << 14, path="gram")
    with pytest.raises(InputError, match="path"):
        cka_permutation_scorer(xs, ys, torch.float32, kernel_metric="rbf", budget=BIG,
                               path="feature")


def test_bad_permutation_is_an_input_error():
    xs, ys = _layers()
    score = cka_permutation_scorer(xs, ys, torch.float32, budget=BIG)
    for bad in (torch.arange(N - 1), torch.zeros(N, dtype=torch.int64),
                torch.arange(N, dtype=torch.float32)):
        with pytest.raises(InputError, match="perm"):
            score(bad)
    sv = svcca_permutation_scorer(xs, ys, 4)
    with pytest.raises(InputError, match="perm"):
        sv(list(range(N))[::-1][:-1])
    # a Python list is accepted
    assert torch.equal(sv(list(range(N))), sv())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("swap", [False, True])
def test_svcca_matches_recompute(dtype, swap):
    xs, ys = _layers(dtype=dtype)
    if swap:
        xs, ys = ys, xs
    r = 5
    score = svcca_permutation_scorer(xs, ys, r)
    perms = _perms(N)
    together = score.many(perms)
    assert together.shape == (len(perms), len(xs), len(ys))
    for p, t in zip(perms, together):
        want = svcca_scores(xs, ys if p is None else [y[p] for y in ys], r)
        _close(score(p), want, dtype)
        _close(t, want, dtype)
    assert score.many([]).shape == (0, len(xs), len(ys))


def test_svcca_krylov_widths_and_oracle():
    """Widths that take the certified Krylov solver; the identity against the oracle."""
    A, B = paired_features(401, 360, 330, seed=2, dtype=torch.float64)
    score = svcca_permutation_scorer([A, B], [B], 6, torch.float64)
    p = torch.randperm(401, generator=torch.Generator().manual_seed(8))
    _close(score(p), svcca_scores([A, B], [B[p]], 6, torch.float64), torch.float64)
    assert abs(float(score()[0, 0]) - R.svcca(A, B, cca_dim=6)) <= 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("kernel", ["ip", "rbf"])
def test_cka_duplicates_constant_layer_and_tiny_sigma(dtype, unbiased, kernel):
    """Duplicated rows (RBF distances exactly 0 under a tiny width), a constant layer (zero
    kernels after centring: the ratio of zeros, 0) and features far from unit scale."""
    X, _ = with_duplicates(N, 9, n_unique=20, seed=3, dtype=dtype)
    Y = (X[:, :5] * 1e3 + 7.0).to(dtype)
    xs, ys = [X, X * 1e-4], [Y, torch.full((N, 3), 2.5, dtype=dtype)]
    sigma = 1e-3 if kernel == "rbf" else 1.0
    kw = dict(kernel_metric=kernel, sigma=sigma, unbiased=unbiased, budget=BIG)
    score = cka_permutation_scorer(xs, ys, dtype, path="gram", **kw)
    for p in _perms(N):
        want = cka_scores(xs, ys if p is None else [y[p] for y in ys], dtype, **kw)[0]
        got = score(p)
        _close(got[:, 0], want[:, 0], dtype)
        # the constant layer: HSIC 0 against every kernel; what is left is rounding over the
        # CKA constant (RBF kernels of a constant layer are all ones: a cancellation of N²-sized
        # sums), near 0 on both paths
        assert float(got[:, 1].abs().max()) <= 1e-4 and float(want[:, 1].abs().max()) <= 1e-4


@pytest.mark.parametrize("n, unbiased", [(2, False), (3, False), (4, True), (5, True)])
@pytest.mark.parametrize("path", ["gram", "feature", "recompute"])
def test_cka_smallest_sample_counts(n, unbiased, path):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, 3, generator=g, dtype=torch.float64)]
    ys = [torch.randn(n, 2, generator=g, dtype=torch.float64) for _ in range(2)]
    score = cka_permutation_scorer(xs, ys, torch.float64, unbiased=unbiased, budget=BIG,
                                   path=path)
    for p in [None, torch.arange(n).flip(0), torch.roll(torch.arange(n), 1)]:
        want = cka_scores(xs, ys if p is None else [y[p] for y in ys], torch.float64,
                          unbiased=unbiased, budget=BIG)[0]
        got = score(p)
        assert torch.equal(torch.isnan(got), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.allclose(got[ok], want[ok], rtol=1e-9, atol=1e-9)
