"""Ground truth: our logits and greedy continuations equal transformers' on the same weights."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from mixserve.workers.config import load_model_config
from mixserve.workers.model_inputs import build_model_inputs
from mixserve.workers.model_runner import CacheShape, ModelRunner
from mixserve.workers.step_input import SeqChunk, StepInput

from .engine_helpers import greedy, make_engine, output_ids, random_prompts

SHORT, LONG = 20, 150  # the tiny preset's sliding window is 64


def _hf(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _reference_greedy(hf, prompt, steps):
    """Greedy decoding by full recomputation at every step: no KV cache involved."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def _logits_prefill_then_decode(runner, prompt, next_token, block_size=16):
    """Our logits for every prompt position (one prefill through the paged cache), then for one
    decode step reading that cache."""
    blocks = list(range((len(prompt) + 1 + block_size - 1) // block_size))
    window = runner.config.sliding_window
    step = StepInput([SeqChunk(0, prompt, 0, blocks, 0, None, prompt_logprob_targets=prompt[1:] + [0])])
    inputs = build_model_inputs(step, block_size, window)
    prefill = runner.model.forward(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_cache, inputs.logits_indices)
    step = StepInput([SeqChunk(0, [next_token], len(prompt), blocks, 0, None, prompt_logprob_targets=[0])])
    inputs = build_model_inputs(step, block_size, window)
    decode = runner.model.forward(inputs.input_ids, inputs.positions, inputs.meta, runner.kv_cache, inputs.logits_indices)
    return prefill, decode[0]


@pytest.fixture(scope="module", params=["tiny_checkpoint", "tiny_dense_checkpoint"])
def checkpoint(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("length", [SHORT, LONG])
def test_logits_match_transformers_within_1e4(checkpoint, length):
    hf = _hf(checkpoint)
    runner = ModelRunner(checkpoint, load_model_config(checkpoint), torch.float32, CacheShape(32, 16))
    prompt = random_prompts([length], seed=length)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]  # [n, V]
    next_token = int(ref[-1].argmax())
    with torch.no_grad():
        ref_next = hf(torch.tensor([prompt + [next_token]])).logits[0, -1]
    prefill, decode = _logits_prefill_then_decode(runner, prompt, next_token)
    assert (prefill - ref).abs().max().item() <= 1e-4
    assert (decode - ref_next).abs().max().item() <= 1e-4


def test_greedy_continuations_match_transformers_token_for_token(checkpoint):
    hf = _hf(checkpoint)
    prompts = random_prompts([SHORT, LONG, 63, 65], seed=1)
    ours = output_ids(make_engine(checkpoint).generate(prompts, greedy(24)))
    for prompt, got in zip(prompts, ours):
        assert got == _reference_greedy(hf, prompt, 24)


def test_mistral_layout_gives_the_same_greedy_output_as_hf_layout(tiny_checkpoint, tiny_mistral_layout_checkpoint):
    prompts = random_prompts([SHORT, LONG], seed=2)
    hf_layout = output_ids(make_engine(tiny_checkpoint).generate(prompts, greedy(24)))
    mistral_layout = output_ids(make_engine(tiny_mistral_layout_checkpoint).generate(prompts, greedy(24)))
    assert mistral_layout == hf_layout
    hf = _hf(tiny_checkpoint)
    assert mistral_layout[1] == _reference_greedy(hf, prompts[1], 24)


def test_mistral_layout_logits_match_transformers(tiny_checkpoint, tiny_mistral_layout_checkpoint):
    hf = _hf(tiny_checkpoint)
    path = tiny_mistral_layout_checkpoint
    runner = ModelRunner(path, load_model_config(path), torch.float32, CacheShape(32, 16))
    prompt = random_prompts([LONG], seed=3)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    prefill, _ = _logits_prefill_then_decode(runner, prompt, int(ref[-1].argmax()))
    assert (prefill - ref).abs().max().item() <= 1e-4


def test_a_llama_config_with_tied_embeddings_matches_transformers_llama(tmp_path):
    """model_type llama (Mistral's architecture without the sliding window), no lm_head tensor:
    the LM head is the embedding. transformers' LlamaForCausalLM on the same folder is the reference."""
    from tests.helpers import write_tiny_hf_checkpoint

    overrides = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True,
                 "sliding_window": None, "rope_theta": 1e4}
    path, _ = write_tiny_hf_checkpoint(tmp_path, dense=True, vocab=512, sliding_window=None,
                                       drop=["lm_head.weight"], config_overrides=overrides)
    config = load_model_config(path)
    assert config.tie_word_embeddings and config.sliding_window is None and config.rope_theta == 1e4
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    runner = ModelRunner(path, config, torch.float32, CacheShape(32, 16))
    prompt = random_prompts([150], seed=7, vocab=512)[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0]
    prefill, _ = _logits_prefill_then_decode(runner, prompt, int(ref[-1].argmax()))
    assert (prefill - ref).abs().max().item() <= 1e-4
