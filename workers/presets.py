"""Model presets: the shapes of the random-weight models mixserve builds for tests and benchmarks.

A preset is only a shape; `random_checkpoint.write_random_checkpoint` turns one into a Hugging Face
checkpoint on disk, and the engine then reads it back like any other checkpoint.

| preset | use        | params (active) |
|--------|------------|-----------------|
| tiny   | tests      | ~4.5 M, almost all in the embeddings and lm_head |
| mini   | benchmarks | ~0.8 B (~0.26 B active per token)                 |
"""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ModelPreset:
    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    sliding_window: int | None  # None = full attention
    dtype: str  # "float32" | "bfloat16"
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int


PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        name="tiny",
        vocab_size=32000,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        sliding_window=64,
        dtype="float32",
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "mini": ModelPreset(
        name="mini",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=3584,
        num_layers=8,
        num_heads=16,
        num_kv_heads=4,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        sliding_window=None,
        dtype="bfloat16",
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
