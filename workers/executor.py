"""Executors run a step on the model: in this process (TP=1) or on tensor-parallel ranks."""

from typing import Protocol

import torch

from .config import ModelConfig
from .engine_config import EngineConfig
from .loader import WeightFormat
from .model_runner import CacheShape, ModelRunner
from .step_input import StepInput, StepOutput


class Executor(Protocol):
    def execute(self, step: StepInput) -> StepOutput: ...

    def check_health(self) -> None:
        """Raise if the executor can no longer run steps."""

    def kernel_report(self) -> dict[str, str]:
        """Linear weight shape -> the kernel chosen for it at load (rank 0's choices)."""

    def weight_bytes(self) -> int:
        """Bytes of the weights one rank holds (rank 0's), quantized codes and scales included."""

    def reload_weights(self, weights: WeightFormat) -> None:
        """Every rank reads its weights again from the checkpoint, stored as `weights` says: all ranks
        swap to the new weights or none does (WeightReloadError; the old ones keep serving)."""

    def shutdown(self) -> None: ...


class LocalExecutor:
    """The model runs in the engine's own process."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def check_health(self) -> None:
        return None

    def kernel_report(self) -> dict[str, str]:
        return dict(self.runner.model.kernel_report)

    def weight_bytes(self) -> int:
        return self.runner.model.weight_bytes()

    def reload_weights(self, weights: WeightFormat) -> None:
        self.runner.reload_weights(weights)

    def shutdown(self) -> None:
        self.runner = None


def make_executor(config: EngineConfig, model_config: ModelConfig, dtype: torch.dtype, cache: CacheShape,
                  local_path=None) -> Executor:
    """In-process for a single rank (reading `local_path`, the model as resolved here); Ray actors in a
    placement group for tensor parallelism (each rank resolves `config.model` on its own node)."""
    if config.tensor_parallel_size == 1 and not config.distributed:
        runner = ModelRunner(local_path or config.model, model_config, dtype, cache, device=config.device,
                             show_progress=config.show_progress, weights=config.weight_format())
        return LocalExecutor(runner)
    from .ray_executor import RayExecutor

    dtype_name = str(dtype).replace("torch.", "")
    return RayExecutor(config.model, model_config, dtype_name, cache, config.tensor_parallel_size, config.placement,
                       device=config.device, expert_parallel=config.expert_parallel,
                       weights=config.weight_format())
