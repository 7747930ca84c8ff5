"""workers/scheduler.py: one token budget per step, running before waiting, chunked prefill,
preemption of the most recently admitted sequence, max_num_seqs, postprocess; and, driven
together with the KV cache manager and build_model_inputs, every query reading the K/V of its own
prefix."""

import random

import pytest

from mixserve.workers.kv_cache_manager import KVCacheManager
from mixserve.workers.model_inputs import build_model_inputs
from mixserve.workers.scheduler import Scheduler
from mixserve.workers.sequence import SequenceStatus
from mixserve.workers.step_input import SamplingRow, SeqChunk, StepInput
from tests.helpers import make_sequence

BS = 4


def _scheduler(num_blocks=64, max_num_seqs=8, budget=32, window=None, caching=True) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, BS, window, caching), max_num_seqs, budget)


def _seq(seq_id, prompt_len, max_tokens=4, first_token=0):
    seq = make_sequence(seq_id, list(range(first_token, first_token + prompt_len)))
    seq.max_tokens = max_tokens
    return seq


def _sample(seq, token):
    """What the engine does with a sampled token, reduced to the max_tokens stop."""
    seq.token_ids.append(token)
    if seq.num_output_tokens >= seq.max_tokens:
        seq.finish_reason = "length"


def _step(sched: Scheduler):
    """One engine step with a fake model: schedule, sample a token for each sequence whose chunk
    completes it, then hand the step back to the scheduler's postprocess."""
    out = sched.schedule()
    for chunk in out.chunks:
        if chunk.completes_sequence:
            _sample(chunk.seq, 1000 + chunk.seq.num_output_tokens)
    sched.postprocess(out)
    return out


def _check_pool_consistent(sched: Scheduler) -> None:
    """Each block's reference count equals the number of running block tables holding it."""
    held = [0] * sched.kv.pool.num_blocks
    for seq in sched.running:
        for b in seq.block_table:
            if b >= 0:
                held[b] += 1
    for seq in sched.waiting:
        assert seq.block_table == []
    assert held == sched.kv.pool.ref_count


def test_a_step_never_exceeds_the_token_budget():
    sched = _scheduler(budget=16)
    for i in range(5):
        sched.add(_seq(i, 11, first_token=100 * i))
    while sched.has_unfinished():
        out = _step(sched)
        assert 0 < out.num_tokens <= 16
        assert len({id(c.seq) for c in out.chunks}) == len(out.chunks)


def test_a_long_prompt_is_prefilled_in_chunks_over_several_steps():
    sched = _scheduler(budget=16)
    seq = _seq(0, 40)
    sched.add(seq)
    sizes, starts = [], []
    for _ in range(3):
        starts.append(seq.num_computed_tokens)
        out = _step(sched)
        assert [c.seq for c in out.chunks] == [seq]
        sizes.append(out.chunks[0].num_tokens)
    assert sizes == [16, 16, 8] and starts == [0, 16, 32]
    assert seq.num_output_tokens == 1  # sampled only when the last chunk completed the prompt
    assert _step(sched).chunks[0].num_tokens == 1  # then it decodes


def test_only_the_chunk_that_reaches_the_last_token_completes_the_sequence():
    sched = _scheduler(budget=8)
    sched.add(_seq(0, 12))
    out = sched.schedule()
    assert not out.chunks[0].completes_sequence
    sched.postprocess(out)
    assert sched.schedule().chunks[0].completes_sequence


def test_running_sequences_are_scheduled_before_waiting_ones():
    sched = _scheduler(budget=10)
    a, b, c = _seq(0, 3), _seq(1, 3, first_token=50), _seq(2, 20, first_token=80)
    sched.add(a)
    sched.add(b)
    _step(sched)  # both admitted, prompts done
    sched.add(c)
    out = _step(sched)
    assert [ch.seq for ch in out.chunks] == [a, b, c]
    assert [ch.num_tokens for ch in out.chunks] == [1, 1, 8]  # c gets what the decodes left


def test_waiting_sequences_are_admitted_first_come_first_served_without_skipping():
    sched = _scheduler(num_blocks=6, budget=64)
    big = _seq(0, 20)  # 5 blocks
    sched.add(big)
    _step(sched)
    blocked, small = _seq(1, 12, first_token=100), _seq(2, 2, first_token=200)  # 3 blocks do not fit now
    sched.add(blocked)
    sched.add(small)
    out = _step(sched)
    assert [c.seq for c in out.chunks] == [big]
    assert list(sched.waiting) == [blocked, small]
    assert blocked.block_table == [] and small.block_table == []


