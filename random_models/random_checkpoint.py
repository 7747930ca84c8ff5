"""Random-weight Mixtral / Mistral checkpoints in the real on-disk layouts, for tests and benchmarks.

- `write_random_checkpoint`: the Hugging Face layout (config.json, model*.safetensors, an index when
  sharded, tokenizer files holding the real Mistral v1 tokenizer shipped with mistral-common).
- `write_mistral_layout`: the same weights in Mistral's own layout (params.json,
  consolidated.safetensors, tokenizer.model).
- `ensure_demo_checkpoint`: the model `mixserve serve` runs without --model, built once into a cache.

Every tensor is drawn in float32 from its own `torch.Generator`, seeded by (seed, tensor name), then
cast: the bytes depend only on the arguments, and a dense and a MoE checkpoint with the same seed
share their attention weights. The scales keep activations near unit size through the layers and
make the logits spread widely (std ~LM_HEAD_SCALE), so the greedy token is rarely a near-tie and
tiny numerical differences between implementations do not flip it:

| tensor                       | init                                |
|------------------------------|-------------------------------------|
| embed_tokens                 | N(0, 1)                             |
| q/k/v/o, router gate, w1, w3 | N(0, 1/in_features)                 |
| w2 (down)                    | N(0, 1/intermediate_size)           |
| RMSNorm weights              | 1 + U(-0.1, 0.1)                    |
| lm_head                      | N(0, LM_HEAD_SCALE^2 / hidden_size) |
"""

import hashlib
import importlib.resources
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..workers.config import DTYPES, ModelConfig
from .presets import get_preset
from ..workers.tensor_names import half_to_interleaved, mistral_name
from ..workers.tokenizer import MISTRAL_INSTRUCT_CHAT_TEMPLATE

LM_HEAD_SCALE = 10.0  # logit std; tiny: median top-1/top-2 gap ~1.6, mean top-1 probability ~0.7
DEMO_NAME = "demo-tiny-v1"
_PRESET_DEFAULT = object()  # sentinel: "use the preset's sliding window"; None means no window


def mistral_tokenizer_model() -> Path:
    """mistral-common's copy of the Mistral v1 sentencepiece model (Mistral-7B, Mixtral-8x7B)."""
    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


# ---------------------------------------------------------------- tensors


