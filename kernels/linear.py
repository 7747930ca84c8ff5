"""Linear layers: the reference and oneDNN's packed-weight kernel.

`pack_weight(weight, kernel)` turns a [out, in] weight into what `kernel` wants; `linear` runs it.
- "reference": `torch.nn.functional.linear` on the plain weight; every device, every dtype.
- "onednn": the weight reordered once into oneDNN's blocked layout
  (`mkldnn._reorder_linear_weight`), run by `mkldnn._linear_pointwise`. On CPU it streams weights
  near memory bandwidth for the few rows of a decode step (2-3x F.linear at 1-8 rows). bfloat16
  needs avx512bw/vl/dq or avx_ne_convert (kernels/capability.py); float32 runs on any x86 CPU.
  Results equal the reference's up to float rounding order (bit-identical in bfloat16 on the
  machines measured; tests/kernels/test_linear.py).
- "int8" / "int4": weight-only quantized codes (kernels/quantize.py). Rule: PyTorch's own
  `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` run on CPU for up to the weight's
  `kernel_max_rows` rows; above it the codes are dequantized to the activations' dtype for one dense
  `F.linear`. The crossover depends on the CPU, the activations' dtype and the shape, so it is timed
  at load (kernels/kernel_choice.py `int_kernel_max_rows`): on one AVX-512 bf16 CPU (5632x1024, bf16
  activations) int8's kernel won up to 32 rows and int4's up to 512 (unpacking torch's int4 layout
  makes its dequantization slow); with float32 activations both run a generic path and lose at every
  row count.
Which kernel each weight gets is kernels/kernel_choice.py's rule (quantization is asked for).
"""

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .capability import CpuCapability, cpu_capability
from .quantize import (
    dequantize_int4,
    int4_block_rows,
    int4_fits,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

LINEAR_KERNELS = ("reference", "onednn", "int8", "int4")
PACK_BATCH_HINT = 8  # rows oneDNN picks its weight layout for: a decode expert's batch


@dataclass(slots=True)
class LinearWeight:
    """A weight ready for `linear`: `data` is the plain [out, in] tensor or `kernel`'s packed form."""

    data: torch.Tensor
    out_features: int
    in_features: int
    kernel: str = "reference"
    scales: torch.Tensor | None = None  # int8: [N]; int4: scales and zeros [K/G, N, 2] (activation dtype)
    group_size: int = 0  # int4 only
    kernel_max_rows: int = 0  # int8/int4 on CPU: most rows run by the weight-only kernel (else dequantize)
    # [in] activation dtype: inputs are multiplied by it first (activation-aware quantization,
    # kernels/activation_aware.py: the stored weight is W diag(1 / input_scale))
    input_scale: torch.Tensor | None = None
    name: str = ""  # what the loader calls it: the key of its calibration statistics

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.data, self.scales, self.input_scale) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def packed(self) -> bool:
        return self.kernel != "reference"


def linear_kernels_for(dtype: torch.dtype, device: torch.device | str, cap: CpuCapability | None = None) -> list[str]:
    """The kernels that run correctly for `dtype` on `device` on this machine, reference first."""
    if torch.device(device).type != "cpu":
        return ["reference"]
    cap = cap or cpu_capability()
    packable = {torch.bfloat16: cap.onednn_bf16_packing, torch.float32: cap.onednn_float32_packing}
    return ["reference", "onednn"] if packable.get(dtype, False) else ["reference"]


