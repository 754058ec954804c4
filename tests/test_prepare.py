"""prepare_features (outlier clipping) against literal oracles: the reference's sort for exact
mode, torch.quantile for approximate mode (docs/metrics.md, pipeline step 2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from prh_fast.prepare import _kth_abs_radix, prepare_features

SHAPES = [(1, 1, 1), (7, 3, 5), (123, 2, 33), (5, 1, 781), (2, 4, 1)]
QS = [0.01, 0.3, 0.5, 0.9, 0.95, 0.999]


def _heavy(shape, dtype=torch.float32, seed=0):
    """Heavy-tailed values with some exact ties (rounded) and both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) / (
        torch.rand(shape, generator=g, dtype=torch.float64) + 0.05)
    x[..., ::3] = x[..., ::3].round()
    return x.to(dtype)


def oracle_exact(x: torch.Tensor, q: float) -> torch.Tensor:
    """The reference's remove_outliers(exact=True), literally."""
    q_val = x.reshape(-1).abs().sort().values[int(q * x.numel())]
    return x.clamp(-q_val, q_val)


def oracle_approx(x: torch.Tensor, q: float) -> torch.Tensor:
    """The reference's remove_outliers(exact=False), literally."""
    q_val = torch.quantile(x.abs().flatten(start_dim=1), q, dim=1).mean()
    return x.clamp(-q_val, q_val)


def assert_same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape,
                                                                 want.dtype, want.shape)
    diff = got != want
    assert not bool(diff.any()), (
        f"{int(diff.sum())} of {diff.numel()} elements differ, first at "
        f"{tuple(torch.nonzero(diff)[0].tolist())}: {got[diff][:5]} vs {want[diff][:5]}")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_matches_oracle(shape, exact, dtype):
    x = _heavy(shape, dtype)
    oracle = oracle_exact if exact else oracle_approx
    for q in QS:
        assert_same(prepare_features(x, q=q, exact=exact), oracle(x, q))


@pytest.mark.parametrize("exact", [True, False])
def test_list_one_threshold_per_layer(exact):
    layers = [_heavy((37, d), seed=d) * (d + 1) for d in (1, 8, 129)]
    oracle = oracle_exact if exact else oracle_approx
    for q in (0.5, 0.95):
        out = prepare_features(layers, q=q, exact=exact)
        assert isinstance(out, list) and len(out) == 3
        for got, x in zip(out, layers):
            assert_same(got, oracle(x, q))
    out = prepare_features(tuple(layers), exact=exact)
    assert isinstance(out, tuple) and len(out) == 3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("exact", [True, False])
def test_low_precision_is_cast_to_float32(dtype, exact):
    x = _heavy((31, 2, 17), dtype)
    out = prepare_features(x, exact=exact)
    assert out.dtype == torch.float32
    assert_same(out, (oracle_exact if exact else oracle_approx)(x.float(), 0.95))


def test_numpy_in_numpy_out():
    x = _heavy((9, 2, 11), torch.float64)
    out = prepare_features(x.numpy(), exact=True)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64
    np.testing.assert_array_equal(out, oracle_exact(x, 0.95).numpy())
    out = prepare_features([x[:, 0].numpy().astype(np.float16)])
    assert isinstance(out[0], np.ndarray) and out[0].dtype == np.float32


@pytest.mark.parametrize("exact", [True, False])
def test_non_contiguous(exact):
    base = _heavy((40, 6, 30))
    x = base.transpose(0, 2)[:, ::2, :]  # [30, 3, 40], non-contiguous
    assert not x.is_contiguous()
    oracle = oracle_exact if exact else oracle_approx
    assert_same(prepare_features(x, exact=exact), oracle(x.contiguous(), 0.95))
    layer = base[:, 1, ::3]
    assert_same(prepare_features([layer], exact=exact)[0], oracle(layer.contiguous(), 0.95))


