"""The mistral-inference check: what the engine computed step by step through its KV cache equals
a single prefill of prompt + output."""

import pytest

from mixserve.workers.sampling_params import SamplingParams

from .engine_helpers import make_engine, random_prompts


@pytest.mark.parametrize("length", [12, 100])
def test_generated_logprobs_agree_with_one_prefill_rescoring(tiny_checkpoint, length):
    engine = make_engine(tiny_checkpoint, enable_prefix_caching=False)
    prompt = random_prompts([length], seed=length)[0]
    generated = engine.generate(
        [prompt], SamplingParams(temperature=1.0, seed=3, max_tokens=32, ignore_eos=True, logprobs=0)
    )[0].outputs[0]
    assert len(generated.token_ids) == 32
    rescored = engine.generate(
        [prompt + generated.token_ids], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    )[0]
    rescored_lp = [entry.logprob for entry in rescored.prompt_logprobs[length:]]
    step_lp = [entry.logprob for entry in generated.logprobs]
    assert [e.token_id for e in rescored.prompt_logprobs[length:]] == generated.token_ids
    assert max(abs(a - b) for a, b in zip(step_lp, rescored_lp)) < 1e-4
