"""Warm-up (workers/warmup.py): it runs the step shapes the engine will serve and leaves no trace."""

from mixserve.workers.warmup import warm_up

from .engine_helpers import greedy, make_engine, output_ids, random_prompts


def test_warm_up_runs_every_decode_batch_size_and_leaves_the_engine_as_it_found_it(tiny_checkpoint):
    prompts = random_prompts([12, 40, 70], seed=5)
    expected = output_ids(make_engine(tiny_checkpoint).generate(prompts, greedy(8)))
    engine = make_engine(tiny_checkpoint, max_num_seqs=8, max_num_batched_tokens=256)
    report = warm_up(engine, budget_s=120)
    assert report.complete and report.batch_sizes == [1, 2, 4, 8] and report.steps >= 1 + 4 * 4
    assert report.line().startswith(f"warm-up: {report.steps} steps (prefill 256 tokens, decode batches [1, 2, 4, 8]) in ")
    assert not engine.has_unfinished_requests() and engine.kv.usage == 0
    assert not engine.kv.pool.by_hash  # no throw-away prompt stays in the prefix cache
    assert engine.stats.steps == 0 and engine.load().prefix_queries == 0
    assert output_ids(engine.generate(prompts, greedy(8))) == expected


def test_warm_up_stops_at_its_budget(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, max_num_seqs=64)
    report = warm_up(engine, budget_s=0.0)
    assert not report.complete and report.steps == 0 and not engine.has_unfinished_requests()
    assert report.line().endswith(" s (budget reached)")
