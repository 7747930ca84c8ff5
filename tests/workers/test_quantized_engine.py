"""--quantization int8|int4 at load: the attention and expert weights are stored quantized (each
weight quantized as it is read), the report says so, the weights shrink, and the model still
computes nearly the same logits; on real text (SmolLM2) perplexity moves by at most 1% (int8) and 8%
(int4, group 32)."""

import math

import pytest
import torch

from mixserve.workers.calibration import module_docstrings
from mixserve.workers.config import load_model_config
from mixserve.workers.loader import WeightFormat
from mixserve.workers.model_runner import CacheShape, ModelRunner

from .engine_helpers import greedy, make_engine, output_ids, random_prompts
from .test_engine_matches_transformers import _logits_prefill_then_decode


def _runner(path, quantization: str, dtype=torch.float32, group_size: int = 64, calibration: str = "none"
            ) -> ModelRunner:
    return ModelRunner(path, load_model_config(path), dtype, CacheShape(160, 16),
                       weights=WeightFormat(quantization=quantization, group_size=group_size, calibration=calibration))


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_tiny_model_reports_its_schemes_shrinks_and_stays_close(tiny_checkpoint, quantization):
    full, quant = _runner(tiny_checkpoint, "none"), _runner(tiny_checkpoint, quantization)
    report = quant.model.kernel_report
    layer_shapes = {"128x64 float32", "64x64 float32", "256x64 float32", "64x128 float32"}  # qkv, o, w13, w2
    assert {report[s].split(" ")[0] for s in layer_shapes} == {quantization}
    assert report["32000x64 float32"].split(" ")[0] in ("reference", "onednn")  # the LM head is not quantized
    assert quant.model.weight_bytes() < full.model.weight_bytes()
    prompt = random_prompts([90], seed=5)[0]
    ours, _ = _logits_prefill_then_decode(quant, prompt, 7)
    ref, _ = _logits_prefill_then_decode(full, prompt, 7)
    # a token whose top-2 experts flip moves a lot, so the typical (median) error is what is bounded
    typical = ((ours - ref).abs().median() / ref.std()).item()
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"tiny {quantization}: median |logit error| {typical:.4f} of the logits' std, top-1 agreement {agree:.3f}")
    assert typical < {"int8": 0.01, "int4": 0.15}[quantization], typical
    assert agree > {"int8": 0.95, "int4": 0.5}[quantization], agree  # random weights: 1/32000 if broken


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_calibrated_quantization_scales_every_quantized_weight_by_its_observed_inputs(tiny_checkpoint, quantization):
    """--quantization-calibration builtin: the model is observed on the standard library's docstrings
    and every quantized layer weight (attention and each expert) gets its own input scales; the LM
    head (not quantized) none. The scales cost K activation-dtype numbers a weight, and the model stays
    as close to unquantized as plain rounding (tiny's random weights have no outlier channels to gain on)."""
    plain, aware = _runner(tiny_checkpoint, quantization), _runner(tiny_checkpoint, quantization, calibration="builtin")
    scaled = list(aware.model.layer_linears())
    assert len(scaled) == 2 * 2 + 2 * 2 * 8  # 2 layers: qkv, o and 8 experts' w13, w2
    assert all(w.kernel == quantization and w.input_scale is not None and w.input_scale.shape == (w.in_features,)
               for w in scaled), [(w.name, w.kernel) for w in scaled]
    assert len({w.name for w in scaled}) == len(scaled)  # each its own statistics
    assert aware.model.lm_head.input_scale is None and all(w.input_scale is None for w in plain.model.layer_linears())
    scale_bytes = sum(w.in_features * 4 for w in scaled)  # float32
    assert aware.model.weight_bytes() == plain.model.weight_bytes() + scale_bytes
    # some channels are scaled up and others down: the statistics reached the weights
    assert any(w.input_scale.max() / w.input_scale.min() > 1.05 for w in scaled)
    full = _runner(tiny_checkpoint, "none")
    prompt = random_prompts([90], seed=5)[0]
    ref, _ = _logits_prefill_then_decode(full, prompt, 7)
    errors = {}
    for name, runner in (("plain", plain), ("calibrated", aware)):
        ours, _ = _logits_prefill_then_decode(runner, prompt, 7)
        errors[name] = ((ours - ref).abs().median() / ref.std()).item()
    print(f"tiny {quantization}: median |logit error| / std: {errors}")
    assert errors["calibrated"] < 1.25 * errors["plain"], errors


