"""Executors run a step on the model: in this process (TP=1) or on tensor-parallel ranks."""

from typing import Protocol

from .model_runner import ModelRunner
from .step_input import StepInput, StepOutput


class Executor(Protocol):
    def execute(self, step: StepInput) -> StepOutput: ...

    def check_health(self) -> None:
        """Raise if the executor can no longer run steps."""

    def shutdown(self) -> None: ...


class LocalExecutor:
    """The model runs in the engine's own process."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner

    def execute(self, step: StepInput) -> StepOutput:
        return self.runner.execute(step)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.runner = None