def tensor_specs(p: ModelConfig, dense: bool) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name, shape, init kind, std) of every tensor, in Hugging Face names and file order."""
    H, I, E = p.hidden_size, p.intermediate_size, p.num_experts
    q_out, kv_out = p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim
    specs = [("model.embed_tokens.weight", (p.vocab_size, H), "normal", 1.0)]
    for i in range(p.num_layers):
        layer = f"model.layers.{i}"
        specs += [
            (f"{layer}.input_layernorm.weight", (H,), "norm", 0.0),
            (f"{layer}.self_attn.q_proj.weight", (q_out, H), "normal", H**-0.5),
            (f"{layer}.self_attn.k_proj.weight", (kv_out, H), "normal", H**-0.5),
            (f"{layer}.self_attn.v_proj.weight", (kv_out, H), "normal", H**-0.5),
            (f"{layer}.self_attn.o_proj.weight", (H, q_out), "normal", q_out**-0.5),
            (f"{layer}.post_attention_layernorm.weight", (H,), "norm", 0.0),
        ]
        if dense:
            specs += [
                (f"{layer}.mlp.gate_proj.weight", (I, H), "normal", H**-0.5),
                (f"{layer}.mlp.up_proj.weight", (I, H), "normal", H**-0.5),
                (f"{layer}.mlp.down_proj.weight", (H, I), "normal", I**-0.5),
            ]
        else:
            specs.append((f"{layer}.block_sparse_moe.gate.weight", (E, H), "normal", H**-0.5))
            for e in range(E):
                expert = f"{layer}.block_sparse_moe.experts.{e}"
                specs += [
                    (f"{expert}.w1.weight", (I, H), "normal", H**-0.5),
                    (f"{expert}.w2.weight", (H, I), "normal", I**-0.5),
                    (f"{expert}.w3.weight", (I, H), "normal", H**-0.5),
                ]
    specs += [
        ("model.norm.weight", (H,), "norm", 0.0),
        ("lm_head.weight", (p.vocab_size, H), "normal", LM_HEAD_SCALE * H**-0.5),
    ]
    return specs


def _random_tensor(seed: int, name: str, shape: tuple[int, ...], kind: str, std: float, dtype) -> torch.Tensor:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    if kind == "norm":
        t = 1.0 + 0.2 * (torch.rand(shape, generator=generator) - 0.5)
    else:
        t = torch.randn(shape, generator=generator).mul_(std)
    return t.to(dtype)


def _shards(sizes: list[int], max_shard_bytes: int | None) -> list[list[int]]:
    """Split tensor indices, in order, into shards of at most max_shard_bytes (a tensor bigger than
    that gets a shard of its own)."""
    if max_shard_bytes is None:
        return [list(range(len(sizes)))]
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


# ---------------------------------------------------------------- config + tokenizer files


def hf_config(p: ModelConfig, dense: bool, sliding_window: int | None, dtype: str) -> dict:
    """config.json of a checkpoint of shape `p` (Mixtral, or Mistral when dense)."""
    config = {
        "architectures": ["MistralForCausalLM" if dense else "MixtralForCausalLM"],
        "model_type": "mistral" if dense else "mixtral",
        "vocab_size": p.vocab_size,
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": p.head_dim,
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "sliding_window": sliding_window,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "dtype": dtype,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if not dense:
        config.update(
            num_local_experts=p.num_experts,
            num_experts_per_tok=p.num_experts_per_tok,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
        )
    return config


def _bpe_merges(pieces: list[tuple[str, float]], mergeable: list[bool]) -> list[tuple[str, str]]:
    """Merges that make a BPE over the vocabulary behave like sentencepiece's BPE, which joins the
    adjacent pair whose union has the highest score. Ordering merges by score (not by id) matters:
    Mistral's whitespace-run pieces ("▁▁", "▁▁▁▁") score -1e9, so they join last and "a  b" becomes
    "▁a", "▁", "▁b" as in sentencepiece, not "▁a", "▁▁", "b". Control, unknown and byte pieces never
    take part in a merge."""
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    normal = {piece for (piece, _), ok in zip(pieces, mergeable) if ok}
    merges = []
    for piece, score in pieces:
        if piece not in normal:
            continue
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        splits = sorted(
            ((left, right) for left, right in splits if left in normal and right in normal),
            key=lambda lr: (vocab[lr[0]], vocab[lr[1]]),
        )
        merges += [(score, left, right) for left, right in splits]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)  # stable: ties keep vocab order
    return [(left, right) for _, left, right in merges]


def _write_tokenizer_files(out_dir: Path, model_max_length: int) -> None:
    """tokenizer.model (sentencepiece) and its conversion: tokenizer.json, tokenizer_config.json,
    special_tokens_map.json.

    tokenizer.json follows transformers' "legacy" Llama conversion, the one in the published
    Mixtral-8x7B repo: a normalizer that prepends "▁" and turns spaces into "▁" (so leading spaces
    survive, unlike the Metaspace pre-tokenizer), byte fallback, and the decoder
    Replace/ByteFallback/Fuse/Strip. Merges come from `_bpe_merges`. The result encodes exactly as
    sentencepiece does (tests/workers/test_tokenizer.py checks thousands of strings).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, normalizers, processors
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE

    spm_file = out_dir / "tokenizer.model"
    shutil.copyfile(mistral_tokenizer_model(), spm_file)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_file.read_bytes())
    pieces = [(piece.piece, piece.score) for piece in proto.pieces]
    normal, unknown, control = 1, 2, 3  # sentencepiece piece types
    mergeable = [piece.type == normal for piece in proto.pieces]
    specials = [piece.piece for piece in proto.pieces if piece.type in (unknown, control)]

    tok = RustTokenizer(
        BPE(
            vocab={piece: i for i, (piece, _) in enumerate(pieces)},
            merges=_bpe_merges(pieces, mergeable),
            unk_token=proto.trainer_spec.unk_piece,
            fuse_unk=True,
            byte_fallback=proto.trainer_spec.byte_fallback,
            dropout=None,
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    bos, eos, unk = proto.trainer_spec.bos_piece, proto.trainer_spec.eos_piece, proto.trainer_spec.unk_piece
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tok.save(str(out_dir / "tokenizer.json"))

    special_flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(tok.token_to_id(s)): {"content": s, **special_flags} for s in specials},
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": None,
        "chat_template": MISTRAL_INSTRUCT_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "spaces_between_special_tokens": False,
        # Not "LlamaTokenizer": transformers 5 rebuilds that class's normalizer (Metaspace, which
        # drops a leading space); the generic fast class uses tokenizer.json as written.
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "special_tokens_map.json", {"bos_token": bos, "eos_token": eos, "unk_token": unk})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------- public API


