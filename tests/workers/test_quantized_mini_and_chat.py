"""--quantization int8|int4 on the models the issue is about: the "mini" random-weight Mixtral (its
"done when": loaded weights shrink to <= 0.55x with int8 and <= 0.3x with int4 of bfloat16, and
its logits move little), and a real chat model (SmolLM2-135M-Instruct, Q4_1 GGUF) whose greedy
answers to simple questions mostly stay the same (with activation-aware calibration for int8).

Run with `pytest -s` to see the measured numbers."""

import gc

import pytest
import torch
from safetensors import safe_open

from mixserve.random_models.random_checkpoint import write_random_checkpoint
from mixserve.workers.engine import LLMEngine
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.sampling_params import SamplingParams

from .engine_helpers import random_prompts
from .test_engine_matches_transformers import _logits_prefill_then_decode
from .test_quantized_engine import _runner

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mini_checkpoint(tmp_path_factory):
    """The "mini" preset (hidden 1024, 8 layers, 8 experts, vocab 32000, bfloat16, ~1.58 GB)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("mini-moe"), "mini", seed=0)


def _checkpoint_tensor_bytes(path) -> int:
    """Bytes of every tensor in the checkpoint's safetensors files, read from their headers."""
    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                numel = 1
                for d in piece.get_shape():
                    numel *= d
                total += numel * {"BF16": 2, "F16": 2, "F32": 4}[piece.get_dtype()]
    return total


def _load_mini(path, **settings) -> tuple[int, dict]:
    engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16", num_blocks=16, block_size=16, **settings))
    try:
        return engine.weight_bytes(), engine.kernel_report()["linear_kernels"]
    finally:
        engine.shutdown()
        del engine
        gc.collect()


def test_mini_weights_shrink_to_055x_int8_and_030x_int4(mini_checkpoint):
    """mini holds 8 layers x (attention 2.62 M + experts 8 x 3 x 3584 x 1024 = 88.1 M) = 725.6 M
    quantizable layer weights, plus the embedding and LM head, 32000 x 1024 = 32.8 M each (65.5 MB
    each in bfloat16); 791.2 M parameters, 1.582 GB in bfloat16. Scales are stored in the activations'
    dtype (bfloat16).
    - int8 (defaults): 1 byte a weight (+ one 2-byte scale per row) -> 725.6 + 131 = ~858 MB = ~0.54x.
    - int4, group 64, LM head in bfloat16: 0.5 byte + 4 bytes (scale, zero) per 64 weights = 0.5625 B
      -> 408 MB + 131 MB (embedding + LM head) = ~539 MB = ~0.34x: misses 0.3x.
    - int4, group 128, quantize_lm_head=True: 0.5 + 4/128 = 0.53125 B a weight over 725.6 M + 32.8 M
      -> 403 MB + 65.5 MB (embedding only) = ~469 MB = ~0.296x. This is what is asserted.
    The bfloat16 size is read from the safetensors headers, and checked against a bfloat16 load."""
    bf16 = _checkpoint_tensor_bytes(mini_checkpoint)
    assert 1.55e9 < bf16 < 1.61e9, bf16  # it really is mini, in bfloat16
    none, _ = _load_mini(mini_checkpoint)
    assert none == bf16, (none, bf16)  # the unquantized load holds exactly the checkpoint's bytes
    int8, int8_kernels = _load_mini(mini_checkpoint, quantization="int8")
    int4, int4_kernels = _load_mini(mini_checkpoint, quantization="int4", quantization_group_size=128,
                                    quantize_lm_head=True)
    r8, r4 = int8 / bf16, int4 / bf16
    print(f"\nmini weights: bfloat16 {bf16 / 1e6:.1f} MB; int8 {int8 / 1e6:.1f} MB = {r8:.4f}x; "
          f"int4 (group 128, LM head quantized) {int4 / 1e6:.1f} MB = {r4:.4f}x")
    # the expert weights (w13 7168x1024, w2 1024x3584) and the LM head are what was quantized
    assert int8_kernels["7168x1024 bfloat16"].startswith("int8"), int8_kernels
    assert int8_kernels["1024x3584 bfloat16"].startswith("int8"), int8_kernels
    assert int4_kernels["7168x1024 bfloat16"].startswith("int4 (group 128"), int4_kernels
    assert int4_kernels["32000x1024 bfloat16"].startswith("int4 (group 128"), int4_kernels
    assert r8 <= 0.55, r8
    assert r4 <= 0.30, r4
    assert r8 > 0.5 and r4 > 0.25  # below 1 byte / half a byte a weight would mean weights went missing


