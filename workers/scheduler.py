"""Continuous batching with chunked prefill and preemption by recompute.

The rule, applied once per engine step:
1. One token budget per step, `max_num_batched_tokens`. Running sequences go first, oldest
   admission first: each gets the tokens it has left to compute (1 for a decode, the rest of its
   prompt for a prefill), cut to the budget that remains - a long prompt is prefilled in chunks
   over several steps.
2. When the KV cache has no room for a running sequence's tokens, the most recently admitted
   running sequence is preempted: its blocks are freed and it returns to the front of the waiting
   queue, to be recomputed later (its cached prefix blocks usually survive for it). If that
   victim is the sequence itself, it waits. No step ever fails for lack of blocks.
3. Only when nothing was preempted this step, waiting sequences are admitted in arrival order
   (first come, first served) while budget remains, fewer than `max_num_seqs` are running, and
   their first chunk fits in the KV cache. Admission first takes any cached prefix.
4. A waiting sequence whose next uncached prompt block is being prefilled right now by a running
   sequence (same chained block hash: the same prefix) is not admitted this step: it keeps its
   place and takes that prefix from the cache once it is computed, instead of computing it a
   second time. Sequences behind it may be admitted meanwhile. It cannot starve: running
   sequences go first, so the prefill it waits for advances every step (or is preempted, and then
   nothing is pending).
5. After the step has run and the engine has appended its sampled tokens, `postprocess` advances
   each scheduled sequence by its chunk, offers its newly completed blocks to the prefix cache,
   releases the blocks that left its sliding window, and retires the sequences the engine marked
   finished (their blocks are freed).
Parameters: max_num_batched_tokens (token budget per step), max_num_seqs (running sequences).
"""

from collections import deque
from dataclasses import dataclass

from .kv_cache_manager import KVCacheManager
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    """Valid from `schedule` until `postprocess` advances the sequence past the chunk."""

    seq: Sequence
    num_tokens: int  # tokens computed this step, from seq.num_computed_tokens on

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every known token is computed, so the next token can be sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Invariant: `running` is in admission order (a sequence is appended when admitted and never
    moved; a preempted one is admitted again at the end), so `running[-1]` is the most recently
    admitted sequence, the one rule 2 preempts."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence wherever it is and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.FINISHED

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv.allocate_slots(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                chunks.append(ScheduledChunk(seq, n))
                budget -= n
        pending = self._blocks_being_prefilled() if self.waiting and self.kv.pool.enable_caching else set()
        deferred: list[Sequence] = []
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.kv.lookup_prefix(seq) if not seq.block_table else seq.num_prefix_hit_tokens
            hit_blocks = hit // self.kv.block_size
            if hit_blocks < len(seq.block_hashes) and seq.block_hashes[hit_blocks] in pending:
                self.kv.free(seq)  # rule 4: wait for the prefix being computed
                deferred.append(self.waiting.popleft())
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.kv.allocate_slots(seq, n):
                self.kv.free(seq)  # give back the prefix blocks; try again next step
                break
            if not seq.admitted_once:
                self.prefix_queries += seq.num_tokens
                self.prefix_hits += hit
                seq.num_cached_prompt_tokens = min(hit, seq.num_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.admitted_once = True
            self.running.append(seq)
            if self.kv.pool.enable_caching:
                pending.update(self._unregistered_prompt_blocks(seq))
            chunks.append(ScheduledChunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(deferred))  # back in front, in their order
        return SchedulerOutput(chunks, preempted)

    def postprocess(self, scheduled: SchedulerOutput) -> int:
        """Account for a step that ran `scheduled` (rule 5); returns the prompt tokens it computed.

        Call once per step, after the engine appended the sampled tokens and set `finish_reason`
        on the sequences that are done.
        """
        prompt_tokens = 0
        for chunk in scheduled.chunks:
            seq = chunk.seq
            start = seq.num_computed_tokens
            prompt_tokens += max(0, min(start + chunk.num_tokens, seq.num_prompt_tokens) - start)
            seq.num_computed_tokens += chunk.num_tokens
            self.kv.cache_computed_blocks(seq)
            self.kv.release_out_of_window(seq)
            if seq.finish_reason is not None:
                self.finish(seq)
        return prompt_tokens

    def _blocks_being_prefilled(self) -> set[int]:
        """Chained hashes of the prompt blocks running sequences have yet to register."""
        return {h for seq in self.running for h in self._unregistered_prompt_blocks(seq)}

    def _unregistered_prompt_blocks(self, seq: Sequence) -> list[int]:
        return seq.block_hashes[seq.num_registered_blocks : seq.num_prompt_tokens // self.kv.block_size]
