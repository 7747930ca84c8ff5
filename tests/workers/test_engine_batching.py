"""Greedy outputs do not depend on how requests are batched, chunked, cached or preempted."""

import pytest

from .engine_helpers import greedy, make_engine, output_ids, random_prompts

LENGTHS = [5, 17, 40, 64, 90, 150]  # around block size 16 and the sliding window 64


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(LENGTHS, seed=11)


@pytest.fixture(scope="module")
def one_at_a_time(tiny_checkpoint, prompts):
    engine = make_engine(tiny_checkpoint, enable_prefix_caching=False)
    return [output_ids(engine.generate([p], greedy(24)))[0] for p in prompts]


def test_batched_equals_one_at_a_time(tiny_checkpoint, prompts, one_at_a_time):
    engine = make_engine(tiny_checkpoint, enable_prefix_caching=False)
    assert output_ids(engine.generate(prompts, greedy(24))) == one_at_a_time


def test_prefix_cache_hits_do_not_change_greedy_output(tiny_checkpoint, prompts, one_at_a_time):
    engine = make_engine(tiny_checkpoint)
    engine.generate(prompts, greedy(24))  # fills the prefix cache
    hits_before = engine.scheduler.prefix_hits
    again = engine.generate(prompts, greedy(24))
    assert output_ids(again) == one_at_a_time
    assert engine.scheduler.prefix_hits > hits_before
    assert sum(r.num_cached_tokens for r in again) > 0


def test_shared_prefix_hits_do_not_change_greedy_output(tiny_checkpoint):
    shared = random_prompts([48], seed=5)[0]
    tails = random_prompts([9, 30, 70], seed=6)
    prompts = [shared + t[1:] for t in tails]
    alone = [output_ids(make_engine(tiny_checkpoint, enable_prefix_caching=False).generate([p], greedy(16)))[0]
             for p in prompts]
    engine = make_engine(tiny_checkpoint)
    engine.generate([shared], greedy(1))
    results = engine.generate(prompts, greedy(16))
    assert output_ids(results) == alone
    assert all(r.num_cached_tokens == 48 for r in results)


def test_chunked_prefill_equals_one_at_a_time(tiny_checkpoint, prompts, one_at_a_time):
    engine = make_engine(tiny_checkpoint, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert output_ids(engine.generate(prompts, greedy(24))) == one_at_a_time
    assert engine.stats.steps > len(LENGTHS) * 24 // 6  # prefills really were split


def test_forced_preemption_equals_one_at_a_time(tiny_checkpoint, prompts, one_at_a_time):
    # 12 blocks of 16 tokens cannot hold the batch (prompts + 24 outputs need ~30 blocks)
    engine = make_engine(tiny_checkpoint, num_blocks=12, max_num_batched_tokens=64)
    results = engine.generate(prompts, greedy(24))
    assert engine.scheduler.num_preemptions > 0
    assert output_ids(results) == one_at_a_time
    assert engine.kv.pool.num_used == 0


def test_max_num_seqs_limits_the_running_batch(tiny_checkpoint, prompts, one_at_a_time):
    engine = make_engine(tiny_checkpoint, max_num_seqs=2, enable_prefix_caching=False)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, greedy(24))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[int(out.request_id)] = out.outputs[0].token_ids
        assert len(engine.scheduler.running) <= 2
    assert [finished[i] for i in range(len(prompts))] == one_at_a_time


def test_long_sequence_releases_blocks_outside_the_sliding_window(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, enable_prefix_caching=False)
    engine.add_request("long", random_prompts([300], seed=9)[0], greedy(8))
    engine.step()  # prefill of 300 tokens, window 64
    seq = engine.scheduler.running[0]
    live = [b for b in seq.block_table if b >= 0]
    assert seq.block_table[0] == -1
    assert len(live) <= (64 + 16) // 16 + 1
    assert engine.kv.pool.num_used == len(live)
