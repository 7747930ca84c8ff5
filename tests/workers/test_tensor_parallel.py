"""Tensor parallelism across Ray actors (gloo on CPU): same outputs as one rank, shards only,
failures surface as errors instead of hangs."""

import asyncio
import dataclasses
import time

import pytest
import ray

from mixserve.cluster.ray_start import init_ray
from mixserve.workers.async_engine import AsyncLLMEngine, EngineDeadError
from mixserve.workers.config import CheckpointError
from mixserve.workers.step_input import SeqChunk, StepInput

from .engine_helpers import greedy, make_engine, output_ids, random_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    init_ray(num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


def tp2(path, **overrides):
    return make_engine(path, tensor_parallel_size=2, **overrides)


def ep2(path, **overrides):
    return tp2(path, expert_parallel=True, **overrides)


@pytest.mark.parametrize("name", ["tiny_checkpoint", "tiny_dense_checkpoint", "tiny_gguf_file"])
def test_tp2_greedy_outputs_equal_tp1(request, name):
    path = request.getfixturevalue(name)
    prompts = random_prompts([9, 40, 100], seed=61)
    expected = output_ids(make_engine(path).generate(prompts, greedy(20)))
    engine = tp2(path)
    try:
        assert output_ids(engine.generate(prompts, greedy(20))) == expected
    finally:
        engine.shutdown()


def test_requantize_reloads_every_rank_and_switching_back_restores_the_outputs(tiny_checkpoint):
    """engine.requantize on TP=2: each rank re-reads its shard as int4 and back to none (the outputs
    from before). Quantized TP outputs are not TP=1's: a column-split shard (o_proj, w2) gets its
    own scales over its own columns."""
    prompts = random_prompts([9, 40], seed=66)
    engine = tp2(tiny_checkpoint)
    try:
        before, full_bytes = output_ids(engine.generate(prompts, greedy(12))), engine.weight_bytes()
        engine.requantize("int4")
        assert engine.weight_bytes() < full_bytes
        assert engine.kernel_report()["linear_kernels"]["128x64 float32"].startswith("int4")  # w13's half
        assert [len(ids) for ids in output_ids(engine.generate(prompts, greedy(12)))] == [12, 12]
        engine.requantize("none")
        assert engine.weight_bytes() == full_bytes
        assert output_ids(engine.generate(prompts, greedy(12))) == before
    finally:
        engine.shutdown()


def test_calibrated_requantize_observes_in_step_on_every_rank(tiny_checkpoint):
    """Re-quantizing with calibration on TP=2: both ranks run the calibration prefills together (their
    all-reduces pair up; a rank out of step would hang until the timeout) and each scales its own
    shard's input channels, so every rank's weights grow by the input scales: K float32 numbers per
    quantized weight, K being the shard's own input width (o_proj and w2 are split by columns)."""
    prompts = random_prompts([9, 40], seed=67)
    engine = tp2(tiny_checkpoint, quantization_calibration="builtin")
    try:
        engine.requantize("int8")
        calibrated = engine.weight_bytes()
        assert [len(ids) for ids in output_ids(engine.generate(prompts, greedy(12)))] == [12, 12]
        engine.weight_format = dataclasses.replace(engine.weight_format, calibration="none")
        engine.requantize("int8")
        # per layer, rank 0: qkv [64 in], o [64 / 2 in], 8 experts' w13 [64 in] and w2 [128 / 2 in]
        scale_bytes = 2 * (64 + 32 + 8 * (64 + 64)) * 4
        assert calibrated - engine.weight_bytes() == scale_bytes
    finally:
        engine.shutdown()


def test_expert_parallel_greedy_outputs_equal_tp1(tiny_checkpoint):
    prompts = random_prompts([9, 40, 100], seed=65)
    expected = output_ids(make_engine(tiny_checkpoint).generate(prompts, greedy(20)))
    engine = ep2(tiny_checkpoint)
    try:
        assert output_ids(engine.generate(prompts, greedy(20))) == expected
    finally:
        engine.shutdown()


@pytest.mark.parametrize("parallel", [tp2, ep2], ids=["tensor-parallel", "expert-parallel"])
def test_tp2_logits_match_tp1_within_1e4(tiny_checkpoint, parallel):
    prompt = random_prompts([90], seed=62)[0]
    step = StepInput([SeqChunk(0, prompt, 0, list(range(6)), 0, None, prompt_logprob_targets=prompt[1:] + [0])])
    single = make_engine(tiny_checkpoint).executor.runner
    from mixserve.workers.model_inputs import build_model_inputs

    inputs = build_model_inputs(step, 16, single.config.sliding_window)
    expected = single.model.forward(inputs.input_ids, inputs.positions, inputs.meta, single.kv_cache,
                                    inputs.logits_indices)
    engine = parallel(tiny_checkpoint)
    try:
        got = engine.executor.logits(step)
    finally:
        engine.shutdown()
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_each_rank_holds_its_shard_plus_the_replicated_tensors(tiny_checkpoint):
    engine = tp2(tiny_checkpoint)
    try:
        per_rank = engine.executor.rank_weight_bytes
    finally:
        engine.shutdown()
    c = engine.model_config
    f32 = 4
    replicated = (2 * c.vocab_size * c.hidden_size  # embedding, LM head
                  + c.hidden_size * (2 * c.num_layers + 1)  # norms
                  + c.num_layers * c.num_experts * c.hidden_size) * f32  # router gates
    attention = c.num_layers * c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) * f32
    experts = c.num_layers * c.num_experts * 3 * c.hidden_size * c.intermediate_size * f32
    assert per_rank == [replicated + (attention + experts) // 2] * 2


def test_expert_parallel_rank_holds_whole_experts_of_its_half(tiny_checkpoint):
    engine = ep2(tiny_checkpoint)
    try:
        runner_bytes = engine.executor.rank_weight_bytes
        owned = ray.get([w.local_experts.remote() for w in engine.executor.workers])
    finally:
        engine.shutdown()
    assert runner_bytes[0] == runner_bytes[1]
    assert owned == [[[0, 1, 2, 3]] * 2, [[4, 5, 6, 7]] * 2]  # per rank, per layer


def test_expert_parallel_needs_the_experts_divisible(tiny_dense_checkpoint):
    with pytest.raises(CheckpointError, match="mixture-of-experts"):
        make_engine(tiny_dense_checkpoint, tensor_parallel_size=2, expert_parallel=True)


def test_tp_size_that_does_not_divide_the_heads_fails_before_any_actor_starts(tiny_checkpoint):
    # new entries in Ray's tables, not free resources: an earlier test's actors may still be
    # giving theirs back
    groups, actors = set(ray.util.placement_group_table()), set(ray._private.state.actors())
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="tensor-parallel size 3"):
        make_engine(tiny_checkpoint, tensor_parallel_size=3)
    assert time.monotonic() - started < 5
    assert set(ray.util.placement_group_table()) <= groups
    assert set(ray._private.state.actors()) <= actors


def test_killing_a_rank_mid_generation_errors_within_30s_and_a_new_engine_starts(tiny_checkpoint):
    driver = AsyncLLMEngine(tp2(tiny_checkpoint))
    victim = driver.engine.executor.workers[1]

    async def generate_until_killed():
        got = 0
        async for _ in driver.generate(random_prompts([20], seed=63)[0], greedy(2000)):
            got += 1
            if got == 3:
                ray.kill(victim, no_restart=True)
                killed_at.append(time.monotonic())
        return got

    killed_at: list[float] = []
    with pytest.raises(EngineDeadError):
        asyncio.run(generate_until_killed())
    assert killed_at and time.monotonic() - killed_at[0] < 30
    assert not driver.is_healthy
    driver.shutdown()

    fresh = tp2(tiny_checkpoint)
    try:
        assert len(fresh.generate(random_prompts([12], seed=64), greedy(8))[0].outputs[0].token_ids) == 8
    finally:
        fresh.shutdown()
