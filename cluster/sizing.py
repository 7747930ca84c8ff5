"""How much memory a deployment needs, said before anything starts (the Apolo "Mistral app" idea:
size the deployment from the model's own numbers).

Rule: one tensor-parallel rank holds its share of the weights in the engine's dtype (as
workers/dtype_choice.py picks it; a tied LM head is a second copy of the embedding) plus its KV
cache (`kv_cache_bytes`). On CPU every rank of every replica started at once must fit in
`budget_fraction` of the memory this machine has available now (workers/dtype_choice.py's
MEMORY_BUDGET_FRACTION, 90%: the budget `--dtype auto` also sizes float32 against), or
`mixserve serve` refuses with a message that names the numbers and what to change; on a joined
cluster (other nodes may hold the replicas) and on CUDA it only reports.
With `kv_cache_memory_fraction` the KV cache is what that fraction of the available memory leaves
after the weights (`kv_cache_bytes_from_memory`), so quantized weights give the cache their savings.
"""

from dataclasses import dataclass

from mixserve.kernels.quantize import scheme_for
from mixserve.workers.config import ModelConfig
from mixserve.workers.dtype_choice import (
    MEMORY_BUDGET_FRACTION,
    available_memory_bytes,
    choose_dtype,
    rank_linear_shapes,
    weight_elements_per_rank,
)
from mixserve.workers.model_runner import kv_bytes_per_block
from mixserve.workers.request_checks import max_model_len

from .settings import ServeSettings

GIB = 2**30


class DoesNotFitError(ValueError):
    """The deployment cannot fit in this machine's memory; the message says by how much and what to change."""


@dataclass(frozen=True, slots=True)
class Sizing:
    dtype: str
    weight_bytes_per_rank: int
    kv_bytes_per_token: int  # one rank's share
    kv_cache_bytes: int  # per rank
    ranks: int  # every rank of the replicas started at once
    quantized: str = ""  # ", attention and experts int4 (group 64)" when quantized

    @property
    def tokens_in_cache(self) -> int:
        return self.kv_cache_bytes // max(1, self.kv_bytes_per_token)

    @property
    def bytes_needed(self) -> int:
        return self.ranks * (self.weight_bytes_per_rank + self.kv_cache_bytes)

    def lines(self) -> list[str]:
        return [
            f"weights: {self.weight_bytes_per_rank / GIB:.2f} GiB per rank ({self.dtype}{self.quantized})",
            f"KV cache: {self.kv_bytes_per_token / 1024:.1f} KiB per token per rank; {self.kv_cache_bytes / GIB:.2f} GiB "
            f"per rank holds {self.tokens_in_cache:,} tokens",
            f"memory needed: {self.bytes_needed / GIB:.2f} GiB for {self.ranks} rank(s)",
        ]


def quantized_bytes(shape: tuple[int, int], scheme: str, itemsize: int, group_size: int,
                    calibrated: bool = False) -> int:
    """Bytes of one [N, K] weight stored as `scheme` (codes and scales; kernels/quantize.py), with
    `calibrated` its K input scales too (kernels/activation_aware.py)."""
    n, k = shape
    input_scales = k * itemsize if calibrated else 0
    if scheme == "int8":
        return n * k + n * itemsize + input_scales
    if scheme == "int4":
        return n * k // 2 + (k // group_size) * n * 2 * itemsize + input_scales
    return n * k * itemsize


def size_deployment(settings: ServeSettings, config: ModelConfig) -> Sizing:
    tp = settings.tensor_parallel_size
    dtype = choose_dtype(settings.dtype, config, settings.device, tp, settings.kv_cache_bytes).dtype
    elements = weight_elements_per_rank(config, tp)
    if config.tie_word_embeddings:
        elements += config.vocab_size * config.hidden_size  # the LM head is packed as its own copy
    weight_bytes = elements * dtype.itemsize
    if settings.quantization != "none":
        lm_head = [(config.vocab_size, config.hidden_size)] if settings.quantize_lm_head else []
        for shape in rank_linear_shapes(config, tp) + lm_head:
            scheme = scheme_for(shape, settings.quantization, settings.quantization_group_size)
            weight_bytes += quantized_bytes(shape, scheme, dtype.itemsize, settings.quantization_group_size,
                                            calibrated=settings.quantization_calibration != "none")
            weight_bytes -= shape[0] * shape[1] * dtype.itemsize
    replicas = settings.replicas if settings.min_replicas is None else max(settings.min_replicas, 1)
    return Sizing(
        dtype=str(dtype).replace("torch.", ""),
        weight_bytes_per_rank=weight_bytes,
        kv_bytes_per_token=kv_bytes_per_block(config, 1, dtype, tp),
        kv_cache_bytes=settings.kv_cache_bytes,
        ranks=replicas * tp,
        quantized="" if settings.quantization == "none" else f", attention and experts {settings.quantization}"
        + (f" (group {settings.quantization_group_size})" if settings.quantization == "int4" else ""),
    )


def kv_cache_bytes_from_memory(settings: ServeSettings, config: ModelConfig, available: int | None = None) -> int:
    """KV bytes per rank under settings.kv_cache_memory_fraction: that fraction of the available memory,
    less every rank's weights (quantized weights leave the KV cache more), split among the ranks and
    capped at what max_num_seqs sequences of the full context length take. DoesNotFitError when the
    weights alone exceed the fraction."""
    sizing = size_deployment(settings, config)
    available = available_memory_bytes() if available is None else available
    if available is None:
        raise DoesNotFitError("kv_cache_memory_fraction needs the memory available (Linux /proc/meminfo); "
                              "set kv_cache_bytes instead")
    budget = int(available * settings.kv_cache_memory_fraction)
    left = budget // sizing.ranks - sizing.weight_bytes_per_rank
    if left < 1 << 20:
        raise DoesNotFitError(
            f"no memory left for the KV cache: {settings.kv_cache_memory_fraction:.0%} of the {available / GIB:.2f} "
            f"GiB available is {budget / GIB:.2f} GiB, and {sizing.ranks} rank(s) hold "
            f"{sizing.weight_bytes_per_rank / GIB:.2f} GiB of weights each. Raise kv_cache_memory_fraction, "
            "quantize (--quantization int8/int4), or use fewer replicas.")
    context = max_model_len(settings.max_model_len, config.max_position_embeddings)
    return min(left, settings.max_num_seqs * context * sizing.kv_bytes_per_token)


def check_fits(sizing: Sizing, available: int | None = None, budget_fraction: float = MEMORY_BUDGET_FRACTION) -> None:
    """Raise DoesNotFitError when the ranks cannot fit in this machine's available memory."""
    available = available_memory_bytes() if available is None else available
    if available is None:
        return
    budget = int(available * budget_fraction)
    if sizing.bytes_needed > budget:
        raise DoesNotFitError(
            f"the model does not fit: {sizing.ranks} rank(s) x ({sizing.weight_bytes_per_rank / GIB:.2f} GiB of "
            f"{sizing.dtype} weights + {sizing.kv_cache_bytes / GIB:.2f} GiB of KV cache) = "
            f"{sizing.bytes_needed / GIB:.2f} GiB, and this machine has {available / GIB:.2f} GiB available "
            f"(budget {budget_fraction:.0%}: {budget / GIB:.2f} GiB). Use fewer replicas, --tensor-parallel-size "
            "over more nodes, a smaller --kv-cache-bytes, --dtype bfloat16, or a quantized (GGUF) model."
        )
