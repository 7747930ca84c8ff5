"""Test helpers: small Hugging Face checkpoints written tensor by tensor, and sequences.

`write_tiny_hf_checkpoint` writes config.json + model.safetensors with random weights (no
tokenizer) in any shape, with the tensor list and config.json of workers/random_checkpoint.py. The
safetensors file is streamed one tensor at a time, so a checkpoint of a few hundred MB never sits
in the test process's memory.
"""

import json
import signal
import struct
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from mixserve.workers.config import ModelConfig
from mixserve.random_models.random_checkpoint import hf_config, tensor_specs
from mixserve.workers.sampling_params import SamplingParams
from mixserve.workers.sequence import Sequence

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def write_safetensors_streaming(
    path: Path,
    specs: Iterable[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    make: Callable[[str, tuple[int, ...]], torch.Tensor],
) -> int:
    """Write a safetensors file whose tensors `make(name, shape)` creates one at a time; returns
    the bytes of tensor data."""
    specs = list(specs)
    itemsize = torch.empty((), dtype=dtype).element_size()
    header, offset = {}, 0
    for name, shape in specs:
        size = itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape in specs:
            t = make(name, shape).to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return offset


def write_tiny_hf_checkpoint(
    path: Path,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    experts: int = 8,
    dense: bool = False,
    vocab: int = 256,
    sliding_window: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_positions: int = 4096,
    drop: Iterable[str] = (),
    reshape: dict[str, tuple[int, ...]] | None = None,
    config_overrides: dict | None = None,
) -> tuple[Path, int]:
    """Write config.json + model.safetensors into `path` (created); returns (path, tensor bytes).

    `drop` leaves tensors out, `reshape` writes tensors with another shape, `config_overrides`
    replaces config.json fields: for checkpoints that must fail to load.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shape = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim or hidden // heads, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=sliding_window, num_experts=experts, num_experts_per_tok=2,
        max_position_embeddings=max_positions, checkpoint_dtype=str(dtype).replace("torch.", ""), layout="hf",
    )
    dropped, reshape = set(drop), reshape or {}
    specs = [(n, reshape.get(n, s)) for n, s, _, _ in tensor_specs(shape, dense) if n not in dropped]
    generator = torch.Generator().manual_seed(seed)

    def make(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * torch.rand(shape, generator=generator)
        return torch.randn(shape, generator=generator).mul_(shape[-1] ** -0.5)

    nbytes = write_safetensors_streaming(path / "model.safetensors", specs, dtype, make)
    config = hf_config(shape, dense, sliding_window, shape.checkpoint_dtype)
    config.update(config_overrides or {})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path, nbytes


def make_sequence(seq_id: int, prompt: list[int], **params) -> Sequence:
    """A waiting sequence for scheduler / KV-cache tests."""
    return Sequence(seq_id, f"req-{seq_id}", 0, list(prompt), SamplingParams(**params), seed=seq_id)


def naive_attention(q, k, v, query_positions, window: int | None, scale: float):
    """Causal (sliding-window) attention of one sequence from its full K/V, in float32.

    q: [Q, H, Dh] at query_positions [Q]; k, v: [P, K, Dh] for positions 0..P-1 -> [Q, H, Dh].
    Query head h reads KV head h // (H / K).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    k = k.float().repeat_interleave(heads // kv_heads, dim=1)  # [P, H, Dh]
    v = v.float().repeat_interleave(heads // kv_heads, dim=1)
    qpos = torch.as_tensor(query_positions)[:, None]  # [Q, 1]
    kpos = torch.arange(k.shape[0])[None, :]  # [1, P]
    visible = kpos <= qpos
    if window:
        visible &= qpos - kpos < window
    scores = torch.einsum("qhd,phd->hqp", q.float(), k) * scale
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqp,phd->qhd", probs, v)


def interrupt(proc: subprocess.Popen, timeout_s: float = 60) -> tuple[int, str]:
    """Stop a `mixserve serve` subprocess as a user's Ctrl-C does (SIGINT), killing it if it hangs;
    returns (exit code, its output)."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out or ""


REPOSITORY = Path(__file__).resolve().parents[1]


def kernels_resolves_to_the_repository() -> bool:
    """Whether `import kernels` would find the repository's kernels/ folder (installed as
    mixserve.kernels) instead of Hugging Face's `kernels` package, which transformers imports."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    origin = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), None))
    return bool(origin) and Path(origin).resolve().is_relative_to(REPOSITORY / "kernels")
