"""A Mixtral in GGUF (written with gguf's own GGUFWriter, tests/gguf_writer.py) loads to exactly the
weights it holds: its logits equal those of the same dequantized weights loaded from safetensors, for
merged and per-expert expert tensors, Q8_0 and Q4_K; its tokenizer (a `llama` SentencePiece
vocabulary in the metadata) gives the folder tokenizer's ids; errors name what is wrong."""

import pytest
import torch

from mixserve.workers.config import CheckpointError, load_model_config
from mixserve.workers.loader import load_model
from mixserve.workers.loader import WeightFormat
from mixserve.workers.model_runner import CacheShape, ModelRunner
from mixserve.workers.tokenizer import Tokenizer
from tests.gguf_writer import write_gguf
from tests.helpers import write_tiny_hf_checkpoint

from .engine_helpers import greedy, make_engine, output_ids, random_prompts
from .test_engine_matches_transformers import _logits_prefill_then_decode

# K-quants pack 256 weights a block: every matrix's input dimension is a multiple of 256 here.
K_SHAPE = dict(hidden=256, intermediate=256, layers=2, heads=4, kv_heads=2, head_dim=64, experts=4, vocab=512,
               sliding_window=48)


def _logits(path, prompt):
    runner = ModelRunner(path, load_model_config(path), torch.float32, CacheShape(16, 16),
                         weights=WeightFormat(linear_kernel="reference"))
    return _logits_prefill_then_decode(runner, prompt, 5)


@pytest.mark.parametrize("merged", [True, False], ids=["merged-experts", "per-expert"])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_gguf_logits_equal_the_dequantized_weights_loaded_from_safetensors(tmp_path, qtype, merged):
    hf, _ = write_tiny_hf_checkpoint(tmp_path / "hf", **K_SHAPE)
    gguf_file, reference = write_gguf(hf, tmp_path / "gguf", qtype, merged, with_tokenizer=False)
    config = load_model_config(gguf_file)
    assert (config.layout, config.num_experts, config.num_experts_per_tok, config.sliding_window) == ("gguf", 4, 2, 48)
    prompt = list(range(3, 80))  # longer than the sliding window
    ours, ours_decode = _logits(gguf_file, prompt)
    ref, ref_decode = _logits(reference, prompt)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_decode, ref_decode, rtol=0, atol=1e-5)
    assert ours.abs().max() > 1e-2  # a real forward pass, not zeros


def test_the_gguf_tokenizer_gives_transformers_ids(tiny_checkpoint, tiny_gguf):
    """Ids equal transformers' own GGUF tokenizer; and the folder's sentencepiece tokenizer's, except on
    runs of spaces, which transformers' GGUF converter splits differently from sentencepiece."""
    from transformers import AutoTokenizer

    gguf_file = tiny_gguf[0]
    ours, folder = Tokenizer.from_dir(gguf_file), Tokenizer.from_dir(tiny_checkpoint)
    theirs = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    texts = ["Hello world", "  two spaces", "naïve café 日本語", "[INST] hi [/INST]", "a\nb\n\nc", "123 4.5",
             "def f(x):\n    return x", "emoji 🤖"]
    for text in texts:
        assert ours.encode(text) == theirs(text)["input_ids"], text
        if "  " not in text:
            assert ours.encode(text) == folder.encode(text), text
    assert (ours.bos_id, ours.eos_id, ours.add_bos_token) == (1, 2, True)


def test_greedy_generation_from_gguf_equals_the_reference_folder(tiny_gguf):
    gguf_file, reference = tiny_gguf
    prompts = random_prompts([10, 70], seed=91)
    assert output_ids(make_engine(gguf_file).generate(prompts, greedy(12))) == \
        output_ids(make_engine(reference).generate(prompts, greedy(12)))


def test_a_missing_tensor_is_named_in_gguf_terms(tmp_path):
    from gguf import GGUFReader, GGUFWriter

    hf, _ = write_tiny_hf_checkpoint(tmp_path / "hf", **K_SHAPE)
    gguf_file, _ = write_gguf(hf, tmp_path / "gguf", "Q8_0", True, with_tokenizer=False)
    source = GGUFReader(str(gguf_file))
    broken = tmp_path / "broken.gguf"
    writer = GGUFWriter(str(broken), "llama")
    for field in source.fields.values():
        if field.name.startswith("llama.") or field.name == "general.file_type":
            writer.add_key_value(field.name, field.contents(), field.types[0])
    for t in source.tensors:
        if t.name != "blk.1.ffn_up_exps.weight":
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"missing tensor blk\.1\.ffn_up_exps\.weight \(or blk\.1\.ffn_up\.0"):
        load_model(broken, load_model_config(broken), torch.float32)


def test_an_unknown_gguf_architecture_is_refused_by_name(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'gpt2'"):
        load_model_config(path)