def test_max_num_seqs_caps_the_running_sequences():
    sched = _scheduler(max_num_seqs=2, budget=64)
    seqs = [_seq(i, 3, max_tokens=3, first_token=10 * i) for i in range(5)]
    for s in seqs:
        sched.add(s)
    while sched.has_unfinished():
        _step(sched)
        assert len(sched.running) <= 2
    assert all(s.is_finished for s in seqs)


def test_when_blocks_run_out_the_most_recently_admitted_sequence_is_preempted():
    sched = _scheduler(num_blocks=4, budget=64)
    a, b = _seq(0, 7, max_tokens=10), _seq(1, 7, max_tokens=10, first_token=100)
    sched.add(a)
    sched.add(b)
    _step(sched)  # each holds 2 blocks; a and b now have 8 tokens
    _step(sched)  # both decode position 7: still 2 blocks each
    out = _step(sched)  # both need a third block for position 8: b (admitted last) must go
    assert out.preempted == [b]
    assert [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and sched.waiting[0] is b
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert sched.num_preemptions == 1
    _check_pool_consistent(sched)


def test_nothing_is_admitted_in_a_step_that_preempted():
    sched = _scheduler(num_blocks=4, budget=64)
    a, b = _seq(0, 7, max_tokens=10), _seq(1, 7, max_tokens=10, first_token=100)
    sched.add(a)
    sched.add(b)
    _step(sched)
    _step(sched)
    sched.add(_seq(2, 1, first_token=300))
    out = _step(sched)
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]


def test_the_newest_sequence_preempts_itself_when_it_cannot_grow():
    sched = _scheduler(num_blocks=4, budget=64)
    a, b = _seq(0, 5, max_tokens=20), _seq(1, 8, max_tokens=20, first_token=100)
    sched.add(a)
    sched.add(b)
    _step(sched)  # a: 6 tokens in 2 blocks, b: 9 tokens in 2 blocks; the pool is full
    out = _step(sched)  # a's position 5 fits its second block; b's position 8 needs a fifth block
    assert out.preempted == [b]
    assert [c.seq for c in out.chunks] == [a]
    assert list(sched.waiting) == [b] and sched.running == [a]
    _check_pool_consistent(sched)


def test_preempted_sequence_resumes_with_its_generated_tokens():
    sched = _scheduler(num_blocks=4, budget=64)
    a, b = _seq(0, 7, max_tokens=6), _seq(1, 7, max_tokens=6, first_token=100)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        _step(sched)
    tokens_of_b = list(b.token_ids)
    assert b.num_output_tokens == 2
    while sched.has_unfinished():
        _step(sched)
        _check_pool_consistent(sched)
    assert b.token_ids[: len(tokens_of_b)] == tokens_of_b
    assert a.num_output_tokens == b.num_output_tokens == 6


def test_a_tiny_pool_never_deadlocks_and_every_step_makes_progress():
    # 5 blocks of 4 tokens: each sequence (6-9 prompt tokens + 8 outputs) fits alone, not together
    sched = _scheduler(num_blocks=5, budget=8, max_num_seqs=4)
    seqs = [_seq(i, 6 + i % 4, max_tokens=8, first_token=100 * i) for i in range(6)]
    for s in seqs:
        assert sched.kv.can_ever_fit(s.num_tokens + s.max_tokens, 8)
        sched.add(s)
    empty_steps = steps = 0
    while sched.has_unfinished():
        steps += 1
        assert steps < 500, "no progress"
        out = _step(sched)
        empty_steps += not out.chunks
        _check_pool_consistent(sched)
        assert sched.kv.pool.num_used <= 5
    assert all(s.is_finished and s.num_output_tokens == 8 for s in seqs)
    assert sched.num_preemptions > 0
    assert empty_steps <= sched.num_preemptions  # a step is empty only when its sole runner waited


