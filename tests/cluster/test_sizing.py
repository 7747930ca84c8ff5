"""cluster/sizing.py: what a deployment needs, from the model's own numbers, and a refusal before any
actor starts when this machine cannot hold it."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mixserve.cluster.settings import ServeSettings
from mixserve.cluster.sizing import DoesNotFitError, check_fits, size_deployment
from mixserve.workers.config import ModelConfig

# Mixtral-8x7B-v0.1's config.json, as published
MIXTRAL_8X7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
    head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, num_experts=8, num_experts_per_tok=2,
    max_position_embeddings=32768, checkpoint_dtype="bfloat16", layout="hf",
)


def test_mixtral_8x7b_weights_are_its_published_46_7_billion_parameters():
    sizing = size_deployment(ServeSettings(dtype="bfloat16", device="cuda"), MIXTRAL_8X7B)
    assert 46.6e9 < sizing.weight_bytes_per_rank / 2 < 46.8e9
    # KV: 32 layers x 2 x 8 KV heads x 128 x 2 bytes = 128 KiB per token
    assert sizing.kv_bytes_per_token == 128 * 1024


def test_tensor_parallelism_splits_the_weights_and_the_kv_cache_per_rank():
    one = size_deployment(ServeSettings(dtype="bfloat16", device="cuda"), MIXTRAL_8X7B)
    two = size_deployment(ServeSettings(dtype="bfloat16", device="cuda", tensor_parallel_size=2), MIXTRAL_8X7B)
    assert two.kv_bytes_per_token == one.kv_bytes_per_token // 2
    replicated = 2 * 32000 * 4096 + 4096 + 32 * (2 * 4096 + 8 * 4096)  # embedding, LM head, norms, routers
    elements = one.weight_bytes_per_rank / 2  # bfloat16
    assert two.weight_bytes_per_rank / 2 == pytest.approx((elements - replicated) / 2 + replicated, rel=1e-9)
    assert two.ranks == 2 and two.bytes_needed == 2 * (two.weight_bytes_per_rank + two.kv_cache_bytes)


def test_a_deployment_larger_than_the_memory_is_refused_with_its_numbers():
    sizing = size_deployment(ServeSettings(dtype="bfloat16", replicas=2), MIXTRAL_8X7B)
    with pytest.raises(DoesNotFitError, match=r"2 rank\(s\) x \(86\.\d\d GiB of bfloat16 weights"):
        check_fits(sizing, available=64 << 30)
    check_fits(sizing, available=256 << 30)  # fits: no error


def test_mixserve_serve_refuses_before_starting_ray(tiny_checkpoint):
    cli = Path(sys.executable).parent / "mixserve"
    started = time.monotonic()
    done = subprocess.run([str(cli), "serve", "--model", str(tiny_checkpoint), "--kv-cache-bytes", str(1 << 50)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "KV cache:" in done.stdout and "the model does not fit" in done.stderr
    assert "Traceback" not in done.stderr and "Ray" not in done.stdout + done.stderr
    assert time.monotonic() - started < 30


def test_mixtral_8x7b_in_int4_takes_at_most_27_gb_and_int8_about_half_of_bf16():
    """From the shapes alone: 4-bit codes + a bf16 scale and zero per 64 weights for every attention
    and expert weight; embedding and LM head stay bf16."""
    bf16 = size_deployment(ServeSettings(dtype="bfloat16", device="cuda"), MIXTRAL_8X7B).weight_bytes_per_rank
    int8 = size_deployment(ServeSettings(dtype="bfloat16", device="cuda", quantization="int8"), MIXTRAL_8X7B)
    int4 = size_deployment(ServeSettings(dtype="bfloat16", device="cuda", quantization="int4"), MIXTRAL_8X7B)
    assert int4.weight_bytes_per_rank <= 27e9 and int4.weight_bytes_per_rank / bf16 <= 0.3
    assert 0.49 <= int8.weight_bytes_per_rank / bf16 <= 0.51
    assert "int4 (group 64)" in int4.lines()[0]
    # activation-aware calibration adds K bf16 input scales per quantized weight: per layer qkv and o
    # (4096 inputs each), 8 experts' w13 (4096) and w2 (14336)
    calibrated = size_deployment(ServeSettings(dtype="bfloat16", device="cuda", quantization="int4",
                                               quantization_calibration="builtin"), MIXTRAL_8X7B)
    per_layer = (4096 + 4096 + 8 * (4096 + 14336)) * 2
    assert calibrated.weight_bytes_per_rank - int4.weight_bytes_per_rank == 32 * per_layer


def test_the_kv_cache_sized_from_memory_gets_what_quantization_saves():
    """kv_cache_memory_fraction: the KV cache is the fraction of memory the weights leave, so int4
    weights give the cache exactly what they save over int8; capped at max_num_seqs full contexts;
    refused when the weights alone do not fit."""
    from mixserve.cluster.sizing import kv_cache_bytes_from_memory

    available = 64 << 30
    base = dict(dtype="bfloat16", kv_cache_memory_fraction=0.9, max_num_seqs=1024)
    int8, int4 = (ServeSettings(**base, quantization=q) for q in ("int8", "int4"))
    kv8, kv4 = (kv_cache_bytes_from_memory(s, MIXTRAL_8X7B, available) for s in (int8, int4))
    w8, w4 = (size_deployment(s, MIXTRAL_8X7B).weight_bytes_per_rank for s in (int8, int4))
    assert kv8 == int(available * 0.9) - w8 and kv4 - kv8 == w8 - w4 > 18 << 30
    capped = ServeSettings(**{**base, "max_num_seqs": 1}, quantization="int4")
    assert kv_cache_bytes_from_memory(capped, MIXTRAL_8X7B, available) == 32768 * 128 * 1024  # one full context
    with pytest.raises(DoesNotFitError, match="no memory left for the KV cache"):
        kv_cache_bytes_from_memory(ServeSettings(**base), MIXTRAL_8X7B, available)  # 87 GiB of bf16 weights
