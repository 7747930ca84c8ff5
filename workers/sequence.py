"""One generated continuation of a prompt (a request with n > 1 has n sequences)."""

import enum
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """Token state of one sequence and its place in the KV cache.

    Invariants: `num_computed_tokens <= len(token_ids)`; positions below `num_computed_tokens`
    have their K/V in the blocks of `block_table` (entry -1 = released because it fell out of
    the sliding window); `block_hashes[i]` is the chained hash of full block i whenever block i
    is full of known tokens.
    """

    seq_id: int
    request_id: str
    index: int  # position among the request's n sequences
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # noise for token i is drawn from a generator seeded with (seed, i)
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_prefix_hit_tokens: int = 0  # leading tokens whose K/V came from the prefix cache
    num_cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why this sequence's own processing failed (finish_reason "error")
    output_logprobs: list = field(default_factory=list)
    prompt_logprobs: list = field(default_factory=list)
    detokenizer: object = None
    max_tokens: int = 0  # output tokens allowed
    admitted_once: bool = False
    delta_text: str = ""  # text produced since the last report
    delta_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
