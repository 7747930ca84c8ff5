"""The asyncio driver: concurrent streams, cancellation, errors."""

import asyncio
import threading

import pytest

from mixserve.workers.async_engine import AsyncLLMEngine, EngineDeadError

from .engine_helpers import greedy, make_engine, output_ids, random_prompts


def test_concurrent_streams_match_blocking_generate(tiny_checkpoint):
    prompts = random_prompts([12, 40, 70], seed=51)
    expected = output_ids(make_engine(tiny_checkpoint).generate(prompts, greedy(16)))
    engine = AsyncLLMEngine(make_engine(tiny_checkpoint))

    async def collect(prompt):
        tokens = []
        async for out in engine.generate(prompt, greedy(16)):
            tokens += out.outputs[0].delta_token_ids
        return tokens

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    assert asyncio.run(main()) == expected
    engine.shutdown()


def test_a_builder_runs_on_the_engine_thread_and_its_error_reaches_the_caller(tiny_checkpoint):
    # The thread rule (workers/async_engine.py): the thread that steps the engine also builds it.
    built_on = []

    def build():
        built_on.append(threading.current_thread())
        return make_engine(tiny_checkpoint)

    engine = AsyncLLMEngine(build)
    assert built_on == [engine._thread] and engine._thread is not threading.current_thread()

    async def main():
        return [out async for out in engine.generate(random_prompts([9], seed=3)[0], greedy(4))]

    assert asyncio.run(main())[-1].finished
    engine.shutdown()

    def fail():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        AsyncLLMEngine(fail)


def test_closing_streams_early_frees_all_blocks(tiny_checkpoint):
    engine = AsyncLLMEngine(make_engine(tiny_checkpoint))

    async def read_two_then_close(prompt):
        stream = engine.generate(prompt, greedy(200))
        async for i, _ in _enumerate(stream):
            if i == 1:
                break
        await stream.aclose()

    async def main():
        await asyncio.gather(*(read_two_then_close(p) for p in random_prompts([20] * 8, seed=52)))
        for _ in range(100):  # let the engine thread apply the aborts
            if not engine.engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert not engine.engine.has_unfinished_requests()
    assert engine.engine.kv.pool.num_used == 0
    engine.shutdown()


async def _enumerate(stream):
    i = 0
    async for item in stream:
        yield i, item
        i += 1


def test_bad_request_raises_value_error_and_engine_stays_healthy(tiny_checkpoint):
    engine = AsyncLLMEngine(make_engine(tiny_checkpoint))

    async def main():
        with pytest.raises(ValueError):
            async for _ in engine.generate([], greedy(4)):
                pass
        outs = [o async for o in engine.generate([1, 2, 3], greedy(4))]
        return outs[-1]

    assert asyncio.run(main()).finished
    assert engine.is_healthy
    engine.shutdown()


def test_failing_step_ends_streams_with_an_error_and_marks_engine_dead(tiny_checkpoint):
    engine = AsyncLLMEngine(make_engine(tiny_checkpoint))

    def broken(step):
        raise RuntimeError("rank died")

    engine.engine.executor.execute = broken

    async def main():
        async for _ in engine.generate([1, 2, 3], greedy(4)):
            pass

    with pytest.raises(EngineDeadError):
        asyncio.run(main())
    assert not engine.is_healthy
    with pytest.raises(EngineDeadError):
        engine.check_health()
    engine.shutdown()


def test_a_slow_reader_gets_missed_reports_folded_into_one(tiny_checkpoint):
    engine = AsyncLLMEngine(make_engine(tiny_checkpoint))
    prompt = random_prompts([12], seed=53)[0]
    expected = make_engine(tiny_checkpoint).generate([prompt], greedy(40))[0].outputs[0]

    async def slow_reader():
        items, text, tokens = 0, "", []
        async for out in engine.generate(prompt, greedy(40)):
            items += 1
            text += out.outputs[0].delta_text
            tokens += out.outputs[0].delta_token_ids
            await asyncio.sleep(0.05)  # much slower than a tiny-model step
        return items, text, tokens

    items, text, tokens = asyncio.run(slow_reader())
    assert tokens == expected.token_ids and text == expected.text
    assert items < len(tokens)
    engine.shutdown()


_ENGINE_THREAD_OPENMP = """
import asyncio, ctypes, sys
sys.path.append(sys.argv[2])  # the repository, for the tests package: after site-packages, never ahead
import torch
from mixserve.workers.async_engine import AsyncLLMEngine
from tests.workers.engine_helpers import make_engine

torch.set_num_threads(2)
libgomp = next(line.split()[-1] for line in open("/proc/self/maps") if "libgomp" in line)
omp_get_max_threads = ctypes.CDLL(libgomp).omp_get_max_threads
engine = AsyncLLMEngine(make_engine(sys.argv[1]))
print(asyncio.run(engine.call(omp_get_max_threads)))
engine.shutdown()
"""


def test_engine_thread_runs_openmp_with_the_process_thread_count(tiny_checkpoint):
    """Ray starts actors with OMP_NUM_THREADS=1; OpenMP's count is per thread, so an engine thread
    that did not re-apply torch's count ran every oneDNN matmul on one core (served decode 2x slower)."""
    import os
    import subprocess
    import sys

    if not any("libgomp" in line for line in open("/proc/self/maps")):
        pytest.skip("this torch build does not use GNU OpenMP")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repository = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run([sys.executable, "-P", "-c", _ENGINE_THREAD_OPENMP, str(tiny_checkpoint), repository],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "2"
