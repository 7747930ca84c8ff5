"""Shared fixtures: random-weight tiny checkpoints, built once per test session."""

import os
import sys

# transformers must never reach for the Hub in tests; set before anything imports it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import ray.cloudpickle

import tests
from tests.helpers import kernels_resolves_to_the_repository
from mixserve.random_models.random_checkpoint import write_mistral_layout, write_random_checkpoint

# Ray's workers cannot import this package (the repository root is on no worker's path, see
# cluster/ray_start.py): functions and classes the tests send them travel by value.
ray.cloudpickle.register_pickle_by_value(tests)


@pytest.fixture(autouse=True, scope="module")
def _the_repository_stays_off_the_import_path(request):
    """After each module: nothing it ran put the repository root ahead of site-packages (its kernels/
    folder would shadow Hugging Face's `kernels`, and transformers' model code would fail to import)."""
    yield
    assert not kernels_resolves_to_the_repository(), (
        f"{request.module.__name__} left the repository root ahead of site-packages: sys.path starts {sys.path[:3]}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Hugging Face layout, Mixtral (8 experts, top-2), tiny preset, seed 0, float32."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-moe"), "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory):
    """Hugging Face layout, dense Mistral, tiny preset, seed 0, float32."""
    return write_random_checkpoint(tmp_path_factory.mktemp("tiny-dense"), "tiny", seed=0, dense=True)


@pytest.fixture(scope="session")
def tiny_gguf(tiny_checkpoint, tmp_path_factory):
    """`tiny_checkpoint` as a Q8_0 GGUF file (merged experts, Mistral vocabulary in the metadata) and
    its dequantized weights as a Hugging Face folder: (gguf file, reference folder)."""
    from tests.gguf_writer import write_gguf

    return write_gguf(tiny_checkpoint, tmp_path_factory.mktemp("tiny-gguf"), "Q8_0", merged_experts=True)


@pytest.fixture(scope="session")
def tiny_gguf_file(tiny_gguf):
    return tiny_gguf[0]


@pytest.fixture(scope="session")
def tiny_mistral_layout_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The weights of `tiny_checkpoint` in Mistral's layout (params.json, consolidated.safetensors)."""
    return write_mistral_layout(tiny_checkpoint, tmp_path_factory.mktemp("tiny-mistral"))
