"""kernels/linear.py: the packed fast path computes exactly what F.linear computes."""

import pytest
import torch
import torch.nn.functional as F

from mixserve.kernels.linear import _onednn_packing_available, linear, pack_weight

SHAPES = [(1, 48, 64), (3, 100, 72), (17, 256, 128)]  # (T, out, in)


def _randn(*shape, seed, dtype):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("t,out_features,in_features", SHAPES)
def test_float32_linear_is_plain_f_linear(t, out_features, in_features):
    w = _randn(out_features, in_features, seed=1, dtype=torch.float32)
    x = _randn(t, in_features, seed=2, dtype=torch.float32)
    packed = pack_weight(w)
    assert not packed.packed
    assert (packed.out_features, packed.in_features) == (out_features, in_features)
    assert torch.equal(linear(x, packed), F.linear(x, w))


@pytest.mark.skipif(not _onednn_packing_available(torch.empty(1, 1, dtype=torch.bfloat16)), reason="no oneDNN")
@pytest.mark.parametrize("t,out_features,in_features", SHAPES)
def test_bfloat16_packed_linear_is_bit_identical_to_f_linear(t, out_features, in_features):
    w = _randn(out_features, in_features, seed=3, dtype=torch.bfloat16)
    x = _randn(t, in_features, seed=4, dtype=torch.bfloat16)
    packed = pack_weight(w)
    assert packed.packed
    out = linear(x, packed)
    assert out.dtype == torch.bfloat16 and out.shape == (t, out_features)
    assert torch.equal(out, F.linear(x, w))


def test_bfloat16_packed_linear_is_within_bf16_rounding_of_float32_math():
    w = _randn(96, 80, seed=5, dtype=torch.bfloat16)
    x = _randn(5, 80, seed=6, dtype=torch.bfloat16)
    out = linear(x, pack_weight(w)).float()
    exact = x.float() @ w.float().T
    torch.testing.assert_close(out, exact, rtol=2**-7, atol=1e-2)


def test_packing_can_be_disabled():
    w = _randn(32, 16, seed=7, dtype=torch.bfloat16)
    x = _randn(4, 16, seed=8, dtype=torch.bfloat16)
    plain = pack_weight(w, allow_packing=False)
    assert not plain.packed
    assert torch.equal(linear(x, plain), F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_weight_gives_the_same_result(dtype):
    w_t = _randn(64, 40, seed=9, dtype=dtype)
    w = w_t.T  # [40, 64] view, not contiguous
    x = _randn(6, 64, seed=10, dtype=dtype)
    assert torch.equal(linear(x, pack_weight(w)), F.linear(x, w.contiguous()))