def test_a_calibration_source_that_is_not_there_is_refused_before_loading(tiny_checkpoint):
    with pytest.raises(ValueError, match="'none', 'builtin' or the path of a text file"):
        make_engine(tiny_checkpoint, quantization="int8", quantization_calibration="/no/such/text.txt")


def test_the_engine_generates_with_int4_weights(tiny_checkpoint):
    engine = make_engine(tiny_checkpoint, quantization="int4", quantization_group_size=32)
    outs = engine.generate(random_prompts([12, 30], seed=8), greedy(8))
    assert [len(ids) for ids in output_ids(outs)] == [8, 8]
    assert engine.kernel_report()["linear_kernels"]["256x64 float32"].startswith("int4 (group 32, ")


def _real_text_ids(tokenizer, min_tokens: int) -> list[int]:
    """English from the standard library's docstrings (modules and their public functions/classes;
    other modules than the built-in calibration text's)."""
    ids: list[int] = []
    for module in ("argparse", "logging", "collections", "unittest", "subprocess", "threading", "pathlib", "email",
                   "json", "textwrap"):
        for doc in module_docstrings(module):
            ids += tokenizer.encode(doc + "\n\n", add_bos=False)
        if len(ids) >= min_tokens:
            break
    return ids


def _perplexity(runner: ModelRunner, ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) over consecutive windows of `window` tokens, each scored from its own start."""
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        logits, _ = _logits_prefill_then_decode(runner, chunk[:-1], chunk[-1])  # [n, V]
        logprobs = torch.log_softmax(logits.double(), dim=-1)
        targets = torch.tensor(chunk[1:])
        nll -= logprobs[torch.arange(len(targets)), targets].sum().item()
        count += len(targets)
    return math.exp(nll / count)


@pytest.mark.slow  # ~5 min: four 20,480-token perplexity runs of SmolLM2 (unquantized, int8, int4, calibrated int8)
def test_smollm2_perplexity_on_20k_tokens_of_english_moves_little():
    from .test_gguf_smollm2 import GGUF

    from mixserve.workers.tokenizer import Tokenizer

    ids = _real_text_ids(Tokenizer.from_dir(GGUF), 20_480)[:20_480]
    assert len(ids) == 20_480
    # int4 in groups of 32: the grid of the file's own Q4_1 blocks (w = d q + m per 32 weights), so
    # re-quantizing them is close to exact; groups of 64 straddle two Q4_1 scales (measured: +29%).
    results = {q: _perplexity(_runner(GGUF, q, group_size=32), ids) for q in ("none", "int8", "int4")}
    # activation-aware int8: calibrated on other modules' docstrings (workers/calibration.py), not these
    results["int8 calibrated"] = _perplexity(_runner(GGUF, "int8", calibration="builtin"), ids)
    print(f"SmolLM2 perplexity on {len(ids)} tokens of stdlib docstrings: "
          + ", ".join(f"{q} {p:.3f}" for q, p in results.items()))
    assert results["none"] < 50  # a real model on real text
    assert results["int8"] <= 1.01 * results["none"]
    assert results["int8 calibrated"] <= 1.01 * results["none"]
    assert results["int4"] <= 1.08 * results["none"]


def test_gguf_q4_1_weights_become_int4_codes_exactly_without_float(monkeypatch):
    """SmolLM2's Q4_1 layer weights, asked for as int4 in groups of 32, are mapped block by block
    (workers/gguf_checkpoint.py read_int4): no layer weight is dequantized to float, and the int4
    weight equals the file's own values exactly, also for a tensor-parallel shard (rank 1 of 3) and
    the rotary-permuted q/k rows."""
    from mixserve.kernels.linear import dequantized
    from mixserve.workers import gguf_checkpoint
    from mixserve.workers.checkpoint import open_checkpoint
    from mixserve.workers.loader import ShardSpec, load_model

    from .test_gguf_smollm2 import GGUF

    dequantized_names = []
    real = gguf_checkpoint._dequantize
    monkeypatch.setattr(gguf_checkpoint, "_dequantize",
                        lambda raw, qtype, name: dequantized_names.append(name) or real(raw, qtype, name))
    config = load_model_config(GGUF)
    shard = ShardSpec(rank=1, world_size=3)
    model = load_model(GGUF, config, torch.float32, shard, weights=WeightFormat(quantization="int4", group_size=32))
    assert dequantized_names and all(n.startswith("token_embd") or n.endswith("norm.weight")
                                     for n in dequantized_names), sorted(set(dequantized_names))

    reader, c = open_checkpoint(GGUF, config), config
    dh, p = c.head_dim, "model.layers.5."
    q_rows, kv_rows, i_part = shard.part(c.num_heads * dh), shard.part(c.num_kv_heads * dh), shard.part(
        c.intermediate_size)

    def floats(name, shape, rows=None, cols=None):
        return reader.read(p + name, shape, torch.float32, rows, cols)

    layer = model.layers[5]
    expected = {
        "qkv": torch.cat([floats("self_attn.q_proj.weight", (c.num_heads * dh, c.hidden_size), q_rows),
                          floats("self_attn.k_proj.weight", (c.num_kv_heads * dh, c.hidden_size), kv_rows),
                          floats("self_attn.v_proj.weight", (c.num_kv_heads * dh, c.hidden_size), kv_rows)]),
        "o": floats("self_attn.o_proj.weight", (c.hidden_size, c.num_heads * dh), cols=q_rows),
        "w13": torch.cat([floats(f"mlp.{w}_proj.weight", (c.intermediate_size, c.hidden_size), i_part)
                          for w in ("gate", "up")]),
        "w2": floats("mlp.down_proj.weight", (c.hidden_size, c.intermediate_size), cols=i_part),
    }
    got = {"qkv": layer.attention.qkv, "o": layer.attention.o, "w13": layer.mlp.w13, "w2": layer.mlp.w2}
    for key, weight in got.items():
        assert weight.kernel == "int4" and weight.group_size == 32, key
        torch.testing.assert_close(dequantized(weight, torch.float32), expected[key], rtol=1e-6, atol=1e-6,
                                   msg=key)


def test_requantize_switches_an_idle_engine_to_int8_and_back_with_the_same_outputs(tiny_checkpoint):
    """engine.requantize (behind POST /v1/re_isq): none -> int8 -> none re-reads the checkpoint each
    time; the weights shrink and grow back, outputs after switching back equal those before (the
    prefix cache, computed with int8 weights, is forgotten), and a busy engine refuses and keeps its
    weights."""
    from mixserve.workers.engine import EngineBusyError

    engine = make_engine(tiny_checkpoint, dtype="bfloat16")
    prompts = random_prompts([40, 75], seed=12)
    before, full_bytes = output_ids(engine.generate(prompts, greedy(12))), engine.weight_bytes()

    assert engine.requantize("int8").quantization == "int8"
    assert engine.weight_bytes() < full_bytes  # tiny: the embedding and LM head (not quantized) dominate
    assert engine.kernel_report()["linear_kernels"]["256x64 bfloat16"].startswith("int8")
    int8_out = output_ids(engine.generate(prompts, greedy(12)))
    assert [len(ids) for ids in int8_out] == [12, 12]

    engine.add_request("busy", prompts[0], greedy(4))
    with pytest.raises(EngineBusyError, match="1 request"):
        engine.requantize("int4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        engine.requantize("int3")
    assert engine.weight_format.quantization == "int8"
    engine.abort_request("busy")
    engine.step()  # the abort's report leaves the engine

    engine.requantize("none")
    assert engine.weight_bytes() == full_bytes
    assert output_ids(engine.generate(prompts, greedy(12))) == before
    engine.shutdown()


def test_requantize_with_calibration_observes_the_running_model_and_switching_back_restores_it(tiny_checkpoint):
    """An engine configured with a calibration source re-quantizes activation-aware: the idle model
    is observed on the text first (the KV cache is scratch for it), and none again gives the
    outputs from before."""
    engine = make_engine(tiny_checkpoint, dtype="bfloat16", quantization_calibration="builtin")
    prompts = random_prompts([40, 75], seed=12)
    before = output_ids(engine.generate(prompts, greedy(12)))
    engine.requantize("int8")
    model = engine.executor.runner.model
    assert all(w.input_scale is not None and w.input_scale.dtype == torch.bfloat16 for w in model.layer_linears())
    assert [len(ids) for ids in output_ids(engine.generate(prompts, greedy(12)))] == [12, 12]
    engine.requantize("none")
    assert all(w.input_scale is None for w in engine.executor.runner.model.layer_linears())
    assert output_ids(engine.generate(prompts, greedy(12))) == before
    engine.shutdown()
