import hashlib
import json
import random
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mixserve.random_models.presets import PRESETS
from mixserve.random_models.random_checkpoint import (
    DEMO_NAME,
    ensure_demo_checkpoint,
    write_random_checkpoint,
)
from mixserve.workers.tensor_names import mistral_name

TINY = PRESETS["tiny"]


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_shapes(dense: bool) -> dict[str, tuple[int, ...]]:
    V, H, I, E = TINY.vocab_size, TINY.hidden_size, TINY.intermediate_size, TINY.num_experts
    q, kv = TINY.num_heads * TINY.head_dim, TINY.num_kv_heads * TINY.head_dim
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(TINY.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (H,),
            f"{p}.post_attention_layernorm.weight": (H,),
            f"{p}.self_attn.q_proj.weight": (q, H),
            f"{p}.self_attn.k_proj.weight": (kv, H),
            f"{p}.self_attn.v_proj.weight": (kv, H),
            f"{p}.self_attn.o_proj.weight": (H, q),
        }
        if dense:
            shapes |= {
                f"{p}.mlp.gate_proj.weight": (I, H),
                f"{p}.mlp.up_proj.weight": (I, H),
                f"{p}.mlp.down_proj.weight": (H, I),
            }
        else:
            shapes[f"{p}.block_sparse_moe.gate.weight"] = (E, H)
            for e in range(E):
                x = f"{p}.block_sparse_moe.experts.{e}"
                shapes |= {f"{x}.w1.weight": (I, H), f"{x}.w3.weight": (I, H), f"{x}.w2.weight": (H, I)}
    return shapes


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint).eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, TINY.vocab_size) for _ in range(rng.randint(2, 90))] for _ in range(n)]


