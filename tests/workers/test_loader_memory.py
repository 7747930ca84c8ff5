"""workers/loader.py memory: loading a checkpoint costs at most ~1.2x its weights in RSS.

Each measurement runs load_model in a fresh subprocess and reads the kernel's peak resident set
(VmHWM, reset to the current RSS through /proc/self/clear_refs just before loading), so allocator
caches and other tests cannot blur it. RSS includes file-backed pages: safetensors hands out
tensors that view its memory map of the checkpoint, and pages of that map count once touched.
"""

import json
import subprocess
import sys

import pytest
import torch

from tests.helpers import write_tiny_hf_checkpoint

pytestmark = pytest.mark.slow

LIMIT = 1.25  # peak RSS increase / checkpoint tensor bytes
SHAPE = dict(hidden=512, intermediate=640, layers=4, heads=8, kv_heads=2, experts=8, vocab=32000)

_MEASURE = r"""
import ctypes, ctypes.util, json, sys
import torch
from mixserve.kernels.kernel_choice import _CHOSEN, LinearKernelChooser
from mixserve.kernels.linear import linear
from mixserve.workers.config import load_model_config
from mixserve.workers.loader import load_model

def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, value = line.split(":", 1)
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

def weights(model):
    yield from (model.embed, model.norm, model.lm_head)
    for layer in model.layers:
        yield from (layer.input_norm, layer.post_attention_norm, layer.attention.qkv, layer.attention.o)
        mlp = layer.mlp
        yield from ([mlp.gate, *mlp.w13, *mlp.w2] if hasattr(mlp, "gate") else [mlp.w13, mlp.w2])

def touch(w):
    if torch.is_tensor(w):
        w.sum()
    else:  # LinearWeight, possibly packed
        linear(torch.zeros(1, w.in_features, dtype=dtype), w)

path, dtype, touch_all = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "1"
config = load_model_config(path)
# The kernel libraries (MKL, oneDNN) keep workspaces of a few tens of MB once a kernel has run on
# a shape, whatever weights it had: the kernel choice is run once on random weights of the model's
# linear shapes before the baseline, then forgotten, so the measured load times and packs again.
c = config
for shape in [((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size),
              (c.hidden_size, c.num_heads * c.head_dim), (2 * c.intermediate_size, c.hidden_size),
              (c.hidden_size, c.intermediate_size), (c.vocab_size, c.hidden_size)]:
    LinearKernelChooser().pack(torch.randn(shape).to(dtype))
_CHOSEN.clear()
ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
try:
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
except OSError:
    pass
before = status()
model = load_model(path, config, dtype)
loaded = status()
if touch_all:
    for w in weights(model):
        touch(w)
after = status()
print(json.dumps({
    "weight_bytes": model.weight_bytes(),
    "peak_increase": after["VmHWM"] - before["VmRSS"],
    "load_peak_increase": loaded["VmHWM"] - before["VmRSS"],
    "anon_increase": after["RssAnon"] - before["RssAnon"],
    "file_increase": after["RssFile"] - before["RssFile"],
}))
"""


def _measure(path, dtype: str, touch_all: bool) -> dict:
    done = subprocess.run([sys.executable, "-P", "-c", _MEASURE, str(path), dtype, "1" if touch_all else "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _report(what: str, m: dict, nbytes: int) -> str:
    mb = lambda b: f"{b / 2**20:.0f} MB"  # noqa: E731
    return (f"{what}: peak RSS +{mb(m['peak_increase'])} for {mb(nbytes)} of weights "
            f"= {m['peak_increase'] / nbytes:.2f}x (anon +{mb(m['anon_increase'])}, "
            f"file-backed +{mb(m['file_increase'])})")


@pytest.fixture(scope="module")
def float32_checkpoint(tmp_path_factory):
    """~255 MB float32 Mixtral: 8 experts x 4 layers, hidden 512, vocab 32000."""
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("f32-255mb"), **SHAPE, dtype=torch.float32)


# Weights packed for oneDNN (kernels/kernel_choice.py) exist twice for a moment: the bound holds
# for a model whose largest tensor is a small share of its weights, as in Mixtral-8x7B (its LM head
# is 0.3% of the weights). This shape keeps Mixtral's proportions: experts dominate, vocab is small.
BF16_SHAPE = dict(hidden=512, intermediate=1792, layers=4, heads=8, kv_heads=2, experts=8, vocab=4000)


@pytest.fixture(scope="module")
def bfloat16_checkpoint(tmp_path_factory):
    """~120 MB bfloat16 Mixtral (its real dtype) with Mixtral's proportions."""
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("bf16"), **BF16_SHAPE, dtype=torch.bfloat16)


def test_loading_a_float32_checkpoint_peaks_below_1_25x_its_weights(float32_checkpoint):
    path, nbytes = float32_checkpoint
    assert 200 * 2**20 < nbytes < 300 * 2**20
    m = _measure(path, "float32", touch_all=False)
    print(_report("float32 load", m, nbytes))
    assert m["peak_increase"] <= LIMIT * nbytes, _report("float32 load", m, nbytes)


def test_a_loaded_float32_model_once_used_holds_at_most_1_25x_its_weights(float32_checkpoint):
    path, nbytes = float32_checkpoint
    m = _measure(path, "float32", touch_all=True)
    print(_report("float32 load + first use", m, nbytes))
    assert m["peak_increase"] <= LIMIT * nbytes, _report("float32 load + first use", m, nbytes)


def test_loading_a_bfloat16_checkpoint_peaks_below_1_25x_its_weights(bfloat16_checkpoint):
    path, nbytes = bfloat16_checkpoint
    m = _measure(path, "bfloat16", touch_all=False)
    print(_report("bfloat16 load", m, nbytes))
    assert m["peak_increase"] <= LIMIT * nbytes, _report("bfloat16 load", m, nbytes)


def test_loading_the_smollm2_gguf_peaks_below_1_3x_its_loaded_weights():
    """Q4_1 GGUF dequantized to float32 tensor by tensor: peak RSS (file pages of the 98 MB file
    included) stays within 1.3x the float32 weights the model keeps."""
    from .test_gguf_smollm2 import GGUF

    m = _measure(GGUF, "float32", touch_all=False)
    print(_report("SmolLM2 GGUF load (float32)", m, m["weight_bytes"]))
    assert m["peak_increase"] <= 1.3 * m["weight_bytes"], _report("SmolLM2 GGUF load", m, m["weight_bytes"])
