"""Runs the model for one rank: owns the weights and this rank's KV cache, executes steps.

The same class serves a single-process engine (TP=1) and each tensor-parallel rank: ranks run
identical forwards on their shards, and only the rank asked to sample does so.

Re-reading the weights in another format (re-quantization at run time) is two-phase, so that a
failure never leaves a rank without a model nor ranks with different weights: `stage_weights`
builds the new model next to the current one, which stays untouched (memory peaks at two models),
then `swap_staged` makes it current or `discard_staged` drops it. Alone, `reload_weights` does
both; tensor-parallel ranks swap only once every rank has staged (workers/ray_executor.py).
Calibration observes the current model with a scratch KV cache of its own: the serving KV cache
(and so the engine's prefix cache) is never touched before a swap.
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


class WeightReloadError(RuntimeError):
    """Re-reading the weights failed; the rank keeps serving the model it had."""


def _calibrates(weights: WeightFormat) -> bool:
    return weights.quantization != "none" and weights.calibration != "none"


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
        self._staged = None
        calibrating = _calibrates(weights)
        # with calibration, a first load rounds plainly: the model the activations are observed on
        self.model = load_model(**self._load, show_progress=show_progress,
                                weights=dataclasses.replace(weights, calibration="none") if calibrating else weights)
        if calibrating:  # at start-up nothing serves yet: the plain model goes before the calibrated one comes
            stats = self._calibration_stats(weights)
            self.model = None
            return_freed_memory()
            self.model = load_model(**self._load, weights=weights, calibration=stats)
        self.kv_cache = self._new_kv_cache(cache.num_blocks)

    def _new_kv_cache(self, num_blocks: int) -> torch.Tensor:
        kv_heads = self.config.num_kv_heads // self._load["shard"].world_size
        slots = num_blocks * self.cache.block_size
        # [layers, K/V, Kr, S, Dh]
        return torch.zeros(self.config.num_layers, 2, kv_heads, slots, self.config.head_dim,
                           dtype=self._load["dtype"], device=self._load["device"])

    # ---- re-reading the weights (re-quantization at run time) --------------------------------

    def reload_weights(self, weights: WeightFormat) -> None:
        """Read the weights again from the checkpoint, stored as `weights` says, and serve them; on
        failure (WeightReloadError) the current ones stay. Memory peaks at two models."""
        self.stage_weights(weights)
        self.swap_staged()

    def stage_weights(self, weights: WeightFormat) -> None:
        """Build the model stored as `weights` says next to the current one, which keeps its weights
        and KV cache. Quantizing with calibration observes the current model on the calibration text
        first (workers/calibration.py). Any failure (checkpoint unreadable, out of memory,
        calibration) drops what was built and raises WeightReloadError naming it."""
        self.discard_staged()
        try:
            self._staged = load_model(**self._load, weights=weights, calibration=self._calibration_stats(weights))
        except Exception as exc:
            self.discard_staged()
            raise WeightReloadError(f"re-reading the weights of {self._load['path']} as {weights.quantization} "
                                    f"(calibration {weights.calibration}) failed: {type(exc).__name__}: {exc}"
                                    ) from exc

    def swap_staged(self) -> None:
        """Serve the staged model; the old one is freed. The KV cache stays allocated (what it holds
        was computed with the old weights: the engine forgets it)."""
        if self._staged is None:
            raise WeightReloadError("no staged model to swap in")
        self.model, self._staged = self._staged, None
        return_freed_memory()

    def discard_staged(self) -> None:
        self._staged = None
        return_freed_memory()

    def _calibration_stats(self, weights: WeightFormat) -> dict | None:
        """The current model's linear inputs observed on the calibration text (None unless `weights`
        calibrates). Ranks run the prefills in step (their all-reduces pair up), so they first agree
        that every rank has its text and scratch cache: one rank failing there fails all before any forward."""
        if not _calibrates(weights):
            return None
        start = time.perf_counter()
        error = chunks = scratch = None
        try:
            slots = self.cache.num_blocks * self.cache.block_size
            chunks = calibration_chunks(weights.calibration, Tokenizer.from_dir(self._load["path"]), slots)
            scratch = self._new_kv_cache(-(-max(map(len, chunks)) // self.cache.block_size))
        except Exception as exc:
            error = exc
        if not self._every_rank_ok(error is None):
            raise error or WeightReloadError("another tensor-parallel rank could not prepare calibration")
        stats = observe_linear_inputs(lambda step: self.execute(step, sample=False, kv_cache=scratch), chunks,
                                      self.cache.block_size)
        log.info("calibration: %d tokens of %s observed in %.1f s", sum(map(len, chunks)), weights.calibration,
                 time.perf_counter() - start)
        return stats

    def _every_rank_ok(self, ok: bool) -> bool:
        """Whether every rank says `ok`: one all-reduce that every rank reaches."""
        failed = torch.tensor([0.0 if ok else 1.0], device=self._load["device"])
        return self._load["all_reduce"](failed).item() == 0

    # ---- serving ------------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, step: StepInput, sample: bool = True, kv_cache: torch.Tensor | None = None
                ) -> StepOutput | None:
        """Run one step (on `kv_cache` instead of the serving KV cache: calibration's scratch)."""
        start = time.perf_counter()
        inputs = build_model_inputs(step, self.cache.block_size, self.config.sliding_window)
        logits = self.model.forward(
            inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache if kv_cache is None else kv_cache,
            inputs.logits_indices,
        )  # [R, V]
        if not sample:
            return None
        output = sample_step(logits, inputs)
        output.compute_s = time.perf_counter() - start
        return output
