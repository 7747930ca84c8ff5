"""workers/config.py, workers/checkpoint.py, workers/loader.py: a checkpoint mixserve cannot load
fails with a CheckpointError that says what is wrong."""

import json

import pytest
import torch

from mixserve.workers.config import CheckpointError, load_model_config
from mixserve.workers.loader import ShardSpec, check_shardable, load_model
from tests.helpers import write_tiny_hf_checkpoint


def _load(path, dtype=torch.float32, **kwargs):
    return load_model(path, load_model_config(path), dtype, **kwargs)


def test_a_valid_tiny_checkpoint_loads(tmp_path):
    path, _ = write_tiny_hf_checkpoint(tmp_path)
    model = _load(path)
    assert model.embed.shape == (256, 64) and len(model.layers) == 2
    assert len(model.layers[0].mlp.w13) == 8


@pytest.mark.parametrize("model_type", ["gpt2", None])
def test_another_model_type_is_rejected_by_name(tmp_path, model_type):
    path, _ = write_tiny_hf_checkpoint(tmp_path, config_overrides={"model_type": model_type})
    with pytest.raises(CheckpointError, match=f"model_type {model_type!r}") as excinfo:
        load_model_config(path)
    assert "mixtral" in str(excinfo.value) and "mistral" in str(excinfo.value)


def test_a_missing_folder_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_config(tmp_path / "nowhere")


def test_a_folder_without_config_is_reported(tmp_path):
    with pytest.raises(CheckpointError, match="neither config.json .* nor params.json"):
        load_model_config(tmp_path)


def test_a_folder_without_weights_is_reported(tmp_path):
    path, _ = write_tiny_hf_checkpoint(tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no safetensors weights"):
        _load(path)


@pytest.mark.parametrize(
    "name",
    ["model.layers.1.block_sparse_moe.experts.5.w3.weight", "model.layers.0.self_attn.k_proj.weight",
     "lm_head.weight", "model.norm.weight"],
)
def test_a_missing_tensor_is_named(tmp_path, name):
    path, _ = write_tiny_hf_checkpoint(tmp_path, drop=[name])
    with pytest.raises(CheckpointError, match=f"missing tensor {name}$"):
        _load(path)


def test_a_missing_dense_mlp_tensor_is_named(tmp_path):
    name = "model.layers.0.mlp.down_proj.weight"
    path, _ = write_tiny_hf_checkpoint(tmp_path, dense=True, drop=[name])
    with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
        _load(path)


@pytest.mark.parametrize(
    "name,bad_shape,expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", (64, 32), (64, 64)),
        ("model.layers.1.block_sparse_moe.experts.2.w2.weight", (128, 64), (64, 128)),
        ("model.layers.0.block_sparse_moe.gate.weight", (4, 64), (8, 64)),
        ("model.embed_tokens.weight", (255, 64), (256, 64)),
        ("model.layers.1.input_layernorm.weight", (65,), (64,)),
    ],
)
def test_a_tensor_of_the_wrong_shape_is_named_with_both_shapes(tmp_path, name, bad_shape, expected):
    path, _ = write_tiny_hf_checkpoint(tmp_path, reshape={name: bad_shape})
    with pytest.raises(CheckpointError) as excinfo:
        _load(path)
    message = str(excinfo.value)
    assert name in message
    assert str(list(bad_shape)) in message and str(list(expected)) in message


@pytest.mark.parametrize("world_size,what", [(3, "attention heads"), (8, "attention heads"), (4, "KV heads")])
def test_a_tensor_parallel_size_that_does_not_divide_the_heads_is_rejected(tmp_path, world_size, what):
    path, _ = write_tiny_hf_checkpoint(tmp_path, heads=4, kv_heads=2)
    config = load_model_config(path)
    with pytest.raises(CheckpointError, match=f"tensor-parallel size {world_size} does not divide .* {what}"):
        check_shardable(config, world_size)
    with pytest.raises(CheckpointError, match=f"tensor-parallel size {world_size}"):
        load_model(path, config, torch.float32, shard=ShardSpec(0, world_size))


def test_a_tensor_parallel_size_that_does_not_divide_the_intermediate_size_is_rejected(tmp_path):
    path, _ = write_tiny_hf_checkpoint(tmp_path, heads=4, kv_heads=4, intermediate=90)
    with pytest.raises(CheckpointError, match="does not divide the model's 90 intermediate size"):
        check_shardable(load_model_config(path), 4)


def test_tensor_parallel_ranks_split_the_weights_that_divide(tmp_path):
    path, _ = write_tiny_hf_checkpoint(tmp_path, heads=4, kv_heads=2)
    config = load_model_config(path)
    check_shardable(config, 2)
    rank = load_model(path, config, torch.float32, shard=ShardSpec(1, 2))
    attn = rank.layers[0].attention
    assert (attn.num_heads, attn.num_kv_heads) == (2, 1)
    assert attn.qkv.out_features == (2 + 1 + 1) * 16
    assert rank.layers[0].mlp.w13[0].out_features == 128  # 2 x intermediate/2


def test_heads_not_a_multiple_of_kv_heads_are_rejected(tmp_path):
    path, _ = write_tiny_hf_checkpoint(tmp_path, heads=4, kv_heads=3, head_dim=16)
    with pytest.raises(CheckpointError, match="num_attention_heads 4 is not a multiple of num_key_value_heads 3"):
        load_model_config(path)


def test_unsupported_rope_scaling_is_rejected(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0}
    path, _ = write_tiny_hf_checkpoint(tmp_path, config_overrides={"rope_scaling": rope})
    with pytest.raises(CheckpointError, match="rope scaling .*yarn.* is not supported"):
        load_model_config(path)


def test_a_missing_tensor_in_mistral_layout_is_named_in_mistral_terms(tmp_path):
    hf, _ = write_tiny_hf_checkpoint(tmp_path / "hf", dense=True)
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    params = {"dim": 64, "n_layers": 2, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16,
              "norm_eps": 1e-5, "vocab_size": 256, "rope_theta": 1e6}
    (mistral / "params.json").write_text(json.dumps(params))
    (mistral / "consolidated.safetensors").write_bytes((hf / "model.safetensors").read_bytes())  # HF names
    with pytest.raises(CheckpointError, match="missing tensor output.weight$"):
        _load(mistral)