def test_a_tiny_pool_with_a_sliding_window_runs_sequences_longer_than_the_pool():
    sched = _scheduler(num_blocks=5, budget=4, window=6)
    seq = _seq(0, 10, max_tokens=30)
    assert sched.kv.can_ever_fit(40, 4)
    sched.add(seq)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        _step(sched)
        assert sched.kv.pool.num_used <= 5
    assert seq.is_finished and seq.num_output_tokens == 30
    assert sched.num_preemptions == 0


def test_postprocess_advances_each_chunk_counts_its_prompt_tokens_and_retires_finished_sequences():
    sched = _scheduler(budget=8)
    a, b = _seq(0, 6, max_tokens=1), _seq(1, 5, first_token=50)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a's whole prompt, the first 2 tokens of b's
    _sample(a, 7)  # a reaches max_tokens
    assert sched.postprocess(out) == 6 + 2
    assert a.is_finished and a.block_table == [] and sched.running == [b]
    assert b.num_computed_tokens == 2
    probe = _seq(2, 6)
    assert sched.kv.lookup_prefix(probe) == 4  # a's full block went to the prefix cache
    sched.kv.free(probe)
    out = sched.schedule()
    _sample(b, 7)
    assert sched.postprocess(out) == 3 and b.num_computed_tokens == 5
    out = sched.schedule()
    assert out.num_tokens == 1 and sched.postprocess(out) == 0  # a decode computes no prompt token


def test_finish_removes_the_sequence_and_frees_its_blocks():
    sched = _scheduler(num_blocks=8)
    a, b = _seq(0, 9), _seq(1, 5, first_token=50)
    sched.add(a)
    sched.add(b)
    _step(sched)
    sched.finish(a)
    assert sched.running == [b] and a.is_finished and a.block_table == []
    waiting = _seq(2, 3)
    sched.add(waiting)
    sched.finish(waiting)
    assert not sched.waiting
    _check_pool_consistent(sched)


def test_admission_takes_the_cached_prefix_and_counts_it_once():
    sched = _scheduler(budget=64)
    first = _seq(0, 10, max_tokens=1)
    sched.add(first)
    _step(sched)  # computes and finishes; its two full blocks stay cached
    assert first.is_finished
    second = _seq(1, 10, max_tokens=1)
    sched.add(second)
    out = _step(sched)
    assert out.chunks[0].num_tokens == 2  # 8 of its 10 prompt tokens came from the cache
    assert second.num_cached_prompt_tokens == 8
    assert (sched.prefix_queries, sched.prefix_hits) == (20, 8)


def test_a_prompt_whose_prefix_is_being_prefilled_waits_for_it_and_others_go_ahead():
    sched = _scheduler(budget=64)
    first, twin = _seq(0, 14), _seq(1, 14)  # the same 3 full blocks, then the last 2 tokens
    twin.token_ids[-1] = twin.prompt_token_ids[-1] = 99
    other = _seq(2, 6, first_token=200)
    for seq in (first, twin, other):
        sched.add(seq)
    out = _step(sched)
    assert [c.seq for c in out.chunks] == [first, other]  # the twin waits; the one behind it does not
    assert list(sched.waiting) == [twin] and twin.block_table == []
    out = _step(sched)
    admitted = [c for c in out.chunks if c.seq is twin]
    assert admitted[0].num_tokens == 2 and twin.num_cached_prompt_tokens == 12
    assert (sched.prefix_queries, sched.prefix_hits) == (14 + 14 + 6, 12)
    _check_pool_consistent(sched)


def test_the_wait_lasts_while_a_chunked_prefill_of_the_prefix_is_under_way():
    sched = _scheduler(budget=8)
    first, twin = _seq(0, 20, max_tokens=1), _seq(1, 20, max_tokens=1)
    sched.add(first)
    sched.add(twin)
    steps = 0
    while not twin.admitted_once and steps < 10:
        _step(sched)
        steps += 1
        _check_pool_consistent(sched)
    assert steps == 4  # first's 20 prompt tokens take 3 steps of 8; the twin comes in the next one
    assert twin.num_cached_prompt_tokens == 20 and twin.is_finished  # it recomputed its last token only
    while sched.has_unfinished():
        _step(sched)
    assert sched.prefix_hits == 20


def test_prefix_cache_statistics_count_each_prompt_once_even_when_admission_is_retried():
    sched = _scheduler(num_blocks=4, budget=64)
    a = _seq(0, 11, max_tokens=3)
    sched.add(a)
    _step(sched)  # a holds 3 of the 4 blocks
    b = _seq(1, 8, max_tokens=1, first_token=100)  # needs 2 blocks: waits until a finishes
    sched.add(b)
    while sched.has_unfinished():
        _step(sched)
    assert sched.prefix_queries == 11 + 8


