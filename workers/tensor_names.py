"""One table of tensor names: Hugging Face <-> Mistral <-> GGUF (llama.cpp).

The engine names every tensor in Hugging Face terms; a checkpoint in another layout is read through
this table (workers/checkpoint.py, workers/gguf_checkpoint.py), and the test fixtures write the
Mistral layout through it too, so the three layouts cannot drift apart.

GGUF keeps a Mixtral layer's experts either merged (one 3-D tensor per projection, expert first:
`blk.N.ffn_gate_exps.weight` [E, I, D]) or, in older files, one tensor per expert
(`blk.N.ffn_gate.E.weight`); `gguf_names` gives both candidates with the expert's index.
"""

import re

import torch

# Hugging Face name pattern -> (Mistral template, GGUF template). "\1" = layer, "\2" = expert.
_TABLE: list[tuple[str, str, str]] = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "norm.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight", r"blk.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight",
     r"blk.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight", r"blk.\1.attn_q.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight", r"blk.\1.attn_k.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight", r"blk.\1.attn_v.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight",
     r"blk.\1.attn_output.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"layers.\1.feed_forward.gate.weight",
     r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight",
     r"layers.\1.feed_forward.experts.\2.w1.weight", r"blk.\1.ffn_gate.\2.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight",
     r"layers.\1.feed_forward.experts.\2.w2.weight", r"blk.\1.ffn_down.\2.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight",
     r"layers.\1.feed_forward.experts.\2.w3.weight", r"blk.\1.ffn_up.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight", r"blk.\1.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight", r"blk.\1.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight", r"blk.\1.ffn_down.weight"),
]
_COMPILED = [(re.compile(hf), mistral, gguf) for hf, mistral, gguf in _TABLE]
_MERGED_EXPERTS = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
ROTARY_PERMUTED = re.compile(r"model\.layers\.\d+\.self_attn\.([qk])_proj\.weight")  # interleaved in Mistral/GGUF


def _lookup(hf_name: str) -> tuple[re.Match, str, str]:
    for pattern, mistral, gguf in _COMPILED:
        match = pattern.fullmatch(hf_name)
        if match:
            return match, mistral, gguf
    raise KeyError(hf_name)


def mistral_name(hf_name: str) -> str:
    match, template, _ = _lookup(hf_name)
    return match.expand(template)


def gguf_names(hf_name: str) -> list[tuple[str, int | None]]:
    """Candidate GGUF (name, expert index within a merged tensor) pairs, in the order to try."""
    match, _, template = _lookup(hf_name)
    expert = _EXPERT.fullmatch(hf_name)
    if expert:
        layer, index, w = expert.groups()
        return [(f"blk.{layer}.{_MERGED_EXPERTS[w]}.weight", int(index)), (match.expand(template), None)]
    return [(match.expand(template), None)]


def interleaved_to_half(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """q/k rows of Mistral's and GGUF's layouts (rotary pairs interleaved: x0, y0, x1, y1, ...) ->
    the rotate-half order the model uses (x0, x1, ..., y0, y1, ...), head by head.
    weight: [heads*Dh, D] -> [heads*Dh, D]."""
    rows, dim_in = weight.shape
    heads = rows // head_dim
    return weight.view(heads, head_dim // 2, 2, dim_in).transpose(1, 2).reshape(rows, dim_in)


def half_to_interleaved(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half` (what Mistral's and llama.cpp's converters write)."""
    rows, dim_in = weight.shape
    heads = rows // head_dim
    return weight.view(heads, 2, head_dim // 2, dim_in).transpose(1, 2).reshape(rows, dim_in)
