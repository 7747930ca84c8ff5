"""kernels/quantize.py + the int8/int4 paths of kernels/linear.py: each quantized kernel computes
what dequantize-then-F.linear computes, at the shapes of tiny, mini and Mixtral-8x7B, with 1, 8 and
32 rows; and the codes are within half a step of the weights they stand for."""

import pytest
import torch
import torch.nn.functional as F

from mixserve.kernels.linear import linear, pack_weight
from mixserve.kernels.quantize import (
    dequantize_int4,
    int4_block_rows,
    dequantize_int8,
    int4_fits,
    quantize_int4,
    quantize_int8,
    scheme_for,
)

SHAPES = {  # [out, in]
    "tiny-w13": (256, 64), "tiny-w2": (64, 128),
    "mini-w13": (7168, 1024), "mini-w2": (1024, 3584), "mini-qkv": (1536, 1024),
    "mixtral-w1": (14336, 4096), "mixtral-w2": (4096, 14336),
}


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def weights():
    return {name: _randn(*shape, seed=i).mul_(shape[1] ** -0.5) for i, (name, shape) in enumerate(SHAPES.items())}


def _reference(x: torch.Tensor, packed, weight: torch.Tensor) -> torch.Tensor:
    """Dequantize the codes (with the scales as stored, in the activation dtype) and run F.linear in
    float32. int4 codes are stored in torch's packed layout, so they are recomputed from `weight`."""
    if packed.kernel == "int8":
        w = dequantize_int8(packed.data, packed.scales.float())
    else:
        codes, _ = quantize_int4(weight, packed.group_size)
        w = dequantize_int4(codes, packed.scales.float(), packed.group_size)
    return F.linear(x.float(), w)


@pytest.mark.parametrize("path", ["weight-only kernel", "dequantize"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_quantized_kernel_equals_dequantize_then_linear(weights, name, scheme, dtype, path):
    """Both ways linear() runs a quantized weight (PyTorch's weight-only kernel up to kernel_max_rows
    rows, dequantize + F.linear above) against the reference."""
    w = weights[name].to(dtype)
    packed = pack_weight(w, scheme, group_size=64)
    assert packed.kernel == scheme and (packed.out_features, packed.in_features) == w.shape
    packed.kernel_max_rows = 32 if path == "weight-only kernel" else 0
    for rows in (1, 8, 32):
        x = _randn(rows, w.shape[1], seed=rows).to(dtype)
        out = linear(x, packed)
        assert out.dtype == dtype and out.shape == (rows, w.shape[0])
        ref = _reference(x, packed, w)
        scale = ref.abs().max().item()
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        assert (out.float() - ref).abs().max().item() <= tolerance * scale, f"{rows} rows"


def test_codes_are_within_half_a_step_of_the_weights(weights):
    w = weights["mini-w2"]
    codes, scales = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert ((dequantize_int8(codes, scales) - w).abs() <= scales[:, None] / 2 + 1e-7).all()
    codes4, scales_zeros = quantize_int4(w, 32)
    assert codes4.min() >= 0 and codes4.max() <= 15 and scales_zeros.shape == (3584 // 32, 1024, 2)
    step = scales_zeros[..., 0].t().repeat_interleave(32, dim=1)  # [N, K]
    assert ((dequantize_int4(codes4, scales_zeros, 32) - w).abs() <= step / 2 + 1e-6).all()


def test_int4_needs_whole_groups_and_whole_packing_blocks_else_int8():
    """torch packs int4 in blocks of 64 output rows with AVX-512 and 32 with AVX2 (probed once)."""
    assert int4_block_rows() in (16, 32, 64)
    assert int4_fits((4096, 14336), 64) and int4_fits((64, 128), 128)
    assert not int4_fits((4096, 100), 64) and not int4_fits((24, 128), 64) and not int4_fits((64, 128), 48)
    assert scheme_for((24, 128), "int4", 64) == "int8" and scheme_for((64, 128), "int4", 64) == "int4"
    assert scheme_for((24, 128), "int8", 64) == "int8" and scheme_for((24, 128), "none", 64) == "none"
    with pytest.raises(ValueError, match="int4 needs"):
        pack_weight(torch.zeros(24, 128), "int4")


def test_quantized_weights_take_a_half_and_a_quarter_of_bfloat16_bytes(weights):
    w = weights["mini-w13"].bfloat16()
    bf16 = w.numel() * 2
    assert pack_weight(w, "int8").nbytes <= 0.51 * bf16
    assert pack_weight(w, "int4", group_size=64).nbytes <= 0.29 * bf16  # 4 bits + two bf16 per 64


def test_the_timed_crossover_keeps_the_kernel_for_a_bf16_row_and_not_for_float32_batches(weights):
    """kernels/kernel_choice.py int_kernel_max_rows: bf16 weight-only kernels win at 1 row on every
    CPU measured (they read 2-4x fewer bytes); float32 activations take a generic path that is ~6x
    slower than dequantizing from 8 rows on (measured, 1536x1024 int8)."""
    from mixserve.kernels.kernel_choice import INT_ROWS, int_kernel_max_rows

    for scheme in ("int8", "int4"):
        bf16 = pack_weight(weights["mini-qkv"].to(torch.bfloat16), scheme, group_size=64)
        assert int_kernel_max_rows(bf16) in INT_ROWS and bf16.kernel_max_rows >= 1
        f32 = pack_weight(weights["mini-qkv"], scheme, group_size=64)
        assert int_kernel_max_rows(f32) <= 1 and f32.kernel_max_rows <= 1
