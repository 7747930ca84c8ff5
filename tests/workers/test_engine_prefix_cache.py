"""Automatic prefix caching, observed through the engine's counters."""

from .engine_helpers import greedy, make_engine, output_ids, random_prompts


def test_identical_prompt_resubmitted_computes_only_its_last_token(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint)
    prompt = random_prompts([64], seed=21)[0]  # exactly 4 full blocks
    first = engine.generate([prompt], greedy(8))
    assert engine.stats.prompt_tokens_computed == 64
    second = engine.generate([prompt], greedy(8))
    assert engine.stats.prompt_tokens_computed == 64 + 1
    assert second[0].num_cached_tokens == 64
    assert output_ids(second) == output_ids(first)


def test_partial_last_block_is_recomputed_and_full_blocks_are_reused(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint)
    prompt = random_prompts([70], seed=22)[0]  # 4 full blocks + 6 tokens
    engine.generate([prompt], greedy(4))
    before = engine.stats.prompt_tokens_computed
    result = engine.generate([prompt], greedy(4))
    assert engine.stats.prompt_tokens_computed - before == 6
    assert result[0].num_cached_tokens == 64


def test_prefix_caching_disabled_recomputes_everything(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, enable_prefix_caching=False)
    prompt = random_prompts([64], seed=21)[0]
    engine.generate([prompt], greedy(4))
    engine.generate([prompt], greedy(4))
    assert engine.stats.prompt_tokens_computed == 128


def test_evicted_prefix_is_recomputed_with_the_same_output(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, num_blocks=16)
    prompt, other = random_prompts([64, 200], seed=23)
    first = engine.generate([prompt], greedy(8))
    engine.generate([other], greedy(8))  # needs most of the pool: evicts the first prompt's blocks
    before = engine.stats.prompt_tokens_computed
    again = engine.generate([prompt], greedy(8))
    assert engine.stats.prompt_tokens_computed - before > 1
    assert output_ids(again) == output_ids(first)


def test_idle_engine_holds_no_referenced_blocks(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint)
    engine.generate(random_prompts([10, 50, 120], seed=24), greedy(8))
    assert engine.kv.pool.num_used == 0
    assert engine.kv.pool.by_hash  # but their contents stay cached for reuse


def test_prompts_arriving_together_compute_their_shared_prefix_once(tiny_checkpoint):
    shared, tail_a, tail_b, unrelated = random_prompts([64, 9, 7, 30], seed=24)
    a, b = shared + tail_a[1:], shared + tail_b[1:]  # 4 shared full blocks, then their own tokens
    alone = make_engine(tiny_checkpoint)
    expected = [output_ids(alone.generate([p], greedy(8)))[0] for p in (a, b, unrelated)]

    engine = make_engine(tiny_checkpoint)
    results = engine.generate([a, b, unrelated], greedy(8))
    assert output_ids(results) == expected
    assert engine.stats.prompt_tokens_computed == len(a) + (len(b) - 64) + len(unrelated)
    assert [r.num_cached_tokens for r in results] == [0, 64, 0]
