"""Lazy, sliceable access to checkpoint tensors by their Hugging Face names.

Both layouts are read through safetensors' lazy slices, so a tensor-parallel rank reads only its
rows or columns and the whole checkpoint is never in memory at once:
- Hugging Face: `model.safetensors`, or shards listed in `model.safetensors.index.json`;
- Mistral: `consolidated*.safetensors` with Mistral's names. Its q/k rows are in the interleaved
  rotary order; they are permuted into the "rotate half" order the model uses (the same permute
  as transformers' conversion script), head by head, so a slice of whole heads permutes alone.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import CheckpointError, ModelConfig
from .tensor_names import ROTARY_PERMUTED, interleaved_to_half, mistral_name

def _mistral_name(hf_name: str) -> str:
    try:
        return mistral_name(hf_name)
    except KeyError:
        raise CheckpointError(f"no Mistral-layout name for tensor {hf_name}") from None


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
        permute = self.config.layout == "mistral" and ROTARY_PERMUTED.fullmatch(hf_name) is not None
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
                    part = interleaved_to_half(part, self.config.head_dim)
                out[chunk.start - first : chunk.stop - first].copy_(part)


_CHUNK_BYTES = 16 << 20



def open_checkpoint(path: str | Path, config: ModelConfig):
    """The reader for the checkpoint's layout: a GGUF file, or a Hugging Face / Mistral folder."""
    if config.layout == "gguf":
        from .gguf_checkpoint import GgufCheckpointReader

        return GgufCheckpointReader(path, config)
    return CheckpointReader(path, config)