def test_q_one_is_identity_and_input_untouched():
    x = _heavy((8, 2, 5))
    keep = x.clone()
    assert_same(prepare_features(x, q=1), x)
    assert_same(prepare_features(x.half(), q=1.0), x.half().float())
    prepare_features(x, q=0.5, exact=True)
    prepare_features(x, q=0.5)
    assert_same(x, keep)


def test_q_rounding_edge_and_single_value():
    x = torch.tensor([[[3.0, -1.0, 2.0]]])
    assert_same(prepare_features(x, q=0.9999999999999999, exact=True), x)  # index clamps to M-1
    assert_same(prepare_features(torch.tensor([[[-5.0]]]), q=0.5, exact=True),
                torch.tensor([[[-5.0]]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_radix_select_matches_sort(dtype):
    """The large-tensor path of exact mode, on small inputs with tiny chunks."""
    x = _heavy((13, 3, 7), dtype)
    x[0, 0, :3] = torch.tensor([0.0, -0.0, 0.0], dtype=dtype)
    s = x.abs().reshape(-1).sort().values
    for k in [0, 1, 2, 3, 50, 136, 200, s.numel() - 1]:
        for chunk in (1, 5, 1 << 24):
            assert_same(_kth_abs_radix(x, k, chunk=chunk), s[k])


def test_more_than_2_24_values_per_sample():
    """torch.quantile refuses > 2**24 values; prepare_features has no such limit."""
    d = (1 << 24) + 5
    x = torch.randn(2, 1, d, generator=torch.Generator().manual_seed(1))
    q = 0.95
    a = x.abs().reshape(2, d).numpy()

    m = a.size
    k = int(q * m)
    t_exact = np.partition(a.reshape(-1), k)[k]
    out = prepare_features(x, q=q, exact=True)
    assert float(out.abs().max()) == t_exact
    assert_same(out, x.clamp(-float(t_exact), float(t_exact)))
    del out

    rank = q * (d - 1)
    lo, hi = int(np.floor(rank)), int(np.ceil(rank))
    part = np.partition(a, (lo, hi), axis=1)
    per = part[:, lo] + (rank - lo) * (part[:, hi] - part[:, lo])
    t_approx = float(per.astype(np.float64).mean())
    out = prepare_features(x, q=q)
    assert abs(float(out.abs().max()) - t_approx) <= 1e-6 * t_approx


@pytest.mark.cuda
@pytest.mark.parametrize("exact", [True, False])
def test_cuda_device_kept(exact):
    x = _heavy((33, 3, 17))
    out = prepare_features(x.cuda(), exact=exact)
    assert out.device.type == "cuda"
    assert_same(out.cpu(), (oracle_exact if exact else oracle_approx)(x, 0.95))
    out = prepare_features([x[:, 0].cuda().half()], exact=exact)
    assert out[0].device.type == "cuda" and out[0].dtype == torch.float32


def test_cpu_device_kept():
    x = _heavy((4, 2, 3))
    assert prepare_features(x).device == x.device


@pytest.mark.parametrize("q", [0, -0.1, 1.5, float("nan"), True, "0.9", None])
def test_bad_q(q):
    with pytest.raises(ValueError, match="q"):
        prepare_features(torch.ones(2, 1, 3), q=q)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite(bad):
    x = torch.ones(3, 2, 4)
    x[1, 1, 2] = bad
    with pytest.raises(ValueError, match="feats"):
        prepare_features(x)
    with pytest.raises(ValueError, match=r"feats\[1\]"):
        prepare_features([x[:, 0], x[:, 1]])


@pytest.mark.parametrize("feats", [
    torch.ones(3, 4),  # 2-D tensor
    torch.ones(3, 2, 4, 1),  # 4-D
    torch.ones(0, 2, 4),  # empty
    torch.ones(3, 2, 4, dtype=torch.int64),  # not float
    np.ones((3, 2, 4), dtype=np.int32),
    [torch.ones(3, 2, 4)],  # list item of rank 3
    [],
    "feats",
    [torch.ones(3, 4), torch.ones(4, 4)],  # mismatched N
])
def test_bad_feats(feats):
    with pytest.raises(ValueError, match="feats"):
        prepare_features(feats)