def test_config_json_has_the_mixtral_fields(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["architectures"] == ["MixtralForCausalLM"]
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["intermediate_size"]) == (32000, 64, 128)
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (2, 4, 2)
    assert cfg["head_dim"] == 16
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["sliding_window"]) == (8, 2, 64)
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert (cfg["rope_theta"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (1e6, 1e-5, 4096)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert (cfg["tie_word_embeddings"], cfg["hidden_act"]) == (False, "silu")
    tokenizer_files = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
    for name in ["generation_config.json", *tokenizer_files]:
        assert (tiny_checkpoint / name).exists(), name


def test_moe_checkpoint_has_the_real_mixtral_tensor_names_and_shapes(tiny_checkpoint):
    tensors = _tensors(tiny_checkpoint)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == _expected_shapes(dense=False)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_dense_checkpoint_is_a_mistral_with_mlp_and_no_experts(tiny_dense_checkpoint):
    cfg = json.loads((tiny_dense_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "mistral" and cfg["architectures"] == ["MistralForCausalLM"]
    assert not {"num_local_experts", "num_experts_per_tok", "router_aux_loss_coef"} & cfg.keys()
    tensors = _tensors(tiny_dense_checkpoint)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == _expected_shapes(dense=True)


def test_same_seed_writes_identical_bytes_and_another_seed_does_not(tiny_checkpoint, tmp_path):
    again = write_random_checkpoint(tmp_path / "again", "tiny", seed=0)
    for name in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"]:
        assert _sha256(again / name) == _sha256(tiny_checkpoint / name), name
    other = write_random_checkpoint(tmp_path / "other", "tiny", seed=1)
    assert _sha256(other / "model.safetensors") != _sha256(tiny_checkpoint / "model.safetensors")


def test_dense_and_moe_with_the_same_seed_share_attention_weights(tiny_checkpoint, tiny_dense_checkpoint):
    moe, dense = _tensors(tiny_checkpoint), _tensors(tiny_dense_checkpoint)
    for name in ["model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "lm_head.weight"]:
        assert torch.equal(moe[name], dense[name])


def test_norm_weights_are_perturbed_around_one(tiny_checkpoint):
    w = _tensors(tiny_checkpoint)["model.layers.0.input_layernorm.weight"]
    assert 0.9 <= w.min() < 0.97 and 1.03 < w.max() <= 1.1


def test_sliding_window_and_dtype_can_be_overridden(tmp_path):
    out = write_random_checkpoint(tmp_path, "tiny", sliding_window=None, dtype="bfloat16")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["sliding_window"] is None and cfg["dtype"] == "bfloat16"
    assert _tensors(out)["lm_head.weight"].dtype == torch.bfloat16


def test_sharded_checkpoint_has_an_index_and_gives_the_same_logits(tiny_checkpoint, hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = write_random_checkpoint(tmp_path, "tiny", seed=0, max_shard_bytes=3_000_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(sharded.glob("model-*.safetensors"))
    assert len(files) >= 3 and not (sharded / "model.safetensors").exists()
    n = len(files)
    assert [f.name for f in files] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert set(index["weight_map"].values()) == {f.name for f in files}
    unsharded = _tensors(tiny_checkpoint)
    assert index["weight_map"].keys() == unsharded.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in unsharded.values())

    model = AutoModelForCausalLM.from_pretrained(sharded).eval()
    ids = torch.tensor(_prompts(1)[:1])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf_model(ids).logits)


def test_transformers_loads_moe_offline_and_runs(hf_model):
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    ids = torch.tensor([_prompts(1)[0]])
    with torch.no_grad():
        logits = hf_model(ids).logits
    assert logits.shape == (1, ids.shape[1], TINY.vocab_size) and torch.isfinite(logits).all()
    out = hf_model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4)


def test_transformers_loads_dense_offline_and_runs(tiny_dense_checkpoint):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dense_checkpoint).eval()
    assert type(model).__name__ == "MistralForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([_prompts(1)[0]])).logits
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 4


def test_greedy_choices_are_not_near_ties(hf_model):
    rng = random.Random(1)
    prompts = torch.tensor([[1] + [rng.randrange(3, TINY.vocab_size) for _ in range(31)] for _ in range(64)])
    with torch.no_grad():
        top2 = hf_model(prompts).logits[:, -1].topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1]).sort().values
    assert gaps[32] >= 1.0, gaps  # median
    assert gaps[0] > 1e-4, gaps  # well above float32 noise, so implementations agree on the argmax


def test_mistral_layout_holds_the_same_weights_with_interleaved_rotary(tiny_checkpoint, tiny_mistral_layout_checkpoint):
    hf, mistral = _tensors(tiny_checkpoint), _tensors(tiny_mistral_layout_checkpoint)
    assert [f.name for f in tiny_mistral_layout_checkpoint.glob("*.safetensors")] == ["consolidated.safetensors"]
    assert set(mistral) == {mistral_name(n) for n in hf}
    assert "layers.1.feed_forward.experts.7.w2.weight" in mistral and "output.weight" in mistral

    def to_hf_order(w, n_heads):  # transformers' conversion permute
        return w.view(n_heads, TINY.head_dim // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)

    for name, w in hf.items():
        m = mistral[mistral_name(name)]
        if name.endswith("q_proj.weight"):
            assert not torch.equal(m, w)
            m = to_hf_order(m, TINY.num_heads)
        elif name.endswith("k_proj.weight"):
            m = to_hf_order(m, TINY.num_kv_heads)
        assert torch.equal(m, w), name


def test_mistral_params_json(tiny_mistral_layout_checkpoint, tiny_dense_checkpoint, tmp_path):
    from mixserve.random_models.random_checkpoint import write_mistral_layout

    params = json.loads((tiny_mistral_layout_checkpoint / "params.json").read_text())
    assert params == {
        "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
        "norm_eps": 1e-5, "vocab_size": 32000, "rope_theta": 1e6, "sliding_window": 64,
        "moe": {"num_experts": 8, "num_experts_per_tok": 2},
    }
    assert (tiny_mistral_layout_checkpoint / "tokenizer.model").exists()
    dense = write_mistral_layout(tiny_dense_checkpoint, tmp_path)
    assert "moe" not in json.loads((dense / "params.json").read_text())
    assert "layers.0.feed_forward.w1.weight" in _tensors(dense)


def test_demo_checkpoint_is_built_once_and_reused(tmp_path):
    path = ensure_demo_checkpoint(tmp_path)
    assert path == tmp_path / DEMO_NAME and (path / "model.safetensors").exists()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_demo_checkpoint(tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_NAME]  # no temporary build folder left


def test_cli_checkpoint_writes_a_loadable_tiny_checkpoint(tmp_path, tiny_checkpoint):
    cmd = [sys.executable, "-P", "-m", "mixserve.cluster.cli", "checkpoint", "--preset", "tiny", "--out"]
    subprocess.run([*cmd, str(tmp_path / "hf"), "--max-shard-bytes", "8000000"], check=True, capture_output=True)
    assert _tensors(tmp_path / "hf").keys() == _tensors(tiny_checkpoint).keys()
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    mistral = [*cmd, str(tmp_path / "m"), "--layout", "mistral", "--dense", "--seed", "3"]
    subprocess.run(mistral, check=True, capture_output=True)
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["consolidated.safetensors", "params.json", "tokenizer.model"]
