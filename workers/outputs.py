"""What the engine reports per request after each step (the shape vLLM users know), and its load."""

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
class RequestTimes:
    """When the engine took a request in, first computed it, produced its first token and finished it
    (time.monotonic() in the engine's process: only the durations mean anything elsewhere)."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    def durations(self) -> tuple[float | None, float | None, float | None]:
        """(queue, prefill, decode) seconds, each None until known: waiting to be scheduled, from then
        to the first token, from the first token to the end."""
        def span(start, end):
            return None if start is None or end is None else end - start

        return (span(self.arrival, self.first_scheduled), span(self.first_scheduled, self.first_token),
                span(self.first_token, self.finished))


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The engine's state after a step, published by the engine thread (readers on other threads
    take the whole snapshot, never the scheduler's live state)."""

    num_running: int = 0  # sequences
    num_waiting: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks referenced by sequences
    pending_prefill_tokens: int = 0  # prompt tokens admitted or waiting that are not computed yet
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache (cumulative)
    prefix_hits: int = 0  # of which were cached (cumulative)
    preemptions: int = 0  # cumulative
    step_s: float = 0.0  # recent wall time of a step (exponential average; 0 before the first)


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
    times: RequestTimes | None = None  # a copy as of this report
