"""Model presets: the shapes of the random-weight models mixserve builds for tests and benchmarks.

A preset is the ModelConfig of the checkpoint it describes (shape, dtype, Hugging Face layout);
`random_checkpoint.write_random_checkpoint` writes one to disk with random weights, and the engine
then reads it back like any other checkpoint.

| preset | use        | params (active) |
|--------|------------|-----------------|
| tiny   | tests      | ~4.5 M, almost all in the embeddings and lm_head |
| mini   | benchmarks | ~0.8 B (~0.26 B active per token)                 |
"""

from ..workers.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
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
        checkpoint_dtype="float32",
        layout="hf",
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
    ),
    "mini": ModelConfig(
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
        checkpoint_dtype="bfloat16",
        layout="hf",
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        max_position_embeddings=32768,
    ),
}


def get_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
