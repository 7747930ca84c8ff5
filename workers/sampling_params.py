"""What a request asks of generation. Validation raises ValueError naming the bad field.

Every field has a range, and the API's request models (router/protocol.py) take theirs from the
constants here, so a request out of range is refused at the boundary (HTTP and gRPC) and again
when it reaches an engine: no value the engine cannot turn into a tensor or check cheaply per
token gets in.
"""

import math
from dataclasses import dataclass, field

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_N = 16  # sequences per request
MAX_TOKENS = 1 << 24  # beyond every context length served; the context check is the real limit
MAX_TOP_K = 1 << 20  # beyond every vocabulary; a top_k at or above the vocabulary size is off
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024  # the detokenizer searches the text not yet emitted, at most this long
MAX_STOP_TOKEN_IDS = 1024  # checked by set membership per token
# A temperature below this samples as greedy (vLLM's rule): float32 logits divided by a temperature
# under ~1e-37 overflow to inf and the probabilities become NaN; anything this small is greedy anyway.
GREEDY_TEMPERATURE = 1e-5


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16  # None: up to the model's context length
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # return the chosen token's logprob and this many top alternatives
    prompt_logprobs: int | None = None  # logprob of every prompt token given its prefix
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        ids = list(self.stop_token_ids or [])
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(ids)}")
        if any(not _is_int(t) or not 0 <= t <= INT64_MAX for t in ids):
            raise ValueError("stop_token_ids must be integers in [0, 2^63)")
        self.stop_token_ids = frozenset(ids)
        self._check()
        if self.temperature < GREEDY_TEMPERATURE:
            self.temperature = 0.0

    def _check(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.n > MAX_N:
            raise ValueError(f"n must be at most {MAX_N}, got {self.n}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.max_tokens is not None and self.max_tokens > MAX_TOKENS:
            raise ValueError(f"max_tokens must be at most {MAX_TOKENS}, got {self.max_tokens}")
        if not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.top_k > MAX_TOP_K:
            raise ValueError(f"top_k must be at most {MAX_TOP_K}, got {self.top_k}")
        if self.seed is not None and (not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be an integer in [-2^63, 2^63), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
