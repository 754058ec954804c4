"""SVCCA's certified top-eigenspace solver (prh_fast.metrics._svcca): the block Krylov path
against the full eigendecomposition and the float64 oracle, its certificate on spectra where it
must refuse, and the edge cases (rank, scale, dtype, grid, streaming form) at widths that take
the Krylov path."""
from __future__ import annotations

import pytest
import torch

from prh_fast import metrics
from prh_fast import reference as R
from prh_fast.errors import InputError
from prh_fast.metrics import _svcca as S
from prh_fast.metrics._svcca import svcca_scores
from prh_fast.store._moments import TensorSource, kernel_scores
from prh_fast.testing import paired_features

F64 = torch.float64
WIDE = max(400, S._KRYLOV_MIN_DIM)  # takes the Krylov path


def _spd(spectrum, seed=0):
    """``Q diag(spectrum) Qᵀ`` with a random orthogonal ``Q`` (float64), and ``Q``."""
    n = len(spectrum)
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64)).Q
    lam = torch.as_tensor(spectrum, dtype=F64)
    return (Q * lam) @ Q.T, Q


def _sin_theta(U, V):
    """``||sin Θ||_F`` between the column spans of two orthonormal bases (projector form: no
    cancellation near zero angles)."""
    return float(torch.linalg.matrix_norm(U - V @ (V.T @ U), ord="fro"))


class _Spy:
    """Counts the solvers ``_top_eig`` used."""

    def __init__(self, monkeypatch):
        self.krylov = self.full = self.refused = 0
        kr, full = S._top_eig_krylov, S._top_eig_full

        def krylov(G, r, *a, **k):
            got = kr(G, r, *a, **k)
            self.krylov += got is not None
            self.refused += got is None
            return got

        def full_(G, r, name):
            self.full += 1
            return full(G, r, name)

        monkeypatch.setattr(S, "_top_eig_krylov", krylov)
        monkeypatch.setattr(S, "_top_eig_full", full_)


# ------------------------------------------------------------------ the solver and certificate
@pytest.mark.parametrize("r", [1, 4, 10])
def test_krylov_top_eigenspace_matches_the_exact_one(r):
    # a slowly decaying spectrum with a 3% gap after the r-th eigenvalue
    lam = [100.0 / (1 + i) ** 1.2 for i in range(400)]
    lam[r] = lam[r - 1] * 0.97
    G, Q = _spd(lam, seed=r)
    got = S._top_eig_krylov(G, r)
    assert got is not None
    evals, V = got
    want = torch.as_tensor(sorted(lam, reverse=True)[:r], dtype=F64)
    torch.testing.assert_close(evals, want, rtol=1e-12, atol=0)
    order = torch.argsort(torch.as_tensor(lam, dtype=F64), descending=True)[:r]
    assert _sin_theta(V, Q[:, order]) < 1e-10
    torch.testing.assert_close(V.T @ V, torch.eye(r, dtype=F64), rtol=0, atol=1e-13)
    assert S._top_eig_krylov(G, r)[1].equal(V)  # deterministic


def test_krylov_gives_up_on_a_hard_spectrum_and_the_full_solver_answers():
    # a 3% gap at r = 20 in a spectrum spread over 100x: beyond the Krylov space's budget
    lam = [100.0 / (1 + i) ** 1.2 for i in range(400)]
    lam[20] = lam[19] * 0.97
    G, Q = _spd(lam, seed=20)
    assert S._top_eig_krylov(G, 20) is None
    evals, V = S._top_eig(G, 20, "x")
    assert _sin_theta(V, Q[:, :20]) < 1e-10


def test_krylov_refuses_a_degenerate_r_th_eigenvalue():
    # λ_r = λ_{r+1}: the top-r eigenspace is not defined; no certificate can exist
    lam = [10.0] * 3 + [5.0] * 4 + [1.0 / (1 + i) for i in range(193)]
    G, _ = _spd(lam, seed=1)
    assert S._top_eig_krylov(G, 5) is None
    evals, V = S._top_eig(G, 5, "x")  # the full eigendecomposition answers
    torch.testing.assert_close(evals, torch.tensor([10.0] * 3 + [5.0] * 2, dtype=F64))
    torch.testing.assert_close(V.T @ G @ V, torch.diag(evals), rtol=0, atol=1e-12)