def write_random_checkpoint(
    out_dir: str | Path,
    preset: str | ModelConfig = "tiny",
    seed: int = 0,
    *,
    dense: bool = False,
    sliding_window: int | None = _PRESET_DEFAULT,  # type: ignore[assignment]
    dtype: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a random-weight checkpoint in the Hugging Face layout into out_dir (created if needed)
    and return its path. dense=True writes a Mistral (dense MLP) model instead of a Mixtral."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    window = p.sliding_window if sliding_window is _PRESET_DEFAULT else sliding_window
    dtype_name = dtype or p.checkpoint_dtype
    if dtype_name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype_name!r}")
    torch_dtype = DTYPES[dtype_name]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    specs = tensor_specs(p, dense)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    sizes = [itemsize * torch.Size(shape).numel() for _, shape, _, _ in specs]
    shards = _shards(sizes, max_shard_bytes)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = "model.safetensors" if len(shards) == 1 else f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for i in shard:
            name, shape, kind, std = specs[i]
            tensors[name] = _random_tensor(seed, name, shape, kind, std, torch_dtype)
            weight_map[name] = filename
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index)

    _write_json(out / "config.json", hf_config(p, dense, window, dtype_name))
    _write_json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    _write_tokenizer_files(out, p.max_position_embeddings)
    return out


def write_mistral_layout(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a Hugging Face-layout Mixtral/Mistral checkpoint (as written above) into Mistral's
    layout: params.json, consolidated.safetensors (q/k rows in interleaved rotary order) and
    tokenizer.model. Tensors are read one at a time through safe_open."""
    hf, out = Path(hf_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((hf / "config.json").read_text())
    params = {
        "dim": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "hidden_dim": cfg["intermediate_size"],
        "n_heads": cfg["num_attention_heads"],
        "n_kv_heads": cfg["num_key_value_heads"],
        "norm_eps": cfg["rms_norm_eps"],
        "vocab_size": cfg["vocab_size"],
        "rope_theta": cfg["rope_theta"],
    }
    if cfg.get("sliding_window") is not None:
        params["sliding_window"] = cfg["sliding_window"]
    if cfg["model_type"] == "mixtral":
        params["moe"] = {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}

    index = hf / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for filename in files:
        with safe_open(str(hf / filename), framework="pt") as f:
            for name in f.keys():
                w = f.get_tensor(name)
                if name.endswith("self_attn.q_proj.weight"):
                    w = half_to_interleaved(w, params["head_dim"])
                elif name.endswith("self_attn.k_proj.weight"):
                    w = half_to_interleaved(w, params["head_dim"])
                tensors[mistral_name(name)] = w.contiguous()
    save_file(tensors, str(out / "consolidated.safetensors"), metadata={"format": "pt"})
    _write_json(out / "params.json", params)
    shutil.copyfile(hf / "tokenizer.model", out / "tokenizer.model")
    return out


def ensure_demo_checkpoint(cache_dir: str | Path) -> Path:
    """The demo model (tiny preset, seed 0) in cache_dir/DEMO_NAME, built on first use. It is built in
    a temporary sibling folder and renamed into place, so an interrupted build is never picked up."""
    cache = Path(cache_dir)
    target = cache / DEMO_NAME
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=cache))
    try:
        write_random_checkpoint(tmp, "tiny", seed=0)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # not just another process winning the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/mixserve, or ~/.cache/mixserve. For the CLI only: library code takes the
    cache folder as an argument."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixserve"
