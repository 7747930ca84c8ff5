"""Build one tensor-parallel rank's model from a checkpoint.

Slicing rule (Megatron style): q/k/v and the MLP/expert w1 (gate) and w3 (up) are split by output
rows, o_proj and w2 (down) by input columns, so each rank's attention and MLP produce partial sums
that one all-reduce completes. The router gate, norms, embedding and LM head are replicated.
With expert parallelism the MoE layers are split by whole experts instead (rank r holds experts
r*E/W .. (r+1)*E/W - 1 entirely); tokens routed to other ranks' experts contribute zero here, so
the same single all-reduce after the MoE combine completes the sum.
Each tensor is read as a lazy safetensors slice and cast on its own, so peak memory while loading
is this rank's weights plus one tensor.
"""

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..kernels.kernel_choice import LinearKernelChooser
from ..kernels.linear import LinearWeight, pack_weight
from ..kernels.quantize import QUANTIZATIONS, scheme_for
from ..kernels.rotary import rotary_table
from .checkpoint import open_checkpoint
from .config import CheckpointError, ModelConfig
from .model import AllReduce, Attention, DecoderLayer, DenseMlp, MixtralModel, SparseMoe, no_all_reduce


def _return_freed_memory() -> None:
    """Hand memory freed by load-time temporaries back to the OS (glibc keeps freed heap chunks,
    which would otherwise inflate the resident set by up to one copy of the weights)."""
    name = ctypes.util.find_library("c")
    if name:
        libc = ctypes.CDLL(name)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)


@dataclass(frozen=True, slots=True)
class WeightFormat:
    """How linear weights are stored: the kernel choice's mode (kernels/kernel_choice.py), and weight-only
    quantization of the attention and MLP/expert projections (kernels/quantize.py; int4 in groups of
    `group_size` input columns), optionally of the LM head too. Norms, router gate and embedding stay
    in the model's dtype."""

    linear_kernel: str = "auto"
    quantization: str = "none"
    group_size: int = 64
    quantize_lm_head: bool = False

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}")


@dataclass(frozen=True, slots=True)
class ShardSpec:
    rank: int = 0
    world_size: int = 1
    expert_parallel: bool = False

    def owns_expert(self, expert: int, num_experts: int) -> bool:
        per_rank = num_experts // self.world_size
        return not self.expert_parallel or self.rank * per_rank <= expert < (self.rank + 1) * per_rank

    def part(self, total: int) -> slice:
        """This rank's contiguous share of `total` rows or columns."""
        size = total // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)


def check_shardable(config: ModelConfig, world_size: int, expert_parallel: bool = False) -> None:
    """Raise a clear error when the model cannot be split across `world_size` ranks."""
    checks = [("attention heads", config.num_heads), ("KV heads", config.num_kv_heads)]
    if expert_parallel and not config.is_moe:
        raise CheckpointError("expert parallelism needs a mixture-of-experts model")
    checks.append(("experts", config.num_experts) if expert_parallel else ("intermediate size", config.intermediate_size))
    for what, count in checks:
        if count % world_size:
            raise CheckpointError(f"tensor-parallel size {world_size} does not divide the model's {count} {what}")