@pytest.mark.parametrize("rel_gap", [1e-6, 1e-9, 1e-12])
def test_krylov_on_a_near_degenerate_gap_is_certified_or_refuses(rel_gap):
    lam = [4.0, 3.0, 2.0, 2.0 * (1 - rel_gap)] + [1.0 / (2 + i) for i in range(196)]
    G, Q = _spd(lam, seed=2)
    got = S._top_eig_krylov(G, 3)
    if got is not None:
        assert _sin_theta(got[1], Q[:, :3]) < 1e-10
    if rel_gap <= 1e-9:
        assert got is None  # the residual floor (~1e-16 ||G||) cannot be 1e-10 of such a gap


def test_certificate_rejects_a_wrong_subspace():
    lam = [9.0, 8.0, 7.0, 6.0, 5.0] + [1.0 / (1 + i) for i in range(195)]
    G, Q = _spd(lam, seed=3)
    # exact eigenvectors, but the 4th largest instead of the 3rd: small residual, wrong space
    U = Q[:, [0, 1, 3]]
    theta = torch.tensor([9.0, 8.0, 6.0], dtype=F64)
    assert S._certify(G, U, theta, 5.0) is None
    # the right eigenvectors are certified, with a bound at the rounding level
    bound = S._certify(G, Q[:, :3], torch.tensor([9.0, 8.0, 7.0], dtype=F64), 6.0)
    assert bound is not None and bound < 1e-12
    # a perturbed right subspace: certified, and the bound covers the true error
    P = torch.linalg.qr(Q[:, :3] + 1e-6 * Q[:, 10:13]).Q
    H = P.T @ G @ P
    th, Y = torch.linalg.eigh(H)
    P = P @ Y.flip(1)
    bound = S._certify(G, P, th.flip(0), 6.0)
    assert bound is not None and bound >= _sin_theta(P, Q[:, :3]) > 1e-7


def test_rank_deficient_gram_falls_back_and_names_cca_dim():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(400, 6, generator=g, dtype=F64) @ torch.randn(6, WIDE, generator=g, dtype=F64)
    Y = torch.randn(400, WIDE, generator=g, dtype=F64)
    with pytest.raises(InputError, match="cca_dim"):
        metrics.svcca(X, Y, cca_dim=8)
    assert metrics.svcca(X, Y, cca_dim=6) == pytest.approx(R.svcca(X, Y, 6), rel=1e-8, abs=1e-10)


# --------------------------------------------------------------------- svcca against the oracle
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
@pytest.mark.parametrize("n,d_a,d_b,r", [(500, WIDE, WIDE + 57, 10), (300, WIDE + 9, WIDE - 24, 5),
                                         (250, WIDE, WIDE, 10), (700, WIDE, WIDE + 20, 1)])
def test_svcca_on_the_krylov_path_matches_the_oracle(n, d_a, d_b, r, dtype, monkeypatch):
    A, B = paired_features(n, d_a, d_b, latent=24, noise=0.3, seed=n, dtype=dtype)
    spy = _Spy(monkeypatch)
    got = metrics.svcca(A, B, cca_dim=r)
    want = R.svcca(A.double(), B.double(), r)
    rtol, atol = (1e-8, 1e-10) if dtype == F64 else (1e-4, 1e-5)
    assert got == pytest.approx(want, rel=rtol, abs=atol)
    assert (spy.krylov, spy.full) == (2, 0)


def test_svcca_float64_is_deterministic_and_right_far_out_of_range():
    A, B = paired_features(400, WIDE, 230, latent=20, noise=0.2, seed=7, dtype=F64)
    base = metrics.svcca(A, B, cca_dim=8)
    assert metrics.svcca(A, B, cca_dim=8) == base
    assert metrics.svcca(A * 1e200, B * 1e200, cca_dim=8) == pytest.approx(base, rel=1e-9)
    # far below the 1e-8 of the standardisation the columns are only centred: the oracle's
    # value at 1e-30, the same at 1e-200 (where the oracle's own products underflow)
    tiny = R.svcca(A * 1e-30, B * 1e-30, 8)
    assert abs(tiny - base) > 1e-4
    for s in (1e-30, 1e-200):
        assert metrics.svcca(A * s, B * s, cca_dim=8) == pytest.approx(tiny, rel=1e-8)


@pytest.mark.parametrize("scale", [1e20, 1e-30])
def test_svcca_float32_far_from_one_on_the_krylov_path(scale):
    A, B = paired_features(300, WIDE, WIDE, latent=16, noise=0.2, seed=8)
    got = metrics.svcca(A * scale, B * scale, cca_dim=6)
    want = R.svcca((A * scale).double(), (B * scale).double(), 6)
    assert got == pytest.approx(want, rel=2e-4)


