"""Paged attention over a slot-addressed KV cache (reference implementation).

The cache of one layer is, per KV head, a flat array of slots: [K, S, Dh] (head-major, so a
gather of slots yields [K, L, Dh] ready for batched matmuls without a transpose copy). A block of
the block manager is `block_size` consecutive slots. A step's tokens arrive flattened, decode tokens first (one per
sequence), then each prefill chunk. The caller (workers/model_inputs.py) turns block tables
into slot indices and masks once per step; every layer reuses them.

Masks are boolean, True = attend, and already encode causality and the sliding window
(a query at position p sees keys at positions p-W+1 .. p).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillChunk:
    """One sequence's run of query tokens in a step."""

    query_start: int  # index of its first token in the step's flat batch
    query_len: int
    key_slots: torch.Tensor  # [L] int64, cache slots of the keys it attends to
    mask: torch.Tensor  # [query_len, L] bool


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64, where each token's k/v is written; -1 = already cached
    num_decode: int  # the first num_decode tokens are single-token decodes, one per sequence
    decode_key_slots: torch.Tensor | None  # [Bd, L] int64, padded with slot 0
    decode_mask: torch.Tensor | None  # [Bd, L] bool
    prefills: list[PrefillChunk]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store the step's keys and values. caches: [K, S, Dh]; k, v: [T, K, Dh]; slot_mapping: [T]."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, H, Q, Dh]; k, v: [B, K, L, Dh]; mask: [B, 1, Q, L] -> [B, H, Q, Dh]."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _attend_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Single-query attention as two batched matmuls (much faster than SDPA's CPU kernel for
    one query). q: [B, H, Dh]; k, v: [K, B, L, Dh]; mask: [B, L] -> [B, H, Dh]."""
    b, h, dh = q.shape
    kv_heads = k.shape[0]
    qg = q.view(b, kv_heads, h // kv_heads, dh).transpose(0, 1)  # [K, B, G, Dh]
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [K, B, G, L]
    scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(0, 1).reshape(b, h, dh)  # [K, B, G, Dh] -> [B, H, Dh]


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q: [T, H, Dh]; caches: [K, S, Dh] (this step's k/v already written) -> [T, H, Dh]."""
    out = torch.empty_like(q)
    bd = meta.num_decode
    if bd:
        slots = meta.decode_key_slots  # [Bd, L]
        kv_heads, (b, span) = k_cache.shape[0], slots.shape
        k = k_cache.index_select(1, slots.flatten()).view(kv_heads, b, span, -1)  # [K, Bd, L, Dh]
        v = v_cache.index_select(1, slots.flatten()).view(kv_heads, b, span, -1)
        out[:bd] = _attend_decode(q[:bd], k, v, meta.decode_mask, scale)
    for chunk in meta.prefills:
        rows = slice(chunk.query_start, chunk.query_start + chunk.query_len)
        k = k_cache.index_select(1, chunk.key_slots).unsqueeze(0)  # [1, K, L, Dh]
        v = v_cache.index_select(1, chunk.key_slots).unsqueeze(0)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, Q, Dh]
        out[rows] = _attend(qp, k, v, chunk.mask[None, None], scale)[0].transpose(0, 1)
    return out
