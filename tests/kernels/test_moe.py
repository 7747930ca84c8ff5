"""kernels/moe.py: routing equals softmax -> top-k -> renormalise, and the grouped expert MLP
equals a per-token loop over each token's chosen experts."""

import pytest
import torch
import torch.nn.functional as F

from mixserve.kernels.linear import linear_kernels_for, pack_weight
from mixserve.kernels.moe import grouped_experts, route

D, I, E, TOP_K = 32, 48, 8, 2  # hidden, expert intermediate, experts, experts per token


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _naive_route(logits: torch.Tensor, k: int):
    weights, experts = [], []
    for row in logits.float():
        probs = torch.softmax(row, dim=-1).tolist()
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e])[:k]
        total = sum(probs[e] for e in chosen)
        weights.append([probs[e] / total for e in chosen])
        experts.append(chosen)
    return torch.tensor(weights), torch.tensor(experts)


def _expert_weights(dtype, seed=0):
    g = _gen(seed)
    w1 = [torch.randn(I, D, generator=g).mul(D**-0.5).to(dtype) for _ in range(E)]
    w3 = [torch.randn(I, D, generator=g).mul(D**-0.5).to(dtype) for _ in range(E)]
    w2 = [torch.randn(D, I, generator=g).mul(I**-0.5).to(dtype) for _ in range(E)]
    return w1, w3, w2


def _naive_moe(x, weights, experts, w1, w3, w2):
    """Per token, per chosen expert, in float32."""
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        xt = x[t].float()
        for j in range(experts.shape[1]):
            e = int(experts[t, j])
            hidden = F.silu(w1[e].float() @ xt) * (w3[e].float() @ xt)
            out[t] += float(weights[t, j]) * (w2[e].float() @ hidden)
    return out


def _grouped(x, weights, experts, w1, w3, w2, i_slice=slice(None), kernel="reference"):
    w13 = [pack_weight(torch.cat([w1[e][i_slice], w3[e][i_slice]]), kernel) for e in range(E)]
    w2p = [pack_weight(w2[e][:, i_slice].contiguous(), kernel) for e in range(E)]
    return grouped_experts(x, weights, experts, w13, w2p)


def test_route_matches_softmax_topk_renormalise():
    logits = torch.randn(7, E, generator=_gen(1))
    weights, experts = route(logits, TOP_K)
    ref_w, ref_e = _naive_route(logits, TOP_K)
    assert torch.equal(experts, ref_e)
    torch.testing.assert_close(weights, ref_w)
    assert weights.dtype == torch.float32 and experts.dtype == torch.int64


def test_route_weights_sum_to_one_in_float32_for_bfloat16_logits():
    logits = torch.randn(5, E, generator=_gen(2)).bfloat16()
    weights, experts = route(logits, 3)
    assert weights.dtype == torch.float32 and weights.shape == (5, 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    ref_w, ref_e = _naive_route(logits, 3)
    assert torch.equal(experts, ref_e)
    torch.testing.assert_close(weights, ref_w)


@pytest.mark.parametrize("kernel", linear_kernels_for(torch.float32, "cpu"))
@pytest.mark.parametrize("num_tokens", [1, 2, 13])
def test_grouped_experts_matches_per_token_loop_float32(num_tokens, kernel):
    w1, w3, w2 = _expert_weights(torch.float32)
    x = torch.randn(num_tokens, D, generator=_gen(3))
    weights, experts = route(torch.randn(num_tokens, E, generator=_gen(4)), TOP_K)
    out = _grouped(x, weights, experts, w1, w3, w2, kernel=kernel)
    assert out.dtype == torch.float32 and out.shape == (num_tokens, D)
    torch.testing.assert_close(out, _naive_moe(x, weights, experts, w1, w3, w2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", linear_kernels_for(torch.bfloat16, "cpu"))
@pytest.mark.parametrize("num_tokens", [1, 9])
def test_grouped_experts_matches_per_token_loop_bfloat16(num_tokens, kernel):
    w1, w3, w2 = _expert_weights(torch.bfloat16)
    x = torch.randn(num_tokens, D, generator=_gen(5)).bfloat16()
    weights, experts = route(torch.randn(num_tokens, E, generator=_gen(6)), TOP_K)
    out = _grouped(x, weights, experts, w1, w3, w2, kernel=kernel)
    assert out.dtype == torch.bfloat16
    ref = _naive_moe(x, weights, experts, w1, w3, w2)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_grouped_experts_with_most_experts_receiving_no_tokens():
    w1, w3, w2 = _expert_weights(torch.float32)
    x = torch.randn(6, D, generator=_gen(7))
    experts = torch.tensor([[5, 1], [1, 5], [5, 1], [1, 5], [5, 1], [5, 1]])  # experts 0, 2-4, 6, 7 idle
    weights = torch.softmax(torch.randn(6, 2, generator=_gen(8)), dim=-1)
    out = _grouped(x, weights, experts, w1, w3, w2)
    torch.testing.assert_close(out, _naive_moe(x, weights, experts, w1, w3, w2), rtol=1e-5, atol=1e-5)


def test_grouped_experts_with_one_expert_taking_every_token():
    w1, w3, w2 = _expert_weights(torch.float32)
    x = torch.randn(4, D, generator=_gen(9))
    experts = torch.full((4, 1), 7)
    weights = torch.ones(4, 1)
    out = _grouped(x, weights, experts, w1, w3, w2)
    torch.testing.assert_close(out, _naive_moe(x, weights, experts, w1, w3, w2), rtol=1e-5, atol=1e-5)


def test_grouped_experts_over_tensor_parallel_slices_sums_to_the_full_result():
    w1, w3, w2 = _expert_weights(torch.float32)
    x = torch.randn(5, D, generator=_gen(10))
    weights, experts = route(torch.randn(5, E, generator=_gen(11)), TOP_K)
    full = _grouped(x, weights, experts, w1, w3, w2)
    half = I // 2
    partial = sum(_grouped(x, weights, experts, w1, w3, w2, s) for s in (slice(0, half), slice(half, I)))
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)
