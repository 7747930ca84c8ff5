"""kernels/rms_norm.py: x / rms(x) * weight, normalised in float32 and scaled in x's dtype."""

import torch

from mixserve.kernels.rms_norm import rms_norm


def _reference64(x, weight, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def test_float32_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 64, generator=g), 1 + 0.1 * torch.randn(64, generator=g)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _reference64(x, w, 1e-5), rtol=1e-5, atol=1e-6)


def test_bfloat16_is_normalised_in_float32_then_scaled_in_bfloat16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 48, generator=g).bfloat16()
    w = (1 + 0.1 * torch.randn(48, generator=g)).bfloat16()
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == torch.bfloat16
    normalised = (x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(out, w * normalised)


def test_float16_inputs_whose_squares_overflow_float16_stay_finite():
    x = torch.full((2, 16), 400.0, dtype=torch.float16)  # 400^2 > float16 max
    out = rms_norm(x, torch.ones(16, dtype=torch.float16), 1e-5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), torch.ones(2, 16), rtol=1e-3, atol=1e-3)


def test_eps_keeps_an_all_zero_row_at_zero():
    out = rms_norm(torch.zeros(1, 8), torch.ones(8), 1e-5)
    assert torch.equal(out, torch.zeros(1, 8))


def test_output_does_not_depend_on_the_input_scale():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 32, generator=g), torch.randn(32, generator=g)
    torch.testing.assert_close(rms_norm(1000 * x, w, 1e-6), rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-5)
