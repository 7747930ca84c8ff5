"""Shared fixtures: random-weight tiny checkpoints, built once per test session."""

import os

# transformers must never reach for the Hub in tests; set before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from mixserve.workers.random_checkpoint import write_mistral_layout, write_random_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Hugging Face layout, Mixtral (8 experts, top-2), tiny preset, seed 0, float32."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-moe"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory):
    """Hugging Face layout, dense Mistral, tiny preset, seed 0, float32."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-dense"), "tiny", seed=0, dense=True)


@pytest.fixture(scope="session")
def tiny_mistral_layout_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The weights of `tiny_checkpoint` in Mistral's layout (params.json, consolidated.safetensors)."""
    return write_mistral_layout(tiny_checkpoint, tmp_path_factory.mktemp("tiny-mistral"))