def load_model(
    path: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    shard: ShardSpec = ShardSpec(),
    all_reduce: AllReduce = no_all_reduce,
    device: str | torch.device = "cpu",
    show_progress: bool = False,
    weights: WeightFormat = WeightFormat(),
) -> MixtralModel:
    """This rank's model, its linear weights stored as `weights` says (each shape's kernel ends up in
    `model.kernel_report`). Each weight is quantized as it is read: no full-precision copy of the model
    is ever held."""
    check_shardable(config, shard.world_size, shard.expert_parallel)
    reader = open_checkpoint(path, config)
    kernels = LinearKernelChooser(weights.linear_kernel)

    def pack(weight: torch.Tensor, quantize: bool = True) -> LinearWeight:
        scheme = scheme_for(tuple(weight.shape), weights.quantization if quantize else "none", weights.group_size)
        if scheme == "none":
            return kernels.pack(weight)
        name = f"{weight.shape[0]}x{weight.shape[1]} {str(weight.dtype).replace('torch.', '')}"
        kernels.report.setdefault(name, scheme + (f" (group {weights.group_size})" if scheme == "int4" else ""))
        return pack_weight(weight, scheme, weights.group_size)

    c = config
    dh, hidden, inter = c.head_dim, c.hidden_size, c.intermediate_size
    q_rows, kv_rows = shard.part(c.num_heads * dh), shard.part(c.num_kv_heads * dh)
    i_part = shard.part(inter)
    expert_rows = slice(0, inter) if shard.expert_parallel else i_part

    def read(name, shape, rows=None, cols=None):
        return reader.read(name, shape, dtype, rows, cols).to(device)

    def fused(parts: list[tuple[str, tuple[int, int], slice]]):
        """Row-wise concatenation of slices, read straight into one buffer: [sum rows, in]."""
        sizes = [r.stop - r.start for _, _, r in parts]
        out = torch.empty(sum(sizes), parts[0][1][1], dtype=dtype)
        for (name, shape, rows), start in zip(parts, [sum(sizes[:i]) for i in range(len(sizes))]):
            reader.read_into(out[start : start + rows.stop - rows.start], name, shape, rows=rows)
        return pack(out.to(device))

    # The LM head first: packing it briefly takes 2-3 copies of it, and that transient must not
    # come on top of every layer already loaded (in small-vocabulary-heavy models it is 25% of all).
    lm_head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    lm_head = pack(read(lm_head_name, (c.vocab_size, hidden)), quantize=weights.quantize_lm_head)
    _return_freed_memory()
    layers = []
    for i in tqdm(range(c.num_layers), desc="loading layers", disable=not show_progress):
        p = f"model.layers.{i}."
        attn = Attention(
            qkv=fused(
                [
                    (p + "self_attn.q_proj.weight", (c.num_heads * dh, hidden), q_rows),
                    (p + "self_attn.k_proj.weight", (c.num_kv_heads * dh, hidden), kv_rows),
                    (p + "self_attn.v_proj.weight", (c.num_kv_heads * dh, hidden), kv_rows),
                ]
            ),
            o=pack(read(p + "self_attn.o_proj.weight", (hidden, c.num_heads * dh), cols=q_rows)),
            num_heads=c.num_heads // shard.world_size,
            num_kv_heads=c.num_kv_heads // shard.world_size,
            head_dim=dh,
        )
        if c.is_moe:
            e = p + "block_sparse_moe."
            mlp = SparseMoe(
                gate=read(e + "gate.weight", (c.num_experts, hidden)),
                w13=[
                    fused([(f"{e}experts.{x}.{w}.weight", (inter, hidden), expert_rows) for w in ("w1", "w3")])
                    if shard.owns_expert(x, c.num_experts) else None
                    for x in range(c.num_experts)
                ],
                w2=[
                    pack(read(f"{e}experts.{x}.w2.weight", (hidden, inter), cols=expert_rows))
                    if shard.owns_expert(x, c.num_experts) else None
                    for x in range(c.num_experts)
                ],
                top_k=c.num_experts_per_tok,
            )
        else:
            mlp = DenseMlp(
                w13=fused([(p + f"mlp.{w}_proj.weight", (inter, hidden), i_part) for w in ("gate", "up")]),
                w2=pack(read(p + "mlp.down_proj.weight", (hidden, inter), cols=i_part)),
            )
        _return_freed_memory()
        layers.append(
            DecoderLayer(
                input_norm=read(p + "input_layernorm.weight", (hidden,)),
                attention=attn,
                post_attention_norm=read(p + "post_attention_layernorm.weight", (hidden,)),
                mlp=mlp,
            )
        )
    cos, sin = rotary_table(dh, c.max_position_embeddings, c.rope_theta)
    return MixtralModel(
        config=c,
        embed=read("model.embed_tokens.weight", (c.vocab_size, hidden)),
        layers=layers,
        norm=read("model.norm.weight", (hidden,)),
        lm_head=lm_head,
        rotary=(cos.to(device), sin.to(device)),
        all_reduce=all_reduce,
        kernel_report=kernels.report,
    )
