"""The Mixtral / Mistral decoder, run over a flat batch of tokens against a paged KV cache.

The model is written for one tensor-parallel rank: each linear weight holds that rank's slice
(see workers/loader.py), and `all_reduce` sums the partial results, exactly twice per layer
(after o_proj and after the MLP/MoE combine). With one rank `all_reduce` does nothing, so the
same code is the single-process model.

Shape legend (kernels/__init__.py's letters, plus this rank's shares):
    T = tokens in the step, D = hidden size, Dh = head dim, V = vocabulary, E = experts,
    Hr = query heads on this rank (H / world size), Kr = KV heads on this rank (K / world size),
    Ir = expert (or MLP) intermediate size on this rank (I / world size; all of I under expert
    parallelism), R = rows whose logits are wanted, P = positions in the rotary table
    (max_position_embeddings), S = cache slots.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..kernels.attention import AttentionMetadata, paged_attention, write_kv
from ..kernels.linear import LinearWeight, linear
from ..kernels.moe import grouped_experts, route, swiglu
from ..kernels.rms_norm import rms_norm
from ..kernels.rotary import apply_rotary
from .config import ModelConfig

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def no_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(slots=True)
class Attention:
    qkv: LinearWeight  # [(Hr + 2Kr) * Dh, D], this rank's q, k, v heads
    o: LinearWeight  # [D, Hr * Dh], this rank's input columns
    num_heads: int  # Hr
    num_kv_heads: int  # Kr
    head_dim: int

    def __call__(self, x, cos, sin, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        """x: [T, D] -> partial o_proj output [T, D] (to be all-reduced)."""
        t = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = linear(x, self.qkv).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rotary(q.reshape(t, self.num_heads, self.head_dim), cos, sin)  # [T, Hr, Dh]
        k = apply_rotary(k.reshape(t, self.num_kv_heads, self.head_dim), cos, sin)  # [T, Kr, Dh]
        write_kv(k_cache, v_cache, k, v.reshape(t, self.num_kv_heads, self.head_dim), meta.slot_mapping)
        out = paged_attention(q, k_cache, v_cache, meta, self.head_dim**-0.5)  # [T, Hr, Dh]
        return linear(out.reshape(t, q_size), self.o)


@dataclass(slots=True)
class SparseMoe:
    gate: torch.Tensor  # [E, D], replicated on every rank
    w13: list[LinearWeight | None]  # per expert [2Ir, D]; None = owned by another rank (expert parallel)
    w2: list[LinearWeight | None]  # per expert [D, Ir]
    top_k: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, D] -> partial [T, D]."""
        weights, experts = route(torch.nn.functional.linear(x, self.gate), self.top_k)  # [T, k]
        return grouped_experts(x, weights, experts, self.w13, self.w2)


@dataclass(slots=True)
class DenseMlp:
    w13: LinearWeight  # [2Ir, D], gate_proj and up_proj rows side by side
    w2: LinearWeight  # [D, Ir]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(swiglu(linear(x, self.w13)), self.w2)


@dataclass(slots=True)
class DecoderLayer:
    input_norm: torch.Tensor  # [D]
    attention: Attention
    post_attention_norm: torch.Tensor  # [D]
    mlp: SparseMoe | DenseMlp


class MixtralModel:
    """Embedding, decoder layers, final norm and LM head for one rank."""

    def __init__(
        self,
        config: ModelConfig,
        embed: torch.Tensor,
        layers: list[DecoderLayer],
        norm: torch.Tensor,
        lm_head: LinearWeight,
        rotary: tuple[torch.Tensor, torch.Tensor],
        all_reduce: AllReduce = no_all_reduce,
        kernel_report: dict[str, str] | None = None,
    ):
        self.config = config
        self.embed = embed  # [V, D]
        self.layers = layers
        self.norm = norm  # [D]
        self.lm_head = lm_head  # [V, D]
        self.cos, self.sin = rotary  # [P, Dh] each, float32
        self.all_reduce = all_reduce
        self.dtype = embed.dtype
        self.kernel_report = kernel_report or {}  # linear weight shape -> kernel chosen at load

    def layer_linears(self) -> Iterator[LinearWeight]:
        """Every decoder layer's linear weight this rank holds: q/k/v, o, and the MLP's or each owned
        expert's w13 and w2 (the LM head is `lm_head`)."""
        for layer in self.layers:
            yield layer.attention.qkv
            yield layer.attention.o
            mlp = layer.mlp
            if isinstance(mlp, SparseMoe):
                yield from (w for w in mlp.w13 + mlp.w2 if w is not None)
            else:
                yield from (mlp.w13, mlp.w2)

    def weight_bytes(self) -> int:
        """Bytes of the weights this rank holds (quantized codes and their scales included)."""
        tensors = [self.embed, self.norm]
        for layer in self.layers:
            tensors += [layer.input_norm, layer.post_attention_norm]
            if isinstance(layer.mlp, SparseMoe):
                tensors.append(layer.mlp.gate)
        linears = [self.lm_head, *self.layer_linears()]
        return sum(t.numel() * t.element_size() for t in tensors) + sum(w.nbytes for w in linears)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; kv_cache: [layers, 2, Kr, S, Dh]; logits_indices: [R]
        (the tokens whose next-token logits are wanted) -> logits [R, V] float32."""
        eps = self.config.rms_norm_eps
        h = self.embed[input_ids]  # [T, D]
        cos, sin = self.cos[positions], self.sin[positions]  # [T, Dh]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.input_norm, eps)
            h = h + self.all_reduce(layer.attention(x, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta))
            x = rms_norm(h, layer.post_attention_norm, eps)
            h = h + self.all_reduce(layer.mlp(x))
        h = rms_norm(h[logits_indices], self.norm, eps)  # [R, D]
        return linear(h, self.lm_head).float()
