"""The dtype an engine computes in: the rule behind `--dtype auto`.

Rule:
1. An explicit dtype is used as given. bfloat16 on a CPU without native bf16 math runs correctly
   (torch converts in software), only slower.
2. `auto` on CUDA, or with a float32 checkpoint: the checkpoint's dtype.
3. `auto` on CPU with a 16-bit checkpoint: the checkpoint's dtype where the CPU has native bf16
   math (kernels/capability.py: avx512_bf16, AMX or avx_ne_convert): half the bytes to stream and
   hardware matmuls. Without it 16-bit math is emulated at about half of float32's speed (AVX2
   EPYC, mini: vLLM 74 vs 36 tok/s, transformers 35 vs 14), so float32 is chosen when this rank's
   float32 weights plus its KV cache fit in `memory_budget` (default: `machine_memory_budget`, 90% of
   the memory available now); otherwise the checkpoint's dtype, which needs half the memory.
Every choice comes with a sentence saying why, for the start-up log and the benchmark JSON.
"""

from dataclasses import dataclass

import torch

from ..kernels.capability import CpuCapability, cpu_capability
from .config import DTYPES, ModelConfig


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")


def rank_linear_shapes(config: ModelConfig, world_size: int = 1) -> list[tuple[int, int]]:
    """[out, in] of every attention and MLP/expert weight one tensor-parallel rank holds (its slice;
    what weight-only quantization touches), as workers/loader.py lays them out: fused q/k/v and o,
    fused gate/up (w13) and down (w2) per expert (one dense MLP counts as one expert)."""
    c, dh = config, config.head_dim
    per_layer = [((c.num_heads + 2 * c.num_kv_heads) * dh // world_size, c.hidden_size),
                 (c.hidden_size, c.num_heads * dh // world_size)]
    per_layer += [(2 * c.intermediate_size // world_size, c.hidden_size),
                  (c.hidden_size, c.intermediate_size // world_size)] * max(c.num_experts, 1)
    return per_layer * c.num_layers


def weight_elements_per_rank(config: ModelConfig, world_size: int = 1) -> int:
    """Weights one tensor-parallel rank holds: its slice of attention and MLP/experts, plus the
    replicated embedding, LM head, norms and router gate."""
    d = config.hidden_size
    sliced = sum(out * inp for out, inp in rank_linear_shapes(config, world_size))
    replicated_per_layer = 2 * d + config.num_experts * d
    return sliced + config.num_layers * replicated_per_layer + 2 * config.vocab_size * d + d


MEMORY_BUDGET_FRACTION = 0.9  # of the memory available now: what one machine's ranks may take


def machine_memory_budget() -> int | None:
    """Bytes this machine's engines may use: MEMORY_BUDGET_FRACTION of MemAvailable (None if unknown)."""
    available = available_memory_bytes()
    return int(available * MEMORY_BUDGET_FRACTION) if available is not None else None


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def choose_dtype(
    requested: str,
    config: ModelConfig,
    device: str = "cpu",
    world_size: int = 1,
    kv_cache_bytes: int = 0,
    memory_budget: int | None = None,
    cap: CpuCapability | None = None,
) -> DtypeChoice:
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {requested!r}")
        return DtypeChoice(DTYPES[requested], "as requested")
    stored = config.checkpoint_dtype
    if device != "cpu" or stored == "float32":
        return DtypeChoice(DTYPES[stored], f"the checkpoint's dtype ({stored})")
    cap = cap or cpu_capability()
    if cap.native_bf16:
        return DtypeChoice(DTYPES[stored], f"the checkpoint's dtype ({stored}): this CPU has native bf16 math")
    need = weight_elements_per_rank(config, world_size) * 4 + kv_cache_bytes
    budget = memory_budget if memory_budget is not None else machine_memory_budget()
    if budget is None:
        budget = need
    if need <= budget:
        return DtypeChoice(torch.float32, f"float32 instead of the checkpoint's {stored}: this CPU has no native "
                           f"bf16 math, and float32 weights + KV cache ({need / 2**30:.2f} GiB) fit the memory "
                           f"budget ({budget / 2**30:.2f} GiB)")
    return DtypeChoice(DTYPES[stored], f"the checkpoint's dtype ({stored}): float32 weights + KV cache "
                       f"({need / 2**30:.2f} GiB) would not fit the memory budget ({budget / 2**30:.2f} GiB)")
