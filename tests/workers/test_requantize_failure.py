"""A re-quantization (engine.requantize, behind POST /v1/re_isq) that fails leaves the replica as it
was: the same weights, format, weight bytes, greedy outputs and prefix cache, the error raised to
the caller, and a later re-quantization works. With tensor parallelism it is two-phase: one rank
failing makes every rank keep its shard (workers/ray_executor.py)."""

import shutil

import pytest
import ray

from mixserve.cluster.ray_start import init_ray
from mixserve.workers import model_runner
from mixserve.workers.model_runner import WeightReloadError

from .engine_helpers import greedy, make_engine, output_ids, random_prompts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=4, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    """A copy of the tiny checkpoint that a test may break."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "tiny")


def _out_of_memory(*args, **kwargs):
    raise MemoryError("out of memory (simulated)")


def _snapshot(engine, prompts) -> dict:
    """What a failed re-quantization must leave unchanged (the prompts' prefix cache filled by generating)."""
    return {"outputs": output_ids(engine.generate(prompts, greedy(12))), "format": engine.weight_format,
            "bytes": engine.weight_bytes(), "kernels": engine.kernel_report()["linear_kernels"],
            "prefix_cache": dict(engine.kv.pool.by_hash)}


def _assert_unchanged(engine, prompts, before: dict) -> None:
    assert engine.weight_format == before["format"]
    assert engine.weight_bytes() == before["bytes"] == engine.executor.weight_bytes()
    assert engine.kernel_report()["linear_kernels"] == before["kernels"]
    assert dict(engine.kv.pool.by_hash) == before["prefix_cache"]
    again = engine.generate(prompts, greedy(12))
    assert output_ids(again) == before["outputs"]
    # the prompts' blocks come from the prefix cache: calibration never wrote into the serving KV cache
    assert all(r.num_cached_tokens > 0 for r in again)


@pytest.mark.parametrize("calibration", ["none", "builtin"])
def test_a_failed_load_keeps_the_old_weights_and_a_retry_succeeds(tiny_checkpoint, monkeypatch, calibration):
    """The new model fails to load (out of memory), after calibration observed the current model where
    one is asked for: the runner still holds the very model from before, and serves as before."""
    engine = make_engine(tiny_checkpoint, quantization_calibration=calibration)
    prompts = random_prompts([40, 75], seed=21)
    before, model = _snapshot(engine, prompts), engine.executor.runner.model
    monkeypatch.setattr(model_runner, "load_model", _out_of_memory)
    with pytest.raises(WeightReloadError, match=f"as int8 \\(calibration {calibration}\\) failed: MemoryError"):
        engine.requantize("int8")
    assert engine.executor.runner.model is model
    _assert_unchanged(engine, prompts, before)

    monkeypatch.undo()
    assert engine.requantize("int8").quantization == "int8"
    assert engine.weight_bytes() < before["bytes"]
    assert engine.kernel_report()["linear_kernels"]["256x64 float32"].startswith("int8")
    assert not engine.kv.pool.by_hash  # forgotten only now, after the swap
    engine.shutdown()


def test_a_checkpoint_gone_from_disk_fails_the_reload_and_coming_back_heals_it(checkpoint_copy):
    """The real path: the weights file is moved away after start-up; the reload names the
    checkpoint and the engine keeps serving from the weights it holds."""
    engine = make_engine(checkpoint_copy)
    prompts = random_prompts([40, 75], seed=22)
    before = _snapshot(engine, prompts)
    weights_file = checkpoint_copy / "model.safetensors"
    weights_file.rename(checkpoint_copy / "moved-away")
    with pytest.raises(WeightReloadError, match=f"{checkpoint_copy}.*CheckpointError"):
        engine.requantize("int8")
    _assert_unchanged(engine, prompts, before)

    (checkpoint_copy / "moved-away").rename(weights_file)
    engine.requantize("int8")
    assert engine.weight_bytes() < before["bytes"]
    engine.shutdown()


def _fail_on_rank(engine, rank: int, name: str):
    """In rank `rank`'s process only, make workers/model_runner.py's `name` raise MemoryError;
    returns the undo."""

    def patch(worker):
        from unittest import mock

        from mixserve.workers import model_runner

        worker.test_patch = mock.patch.object(model_runner, name, side_effect=MemoryError("out of memory (simulated)"))
        worker.test_patch.start()

    def undo(worker):
        worker.test_patch.stop()

    actor = engine.executor.workers[rank]
    ray.get(actor.__ray_call__.remote(patch))
    return lambda: ray.get(actor.__ray_call__.remote(undo))


def _rank_weight_bytes(engine) -> list[int]:
    return ray.get([w.weight_bytes.remote() for w in engine.executor.workers])


def test_tp2_reload_is_all_ranks_or_none(local_ray, checkpoint_copy):
    """TP=2 with calibration (both ranks observe their shards in step first): rank 1 alone failing
    to load, rank 1 alone failing to read the calibration text (before any collective forward, so
    rank 0 does not wait on it), and every rank failing (the weights file gone) each leave both ranks
    on their old shards, in step, with the same greedy outputs; then the reload succeeds."""
    engine = make_engine(checkpoint_copy, tensor_parallel_size=2,
                         quantization_calibration="builtin")
    prompts = random_prompts([40, 75], seed=23)
    try:
        before, rank_bytes = _snapshot(engine, prompts), _rank_weight_bytes(engine)

        undo = _fail_on_rank(engine, 1, "load_model")
        with pytest.raises(WeightReloadError, match="rank 1: .*MemoryError") as failure:
            engine.requantize("int8")
        assert "rank 0" not in str(failure.value)  # rank 0 had staged its shard: discarded
        undo()
        _assert_unchanged(engine, prompts, before)
        assert _rank_weight_bytes(engine) == rank_bytes

        undo = _fail_on_rank(engine, 1, "calibration_chunks")
        with pytest.raises(WeightReloadError, match="rank 0: .*another tensor-parallel rank.*rank 1: .*MemoryError"):
            engine.requantize("int8")
        undo()
        _assert_unchanged(engine, prompts, before)

        weights_file = checkpoint_copy / "model.safetensors"
        weights_file.rename(checkpoint_copy / "moved-away")
        with pytest.raises(WeightReloadError, match="rank 0: .*CheckpointError.*rank 1: .*CheckpointError"):
            engine.requantize("int8")
        (checkpoint_copy / "moved-away").rename(weights_file)
        _assert_unchanged(engine, prompts, before)
        assert _rank_weight_bytes(engine) == rank_bytes

        engine.requantize("int8")
        assert engine.kernel_report()["linear_kernels"]["128x64 float32"].startswith("int8")
        assert all(b < full for b, full in zip(_rank_weight_bytes(engine), rank_bytes))
        assert [len(ids) for ids in output_ids(engine.generate(prompts, greedy(12)))] == [12, 12]
    finally:
        engine.shutdown()
