"""A request whose own processing raises fails alone (workers/engine.py's failure rule): the other
requests in its batch finish with their normal text, and the engine serves on."""

import asyncio

import pytest

from mixserve.workers import sampler
from mixserve.workers.async_engine import AsyncLLMEngine, RequestFailedError
from mixserve.workers.detokenizer import IncrementalDetokenizer
from mixserve.workers.sampling_params import MAX_TOP_K, SamplingParams

from .engine_helpers import make_engine, random_prompts

BATCH = 32
BAD = 13  # the request whose sampling raises


def _params(i: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.8, top_k=50, seed=1000 + i, max_tokens=12, ignore_eos=True, **kw)


def _raise_for_the_bad_seed(monkeypatch, at_step: int = 3):
    real = sampler._generator

    def generator(seed, step):
        if seed == 1000 + BAD and step == at_step:
            raise RuntimeError("injected sampling failure")
        return real(seed, step)

    monkeypatch.setattr(sampler, "_generator", generator)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts([8 + 3 * i for i in range(BATCH)], seed=91)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, prompts):
    engine = make_engine(tiny_checkpoint, max_num_seqs=BATCH)
    return [out.outputs[0].text for out in engine.generate(prompts, [_params(i) for i in range(BATCH)])]


def test_a_request_whose_sampling_raises_fails_alone_and_31_others_finish_normally(
        tiny_checkpoint, prompts, reference, monkeypatch):
    engine = make_engine(tiny_checkpoint, max_num_seqs=BATCH)
    _raise_for_the_bad_seed(monkeypatch)
    outs = engine.generate(prompts, [_params(i) for i in range(BATCH)])
    bad = outs[BAD]
    assert bad.finished and bad.error and "injected sampling failure" in bad.error
    assert bad.outputs[0].finish_reason == "error" and len(bad.outputs[0].token_ids) == 3
    assert [o.outputs[0].text for i, o in enumerate(outs) if i != BAD] == reference[:BAD] + reference[BAD + 1:]
    assert all(o.error is None and o.outputs[0].finish_reason == "length" for i, o in enumerate(outs) if i != BAD)
    assert engine.kv.usage == 0 and not engine.has_unfinished_requests()  # its blocks were freed too
    monkeypatch.undo()
    again = engine.generate(prompts[:4], [_params(i) for i in range(4)])
    assert [o.outputs[0].text for o in again] == reference[:4]


def test_a_failed_request_with_several_choices_frees_every_choice(tiny_checkpoint, prompts, monkeypatch):
    engine = make_engine(tiny_checkpoint)
    _raise_for_the_bad_seed(monkeypatch, at_step=2)
    # choice i draws from seed + i: choice 1 of a request seeded BAD - 1 is the one that raises
    params = SamplingParams(temperature=0.8, seed=1000 + BAD - 1, n=3, max_tokens=12, ignore_eos=True)
    (out,) = engine.generate(prompts[:1], params)
    assert out.error and [c.finish_reason for c in out.outputs] == ["error"] * 3
    assert engine.kv.usage == 0 and not engine.has_unfinished_requests()


def test_a_request_whose_detokenization_raises_fails_alone(tiny_checkpoint, prompts, reference, monkeypatch):
    engine = make_engine(tiny_checkpoint, max_num_seqs=BATCH)
    real = IncrementalDetokenizer.append

    def append(self, token_id):
        if self is victims[0] and len(self._ids) > self_prompt_len[0] + 4:
            raise UnicodeError("injected detokenizer failure")
        return real(self, token_id)

    victims, self_prompt_len = [], []
    monkeypatch.setattr(IncrementalDetokenizer, "append", append)
    ids = [f"r{i}" for i in range(BATCH)]
    for rid, prompt, i in zip(ids, prompts, range(BATCH)):
        engine.add_request(rid, prompt, _params(i))
    seq = engine._requests[ids[BAD]].seqs[0]
    victims.append(seq.detokenizer)
    self_prompt_len.append(len(prompts[BAD]))
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert "injected detokenizer failure" in final[ids[BAD]].error
    assert [final[r].outputs[0].text for r in ids if r != ids[BAD]] == reference[:BAD] + reference[BAD + 1:]


def test_the_async_engine_raises_request_failed_for_that_request_only_and_stays_healthy(
        tiny_checkpoint, prompts, reference, monkeypatch):
    engine = AsyncLLMEngine(make_engine(tiny_checkpoint, max_num_seqs=BATCH))
    _raise_for_the_bad_seed(monkeypatch)

    async def collect(i):
        text = ""
        async for out in engine.generate(prompts[i], _params(i)):
            text += out.outputs[0].delta_text
        return text

    async def main():
        return await asyncio.gather(*(collect(i) for i in range(BATCH)), return_exceptions=True)

    try:
        results = asyncio.run(main())
        assert isinstance(results[BAD], RequestFailedError) and "injected" in str(results[BAD])
        assert [r for i, r in enumerate(results) if i != BAD] == reference[:BAD] + reference[BAD + 1:]
        assert engine.is_healthy
        engine.check_health()
    finally:
        engine.shutdown()


def test_a_top_k_beyond_the_vocabulary_samples_as_top_k_off(tiny_checkpoint, prompts):
    engine = make_engine(tiny_checkpoint)
    wide = SamplingParams(temperature=0.8, top_k=MAX_TOP_K, seed=5, max_tokens=8, ignore_eos=True)
    off = SamplingParams(temperature=0.8, top_k=-1, seed=5, max_tokens=8, ignore_eos=True)
    assert engine.generate(prompts[:1], wide)[0].outputs[0].token_ids == \
        engine.generate(prompts[:1], off)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="top_k must be at most"):
        engine.add_request("huge", prompts[0], SamplingParams(top_k=2**63))
