"""Rotary position embedding, "rotate half" convention (Hugging Face layout of q/k weights).

Mistral's own checkpoints store q/k rows interleaved; the loader permutes them into this layout.
"""

import torch


def rotary_table(head_dim: int, max_positions: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [P, Dh] in float32, computed exactly as transformers does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # [Dh/2]
    positions = torch.arange(max_positions, dtype=torch.int64).float()  # [P]
    freqs = positions[:, None] * inv_freq[None, :]  # [P, Dh/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [P, Dh]
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, Dh]; cos, sin: [T, Dh] (already gathered at the tokens' positions)."""
    cos = cos.to(x.dtype)[:, None, :]  # [T, 1, Dh]
    sin = sin.to(x.dtype)[:, None, :]
    return x * cos + _rotate_half(x) * sin