def pack_weight(weight: torch.Tensor, kernel: str = "reference", group_size: int = 64,
                channel_scale: torch.Tensor | None = None) -> LinearWeight:
    """weight: [out, in] -> LinearWeight for `kernel` (one of linear_kernels_for(...), or int8/int4).
    channel_scale [in] (int8/int4 only; kernels/activation_aware.py): quantize W diag(s) and have the
    layer multiply its inputs by 1/s. 1/s is rounded to the activations' dtype first and the weight
    scaled by the inverse of that rounded value, so the two agree exactly."""
    out_features, in_features = weight.shape
    input_scale = None
    if channel_scale is not None:
        if kernel not in ("int8", "int4"):
            raise ValueError(f"input channel scales are for int8/int4 weights, not {kernel!r}")
        input_scale = (1 / channel_scale.float()).to(weight.dtype)  # [in]
        scaled = weight.float() / input_scale.float()  # [out, in] float32
    else:
        scaled = weight
    if kernel == "int8":
        codes, scales = quantize_int8(scaled)
        return LinearWeight(codes, out_features, in_features, "int8", scales.to(weight.dtype),
                            kernel_max_rows=_untimed_kernel_rows(weight.dtype), input_scale=input_scale)
    if kernel == "int4":
        if not int4_fits(tuple(weight.shape), group_size):
            raise ValueError(f"int4 needs the input size a multiple of the group size and the output size a multiple "
                             f"of {int4_block_rows()} rows here; got {tuple(weight.shape)}, group {group_size}")
        codes, scales_zeros = quantize_int4(scaled, group_size)
        packed = int4_weight(codes, scales_zeros, group_size, weight.dtype)
        packed.input_scale = input_scale
        return packed
    if kernel == "onednn":
        data = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    elif kernel == "reference":
        data = weight.contiguous()
    else:
        raise ValueError(f"unknown linear kernel {kernel!r}; one of {', '.join(LINEAR_KERNELS)}")
    return LinearWeight(data, out_features, in_features, kernel)


def int4_weight(codes: torch.Tensor, scales_zeros: torch.Tensor, group_size: int, dtype: torch.dtype) -> LinearWeight:
    """codes int32 [N, K] in 0..15 and scales_zeros [K/G, N, 2] (kernels/quantize.py's int4) -> the
    int4 LinearWeight, packed for torch's CPU kernel on CPU; scales in the activations' `dtype`."""
    out_features, in_features = codes.shape
    data = pack_int4(codes) if codes.device.type == "cpu" else codes
    return LinearWeight(data, out_features, in_features, "int4", scales_zeros.to(dtype), group_size,
                        kernel_max_rows=_untimed_kernel_rows(dtype))


def _untimed_kernel_rows(dtype: torch.dtype) -> int:
    """kernel_max_rows before kernels/kernel_choice.py times the crossover: one bf16 row (the weight-only
    kernels are fast there on every CPU measured), none for float32 (a generic path)."""
    return 1 if dtype == torch.bfloat16 else 0


_observer: Callable[[str, torch.Tensor], None] | None = None


@contextmanager
def observing_inputs(observer: Callable[[str, torch.Tensor], None]):
    """Within the block, every `linear` call first hands `observer(weight.name, x)` its input x [T, in]
    (calibration for kernels/activation_aware.py). One process-wide observer at a time."""
    global _observer
    if _observer is not None:
        raise RuntimeError("linear inputs are already being observed")
    _observer = observer
    try:
        yield
    finally:
        _observer = None


def linear(x: torch.Tensor, weight: LinearWeight) -> torch.Tensor:
    """x: [T, in] -> [T, out]."""
    if _observer is not None:
        _observer(weight.name, x)
    if weight.input_scale is not None:
        x = x * weight.input_scale
    if weight.kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight.data, None, "none", [], "")
    if weight.kernel in ("int8", "int4"):
        int_kernel = x.device.type == "cpu" and x.dtype == weight.scales.dtype and x.shape[0] <= weight.kernel_max_rows
        if int_kernel and weight.kernel == "int8":
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), weight.data, weight.scales)
        if int_kernel:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), weight.data, weight.group_size,
                                                              weight.scales)
        return F.linear(x, dequantized(weight, x.dtype))
    return F.linear(x, weight.data)


def dequantized(weight: LinearWeight, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight an int8/int4 LinearWeight stores, in `dtype` (with an input_scale the layer
    computes this times diag(input_scale))."""
    if weight.kernel == "int8":
        return (weight.data.to(dtype) * weight.scales.to(dtype)[:, None])
    codes = weight.data
    if codes.dtype == torch.uint8:  # torch's CPU int4 pack
        codes = unpack_int4(codes, weight.out_features, weight.in_features)
    return dequantize_int4(codes, weight.scales, weight.group_size).to(dtype)
