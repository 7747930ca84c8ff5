"""GGUF checkpoints (llama.cpp's format): tensors by their Hugging Face names, dequantized tensor by
tensor (the model config from the metadata is workers/config.py's).

Read with `gguf`'s own GGUFReader (a memory map: nothing is read until a tensor is asked for).
Architecture `llama` as llama.cpp's converter writes it for Llama, Mistral (a sliding window when the
metadata has one) and Mixtral (`llama.expert_count`, router `ffn_gate_inp`, experts merged into 3-D
`ffn_{gate,up,down}_exps` or one tensor per expert). The converter permutes q/k rows into the
interleaved rotary order; they are permuted back head by head (as for Mistral's layout). A file
without `output.weight` ties the LM head to the embedding. Any tensor type `gguf.quants` can
dequantize is read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K, ...): one tensor (or one row
chunk of it) is dequantized to float32 at a time and cast, so peak memory stays near the weights kept.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .config import CheckpointError, ModelConfig, gguf_reader
from .tensor_names import ROTARY_PERMUTED, gguf_names, interleaved_to_half

_CHUNK_BYTES = 4 << 20  # float32 bytes dequantized at once (numpy makes a few temporaries of this size)
INT4_GGUF_GROUP = 32  # columns per Q4_0 / Q4_1 block
_INT4_HEADER_BYTES = {"Q4_0": 2, "Q4_1": 4}  # f16 d (and f16 m) before a block's 16 bytes of nibbles


def _dequantize(raw: np.ndarray, qtype, name: str) -> np.ndarray:
    from gguf import quants

    try:
        return quants.dequantize(raw, qtype)
    except NotImplementedError:
        raise CheckpointError(f"GGUF tensor {name} has type {qtype.name}, which gguf cannot dequantize") from None


@dataclass(frozen=True, slots=True)
class _TensorView:
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: innermost dimension first
    data: np.ndarray  # the raw (quantized) rows, a view of the memory-mapped file


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over the array; F32 data comes back as a read-only view of the file's map, copied."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


class GgufCheckpointReader:
    """Reads (slices of) tensors named in Hugging Face terms from a GGUF file; the same interface as
    workers/checkpoint.py's CheckpointReader."""

    def __init__(self, path: str | Path, config: ModelConfig):
        self.path = Path(path)
        self.config = config
        # Keep only each tensor's type, shape and view of the file's memory map: the reader's parsed
        # metadata (every vocabulary string and merge as its own array) takes ~150 MB for a 49k-token
        # vocabulary and is not needed once the tensors are found.
        self._tensors = {t.name: _TensorView(t.tensor_type, tuple(int(n) for n in t.shape), t.data)
                         for t in gguf_reader(self.path).tensors}

    def _find(self, hf_name: str):
        try:
            candidates = gguf_names(hf_name)
        except KeyError:
            raise CheckpointError(f"no GGUF name for tensor {hf_name}") from None
        for name, expert in candidates:
            if name in self._tensors:
                return name, self._tensors[name], expert
        raise CheckpointError(f"GGUF file {self.path} is missing tensor {candidates[0][0]}"
                              + (f" (or {candidates[1][0]})" if len(candidates) > 1 else ""))

    def read(self, hf_name: str, expected_shape: tuple[int, ...], dtype: torch.dtype,
             rows: slice | None = None, cols: slice | None = None) -> torch.Tensor:
        shape = [len(range(*(s or slice(None)).indices(n))) for s, n in zip((rows, cols), expected_shape)]
        out = torch.empty(shape + list(expected_shape[2:]), dtype=dtype)
        self.read_into(out, hf_name, expected_shape, rows, cols)
        return out

    def _raw_rows(self, hf_name: str, expected_shape: tuple[int, ...]):
        """(GGUF name, tensor view, raw rows [rows, bytes or elements per row]) after checking the shape."""
        name, tensor, expert = self._find(hf_name)
        shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions innermost first
        if expert is not None:
            shape = shape[1:]
        if shape != tuple(expected_shape):
            raise CheckpointError(f"GGUF tensor {name} has shape {list(shape)}, expected {list(expected_shape)}")
        return name, tensor, (tensor.data if expert is None else tensor.data[expert])

    def read_into(self, out: torch.Tensor, hf_name: str, expected_shape: tuple[int, ...],
                  rows: slice | None = None, cols: slice | None = None) -> None:
        """Dequantize the tensor (or its rows/cols slice) into `out`, a row chunk at a time."""
        name, tensor, raw = self._raw_rows(hf_name, expected_shape)
        if len(expected_shape) == 1:
            out.copy_(_as_tensor(_dequantize(np.asarray(raw), tensor.tensor_type, name)).reshape(-1))
            return
        permute = ROTARY_PERMUTED.fullmatch(hf_name) is not None
        first, last, _ = (rows or slice(None)).indices(expected_shape[0])
        row_bytes = max(1, expected_shape[1] * 4)
        step = last - first if permute else max(1, _CHUNK_BYTES // row_bytes)
        for start in range(first, last, step):
            stop = min(start + step, last)
            part = _as_tensor(_dequantize(np.asarray(raw[start:stop]), tensor.tensor_type, name))
            part = part.reshape(stop - start, expected_shape[1])
            if cols is not None:
                part = part[:, cols]
            if permute:
                part = interleaved_to_half(part, self.config.head_dim)
            out[start - first : stop - first].copy_(part)

    def read_int4(self, hf_name: str, expected_shape: tuple[int, int], rows: slice | None = None,
                  cols: slice | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A Q4_0 / Q4_1 weight (or its rows/cols slice) as int4 codes and scales, with no float copy of
        it: codes int32 [n, k] in 0..15 and scales_zeros float32 [k/32, n, 2] in kernels/quantize.py's
        convention w = (q - 8) * s + z, groups of INT4_GGUF_GROUP columns. Exact: Q4_0 (w = d (q - 8))
        is s = d, z = 0; Q4_1 (w = d q + m) is s = d, z = m + 8 d. None for any other type (Q8_0's
        per-32 scales have no per-channel int8 equivalent; K-quants nest scales in 256-column
        super-blocks) and for a column slice that does not fall on 32-column blocks."""
        name, tensor, raw = self._raw_rows(hf_name, expected_shape)
        header = _INT4_HEADER_BYTES.get(tensor.tensor_type.name)
        n, k = expected_shape
        row_slice, col_slice = slice(*(rows or slice(None)).indices(n)), slice(*(cols or slice(None)).indices(k))
        if header is None or col_slice.start % INT4_GGUF_GROUP or col_slice.stop % INT4_GGUF_GROUP:
            return None
        groups = slice(col_slice.start // INT4_GGUF_GROUP, col_slice.stop // INT4_GGUF_GROUP)
        blocks = np.asarray(raw[row_slice]).reshape(-1, k // INT4_GGUF_GROUP, header + INT4_GGUF_GROUP // 2)
        blocks = torch.from_numpy(np.array(blocks[:, groups]))  # [n, G, bytes per block], copied off the map
        scales = blocks[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)  # [n, G]
        if header == 4:  # Q4_1: d, m, nibbles
            zeros = blocks[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1) + 8 * scales
        else:  # Q4_0: d, nibbles
            zeros = torch.zeros_like(scales)
        nibbles = blocks[..., header:]  # [n, G, 16]: low nibbles are a block's first 16 values
        codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(blocks.shape[0], -1).int()  # [n, k']
        per_row = torch.stack([scales, zeros], dim=-1)  # [n, G, 2]
        if ROTARY_PERMUTED.fullmatch(hf_name) is not None:
            codes = interleaved_to_half(codes, self.config.head_dim)
            per_row = interleaved_to_half(per_row.flatten(1), self.config.head_dim).view(per_row.shape)
        return codes, per_row.transpose(0, 1).contiguous()  # [n, k'], [G, n, 2]
