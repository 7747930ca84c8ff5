"""The repository root never comes before site-packages on an import path we set up: its
`kernels/` folder (installed as mixserve.kernels) would shadow Hugging Face's `kernels` package,
which transformers imports, in the test process and in every Ray worker. (conftest.py checks the
test process again after every module, so a test that puts it there is named.)"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import ray

from mixserve.cluster.ray_start import init_ray

from tests.helpers import REPOSITORY as ROOT
from tests.helpers import kernels_resolves_to_the_repository as _resolves_to_our_folder


def _import_transformers_model_code() -> str:
    """What loading a model with transformers imports (its hub-kernels integration included)."""
    from transformers import MixtralForCausalLM  # noqa: F401
    from transformers.integrations import gguf, hub_kernels  # noqa: F401

    spec = importlib.util.find_spec("kernels")
    return spec.origin if spec else ""


def test_the_test_process_cannot_import_our_kernels_folder_as_kernels():
    assert not _resolves_to_our_folder(), (
        "`import kernels` resolves to the repository's kernels/ folder: run the tests as `make test` does "
        f"(python -P -m pytest, importlib import mode); sys.path starts {sys.path[:3]}")
    _import_transformers_model_code()


def test_a_ray_worker_started_from_the_repository_root_imports_transformers_model_code(monkeypatch):
    monkeypatch.chdir(ROOT)

    @ray.remote(num_cpus=0)
    def in_worker():
        return _resolves_to_our_folder(), _import_transformers_model_code(), os.getcwd()

    init_ray(num_cpus=1, log_to_driver=False)
    try:
        shadowed, kernels_origin, cwd = ray.get(in_worker.remote())
    finally:
        ray.shutdown()
    assert not shadowed, f"a Ray worker imports kernels from {kernels_origin}"
    assert Path(cwd).resolve() != ROOT
