"""Runs the model for one rank: owns the weights and this rank's KV cache, executes steps.

The same class serves a single-process engine (TP=1) and each tensor-parallel rank: ranks run
identical forwards on their shards, and only the rank asked to sample does so.
"""

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..kernels.kernel_caches import cap_kernel_caches
from .calibration import calibration_chunks, observe_linear_inputs
from .config import ModelConfig
from .loader import ShardSpec, WeightFormat, load_model, return_freed_memory
from .model import AllReduce, no_all_reduce
from .model_inputs import build_model_inputs
from .sampler import sample_step
from .step_input import StepInput, StepOutput
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CacheShape:
    num_blocks: int
    block_size: int


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, world_size: int = 1) -> int:
    """Bytes one block takes on one rank: K and V for every layer."""
    kv_heads = config.num_kv_heads // world_size
    return config.num_layers * 2 * block_size * kv_heads * config.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(
        self,
        model_path: str | Path,
        config: ModelConfig,
        dtype: torch.dtype,
        cache: CacheShape,
        shard: ShardSpec = ShardSpec(),
        all_reduce: AllReduce = no_all_reduce,
        device: str = "cpu",
        show_progress: bool = False,
        weights: WeightFormat = WeightFormat(),
    ):
        cap_kernel_caches()  # before this process's first oneDNN matmul (loading times kernels)
        self.config = config
        self.cache = cache
        self._load = dict(path=model_path, config=config, dtype=dtype, shard=shard, all_reduce=all_reduce,
                          device=device)
        calibrating = weights.quantization != "none" and weights.calibration != "none"
        # with calibration, a first load rounds plainly: the model the activations are observed on
        self.model = load_model(**self._load, show_progress=show_progress,
                                weights=dataclasses.replace(weights, calibration="none") if calibrating else weights)
        kv_heads = config.num_kv_heads // shard.world_size
        slots = cache.num_blocks * cache.block_size
        # [layers, K/V, Kr, S, Dh]
        self.kv_cache = torch.zeros(config.num_layers, 2, kv_heads, slots, config.head_dim, dtype=dtype, device=device)
        if calibrating:
            self.reload_weights(weights)

    def reload_weights(self, weights: WeightFormat) -> None:
        """Read the weights again from the checkpoint, stored as `weights` says (re-quantization at run
        time). The old weights are dropped first, so memory peaks at one model, not two; the KV cache
        stays allocated (what it holds was computed with the old weights: the engine forgets it).
        Quantizing with calibration observes the current model on the calibration text first
        (workers/calibration.py)."""
        stats = None
        if weights.quantization != "none" and weights.calibration != "none":
            start = time.perf_counter()
            slots = self.cache.num_blocks * self.cache.block_size
            chunks = calibration_chunks(weights.calibration, Tokenizer.from_dir(self._load["path"]), slots)
            stats = observe_linear_inputs(lambda step: self.execute(step, sample=False), chunks, self.cache.block_size)
            log.info("calibration: %d tokens of %s observed in %.1f s", sum(map(len, chunks)), weights.calibration,
                     time.perf_counter() - start)
        self.model = None
        return_freed_memory()
        self.model = load_model(**self._load, weights=weights, calibration=stats)

    @torch.inference_mode()
    def execute(self, step: StepInput, sample: bool = True) -> StepOutput | None:
        start = time.perf_counter()
        inputs = build_model_inputs(step, self.cache.block_size, self.config.sliding_window)
        logits = self.model.forward(
            inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache, inputs.logits_indices
        )  # [R, V]
        if not sample:
            return None
        output = sample_step(logits, inputs)
        output.compute_s = time.perf_counter() - start
        return output
