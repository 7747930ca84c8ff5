"""What the engine reports per request after each step (the shape vLLM users know)."""

from dataclasses import dataclass, field

from .step_input import TokenLogprobs


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # whole text so far
    token_ids: list[int]  # whole output so far
    delta_text: str = ""  # new since the previous report
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    error: str | None = None  # the request failed on its own (finished; workers/engine.py's failure rule)
