"""Sampling options, seen from the engine's outputs."""

import pytest

from mixserve.workers.sampling_params import SamplingParams

from .engine_helpers import greedy, make_engine, output_ids, random_prompts


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return make_engine(tiny_checkpoint)


def test_same_seed_gives_same_output_whatever_else_is_in_the_batch(engine):
    prompt, *others = random_prompts([30, 12, 45, 80], seed=31)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=7, max_tokens=20, ignore_eos=True)
    alone = engine.generate([prompt], params)[0].outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batched = engine.generate([prompt, *others], [params, noise, noise, noise])[0].outputs[0].token_ids
    assert batched == alone


def test_different_seeds_give_different_samples(engine):
    prompt = random_prompts([30], seed=32)[0]
    outs = {tuple(engine.generate([prompt], SamplingParams(temperature=1.0, seed=s, max_tokens=16,
                                                             ignore_eos=True))[0].outputs[0].token_ids)
            for s in range(4)}
    assert len(outs) > 1


def test_top_k_one_is_greedy(engine):
    prompt = random_prompts([25], seed=33)[0]
    sampled = engine.generate([prompt], SamplingParams(temperature=1.5, top_k=1, seed=1, max_tokens=16,
                                                       ignore_eos=True))
    assert output_ids(sampled) == output_ids(engine.generate([prompt], greedy(16)))


def test_n_returns_n_distinct_completions(engine):
    prompt = random_prompts([25], seed=34)[0]
    result = engine.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=12, ignore_eos=True))[0]
    assert [o.index for o in result.outputs] == [0, 1, 2]
    assert all(len(o.token_ids) == 12 for o in result.outputs)
    assert len({tuple(o.token_ids) for o in result.outputs}) > 1


def test_max_tokens_ends_with_length(engine):
    result = engine.generate(random_prompts([10], seed=35), greedy(7))[0].outputs[0]
    assert len(result.token_ids) == 7 and result.finish_reason == "length"


def test_stop_token_id_ends_generation_on_that_token(engine):
    prompt = random_prompts([20], seed=36)[0]
    full = engine.generate([prompt], greedy(16))[0].outputs[0].token_ids
    stop_at = next(i for i, t in enumerate(full) if t not in full[:i] and i >= 3)
    result = engine.generate([prompt], greedy(16, stop_token_ids=[full[stop_at]]))[0].outputs[0]
    assert result.token_ids == full[: stop_at + 1]
    assert result.finish_reason == "stop" and result.stop_reason == full[stop_at]


def test_stop_string_truncates_the_text_before_it(engine):
    prompt = random_prompts([20], seed=37)[0]
    text = engine.generate([prompt], greedy(24))[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    result = engine.generate([prompt], greedy(24, stop=[stop]))[0].outputs[0]
    assert result.text == text[: text.index(stop)]
    assert result.finish_reason == "stop" and result.stop_reason == stop


def test_logprobs_report_the_chosen_token_and_top_alternatives(engine):
    result = engine.generate(random_prompts([20], seed=38), greedy(6, logprobs=3))[0].outputs[0]
    assert len(result.logprobs) == 6
    for token, entry in zip(result.token_ids, result.logprobs):
        assert entry.token_id == token and len(entry.top) == 3
        assert entry.top[0][0] == token  # greedy picks the most likely token
        assert entry.top[0][1] >= entry.top[1][1] >= entry.top[2][1]
        assert entry.logprob <= 0


def test_penalties_discourage_repeating_generated_tokens(engine):
    prompt = random_prompts([8], seed=39)[0]
    plain = engine.generate([prompt], greedy(48))[0].outputs[0].token_ids
    penalised = engine.generate([prompt], greedy(48, frequency_penalty=2.0, presence_penalty=2.0))[0].outputs[0].token_ids
    assert len(set(penalised)) >= len(set(plain))


def test_streamed_deltas_add_up_to_the_final_text(engine):
    engine.add_request("stream", random_prompts([15], seed=40)[0], greedy(20))
    deltas, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas.append(out.outputs[0].delta_text)
            final = out
    assert "".join(deltas) == final.outputs[0].text
    assert final.outputs[0].text == engine.tokenizer.decode(final.outputs[0].token_ids)


@pytest.mark.parametrize(
    "prompt, params, message",
    [
        ([], SamplingParams(), "empty"),
        ([1, 32000], SamplingParams(), "outside the vocabulary"),
        ([1, 5], SamplingParams(max_tokens=5000), "maximum context length"),
    ],
)
def test_bad_requests_are_rejected_and_nothing_is_queued(engine, prompt, params, message):
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished_requests()


def test_abort_frees_the_request_blocks(engine):
    engine.add_request("to-abort", random_prompts([100], seed=41)[0], greedy(50))
    engine.step()
    assert engine.kv.pool.num_used > 0
    out = engine.abort_request("to-abort")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert engine.kv.pool.num_used == 0 and not engine.has_unfinished_requests()