def test_mini_logits_move_little_under_int8_and_int4(mini_checkpoint):
    """Logits of mini over a 60-token random prompt (prefill) and the decode step after it
    (`_logits_prefill_then_decode`: 61 positions), int8 (per-row) and int4 (group 64) vs unquantized,
    all three in bfloat16: mini's own dtype, the one the engine runs it in (float32 loads of the
    quantized model take several times longer here). The bfloat16 reference carries its own rounding, which is
    part of the int8 error measured (float32 measured: int8 0.017 of the std, top-1 0.97; int4 0.26, 0.36).
    As in test_quantized_engine.py's tiny test, the typical (median) |error| is bounded, relative to the
    reference logits' std (~10 by construction), since a token whose top-2 experts flip moves a lot.
    Measured in bfloat16: int8 0.034 of the std, top-1 agreement 0.87; int4 0.25, 0.31-0.34 (the
    kernel-or-dequantize crossover is timed at load, so the path, and a near-tie, can vary by run; with 32000
    logits of std 10 the top-1/top-2 gap is typically ~2, so an error of ~2.5 flips many). A broken
    scheme gives an error ~1.4x the std (uncorrelated logits) and ~1/32000 agreement."""
    prompt = random_prompts([60], seed=11)[0]
    logits = {}
    for quantization in ("none", "int8", "int4"):
        runner = _runner(mini_checkpoint, quantization, torch.bfloat16, group_size=64)
        prefill, decode = _logits_prefill_then_decode(runner, prompt, 123)
        logits[quantization] = torch.cat([prefill, decode[None]]).float()  # [61, V]
        del runner, prefill, decode
        gc.collect()
    ref = logits["none"]
    results = {}
    for quantization in ("int8", "int4"):
        typical = ((logits[quantization] - ref).abs().median() / ref.std()).item()
        agree = (logits[quantization].argmax(-1) == ref.argmax(-1)).float().mean().item()
        results[quantization] = (typical, agree)
        print(f"\nmini bfloat16 {quantization}{' group 64' if quantization == 'int4' else ''}: median |logit error| "
              f"{typical:.4f} of the logits' std (std {ref.std().item():.2f}), top-1 agreement {agree:.3f} "
              f"over {len(ref)} positions")
    (t8, a8), (t4, a4) = results["int8"], results["int4"]
    assert t8 < 0.06, t8
    assert a8 >= 0.75, a8
    assert t4 < 0.4, t4
    assert a4 >= 0.15, a4
    assert t8 < t4 / 3  # int8 is much closer than int4


QUESTIONS = [
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "What is 2 plus 2?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "What do bees make?",
    "How many days are in a week?",
    "What is the boiling point of water in Celsius?",
    "What is the opposite of hot?",
]


