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

from ..kernels.activation_aware import ChannelStats, input_channel_scales
from ..kernels.kernel_choice import LinearKernelChooser
from ..kernels.linear import LinearWeight, int4_weight, pack_weight
from ..kernels.quantize import INT4_GROUP_SIZES, QUANTIZATIONS, int4_fits, round_trip, scheme_for
from ..kernels.rotary import rotary_table
from .calibration import check_calibration_source
from .checkpoint import open_checkpoint
from .config import CheckpointError, ModelConfig
from .gguf_checkpoint import INT4_GGUF_GROUP
from .model import AllReduce, Attention, DecoderLayer, DenseMlp, MixtralModel, SparseMoe, no_all_reduce


def return_freed_memory() -> None:
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
    in the model's dtype. `calibration` (workers/calibration.py): "none" rounds each weight as it is;
    "builtin" or a text file's path first observes the model's activations on that text and quantizes
    activation-aware (kernels/activation_aware.py)."""

    linear_kernel: str = "auto"
    quantization: str = "none"
    group_size: int = 64
    quantize_lm_head: bool = False
    calibration: str = "none"

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; "
                             f"got {self.group_size}")
        check_calibration_source(self.calibration)


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
    calibration: dict[str, ChannelStats] | None = None,
) -> MixtralModel:
    """This rank's model, its linear weights stored as `weights` says (each shape's kernel ends up in
    `model.kernel_report`). Each weight is quantized as it is read: no full-precision copy of the model
    is ever held; GGUF Q4_0/Q4_1 weights asked for as int4 in groups of 32 are never float at all.
    `calibration`: the observed inputs of each linear weight, by its name (`LinearWeight.name`), for
    activation-aware quantization; a quantized weight without statistics is rounded as it is."""
    check_shardable(config, shard.world_size, shard.expert_parallel)
    reader = open_checkpoint(path, config)
    kernels = LinearKernelChooser(weights.linear_kernel)

    def pack(weight: torch.Tensor, name: str, quantize: bool = True) -> LinearWeight:
        scheme = scheme_for(tuple(weight.shape), weights.quantization if quantize else "none", weights.group_size)
        if scheme == "none":
            packed = kernels.pack(weight)
        else:
            stats = (calibration or {}).get(name)
            scale = None
            if stats is not None:
                scale, _ = input_channel_scales(weight, stats, lambda w: round_trip(w, scheme, weights.group_size))
            packed = kernels.quantized(pack_weight(weight, scheme, weights.group_size, channel_scale=scale))
        packed.name = name
        return packed

    c = config
    dh, hidden, inter = c.head_dim, c.hidden_size, c.intermediate_size
    q_rows, kv_rows = shard.part(c.num_heads * dh), shard.part(c.num_kv_heads * dh)
    i_part = shard.part(inter)
    expert_rows = slice(0, inter) if shard.expert_parallel else i_part

    def read(name, shape, rows=None, cols=None):
        return reader.read(name, shape, dtype, rows, cols).to(device)

    def int4_as_stored(parts: list[tuple[str, tuple[int, int], slice | None]], cols: slice | None):
        """The weight straight from the checkpoint's own int4 blocks (GGUF Q4_0/Q4_1, when int4 at
        their group size is asked for), or None to read it as floats."""
        read_int4 = getattr(reader, "read_int4", None)
        if weights.quantization != "int4" or weights.group_size != INT4_GGUF_GROUP or read_int4 is None:
            return None
        blocks = [read_int4(name, shape, rows, cols) for name, shape, rows in parts]
        if any(b is None for b in blocks):
            return None
        codes = torch.cat([b[0] for b in blocks])  # [rows, in]
        if not int4_fits(tuple(codes.shape), weights.group_size):
            return None
        scales_zeros = torch.cat([b[1] for b in blocks], dim=1)  # [K/G, rows, 2]
        return kernels.quantized(int4_weight(codes.to(device), scales_zeros.to(device), weights.group_size, dtype))

    def linear_weight(name: str, parts: list[tuple[str, tuple[int, int], slice | None]], cols: slice | None = None):
        """The row-wise concatenation of `parts` (tensor name, full shape, this rank's rows), this rank's
        `cols`, as one LinearWeight called `name`: [sum rows, in]."""
        stored = int4_as_stored(parts, cols)  # exact already: calibration has nothing to improve
        if stored is not None:
            stored.name = name
            return stored
        if len(parts) == 1:
            tensor, shape, rows = parts[0]
            return pack(read(tensor, shape, rows, cols), name)
        sizes = [r.stop - r.start for _, _, r in parts]
        out = torch.empty(sum(sizes), parts[0][1][1], dtype=dtype)
        for (tensor, shape, rows), start in zip(parts, [sum(sizes[:i]) for i in range(len(sizes))]):
            reader.read_into(out[start : start + rows.stop - rows.start], tensor, shape, rows=rows)
        return pack(out.to(device), name)

    # The LM head first: packing it briefly takes 2-3 copies of it, and that transient must not
    # come on top of every layer already loaded (in small-vocabulary-heavy models it is 25% of all).
    lm_head_name = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
    lm_head = pack(read(lm_head_name, (c.vocab_size, hidden)), "lm_head", quantize=weights.quantize_lm_head)
    return_freed_memory()
    layers = []
    for i in tqdm(range(c.num_layers), desc="loading layers", disable=not show_progress):
        p = f"model.layers.{i}."
        attn = Attention(
            qkv=linear_weight(
                p + "self_attn.qkv",
                [
                    (p + "self_attn.q_proj.weight", (c.num_heads * dh, hidden), q_rows),
                    (p + "self_attn.k_proj.weight", (c.num_kv_heads * dh, hidden), kv_rows),
                    (p + "self_attn.v_proj.weight", (c.num_kv_heads * dh, hidden), kv_rows),
                ]
            ),
            o=linear_weight(p + "self_attn.o_proj", [(p + "self_attn.o_proj.weight", (hidden, c.num_heads * dh), None)],
                            cols=q_rows),
            num_heads=c.num_heads // shard.world_size,
            num_kv_heads=c.num_kv_heads // shard.world_size,
            head_dim=dh,
        )
        if c.is_moe:
            e = p + "block_sparse_moe."
            mlp = SparseMoe(
                gate=read(e + "gate.weight", (c.num_experts, hidden)),
                w13=[
                    linear_weight(f"{e}experts.{x}.w13",
                                  [(f"{e}experts.{x}.{w}.weight", (inter, hidden), expert_rows) for w in ("w1", "w3")])
                    if shard.owns_expert(x, c.num_experts) else None
                    for x in range(c.num_experts)
                ],
                w2=[
                    linear_weight(f"{e}experts.{x}.w2", [(f"{e}experts.{x}.w2.weight", (hidden, inter), None)],
                                  cols=expert_rows)
                    if shard.owns_expert(x, c.num_experts) else None
                    for x in range(c.num_experts)
                ],
                top_k=c.num_experts_per_tok,
            )
        else:
            mlp = DenseMlp(
                w13=linear_weight(p + "mlp.gate_up_proj",
                                  [(p + f"mlp.{w}_proj.weight", (inter, hidden), i_part) for w in ("gate", "up")]),
                w2=linear_weight(p + "mlp.down_proj", [(p + "mlp.down_proj.weight", (hidden, inter), None)],
                                 cols=i_part),
            )
        return_freed_memory()
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
