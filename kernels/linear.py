"""Linear layers: the reference and oneDNN's packed-weight kernel.

`pack_weight(weight, kernel)` turns a [out, in] weight into what `kernel` wants; `linear` runs it.
- "reference": `torch.nn.functional.linear` on the plain weight; every device, every dtype.
- "onednn": the weight reordered once into oneDNN's blocked layout
  (`mkldnn._reorder_linear_weight`), run by `mkldnn._linear_pointwise`. On CPU it streams weights
  near memory bandwidth for the few rows of a decode step (2-3x F.linear at 1-8 rows). bfloat16
  needs avx512bw/vl/dq or avx_ne_convert (kernels/capability.py); float32 runs on any x86 CPU.
  Results equal the reference's up to float rounding order (bit-identical in bfloat16 on the
  machines measured; tests/kernels/test_linear.py).
Which kernel each weight gets is kernels/kernel_choice.py's rule.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .capability import CpuCapability, cpu_capability

LINEAR_KERNELS = ("reference", "onednn")
PACK_BATCH_HINT = 8  # rows oneDNN picks its weight layout for: a decode expert's batch


@dataclass(slots=True)
class LinearWeight:
    """A weight ready for `linear`: `data` is the plain [out, in] tensor or `kernel`'s packed form."""

    data: torch.Tensor
    out_features: int
    in_features: int
    kernel: str = "reference"

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


def pack_weight(weight: torch.Tensor, kernel: str = "reference") -> LinearWeight:
    """weight: [out, in] -> LinearWeight for `kernel` (one of linear_kernels_for(...))."""
    out_features, in_features = weight.shape
    if kernel == "onednn":
        data = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    elif kernel == "reference":
        data = weight.contiguous()
    else:
        raise ValueError(f"unknown linear kernel {kernel!r}; one of {', '.join(LINEAR_KERNELS)}")
    return LinearWeight(data, out_features, in_features, kernel)


def linear(x: torch.Tensor, weight: LinearWeight) -> torch.Tensor:
    """x: [T, in] -> [T, out]."""
    if weight.kernel == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, weight.data, None, "none", [], "")
    return F.linear(x, weight.data)
