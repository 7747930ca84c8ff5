"""Model configuration, read from a checkpoint folder.

One dataclass describes every layout: Hugging Face `config.json` (model_type mixtral, mistral or
llama - Mistral's architecture without the sliding window), Mistral's `params.json` (with an optional
`moe` section) and a GGUF file's metadata (its tensors are read by workers/gguf_checkpoint.py). A
config with no experts is a dense Mistral/Llama model.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint that mixserve cannot load; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None  # keys visible to a query: itself and W-1 earlier ones; None = all
    num_experts: int  # 0 = dense MLP (Mistral-7B)
    num_experts_per_tok: int
    max_position_embeddings: int
    checkpoint_dtype: str
    layout: str  # "hf", "mistral" or "gguf"
    bos_token_id: int = 1
    eos_token_id: int = 2
    tie_word_embeddings: bool = False  # the LM head is the embedding matrix (no lm_head tensor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _dtype_name(value: str | None, default: str) -> str:
    if value is None:
        return default
    value = str(value).replace("torch.", "")
    return value if value in DTYPES else default


def _from_hf(cfg: dict) -> ModelConfig:
    model_type = cfg.get("model_type")
    if model_type not in ("mixtral", "mistral", "llama"):
        raise CheckpointError(
            f"config.json has model_type {model_type!r}; mixserve serves Mixtral, Mistral and Llama models "
            "(model_type 'mixtral', 'mistral' or 'llama')"
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise CheckpointError(f"rope scaling {rope!r} is not supported")
    num_experts = int(cfg.get("num_local_experts", 0)) if model_type == "mixtral" else 0
    heads = int(cfg["num_attention_heads"])
    eos = cfg.get("eos_token_id", 2)
    return ModelConfig(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 1e6),
        sliding_window=cfg.get("sliding_window") if model_type != "llama" else None,
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)) if num_experts else 0,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        checkpoint_dtype=_dtype_name(cfg.get("dtype") or cfg.get("torch_dtype"), "bfloat16"),
        layout="hf",
        bos_token_id=int(cfg.get("bos_token_id", 1)),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _stored_dtype(path: Path) -> str:
    """The dtype of the first tensor of a Mistral-layout checkpoint (params.json rarely says)."""
    files = sorted(path.glob("consolidated*.safetensors"))
    if not files:
        return "bfloat16"
    with safe_open(str(files[0]), framework="pt") as handle:
        first = next(iter(handle.keys()), None)
        return _SAFETENSORS_DTYPES.get(handle.get_slice(first).get_dtype(), "bfloat16") if first else "bfloat16"


def _from_mistral(params: dict, path: Path) -> ModelConfig:
    moe = params.get("moe") or {}
    heads = int(params["n_heads"])
    return ModelConfig(
        vocab_size=int(params["vocab_size"]),
        hidden_size=int(params["dim"]),
        intermediate_size=int(params["hidden_dim"]),
        num_layers=int(params["n_layers"]),
        num_heads=heads,
        num_kv_heads=int(params.get("n_kv_heads") or heads),
        head_dim=int(params.get("head_dim") or params["dim"] // heads),
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 1e6)),
        sliding_window=params.get("sliding_window"),
        num_experts=int(moe.get("num_experts", 0)),
        num_experts_per_tok=int(moe.get("num_experts_per_tok", 2)) if moe else 0,
        max_position_embeddings=int(params.get("max_seq_len", params.get("max_position_embeddings", 32768))),
        checkpoint_dtype=_dtype_name(params.get("dtype"), _stored_dtype(path)),
        layout="mistral",
    )


_GGUF_ARCHITECTURES = ("llama",)  # as llama.cpp's converter writes Llama, Mistral and Mixtral


def gguf_reader(path: Path):
    """gguf's reader of a GGUF file (a memory map); a CheckpointError when it is not one."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path), "r")
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable GGUF file: {exc}") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _from_gguf(path: Path) -> ModelConfig:
    reader = gguf_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise CheckpointError(f"{path} has GGUF architecture {arch!r}; mixserve reads "
                              f"{', '.join(_GGUF_ARCHITECTURES)} (Llama, Mistral, Mixtral as llama.cpp writes them)")

    def need(key: str):
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise CheckpointError(f"{path} is missing the GGUF metadata field {arch}.{key}")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        raise CheckpointError(f"{path} has neither {arch}.vocab_size nor a tokenizer vocabulary")
    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    window = _field(reader, f"{arch}.attention.sliding_window")
    head_dim = _field(reader, f"{arch}.attention.key_length") or _field(reader, f"{arch}.rope.dimension_count")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv") or heads),
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        sliding_window=int(window) if window else None,
        num_experts=experts,
        num_experts_per_tok=int(_field(reader, f"{arch}.expert_used_count", 2)) if experts else 0,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 4096)),
        # all-float32 files (file_type 0) stay float32; quantized and 16-bit ones are 16-bit-sized
        checkpoint_dtype="float32" if _field(reader, "general.file_type", 1) == 0 else "bfloat16",
        layout="gguf",
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        tie_word_embeddings="output.weight" not in names,
    )


def load_model_config(path: str | Path) -> ModelConfig:
    """Read config.json (Hugging Face) or params.json (Mistral) from a checkpoint folder, or the
    metadata of a .gguf file."""
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        return _from_gguf(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if (path / "config.json").exists():
        source, parse = path / "config.json", _from_hf
    elif (path / "params.json").exists():
        source, parse = path / "params.json", lambda raw: _from_mistral(raw, path)
    else:
        raise CheckpointError(f"{path} has neither config.json (Hugging Face) nor params.json (Mistral)")
    try:
        config = parse(json.loads(source.read_text()))
    except KeyError as missing:
        raise CheckpointError(f"{source} is missing the field {missing}") from None
    except (TypeError, ValueError, json.JSONDecodeError) as bad:
        if isinstance(bad, CheckpointError):
            raise
        raise CheckpointError(f"{source} is not a valid model config: {bad}") from None
    if config.num_heads % config.num_kv_heads:
        raise CheckpointError(
            f"num_attention_heads {config.num_heads} is not a multiple of num_key_value_heads {config.num_kv_heads}"
        )
    if config.sliding_window is not None and config.sliding_window <= 0:
        config = replace(config, sliding_window=None)
    return config
