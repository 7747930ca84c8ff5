"""Knobs of one engine (one replica), and the one place their defaults live (cluster/settings.py's
ServeSettings takes its engine defaults from here and builds an EngineConfig; the weight format's
come from workers/loader.py's WeightFormat, which `weight_format()` builds). No env reads."""

from dataclasses import dataclass, field

from .loader import WeightFormat
from .placement_plan import PlacementPlan

_WEIGHTS = WeightFormat()  # the weight format's defaults, which the fields below reuse


@dataclass(slots=True)
class EngineConfig:
    model: str
    dtype: str = "auto"  # "auto": workers/dtype_choice.py's rule
    linear_kernel: str = _WEIGHTS.linear_kernel  # "auto": kernels/kernel_choice.py's rule; or "reference" / "onednn"
    quantization: str = _WEIGHTS.quantization  # "int8" / "int4": weight-only, at load (kernels/quantize.py)
    quantization_group_size: int = _WEIGHTS.group_size  # int4's group of input columns (32, 64, 128, 256)
    quantize_lm_head: bool = _WEIGHTS.quantize_lm_head
    # "none": round each weight as it is; "builtin" or a text file: activation-aware (workers/calibration.py)
    quantization_calibration: str = _WEIGHTS.calibration
    block_size: int = 16  # tokens per KV-cache block
    kv_cache_bytes: int = 512 << 20  # per rank; sets the number of blocks
    num_blocks: int | None = None  # overrides kv_cache_bytes
    max_num_seqs: int = 32  # running sequences at once
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunk size)
    max_model_len: int | None = None  # prompt + output; default: the model's context length
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    expert_parallel: bool = False  # MoE layers split by whole experts across the ranks (attention stays TP)
    distributed: bool = False  # run ranks as Ray actors even when tensor_parallel_size is 1
    placement: PlacementPlan = field(default_factory=PlacementPlan)  # where the ranks run (workers/placement_plan.py)
    device: str = "cpu"
    seed: int = 0  # seeds the seeds of unseeded requests
    show_progress: bool = False

    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.linear_kernel, self.quantization, self.quantization_group_size, self.quantize_lm_head,
                            self.quantization_calibration)
