"""The engine on a CPU without AVX-512 (the AVX2-only EPYC CI machine): bfloat16 loads and runs on
the reference kernels, `--dtype auto` takes float32 for a bfloat16 checkpoint, and the logits stay
those of float32 math.

The AVX2 machine is emulated on any machine with torch's own switch ATEN_CPU_CAPABILITY=avx2 (and
ONEDNN_MAX_CPU_ISA=AVX2 for oneDNN's kernels), in a subprocess so this process keeps its choices.
On a machine that has no AVX-512 the switch changes nothing and the test runs the real thing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mixserve.workers.config import load_model_config
from mixserve.workers.loader import WeightFormat
from mixserve.workers.model_runner import CacheShape, ModelRunner

from .test_engine_matches_transformers import _logits_prefill_then_decode

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

_RUN = r"""
import dataclasses, json, sys
sys.path.append(sys.argv[4])  # the repository, for the tests package: after site-packages, never ahead
import torch
from mixserve.kernels.capability import cpu_capability
from mixserve.workers.config import load_model_config
from mixserve.workers.dtype_choice import choose_dtype
from mixserve.workers.model_runner import CacheShape, ModelRunner
from tests.workers.test_engine_matches_transformers import _logits_prefill_then_decode

path, prompt, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
config = load_model_config(path)
runner = ModelRunner(path, config, torch.bfloat16, CacheShape(16, 16))
prefill, decode = _logits_prefill_then_decode(runner, prompt, 7)
torch.save({"prefill": prefill, "decode": decode}, out)
bf16_checkpoint = dataclasses.replace(config, checkpoint_dtype="bfloat16")
print(json.dumps({
    "cpu": cpu_capability().summary(),
    "kernels": runner.model.kernel_report,
    "auto_dtype": choose_dtype("auto", bf16_checkpoint).name,
    "auto_dtype_when_memory_is_short": choose_dtype("auto", bf16_checkpoint, memory_budget=1).name,
}))
"""


def test_bfloat16_runs_on_reference_kernels_and_auto_takes_float32_without_avx512(tiny_checkpoint, tmp_path):
    prompt = list(range(5, 45))
    out = tmp_path / "logits.pt"
    env = {**os.environ, **AVX2_ENV}
    done = subprocess.run([sys.executable, "-P", "-c", _RUN, str(tiny_checkpoint), json.dumps(prompt), str(out),
                           str(Path(__file__).resolve().parents[2])],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["cpu"]["isa"] == "AVX2"
    assert not report["cpu"]["flags"]["avx512f"] and not report["cpu"]["native_bf16"]
    assert report["kernels"] and all(k.endswith("bfloat16") for k in report["kernels"])
    assert set(report["kernels"].values()) == {"reference"}  # no oneDNN bf16 packing: the old crash
    assert report["auto_dtype"] == "float32"
    assert report["auto_dtype_when_memory_is_short"] == "bfloat16"

    bf16 = torch.load(out)
    runner = ModelRunner(tiny_checkpoint, load_model_config(tiny_checkpoint), torch.float32, CacheShape(16, 16),
                         weights=WeightFormat(linear_kernel="reference"))
    f32_prefill, f32_decode = _logits_prefill_then_decode(runner, prompt, 7)
    for ours, exact in ((bf16["prefill"], f32_prefill), (bf16["decode"], f32_decode)):
        scale = exact.abs().max()
        assert (ours.float() - exact).abs().max() < 0.05 * scale  # bf16 rounding, not a different model
        assert (ours.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9
