"""Test fixture: a Hugging Face checkpoint written as a GGUF file with `gguf`'s own GGUFWriter, the way
llama.cpp's converter lays it out (architecture `llama`, q/k rows permuted to interleaved rotary
pairs, Mixtral experts merged into 3-D tensors or one tensor per expert), and the same weights,
dequantized, written back as a Hugging Face safetensors checkpoint: the reference the GGUF load must
equal exactly.

Quantized types: those `gguf.quants` can quantize (Q8_0, Q4_0, Q4_1) are quantized from the
checkpoint's weights; K-quants (Q4_K), which it can only dequantize, are written as random blocks of
the right layout (scales small enough to give weight-sized values), so their dequantized values are
the weights of both files.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixserve.workers.config import load_model_config
from mixserve.random_models.random_checkpoint import mistral_tokenizer_model
from mixserve.workers.tensor_names import ROTARY_PERMUTED, gguf_names, half_to_interleaved, interleaved_to_half


def _random_k_blocks(rows: int, cols: int, qtype, seed: int) -> np.ndarray:
    """Random Q4_K/Q5_K/Q6_K rows: [rows, bytes per row], with small f16 super-block scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[qtype]
    g = np.random.default_rng(seed)
    raw = g.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype in (GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K):  # d, dmin first
        scales = g.uniform(2e-4, 6e-4, size=(rows, cols // block, 2)).astype(np.float16)
        raw[..., :4] = scales.view(np.uint8).reshape(rows, cols // block, 4)
    else:  # Q6_K: d last
        d = g.uniform(2e-4, 6e-4, size=(rows, cols // block, 1)).astype(np.float16)
        raw[..., -2:] = d.view(np.uint8).reshape(rows, cols // block, 2)
        raw[..., size - 18 : size - 2] = g.integers(-20, 20, size=(rows, cols // block, 16)).astype(np.int8).view(np.uint8)
    return raw.reshape(rows, -1)


def _quantized(weight: np.ndarray, qtype, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw rows to store, their dequantized float32 values)."""
    from gguf import GGMLQuantizationType, quants

    if qtype == GGMLQuantizationType.F32:
        return weight, weight
    if qtype.name.endswith("_K"):
        raw = _random_k_blocks(weight.shape[0], weight.shape[1], qtype, seed)
    else:
        raw = quants.quantize(weight, qtype)
    return raw, quants.dequantize(raw, qtype).reshape(weight.shape)


def _add_tokenizer(writer) -> None:
    """The Mistral v1 sentencepiece vocabulary as llama.cpp stores it (`llama` tokenizer model)."""
    import sentencepiece

    from gguf import TokenType

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_model()))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def write_gguf(hf_dir: Path, out_dir: Path, qtype_name: str, merged_experts: bool, seed: int = 0,
               with_tokenizer: bool = True) -> tuple[Path, Path]:
    """Write hf_dir's weights quantized to `qtype_name` (2-D weights; norms and the router stay F32)
    as out_dir/model.gguf, and their dequantized values as the HF checkpoint out_dir/reference.
    Returns (gguf file, reference folder)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    qtype = GGMLQuantizationType[qtype_name]
    config = load_model_config(hf_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = out_dir / "reference"
    reference.mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        if (hf_dir / name).exists():
            shutil.copyfile(hf_dir / name, reference / name)
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        weights = {name: f.get_tensor(name).float() for name in f.keys()}

    writer = GGUFWriter(str(out_dir / "model.gguf"), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.sliding_window:
        writer.add_sliding_window(config.sliding_window)
    if config.is_moe:
        writer.add_expert_count(config.num_experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_file_type(1)
    if with_tokenizer:
        _add_tokenizer(writer)

    dequantized: dict[str, torch.Tensor] = {}
    merged: dict[str, list[np.ndarray]] = {}
    for i, (name, w) in enumerate(sorted(weights.items())):
        array = w.numpy()
        if ROTARY_PERMUTED.fullmatch(name):
            array = half_to_interleaved(w, config.head_dim).numpy()
        is_matrix = array.ndim == 2 and not name.endswith("gate.weight")
        raw, values = _quantized(array, qtype if is_matrix else GGMLQuantizationType.F32, seed + i)
        values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        dequantized[name] = interleaved_to_half(values, config.head_dim) if ROTARY_PERMUTED.fullmatch(name) else values
        (gguf_name, expert), *_ = gguf_names(name) if merged_experts else gguf_names(name)[-1:]
        if expert is not None:
            merged.setdefault(gguf_name, [None] * config.num_experts)[expert] = raw
            continue
        writer.add_tensor(gguf_name, raw, raw_dtype=qtype if is_matrix else GGMLQuantizationType.F32)
    for gguf_name, parts in merged.items():
        writer.add_tensor(gguf_name, np.stack(parts), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    save_file({k: v.contiguous() for k, v in dequantized.items()}, str(reference / "model.safetensors"))
    cfg = json.loads((reference / "config.json").read_text())
    (reference / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "float32", "dtype": "float32"}))
    return out_dir / "model.gguf", reference
