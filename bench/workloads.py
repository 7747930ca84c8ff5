"""The workloads of `mixserve bench serve`: seeded, built with the model's real tokenizer.

A workload is a list of *sessions*; a session is a list of requests sent one after another (the
next only once the previous has answered). Random and shared-prefix sessions hold one request each;
a multi-turn session is one chat. Arrivals (Poisson or a fixed concurrency) are per session.

- random: `num_prompts` completions prompts of `input_len` tokens (uniform in
  [input_len * (1 - range_ratio), input_len * (1 + range_ratio)]), `output_len` new tokens each.
- shared-prefix: `groups` system prompts of `prefix_len` tokens; each group has `users_per_group`
  users whose prompt is the group's prefix followed by their own `suffix_len` tokens. Requests are
  shuffled (seeded), so the groups interleave as they would with many users at once. The ideal
  prefix-cache hit rate is that of a cache that never evicts: every request but the first of its
  group finds its group's prefix.
- multi-turn: `conversations` chats of `turns` turns on /v1/chat/completions; turn k sends the whole
  chat so far (each user message `user_len` tokens, each assistant message the server's actual
  answer to the turn before), so every turn's prompt extends the last one's.

Prompt text is made of the tokenizer's ordinary pieces (no special or byte-fallback tokens),
decoded and re-encoded, so a completions prompt is sent as the token ids its own text encodes to
and its length is exact. EOS is ignored (`ignore_eos`) so every request generates its `max_tokens`.
"""

import random
from dataclasses import dataclass, field
from pathlib import Path

from mixserve.workers.tokenizer import Tokenizer

WORKLOADS = ("random", "shared-prefix", "multi-turn")


@dataclass(slots=True)
class BenchRequest:
    session: int
    turn: int
    max_tokens: int
    prompt: list[int] | None = None  # /v1/completions: token ids
    user_message: str | None = None  # /v1/chat/completions: this turn's user message
    group: int | None = None  # shared-prefix group
    shared_prefix_len: int = 0  # leading prompt tokens shared with the rest of the group

    @property
    def prompt_len(self) -> int:
        return len(self.prompt) if self.prompt is not None else 0


@dataclass(slots=True)
class Workload:
    name: str
    endpoint: str  # "/v1/completions" | "/v1/chat/completions"
    sessions: list[list[BenchRequest]]
    params: dict = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(len(s) for s in self.sessions)

    def requests(self) -> list[BenchRequest]:
        return [r for s in self.sessions for r in s]

    def ideal_prefix_hit_rate(self) -> float | None:
        """Shared prefix tokens of every request but the first of its group, over all prompt tokens
        (requests in sending order); None for workloads without known prompts."""
        reqs = self.requests()
        if not reqs or any(r.prompt is None for r in reqs):
            return None
        seen: set[int] = set()
        hits = 0
        for r in reqs:
            if r.group is not None:
                if r.group in seen:
                    hits += r.shared_prefix_len
                seen.add(r.group)
        return hits / sum(r.prompt_len for r in reqs)


class TextSource:
    """Seeded text of a given token length, from the tokenizer's ordinary pieces."""

    def __init__(self, tokenizer: Tokenizer, seed: int | str):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        excluded = tokenizer.special_token_ids | tokenizer.byte_token_ids
        self.pieces = [i for i in range(tokenizer.vocab_size) if i not in excluded]

    def ids(self, n: int) -> list[int]:
        """`n` token ids (no BOS) that are the tokenizer's own encoding of their text."""
        out: list[int] = []
        while len(out) < n:
            raw = self.rng.choices(self.pieces, k=n - len(out) + 8)
            out += self.tok.encode(" " + self.tok.decode(raw), add_bos=False)
        return self.tok.encode(self.tok.decode(out[:n]), add_bos=False)[:n] if n else []

    def text(self, n: int) -> str:
        return self.tok.decode(self.ids(n))


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def _exact_ids(text: TextSource, n: int) -> list[int]:
    """Exactly n ids (re-encoding can come back a token short or long)."""
    ids = text.ids(n)
    while len(ids) < n:
        ids += text.ids(n - len(ids))
    return ids[:n]