def _chat_answers(engine_settings: dict, reference: list[list[int]] | None = None):
    """Greedy answers (token ids, texts) to QUESTIONS, up to 24 tokens, all ten in one `generate` call;
    with `reference` answers also (agreeing, total): over every reference answer token, whether this
    model's greedy choice given the question and the reference answer so far is that token (one prefill
    with prompt logprobs per answer: "teacher forced", so one early split does not hide the tokens after)."""
    from .test_gguf_smollm2 import GGUF

    settings = {"dtype": "float32", **engine_settings}
    engine = LLMEngine(EngineConfig(model=str(GGUF), num_blocks=128, block_size=16, **settings))
    try:
        prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
        outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=24))
        ids, texts = [o.outputs[0].token_ids for o in outs], [o.outputs[0].text for o in outs]
        if reference is None:
            return ids, texts, None
        forced = engine.generate([p + r for p, r in zip(prompts, reference)],
                                 SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
        choices = [lp.top[0][0] == lp.token_id
                   for p, o in zip(prompts, forced) for lp in o.prompt_logprobs[len(p):]]
        return ids, texts, (sum(choices), len(choices))
    finally:
        engine.shutdown()
        del engine
        gc.collect()


def _first_difference(a: list[int], b: list[int]) -> int:
    """How many leading tokens two answers share (the length of both when identical)."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_smollm2_greedy_chat_answers_to_10_questions_under_each_quantization():
    """Ten one-message chats, greedy, up to 24 tokens, float32; each answer compared token for token
    with the unquantized model's, two ways: whole answers identical, and the share of the reference's
    answer tokens each model also picks when fed the reference answer so far (teacher forced).
    The unquantized model run in bfloat16 is the yardstick: the perturbation every bfloat16 user accepts.
    Measured (CPU class [avx2 avx512_bf16 avx512f]), identical answers / teacher-forced tokens:
    - bfloat16, unquantized: 6/10, 192/197 (97.5%).
    - int8 rounded plainly (per-row scales over the Q4_1 values; not exact on this file): 5/10,
      189/197 (95.9%). The differing answers split where the float32 model's top-2 logits nearly tie
      (gaps 0.013, 0.046, 0.33 at the first three); bfloat16 splits four of them at the same tokens.
    - int8 activation-aware (--quantization-calibration builtin: 2048 tokens of standard-library
      docstrings, none of this test's text): 7/10, 194/197 (98.5%): "mostly unchanged". One changed
      answer splits at its first token, where the float32 model itself is torn ("The" 15%, "L" 14%).
      The per-token agreement is the steadier figure: over 40 questions (these and 30 more like them)
      plain int8 kept 21/40 answers whole and calibrated 22/40 (bfloat16 23/40), while teacher-forced
      disagreements fell from 33 to 22 of 831 tokens (bfloat16: 14).
      Asserted: >= 6/10 identical and >= 97% teacher-forced (plain: >= 4/10, >= 93%, and every
      answer's first 5 tokens unchanged).
    - int4 in groups of 32 maps the file's own Q4_1 blocks exactly (test_quantized_engine.py checks the
      weights): only float rounding differs; measured 10/10 and 197/197; asserted >= 9/10 and >= 99%.
    - int4 in groups of 64 re-quantizes across two Q4_1 blocks (lossy on an already-4-bit file):
      plainly 1/10 identical, 146/197 = 74% teacher-forced; calibrated 0/10, 163/197 = 83%. Asserted:
      the engine answered every question, and calibration raises the teacher-forced share."""
    ref_ids, ref_text, _ = _chat_answers({})
    # the unquantized model answers sensibly, so "unchanged" means unchanged real answers
    assert "Paris" in ref_text[0], ref_text[0]
    calibrated = dict(quantization_calibration="builtin")
    settings = {"bfloat16 (unquantized)": dict(dtype="bfloat16"), "int8": dict(quantization="int8"),
                "int8 calibrated": dict(quantization="int8", **calibrated),
                "int4 group 32": dict(quantization="int4", quantization_group_size=32),
                "int4 group 64": dict(quantization="int4", quantization_group_size=64),
                "int4 group 64 calibrated": dict(quantization="int4", quantization_group_size=64, **calibrated)}
    same, shared, forced = {}, {}, {}
    for name, s in settings.items():
        ids, text, (agreeing, total) = _chat_answers(s, ref_ids)
        assert all(len(a) > 0 for a in ids), (name, text)  # the engine answered every question
        assert total == sum(len(a) for a in ref_ids)
        same[name] = sum(a == b for a, b in zip(ids, ref_ids))
        shared[name] = [_first_difference(a, b) for a, b in zip(ids, ref_ids)]
        forced[name] = agreeing / total
        differing = [i for i, (a, b) in enumerate(zip(ids, ref_ids)) if a != b]
        line = (f"\nSmolLM2 {name}: {same[name]}/10 answers identical to float32 unquantized; teacher-forced "
                f"{agreeing}/{total} answer tokens ({forced[name]:.1%}); tokens shared before the first difference "
                f"{shared[name]} (answer lengths {[len(a) for a in ref_ids]})")
        if differing:
            i = differing[0]
            line += f"\n  e.g. {QUESTIONS[i]!r}:\n    none: {ref_text[i]!r}\n    {name}: {text[i]!r}"
        print(line)
    assert same["int4 group 32"] >= 9, same
    assert forced["int4 group 32"] >= 0.99, forced
    assert same["int8"] >= 4, same
    assert min(shared["int8"]) >= 5, shared["int8"]
    assert forced["int8"] >= 0.93, forced
    assert same["int8 calibrated"] >= 6, same
    assert forced["int8 calibrated"] >= 0.97, forced
    assert forced["int4 group 64 calibrated"] > forced["int4 group 64"], forced
