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
        self._where: dict[str, Path] = {}
        for file in _checkpoint_files(self.path, config.layout):
            with safe_open(str(file), framework="pt") as handle:
                self._where.update((name, file) for name in handle.keys())

    def read(
        self,
        hf_name: str,
        expected_shape: tuple[int, ...],
        dtype: torch.dtype,
        rows: slice | None = None,
        cols: slice | None = None,
    ) -> torch.Tensor:
        """The tensor (or its rows/cols slice), checked against its expected full shape, cast to dtype."""
        shape = [len(range(*(s or slice(None)).indices(n))) for s, n in zip((rows, cols), expected_shape)]
        out = torch.empty(shape + list(expected_shape[2:]), dtype=dtype)
        self.read_into(out, hf_name, expected_shape, rows, cols)
        return out

    def read_into(
        self,
        out: torch.Tensor,
        hf_name: str,
        expected_shape: tuple[int, ...],
        rows: slice | None = None,
        cols: slice | None = None,
    ) -> None:
        """Copy the tensor (or its slice) straight into `out` (e.g. a part of a fused weight).

        The file is mapped only while a piece is copied, and big tensors are copied in row chunks,
        so the checkpoint pages read never stay resident: peak memory stays near the weights kept.
        """
        name = hf_name if self.config.layout == "hf" else _mistral_name(hf_name)
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"checkpoint {self.path} is missing tensor {name}")
        permute = self.config.layout == "mistral" and _ROTARY_PERMUTED.fullmatch(hf_name) is not None
        first, last, _ = (rows or slice(None)).indices(expected_shape[0])
        row_bytes = max(1, out[0].numel() * out.element_size()) if out.shape[0] else 1
        step = last - first if permute else max(1, _CHUNK_BYTES // row_bytes)
        for chunk_start in range(first, last, step):
            chunk = slice(chunk_start, min(chunk_start + step, last))
            with safe_open(str(file), framework="pt") as handle:
                lazy = handle.get_slice(name)
                shape = tuple(lazy.get_shape())
                if shape != tuple(expected_shape):
                    raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {list(expected_shape)}")
                part = lazy[chunk] if cols is None else lazy[chunk, cols]
                if permute:
                    part = _interleaved_to_half(part, self.config.head_dim)
                out[chunk.start - first : chunk.stop - first].copy_(part)


_CHUNK_BYTES = 16 << 20


def _interleaved_to_half(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """weight: [heads*Dh, D] with rotary pairs interleaved -> the same rows in rotate-half order."""
    rows, dim_in = weight.shape
    heads = rows // head_dim
    return weight.view(heads, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(rows, dim_in)