def random_workload(tokenizer: Tokenizer, num_prompts: int, input_len: int = 128, output_len: int = 64,
                    range_ratio: float = 0.0, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    text = TextSource(tokenizer, f"random-{seed}")
    sessions = [[BenchRequest(session=i, turn=0, max_tokens=out, prompt=[tokenizer.bos_id] + _exact_ids(text, n - 1))]
                for i, (n, out) in enumerate(zip(_lengths(rng, num_prompts, input_len, range_ratio),
                                                 _lengths(rng, num_prompts, output_len, range_ratio)))]
    return Workload("random", "/v1/completions", sessions,
                    dict(num_prompts=num_prompts, input_len=input_len, output_len=output_len,
                         range_ratio=range_ratio, seed=seed))


def shared_prefix_workload(tokenizer: Tokenizer, groups: int = 8, users_per_group: int = 8, prefix_len: int = 1024,
                           suffix_len: int = 32, output_len: int = 16, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    text = TextSource(tokenizer, f"shared-prefix-{seed}")
    prefixes = [[tokenizer.bos_id] + _exact_ids(text, prefix_len - 1) for _ in range(groups)]
    reqs = [BenchRequest(session=0, turn=0, max_tokens=output_len, prompt=prefixes[g] + _exact_ids(text, suffix_len),
                         group=g, shared_prefix_len=prefix_len)
            for g in range(groups) for _ in range(users_per_group)]
    rng.shuffle(reqs)
    for i, r in enumerate(reqs):
        r.session = i
    return Workload("shared-prefix", "/v1/completions", [[r] for r in reqs],
                    dict(groups=groups, users_per_group=users_per_group, prefix_len=prefix_len,
                         suffix_len=suffix_len, output_len=output_len, seed=seed))


def multi_turn_workload(tokenizer: Tokenizer, conversations: int = 8, turns: int = 4, user_len: int = 64,
                        output_len: int = 32, seed: int = 0) -> Workload:
    text = TextSource(tokenizer, f"multi-turn-{seed}")
    sessions = [[BenchRequest(session=c, turn=t, max_tokens=output_len, user_message=text.text(user_len))
                 for t in range(turns)] for c in range(conversations)]
    return Workload("multi-turn", "/v1/chat/completions", sessions,
                    dict(conversations=conversations, turns=turns, user_len=user_len, output_len=output_len,
                         seed=seed))


def build_workload(name: str, tokenizer: Tokenizer, num_prompts: int, seed: int = 0, **sizes) -> Workload:
    """One of WORKLOADS with `num_prompts` requests in all; `sizes` are the generator's other
    arguments (None = its default). Shared-prefix splits the requests over `groups`; multi-turn
    over conversations of `turns`."""
    sizes = {k: v for k, v in sizes.items() if v is not None}
    if name == "random":
        keep = ("input_len", "output_len", "range_ratio")
        return random_workload(tokenizer, num_prompts, seed=seed, **{k: sizes[k] for k in keep if k in sizes})
    if name == "shared-prefix":
        groups = sizes.get("groups", 8)
        keep = ("prefix_len", "suffix_len", "output_len")
        return shared_prefix_workload(tokenizer, groups, max(1, -(-num_prompts // groups)), seed=seed,
                                      **{k: sizes[k] for k in keep if k in sizes})
    if name == "multi-turn":
        turns = sizes.get("turns", 4)
        keep = ("user_len", "output_len")
        return multi_turn_workload(tokenizer, max(1, -(-num_prompts // turns)), turns, seed=seed,
                                   **{k: sizes[k] for k in keep if k in sizes})
    raise ValueError(f"unknown workload {name!r}; choose one of {WORKLOADS}")


def default_tokenizer_dir() -> Path:
    """The embedded demo model's folder: random weights, the real Mistral tokenizer."""
    from mixserve.random_models.random_checkpoint import default_cache_dir, ensure_demo_checkpoint

    return ensure_demo_checkpoint(default_cache_dir())
