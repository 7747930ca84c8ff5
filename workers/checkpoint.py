"""Lazy, sliceable access to checkpoint tensors by their Hugging Face names.

Both layouts are read through safetensors' lazy slices, so a tensor-parallel rank reads only its
rows or columns and the whole checkpoint is never in memory at once:
- Hugging Face: `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- Mistral: `consolidated*.safetensors` with Mistral's names. Its q/k rows are in the interleaved
  rotary order; they are permuted into the "rotate half" order the model uses (the same permute
  as transformers' conversion script), head by head, so a slice of whole heads permutes alone.
"""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, ModelConfig

# Hugging Face name pattern -> Mistral name template.
_MISTRAL_NAMES: list[tuple[str, str]] = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.feed_forward.gate.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", r"layers.\1.feed_forward.experts.\2.\3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
]
_ROTARY_PERMUTED = re.compile(r"model\.layers\.\d+\.self_attn\.([qk])_proj\.weight")


def _mistral_name(hf_name: str) -> str:
    for pattern, template in _MISTRAL_NAMES:
        if re.fullmatch(pattern, hf_name):
            return re.sub(pattern, template, hf_name)
    raise CheckpointError(f"no Mistral-layout name for tensor {hf_name}")


def _checkpoint_files(path: Path, layout: str) -> list[Path]:
    if layout == "mistral":
        files = sorted(path.glob("consolidated*.safetensors"))
    elif (path / "model.safetensors.index.json").exists():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted({path / name for name in index["weight_map"].values()})
    else:
        files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no safetensors weights for its {layout} layout")
    return files


class CheckpointReader:
    """Reads (slices of) tensors named in Hugging Face terms from either layout."""

    def __init__(self, path: str | Path, config: ModelConfig):
        self.path = Path(path)
        self.config = config
        self._handles = [safe_open(str(f), framework="pt") for f in _checkpoint_files(self.path, config.layout)]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def read(
        self,
        hf_name: str,
        expected_shape: tuple[int, ...],
        dtype: torch.dtype,
        rows: slice | None = None,
        cols: slice | None = None,
    ) -> torch.Tensor:
        """The tensor (or its rows/cols slice), checked against its expected full shape, cast to dtype."""
        name = hf_name if self.config.layout == "hf" else _mistral_name(hf_name)
        handle = self._where.get(name)
        if handle is None:
            raise CheckpointError(f"checkpoint {self.path} is missing tensor {name}")
        lazy = handle.get_slice(name)
        shape = tuple(lazy.get_shape())
        if shape != tuple(expected_shape):
            raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {list(expected_shape)}")
        rows = rows or slice(None)
        tensor = lazy[rows] if cols is None else lazy[rows, cols]
        permuted = _ROTARY_PERMUTED.fullmatch(hf_name)
        if self.config.layout == "mistral" and permuted:
            tensor = _interleaved_to_half(tensor, self.config.head_dim)
        return tensor.to(dtype).contiguous()


def _interleaved_to_half(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """weight: [heads*Dh, D] with rotary pairs interleaved -> the same rows in rotate-half order."""
    rows, dim_in = weight.shape
    heads = rows // head_dim
    return weight.view(heads, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(rows, dim_in)
