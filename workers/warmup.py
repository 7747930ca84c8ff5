"""Warm-up: run the step shapes a replica will run before it takes its first request.

A fresh process is slower for its first steps of each shape: oneDNN creates a kernel per new
(rows, weight shape), the allocator grows its heap for the largest activations (until then big
tensors come from fresh, zero-filled pages), and the engine thread's OpenMP pool starts. A replica
that autoscaling adds would otherwise pay this on live traffic.

Rule: generate from throw-away prompts of random token ids, through the engine's own scheduler:
1. a full prefill step: max_num_batched_tokens prompt tokens over as many sequences as make it up
   (at most max_num_seqs), so the step and every expert see their largest row counts;
2. decode steps at batch sizes 1, 2, 4, ... up to max_num_seqs (and max_num_seqs itself): one short
   request per batch row, each generating WARMUP_DECODE_TOKENS tokens.
The warm-up stops between steps once `budget_s` has passed. Its requests are then gone, the prefix
cache is emptied (its blocks hold throw-away prompts) and the engine's counters are reset, so
nothing it did is visible after.
"""

import random
import time
from dataclasses import dataclass

from .engine import LLMEngine
from .sampling_params import SamplingParams

WARMUP_DECODE_TOKENS = 4
WARMUP_PROMPT_TOKENS = 16  # of each decode-phase request


@dataclass(slots=True)
class WarmupReport:
    seconds: float
    steps: int
    batch_sizes: list[int]  # decode batch sizes run
    complete: bool  # False when the budget ran out first
    prefill_tokens: int  # of the full prefill step
    skipped: list[str]  # step shapes this engine cannot hold (a small KV cache), with the reason

    def line(self) -> str:
        return (f"warm-up: {self.steps} steps (prefill {self.prefill_tokens} tokens, decode batches "
                f"{self.batch_sizes}) in {self.seconds:.1f} s{'' if self.complete else ' (budget reached)'}"
                + "".join(f"; skipped: {why}" for why in self.skipped))


def _batch_sizes(max_num_seqs: int) -> list[int]:
    sizes, b = [], 1
    while b < max_num_seqs:
        sizes.append(b)
        b *= 2
    return sizes + [max_num_seqs]


def warm_up(engine: LLMEngine, budget_s: float = 60.0, seed: int = 0) -> WarmupReport:
    """Steps 1-2 of the rule above on `engine` (idle: nothing else in it)."""
    started = time.monotonic()
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    config = engine.config
    max_len = engine.max_model_len
    steps, sizes, complete, skipped = 0, [], True, []

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(max(1, min(n, max_len - WARMUP_DECODE_TOKENS - 1)))]

    def run(prompts: list[list[int]], max_tokens: int) -> None:
        nonlocal steps, complete
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        ids = [f"warmup-{steps}-{i}" for i in range(len(prompts))]
        try:
            for request_id, ids_ in zip(ids, prompts):
                engine.add_request(request_id, ids_, params)
            while engine.has_unfinished_requests():
                if time.monotonic() - started > budget_s:
                    complete = False
                    return
                engine.step()
                steps += 1
        except ValueError as exc:  # a shape this engine cannot hold (a small KV cache): skipped
            skipped.append(str(exc))
        finally:
            for request_id in ids:
                engine.abort_request(request_id)

    budget_tokens = config.max_num_batched_tokens
    per_seq = max(1, -(-budget_tokens // config.max_num_seqs))
    count = max(1, budget_tokens // max(per_seq, 1))
    run([prompt(per_seq) for _ in range(min(count, config.max_num_seqs))], 1)
    for b in _batch_sizes(config.max_num_seqs):
        if not complete:
            break
        run([prompt(WARMUP_PROMPT_TOKENS) for _ in range(b)], WARMUP_DECODE_TOKENS)
        sizes.append(b)
    engine.kv.pool.reset_prefix_cache()
    engine.reset_counters()
    return WarmupReport(time.monotonic() - started, steps, sizes, complete, budget_tokens, skipped)
