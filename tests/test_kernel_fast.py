"""The fast paths of feature-space CKA: float32 centring without float64 copies and the
self products from the blocks on and above the diagonal of ``AᵀA``.

Every value is checked against the float64 oracle (``prh_fast.reference``) or against the same
quantity in float64, on data with shared structure (``prh_fast.testing``), large offsets, tiny
and huge scales, duplicates, widths that do not divide into blocks, half-precision inputs and
layer grids.
"""
from __future__ import annotations

import pytest
import torch

from prh_fast import metrics
from prh_fast import reference as R
from prh_fast.metrics import _kernel
from prh_fast.testing import independent_features, paired_features, with_duplicates


def _pair(n=300, da=96, db=160, seed=0):
    return paired_features(n, da, db, seed=seed)


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (1e4, 1.0), (-300.0, 3.0),
                                          (0.0, 1e-25), (1e22, 1e20), (5.0, 1e18)])
def test_float32_centring_matches_float64_centring(shift, scale):
    A, _ = _pair()
    X = (A.double() * scale + shift).float()
    got = _kernel._centred_float32(X)
    assert got is not None
    C, e = got
    assert C.dtype == torch.float32 and C.shape == X.shape
    X64 = X.double()
    want = X64 - X64.mean(0)
    back = C.double() * 2.0 ** e
    spread = float(want.abs().max())
    # one or two roundings of each centred value, never more
    assert float((back - want).abs().max()) <= 4 * 2.0 ** -24 * spread
    # the residual column means are of the order of one rounding of the values, not of the mean
    assert float(back.mean(0).abs().max()) <= 2 * 2.0 ** -24 * spread
    top = float(C.abs().max())
    # scaled into [0.5, 1) (up to the residual's rounding), or left alone where it is harmless
    assert (2.0 ** -20 <= top <= 2.0 ** 20) if e == 0 else (0.25 <= top <= 1.0)


@pytest.mark.parametrize("values", [[3e37, -3e37, 1.0], [1e-38, 2e-38, 0.0], [float("nan"), 1, 2],
                                    [float("inf"), 0, 1], [3e38, 3e38, 1.0]])
def test_float32_centring_leaves_extreme_values_to_float64(values):
    X = torch.tensor(values, dtype=torch.float32).repeat(4, 1).T.contiguous()  # [3, 4]
    assert _kernel._centred_float32(X) is None


def test_extreme_float32_values_are_centred_in_float64():
    X = torch.tensor([[3e37, 1.0], [-3e37, 2.0], [1e37, 4.0]], dtype=torch.float32)
    C, e = _kernel.centred(X, torch.float32)
    want = X.double() - X.double().mean(0)
    assert torch.allclose(C.double() * 2.0 ** e, want, rtol=1e-6, atol=0.0)


def test_centred_constant_columns_are_zero():
    X = torch.full((7, 3), 2.5e10, dtype=torch.float32)
    C, e = _kernel.centred(X, torch.float32)
    assert e == 0 and torch.equal(C, torch.zeros_like(C))


@pytest.mark.parametrize("d", [1, 7, 128, 192, 193, 300, 1000])
@pytest.mark.parametrize("with_sums", [False, True])
def test_sym_fro2_is_the_full_products_frobenius_norm(d, with_sums):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(50, d, generator=g, dtype=torch.float64) + 0.3
    s = x.sum(0) if with_sums else None
    G = x.T @ x
    if with_sums:
        G = G - torch.outer(s, s) / 50
    want = float(G.pow(2).sum())
    assert _kernel._sym_fro2(x, s, 50) == pytest.approx(want, rel=1e-12)


def test_sym_fro2_float32_products_within_rounding():
    A, _ = _pair(n=400, da=700)
    want = float((A.double().T @ A.double()).pow(2).sum())
    assert _kernel._sym_fro2(A, None, 400) == pytest.approx(want, rel=1e-5)


def _cases():
    A, B = _pair()
    ia, ib = independent_features(300, 96, 160, seed=1)
    da, _ = with_duplicates(300, 40, seed=2)
    wa, wb = _pair(n=60, da=400, db=250, seed=3)  # wider than N: a layer of 400 in blocks
    return {
        "paired": (A, B),
        "offsets": ((A.double() * 1e-2 + 1e3).float(), (B.double() * 7 - 40).float()),
        "huge and tiny": ((A.double() * 1e25).float(), (B.double() * 1e-25).float()),
        "independent": (ia.float(), ib.float()),
        "duplicates": (da, B),
        "wide": (wa, wb),
        "half": (A.half(), B.bfloat16()),
    }


def _centred64(X):
    # both HSIC estimators are shift-invariant; the oracle's literal N x N formulas are not
    # well conditioned for columns far from 0 (float64 cancellation), so it gets the same
    # values centred in float64
    X = X.double()
    return X - X.mean(0)


@pytest.mark.parametrize("case", list(_cases()))
@pytest.mark.parametrize("unbiased", [False, True])
def test_feature_space_cka_equals_the_oracle(case, unbiased):
    A, B = _cases()[case]
    got = metrics.cka(A, B, unbiased=unbiased)
    want = R.cka(_centred64(A), _centred64(B), unbiased=unbiased)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
def test_feature_space_cka_equals_its_float64_form(unbiased):
    # the float32 path against the same formulas in float64 on the same values: only rounding
    A, B = _pair(n=500, da=200, db=300, seed=4)
    A, B = (A.double() + 50).float(), B
    got, _ = _kernel.cka_scores([A], [B], torch.float32, unbiased=unbiased, budget=1 << 26,
                                space="feature")
    want, _ = _kernel.cka_scores([A.double()], [B.double()], torch.float64, unbiased=unbiased,
                                 budget=1 << 26, space="feature")
    assert float(got) == pytest.approx(float(want), abs=1e-7)


@pytest.mark.parametrize("unbiased", [False, True])
def test_layer_grid_uses_the_same_fast_scorer(unbiased):
    g = torch.Generator().manual_seed(5)
    A, B = _pair(n=200, da=64, db=300, seed=5)
    xs = [A, torch.tanh(A @ torch.randn(64, 200, generator=g)) + 3.0]
    ys = [B, B[:, :150] * 1e-3]
    got, space = _kernel.cka_scores(xs, ys, torch.float32, unbiased=unbiased, budget=1 << 26,
                                    space="feature")
    assert space == "feature" and got.shape == (2, 2)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            want = R.cka(_centred64(x), _centred64(y), unbiased=unbiased)
            assert float(got[i, j]) == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_cknna_and_unbiased_cka_of_a_structured_pair_equal_the_oracle():
    A, B = _pair(n=256, da=48, db=80, seed=6)
    assert metrics.unbiased_cka(A, B) == pytest.approx(
        R.unbiased_cka(A.double(), B.double()), rel=1e-5, abs=1e-6)
    assert metrics.cknna(A, B, topk=10) == pytest.approx(
        R.cknna(A.double(), B.double(), topk=10), rel=1e-5, abs=1e-6)
