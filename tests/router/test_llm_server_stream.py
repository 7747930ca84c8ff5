"""LLMServer's chunking, on a real engine in this process (the replica class, without Serve)."""

import asyncio

import pytest

from mixserve.router.engine_api import GenerateRequest
from mixserve.router.llm_server import LLMServer, LLMServerSpec
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.sampling_params import SamplingParams
from tests.workers.engine_helpers import greedy, make_engine, random_prompts


@pytest.mark.parametrize("interval", [1, 4])
def test_tokens_stream_n_at_a_time_after_an_immediate_first_chunk(tiny_checkpoint, interval):
    prompt = random_prompts([20], seed=71)[0]
    expected = make_engine(tiny_checkpoint).generate([prompt], greedy(18, logprobs=1))[0].outputs[0]
    server = LLMServer(LLMServerSpec(EngineConfig(model=str(tiny_checkpoint), dtype="float32", num_blocks=64),
                                     num_threads=None, stream_interval=interval, warmup_s=0.0))
    sampling = SamplingParams(temperature=0, max_tokens=18, ignore_eos=True, logprobs=1)

    async def collect():
        return [c async for c in server.generate(GenerateRequest("r1", prompt, sampling))]

    try:
        chunks = asyncio.run(collect())
    finally:
        server.engine.shutdown()
    sizes = [len(c.choices[0].delta_token_ids) for c in chunks]
    assert sizes[0] == 1  # time to first token does not wait for the interval
    assert all(n == interval for n in sizes[1:-1]) and 1 <= sizes[-1] <= interval
    assert len(chunks) == 1 + -(-17 // interval)
    assert [t for c in chunks for t in c.choices[0].delta_token_ids] == expected.token_ids
    assert "".join(c.choices[0].delta_text for c in chunks) == expected.text
    streamed_logprobs = [lp for c in chunks for lp in c.choices[0].logprobs]
    assert [lp.token_id for lp in streamed_logprobs] == expected.token_ids
    assert chunks[-1].finished and chunks[-1].choices[0].finish_reason == "length"
