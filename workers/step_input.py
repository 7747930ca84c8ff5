"""What the engine sends its model runner(s) each step, and what comes back.

Plain Python data (lists and numbers, no tensors) so that it is cheap to build and to ship to
tensor-parallel ranks; every rank turns it into the same tensors itself.
"""

from dataclasses import dataclass, field


@dataclass(slots=True)
class SamplingRow:
    """How to pick the next token of a sequence whose chunk completes this step."""

    temperature: float
    top_k: int  # <= 0: off
    top_p: float
    seed: int
    step: int  # index of the token being drawn (number of tokens generated so far)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    output_token_ids: list[int] | None = None  # only when a penalty is set
    num_logprobs: int | None = None


@dataclass(slots=True)
class SeqChunk:
    seq_id: int
    token_ids: list[int]  # the tokens computed this step
    start: int  # position of token_ids[0]
    block_table: list[int]  # -1 = released (outside the sliding window)
    no_write_before: int  # positions below this already hold their K/V in shared blocks
    sample: SamplingRow | None  # None while the prompt is still being prefilled
    prompt_logprob_targets: list[int] | None = None  # next-token ids whose logprobs are wanted
    num_prompt_logprobs: int = 0


@dataclass(slots=True)
class StepInput:
    chunks: list[SeqChunk]


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class SeqResult:
    token_id: int | None = None
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None
    error: str | None = None  # this sequence's own sampling failed (the step and other rows went on)


@dataclass(slots=True)
class StepOutput:
    results: dict[int, SeqResult]  # by seq_id
    compute_s: float = 0.0  # time the sampling rank spent on the step (inputs, forward, sampling)
