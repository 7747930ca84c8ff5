"""Sparse mixture-of-experts: top-k routing and a grouped expert MLP.

Routing follows Mixtral (and transformers): softmax over the router logits in float32, keep the
top-k experts, renormalise their weights to sum to 1. The expert MLP is SwiGLU,
`w2(silu(w1 x) * w3 x)`, with w1 and w3 fused into one [2I, D] weight per expert.

Tokens are grouped by expert with one sort, so the Python loop runs over experts (8), never over
tokens; each expert sees one contiguous [n_e, D] matrix.
"""

import torch
import torch.nn.functional as F

from .linear import LinearWeight, linear


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, k] float32, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, k]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [n, 2I] (w1 x and w3 x side by side) -> [n, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    w13: list[LinearWeight | None],
    w2: list[LinearWeight | None],
) -> torch.Tensor:
    """Weighted sum of each token's chosen experts.

    x: [T, D]; weights, experts: [T, k]; w13[e]: [2I, D]; w2[e]: [D, I] -> [T, D] in x's dtype.
    `w13`/`w2` may hold only a tensor-parallel slice of I, or (expert parallelism) None for experts
    another rank owns: the result is then a partial sum that the caller all-reduces.
    """
    num_tokens, top_k = experts.shape
    flat_experts = experts.reshape(-1)  # [T*k]
    order = torch.argsort(flat_experts, stable=True)  # [T*k], grouped by expert
    token_of = order // top_k  # [T*k] token index of each grouped row
    counts = torch.bincount(flat_experts, minlength=len(w13)).tolist()  # [E]
    grouped_x = x.index_select(0, token_of)  # [T*k, D]
    grouped_w = weights.reshape(-1).index_select(0, order)  # [T*k]
    out = torch.empty_like(grouped_x)  # [T*k, D]
    start = 0
    for e, n in enumerate(counts):
        rows = slice(start, start + n)
        start += n
        if n == 0:
            continue
        if w13[e] is None:  # expert parallelism: another rank owns this expert
            out[rows] = 0
            continue
        hidden = swiglu(linear(grouped_x[rows], w13[e]))  # [n, I]
        out[rows] = linear(hidden, w2[e])  # [n, D]
    weighted = (out.float() * grouped_w[:, None]).to(x.dtype)  # [T*k, D]
    # Back to (token, choice) order with a gather (CPU index_add_ is serial), then sum the k choices.
    by_choice = weighted.index_select(0, torch.argsort(order))  # [T*k, D]
    return by_choice.view(num_tokens, top_k, -1).sum(dim=1)  # [T, D]
