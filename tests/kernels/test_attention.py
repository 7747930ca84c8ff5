"""kernels/attention.py: write_kv + paged_attention equal naive causal (sliding-window) attention
computed sequence by sequence from the full K/V, whatever the cache layout."""

from dataclasses import dataclass

import pytest
import torch

from mixserve.kernels.attention import AttentionMetadata, PrefillChunk, paged_attention, write_kv

DH, BLOCK, NUM_BLOCKS = 8, 4, 24


@dataclass
class Seq:
    """A sequence whose positions [0, start) are already cached and [start, start+n) run now."""

    start: int
    n: int
    blocks: list[int]
    cached_in_step: int = 0  # leading step tokens whose K/V are already cached (slot_mapping -1)


def _slot(seq: Seq, pos: int) -> int:
    return seq.blocks[pos // BLOCK] * BLOCK + pos % BLOCK


def _visible(pos: int, window: int | None) -> range:
    return range(max(0, pos - window + 1) if window else 0, pos + 1)


def _metadata(decodes: list[Seq], prefills: list[Seq], window: int | None) -> AttentionMetadata:
    """Built by hand, one token at a time (decodes first, then prefills, as the kernel expects)."""
    slot_mapping = []
    for s in decodes + prefills:
        for i in range(s.n):
            slot_mapping.append(-1 if i < s.cached_in_step else _slot(s, s.start + i))
    decode_slots = decode_mask = None
    if decodes:
        keys = [list(_visible(s.start, window)) for s in decodes]
        span = max(len(k) for k in keys)
        decode_slots = torch.tensor([[_slot(s, p) for p in k] + [0] * (span - len(k)) for s, k in zip(decodes, keys)])
        decode_mask = torch.tensor([[True] * len(k) + [False] * (span - len(k)) for k in keys])
    chunks, offset = [], len(decodes)
    for s in prefills:
        key_pos = list(range(max(0, s.start - window + 1) if window else 0, s.start + s.n))
        mask = torch.tensor([[kp in _visible(s.start + i, window) for kp in key_pos] for i in range(s.n)])
        chunks.append(PrefillChunk(offset, s.n, torch.tensor([_slot(s, p) for p in key_pos]), mask))
        offset += s.n
    return AttentionMetadata(torch.tensor(slot_mapping), len(decodes), decode_slots, decode_mask, chunks)


def _naive(q, k, v, pos: int, window: int | None, scale: float) -> torch.Tensor:
    """q: [P, H, Dh], k, v: [P, K, Dh] of one sequence (float32) -> output at `pos`: [H, Dh]."""
    heads, kv_heads = q.shape[1], k.shape[1]
    keys = list(_visible(pos, window))
    out = torch.empty(heads, q.shape[2])
    for h in range(heads):
        kh = h // (heads // kv_heads)
        scores = torch.stack([q[pos, h] @ k[j, kh] for j in keys]) * scale
        probs = torch.softmax(scores, dim=0)
        out[h] = sum(p * v[j, kh] for p, j in zip(probs, keys))
    return out


def _run(decodes, prefills, heads, kv_heads, window, dtype=torch.float32, seed=0, scale=DH**-0.5):
    """Fill the cache with each sequence's past, run one step; returns (output, reference)."""
    g = torch.Generator().manual_seed(seed)
    seqs = decodes + prefills
    full = []
    for s in seqs:
        length = s.start + s.n
        full.append(tuple(torch.randn(length, h, DH, generator=g) for h in (heads, kv_heads, kv_heads)))
    k_cache = torch.randn(kv_heads, NUM_BLOCKS * BLOCK, DH, generator=g).to(dtype)  # garbage everywhere
    v_cache = torch.randn(kv_heads, NUM_BLOCKS * BLOCK, DH, generator=g).to(dtype)
    for s, (_, k, v) in zip(seqs, full):
        for p in range(s.start + s.cached_in_step):
            k_cache[:, _slot(s, p)] = k[p].to(dtype)
            v_cache[:, _slot(s, p)] = v[p].to(dtype)
    q_step, k_step, v_step = [], [], []
    for s, (q, k, v) in zip(seqs, full):
        rows = slice(s.start, s.start + s.n)
        k_new, v_new = k[rows].clone(), v[rows].clone()
        k_new[: s.cached_in_step] = 99.0  # must never reach the cache
        v_new[: s.cached_in_step] = 99.0
        q_step.append(q[rows])
        k_step.append(k_new)
        v_step.append(v_new)
    meta = _metadata(decodes, prefills, window)
    q_flat = torch.cat(q_step).to(dtype)
    write_kv(k_cache, v_cache, torch.cat(k_step).to(dtype), torch.cat(v_step).to(dtype), meta.slot_mapping)
    out = paged_attention(q_flat, k_cache, v_cache, meta, scale)
    ref = []
    for s, (q, k, v) in zip(seqs, full):
        cast = [t.to(dtype).float() for t in (q, k, v)]
        ref += [_naive(*cast, s.start + i, window, scale) for i in range(s.n)]
    return out, torch.stack(ref)


DECODES = [Seq(5, 1, [9, 3]), Seq(10, 1, [14, 0, 7]), Seq(0, 1, [21])]  # one decode at position 0
PREFILLS = [Seq(0, 7, [4, 17]), Seq(6, 5, [12, 2, 19])]  # a fresh prompt and a chunk continuing at 6
GQA = [(4, 2), (4, 1), (2, 2), (6, 3)]  # (H, K)


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_decode_only_batch_matches_naive_attention(heads, kv_heads, window):
    out, ref = _run(DECODES, [], heads, kv_heads, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("heads,kv_heads", GQA)
def test_prefill_only_batch_matches_naive_attention(heads, kv_heads, window):
    out, ref = _run([], PREFILLS, heads, kv_heads, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_decode_and_prefill_batch_matches_naive_attention(window):
    out, ref = _run(DECODES, PREFILLS, 4, 2, window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_mixed_batch_in_bfloat16_is_close_to_float32_attention():
    out, ref = _run(DECODES, PREFILLS, 4, 2, 5, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_long_sequences_with_window_smaller_than_a_block_span():
    decodes = [Seq(37, 1, [23, 1, 8, 15, 6, 11, 20, 3, 10, 13])]
    prefills = [Seq(18, 9, [5, 16, 22, 18, 2, 9, 7])]
    out, ref = _run(decodes, prefills, 4, 2, window=6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tokens_with_slot_minus_one_are_not_written_but_attended_from_the_cache():
    prefills = [Seq(0, 10, [6, 11, 4], cached_in_step=8), Seq(0, 3, [13])]
    decodes = [Seq(7, 1, [2, 19], cached_in_step=1)]  # a whole-prefix hit recomputing its last token
    out, ref = _run(decodes, prefills, 4, 2, None)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_write_kv_stores_rows_at_their_slots_and_skips_minus_one():
    k_cache = torch.zeros(2, 12, DH)
    v_cache = torch.zeros(2, 12, DH)
    k = torch.arange(4 * 2 * DH, dtype=torch.float32).view(4, 2, DH)
    v = -k
    write_kv(k_cache, v_cache, k, v, torch.tensor([7, -1, 0, 11]))
    for t, slot in ((0, 7), (2, 0), (3, 11)):
        assert torch.equal(k_cache[:, slot], k[t]) and torch.equal(v_cache[:, slot], v[t])
    untouched = [s for s in range(12) if s not in (7, 0, 11)]
    assert not k_cache[:, untouched].any() and not v_cache[:, untouched].any()


def test_write_kv_with_every_slot_minus_one_writes_nothing():
    k_cache = torch.zeros(1, 8, DH)
    v_cache = torch.zeros(1, 8, DH)
    k = torch.ones(3, 1, DH)
    write_kv(k_cache, v_cache, k, k, torch.tensor([-1, -1, -1]))
    assert not k_cache.any() and not v_cache.any()


def test_a_non_default_scale_multiplies_the_scores():
    out, ref = _run(DECODES, PREFILLS, 4, 2, None, scale=1.7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