# ---------------------------------------------------------------- randomized whole-path check


def _run_workload(rng, window, budget, caching, max_num_seqs):
    """Drive scheduler + KV manager + build_model_inputs like the engine, with a fake cache in
    which slot s holds the token prefix whose K/V was written there. Every key a query attends
    to must hold exactly the prefix up to that key's position. Returns the scheduler."""
    shared = [[rng.randrange(50) for _ in range(rng.randrange(4, 17))] for _ in range(3)]
    seqs = []
    for i in range(rng.randrange(5, 13)):
        seq = make_sequence(i, rng.choice(shared) + [rng.randrange(50) for _ in range(rng.randrange(0, 7))])
        seq.max_tokens = rng.randrange(1, 13)
        seqs.append(seq)
    longest = max(s.num_tokens + s.max_tokens for s in seqs)
    need = next(n for n in range(1, 100) if KVCacheManager(n, BS, window).can_ever_fit(longest, budget))
    num_blocks = need + rng.choice([0, 1, 4, 12])  # from just enough for one sequence to roomy
    sched = Scheduler(KVCacheManager(num_blocks, BS, window, caching), max_num_seqs, budget)
    row = SamplingRow(temperature=0.0, top_k=-1, top_p=1.0, seed=0, step=0)
    pending = list(seqs)
    cache: dict[int, tuple] = {}
    by_id = {s.seq_id: s for s in seqs}
    for _ in range(2000):
        if pending and rng.random() < 0.4:
            sched.add(pending.pop(0))
        if not sched.has_unfinished():
            if not pending:
                break
            continue
        out = sched.schedule()
        assert out.num_tokens <= budget and len(sched.running) <= max_num_seqs
        _check_pool_consistent(sched)
        chunks = []
        for c in out.chunks:
            seq, start = c.seq, c.seq.num_computed_tokens
            chunks.append(SeqChunk(seq.seq_id, seq.token_ids[start : start + c.num_tokens], start,
                                   list(seq.block_table), seq.num_prefix_hit_tokens,
                                   row if c.completes_sequence else None))
        if not chunks:
            continue
        inputs = build_model_inputs(StepInput(chunks), BS, window)
        meta = inputs.meta
        flat = [(by_id[c.seq_id], c.start + i) for c in inputs.chunks for i in range(len(c.token_ids))]
        for (seq, pos), slot in zip(flat, meta.slot_mapping.tolist()):
            if slot >= 0:
                cache[slot] = tuple(seq.token_ids[: pos + 1])
        for i, c in enumerate(inputs.chunks[: meta.num_decode]):
            seq = by_id[c.seq_id]
            keys = [s for s, m in zip(meta.decode_key_slots[i].tolist(), meta.decode_mask[i].tolist()) if m]
            first = c.start - len(keys) + 1
            assert first == (max(0, c.start - window + 1) if window else 0)
            for p, slot in zip(range(first, c.start + 1), keys):
                assert cache.get(slot) == tuple(seq.token_ids[: p + 1])
        for c, chunk in zip(inputs.chunks[meta.num_decode :], meta.prefills):
            seq = by_id[c.seq_id]
            first = c.start + len(c.token_ids) - len(chunk.key_slots)
            for j, slot in enumerate(chunk.key_slots.tolist()):
                if chunk.mask[:, j].any():
                    assert cache.get(slot) == tuple(seq.token_ids[: first + j + 1])
        for c in out.chunks:
            if c.completes_sequence:
                _sample(c.seq, hash(tuple(c.seq.token_ids)) % 7)  # a deterministic "model"
        sched.postprocess(out)
    assert all(s.is_finished for s in seqs), "workload did not finish"
    return sched


@pytest.mark.parametrize("seed", range(16))
def test_random_workloads_finish_and_every_query_reads_the_kv_of_its_own_prefix(seed):
    rng = random.Random(seed)
    window = [None, 4, 7, 10][seed % 4]
    _run_workload(rng, window, budget=rng.choice([4, 8, 16]), caching=seed % 5 != 0,
                  max_num_seqs=rng.choice([2, 4, 8]))
