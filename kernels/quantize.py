"""Weight-only quantization of a linear weight, for PyTorch's own weight-only kernels.

Schemes (the weight is [N, K] = [out, in]; activations stay in the model's dtype):
- "int8": symmetric, one scale per output channel: q = round(w / s) in [-127, 127],
  s = max|w_row| / 127; run by `aten._weight_int8pack_mm(x, q[N, K], s[N])`.
- "int4": asymmetric per group of `group_size` input columns: q = round((w - min) / s) in [0, 15],
  s = (max - min) / 15; torch's int4 convention is w = (q - 8) * s + z, so z = min + 8 s. Run by
  `aten._weight_int4pack_mm_for_cpu(x, pack(q), group_size, scales_zeros[K/G, N, 2])`. Needs K a
  multiple of the group size (32, 64, 128 or 256) and N a multiple of torch's packing block (64 rows
  with AVX-512, 32 with AVX2: `int4_block_rows`, found by probing the packer once), whose layout
  `unpack_int4` reads back; a weight that does not fit becomes int8 instead.
When to run the weight-only kernels and when to dequantize for a dense matmul is kernels/linear.py's
rule.
"""

import functools

import torch

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_fits(weight_shape: tuple[int, int], group_size: int) -> bool:
    n, k = weight_shape
    rows = int4_block_rows()
    return rows is not None and group_size in INT4_GROUP_SIZES and k % group_size == 0 and n % rows == 0


def scheme_for(weight_shape: tuple[int, int], quantization: str, group_size: int) -> str:
    """The scheme a weight of this shape gets under `quantization` (int4 falls back to int8)."""
    if quantization == "int4" and not int4_fits(weight_shape, group_size):
        return "int8"
    return quantization


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [N, K] -> (codes int8 [N, K], scales float32 [N])."""
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [N]
    codes = torch.clamp(torch.round(w / scales[:, None]), -127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """weight: [N, K] -> (codes int32 [N, K] in 0..15, scales_zeros float32 [K/G, N, 2])."""
    n, k = weight.shape
    w = weight.float().view(n, k // group_size, group_size)  # [N, K/G, G]
    low, high = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    scales = (high - low).clamp(min=1e-12) / 15  # [N, K/G, 1]
    codes = torch.clamp(torch.round((w - low) / scales), 0, 15).to(torch.int32).view(n, k)
    zeros = low + 8 * scales
    scales_zeros = torch.stack([scales.squeeze(-1).t(), zeros.squeeze(-1).t()], dim=-1)  # [K/G, N, 2]
    return codes, scales_zeros.contiguous()


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """-> [N, K] float32."""
    return codes.float() * scales.float()[:, None]


def dequantize_int4(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes int32 [N, K] in 0..15, scales_zeros [K/G, N, 2] -> [N, K] float32."""
    n, k = codes.shape
    scales = scales_zeros[..., 0].float().t()[:, :, None]  # [N, K/G, 1]
    zeros = scales_zeros[..., 1].float().t()[:, :, None]
    return ((codes.view(n, k // group_size, group_size).float() - 8) * scales + zeros).view(n, k)


def round_trip(weight: torch.Tensor, scheme: str, group_size: int) -> torch.Tensor:
    """weight: [N, K] -> what `scheme` ("int8" / "int4") stores for it, dequantized: [N, K] float32."""
    if scheme == "int8":
        return dequantize_int8(*quantize_int8(weight))
    return dequantize_int4(*quantize_int4(weight, group_size), group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes int32 [N, K] in 0..15 -> torch's CPU int4 pack, uint8 [N, K/2]."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)


def _unpack(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """torch stores each block of `block` output rows as [K, block/2] bytes, the low nibbles holding
    the block's first half of the rows, the high nibbles the second half."""
    blocks = packed.reshape(n // block, k, block // 2)
    rows = torch.cat([blocks & 0xF, blocks >> 4], dim=-1)  # [N/block, K, block]
    return rows.permute(0, 2, 1).reshape(n, k).int()


def unpack_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The inverse of `pack_int4` (N a multiple of int4_block_rows()). packed: uint8 [N, K/2] ->
    codes int32 [N, K]."""
    return _unpack(packed, n, k, int4_block_rows())


@functools.cache
def int4_block_rows() -> int | None:
    """Rows per block of this torch build's CPU int4 packing on this CPU, found by packing a probe of
    several blocks and reading it back; None (int4 unavailable) when no known layout matches."""
    try:
        probe = torch.randint(0, 16, (192, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = pack_int4(probe)
    except (RuntimeError, AttributeError):
        return None
    for block in (64, 32, 16):
        if torch.equal(_unpack(packed, 192, 64, block), probe):
            return block
    return None