def test_constant_columns_on_the_krylov_path():
    A, B = paired_features(300, WIDE, WIDE, latent=16, noise=0.2, seed=9, dtype=F64)
    A = A.clone()
    A[:, :7] = 0.5
    got = metrics.svcca(A, B, cca_dim=10)
    assert got == pytest.approx(R.svcca(A, B, 10), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("scale", [1.0, 2.0 ** 664, 2.0 ** -664], ids=["1", "1e200", "1e-200"])
def test_standardisation_is_the_formula_up_to_a_power_of_two(scale):
    A, _ = paired_features(97, 33, 5, seed=10, dtype=F64)
    base = A * torch.logspace(-5, 5, 33, dtype=F64) + 3.0
    base[:, 4] = 0.0  # constant (exactly, at every scale)
    A = base * scale  # exact: a power of two
    C = base - base.mean(0)
    if scale == 1:
        want = C / (C.std(0) + 1e-8)
    elif scale > 1:  # the 1e-8 vanishes next to the std (the formula's own squares overflow)
        want = C / torch.where(C.std(0) > 0, C.std(0), 1.0)
    else:  # std << 1e-8: the columns are only centred
        want = (A - A.mean(0)) / 1e-8
    Y, m, q, G = S._standardised_gram(A, F64)
    assert not m.any()  # float64 input: centred in float64
    got = Y * q
    ratio = got.abs().max() / want.abs().max()
    two = 2.0 ** round(float(torch.log2(ratio)))
    assert float(ratio) == pytest.approx(two, rel=1e-13)
    torch.testing.assert_close(got / two, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(G, got.T @ got, rtol=1e-12, atol=1e-13 * float(G.abs().max()))
    assert float(Y.abs().amax(0).max()) < 1.0
    if scale == 1.0:  # float32 input: the same formula on the float32 values
        A32 = A.float()
        C32 = A32.double() - A32.double().mean(0)
        want32 = C32 / (C32.std(0) + 1e-8)
        Y32, m32, q32, G32 = S._standardised_gram(A32, torch.float32)
        assert Y32.dtype == torch.float32 and m32.dtype == q32.dtype == G32.dtype == F64
        got32 = (Y32.double() - m32) * q32
        torch.testing.assert_close(G32, got32.T @ got32, rtol=1e-5,
                                   atol=1e-6 * float(G32.abs().max()))
        got32 = got32 / (got32.abs().max() / want32.abs().max())
        torch.testing.assert_close(got32, want32, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- grid and streaming forms
def test_grid_and_streaming_forms_agree_with_single_pairs():
    xs = [paired_features(300, WIDE + 8 * i, 20, latent=16, seed=20 + i, dtype=F64)[0]
          for i in range(2)]
    ys = [paired_features(300, 20, WIDE + 5 * j, latent=16, seed=30 + j, dtype=F64)[1]
          for j in range(3)]
    grid = svcca_scores(xs, ys, 6)
    assert grid.shape == (2, 3)
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            assert float(grid[i, j]) == pytest.approx(R.svcca(x, y, 6), rel=1e-8, abs=1e-10)
    stream = kernel_scores(TensorSource(xs), TensorSource(ys), "svcca", cca_dim=6)
    torch.testing.assert_close(stream, grid, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("d", [5, 191, 400, 777, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_block_triangle_gram_is_the_product(d, dtype):
    Y = torch.randn(130, d, generator=torch.Generator().manual_seed(d), dtype=dtype)
    G = S._gram(Y)
    assert G.dtype == dtype and G.shape == (d, d)
    torch.testing.assert_close(G, G.T, rtol=1e-12 if dtype == F64 else 1e-5, atol=1e-3)
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(G, Y.T @ Y, rtol=tol, atol=tol * 130)


@pytest.mark.parametrize("offset", [0.0, 1e2, 3e4])
def test_float32_with_a_large_common_offset(offset):
    # float32 input is centred in float32 and the product corrected by the residual column
    # means: an offset far above the spread must not leak into the score
    A, B = paired_features(600, WIDE, WIDE + 8, latent=24, noise=0.3, seed=11)
    A, B = A + offset, B - offset
    got = metrics.svcca(A, B, cca_dim=10)
    want = R.svcca(A.double(), B.double(), 10)  # the oracle on the same float32 values
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
