"""kernels/rotary.py: the "rotate half" rotary embedding, and its equivalence with Mistral's
interleaved convention once q/k rows are permuted (workers/checkpoint.py)."""

import pytest
import torch

from mixserve.kernels.rotary import apply_rotary, rotary_table
from mixserve.workers.tensor_names import half_to_interleaved, interleaved_to_half

DH, THETA = 16, 1e6


def _angles64(positions, head_dim=DH, theta=THETA) -> torch.Tensor:
    """[P, Dh/2] rotation angles in float64."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.as_tensor(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]


def _rotate_complex(x: torch.Tensor, positions) -> torch.Tensor:
    """Reference: pair (i, i + Dh/2) as a complex number, multiplied by e^{i p f_i}. x: [T, heads, Dh]."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones(1, dtype=torch.float64), _angles64(positions))[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def test_table_equals_the_transformers_float32_computation():
    cos, sin = rotary_table(DH, 64, THETA)
    inv_freq = 1.0 / (THETA ** (torch.arange(0, DH, 2, dtype=torch.int64).float() / DH))
    freqs = (inv_freq[:, None] @ torch.arange(64, dtype=torch.int64).float()[None, :]).T  # as transformers
    emb = torch.cat((freqs, freqs), dim=-1)
    assert cos.dtype == torch.float32 and cos.shape == (64, DH)
    assert torch.equal(cos, emb.cos()) and torch.equal(sin, emb.sin())


def test_table_matches_float64_angles_at_large_positions():
    cos, sin = rotary_table(DH, 4096, THETA)
    angles = _angles64(range(4096))
    torch.testing.assert_close(cos[:, : DH // 2].double(), angles.cos(), rtol=0, atol=1e-3)
    torch.testing.assert_close(sin[:, DH // 2 :].double(), angles.sin(), rtol=0, atol=1e-3)


def test_apply_rotary_rotates_each_half_pair_by_its_position_angle():
    positions = torch.tensor([0, 1, 7, 300, 4095])
    cos, sin = rotary_table(DH, 4096, THETA)
    x = torch.randn(5, 3, DH, generator=torch.Generator().manual_seed(0))
    out = apply_rotary(x, cos[positions], sin[positions])
    torch.testing.assert_close(out.double(), _rotate_complex(x, positions), rtol=1e-4, atol=1e-4)


def test_position_zero_is_the_identity():
    cos, sin = rotary_table(DH, 4, THETA)
    x = torch.randn(1, 2, DH, generator=torch.Generator().manual_seed(1))
    assert torch.equal(apply_rotary(x, cos[:1], sin[:1]), x)


def test_scores_depend_only_on_the_relative_position():
    cos, sin = rotary_table(DH, 512, 1e4)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 1, DH, generator=g), torch.randn(1, 1, DH, generator=g)

    def score(pq, pk):
        rq = apply_rotary(q, cos[[pq]], sin[[pq]])
        rk = apply_rotary(k, cos[[pk]], sin[[pk]])
        return float((rq * rk).sum())

    assert score(10, 3) == pytest.approx(score(110, 103), abs=1e-4)
    assert score(10, 3) == pytest.approx(score(7, 0), abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_keeps_the_input_dtype_and_norm(dtype):
    cos, sin = rotary_table(DH, 100, THETA)
    positions = torch.tensor([3, 50, 99])
    x = torch.randn(3, 4, DH, generator=torch.Generator().manual_seed(3)).to(dtype)
    out = apply_rotary(x, cos[positions], sin[positions])
    assert out.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float().norm(dim=-1), x.float().norm(dim=-1), rtol=tol, atol=tol)


def test_interleaved_mistral_weights_permuted_to_half_layout_give_the_same_rotated_vectors():
    """Mistral rotates adjacent pairs (2i, 2i+1); after _interleaved_to_half the rotate-half
    kernel yields the same vectors, with each head's dims reordered (evens, then odds)."""
    heads, hidden, positions = 2, 12, torch.tensor([0, 5, 17])
    g = torch.Generator().manual_seed(4)
    w_interleaved = torch.randn(heads * DH, hidden, generator=g)
    x = torch.randn(3, hidden, generator=g)

    q_int = (x @ w_interleaved.T).view(3, heads, DH).double()
    z = torch.complex(q_int[..., 0::2], q_int[..., 1::2])  # Mistral's view_as_complex
    z = z * torch.polar(torch.ones(1, dtype=torch.float64), _angles64(positions))[:, None, :]
    rotated_int = torch.stack([z.real, z.imag], dim=-1).flatten(-2)  # back to interleaved order

    cos, sin = rotary_table(DH, 32, THETA)
    q_half = (x @ interleaved_to_half(w_interleaved, DH).T).view(3, heads, DH)
    rotated_half = apply_rotary(q_half, cos[positions], sin[positions])

    evens_then_odds = torch.cat([torch.arange(0, DH, 2), torch.arange(1, DH, 2)])
    torch.testing.assert_close(rotated_half.double(), rotated_int[..., evens_then_odds], rtol=1e-4, atol=1e-4)


def test_half_to_interleaved_inverts_interleaved_to_half():
    w = torch.randn(3 * DH, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, DH), DH), w)
    assert torch.equal(interleaved_to_half(half_to_interleaved(w, DH), DH), w)
