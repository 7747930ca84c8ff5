"""workers/model_inputs.py: flat token order, slot mapping, decode / prefill masks, logits rows,
and (end to end with kernels/attention.py) the attention they produce."""

import pytest
import torch

from mixserve.kernels.attention import paged_attention, write_kv
from mixserve.workers.model_inputs import build_model_inputs
from mixserve.workers.step_input import SamplingRow, SeqChunk, StepInput
from tests.helpers import naive_attention

BS = 4
ROW = SamplingRow(temperature=0.0, top_k=-1, top_p=1.0, seed=0, step=0)


def _chunk(seq_id, start, n, table, no_write_before=0, sample=True, targets=None):
    return SeqChunk(seq_id, list(range(100 * seq_id + start, 100 * seq_id + start + n)), start, table,
                    no_write_before, ROW if sample else None, targets)


def test_slot_of_a_position_is_block_times_block_size_plus_offset():
    inputs = build_model_inputs(StepInput([_chunk(0, 3, 3, [5, 2])]), BS, None)
    assert inputs.meta.slot_mapping.tolist() == [23, 8, 9]
    assert inputs.positions.tolist() == [3, 4, 5]


def test_positions_below_no_write_before_get_slot_minus_one():
    inputs = build_model_inputs(StepInput([_chunk(0, 2, 4, [5, 2], no_write_before=4)]), BS, None)
    assert inputs.meta.slot_mapping.tolist() == [-1, -1, 8, 9]


def test_single_token_chunks_come_first_in_the_flat_batch():
    chunks = [_chunk(0, 0, 3, [1]), _chunk(1, 5, 1, [2, 3]), _chunk(2, 0, 2, [4]), _chunk(3, 0, 1, [6])]
    inputs = build_model_inputs(StepInput(chunks), BS, None)
    assert [c.seq_id for c in inputs.chunks] == [1, 3, 0, 2]
    assert inputs.input_ids.tolist() == [105, 300, 0, 1, 2, 200, 201]
    assert inputs.positions.tolist() == [5, 0, 0, 1, 2, 0, 1]
    assert inputs.meta.num_decode == 2
    assert [(p.query_start, p.query_len) for p in inputs.meta.prefills] == [(2, 3), (5, 2)]
    assert inputs.meta.slot_mapping.tolist() == [13, 24, 4, 5, 6, 16, 17]


def test_decode_keys_cover_the_sliding_window_and_pad_shorter_rows():
    chunks = [_chunk(0, 9, 1, [7, 3, 5]), _chunk(1, 2, 1, [1])]
    meta = build_model_inputs(StepInput(chunks), BS, window=4).meta
    # position 9 sees 6..9 (blocks 3 and 5); position 2 sees 0..2 (block 1), padded with slot 0
    assert meta.decode_key_slots.tolist() == [[14, 15, 20, 21], [4, 5, 6, 0]]
    assert meta.decode_mask.tolist() == [[True] * 4, [True, True, True, False]]


def test_decode_without_window_sees_the_whole_context():
    meta = build_model_inputs(StepInput([_chunk(0, 5, 1, [3, 8])]), BS, None).meta
    assert meta.decode_key_slots.tolist() == [[12, 13, 14, 15, 32, 33]]
    assert meta.decode_mask.all()


def test_blocks_released_by_the_window_rule_never_produce_negative_key_slots():
    # window 4: a query at 12 sees 9..12, so blocks 0-1 are gone; a chunk from 10 sees 7.., so block 0
    chunks = [_chunk(0, 12, 1, [-1, -1, 5, 6]), _chunk(1, 1, 1, [9]), _chunk(2, 10, 3, [-1, 3, 4, 2])]
    meta = build_model_inputs(StepInput(chunks), BS, window=4).meta
    assert meta.decode_key_slots.tolist()[0] == [21, 22, 23, 24]  # positions 9..12
    assert (meta.decode_key_slots >= 0).all()
    (chunk,) = meta.prefills
    assert chunk.key_slots.tolist() == [15, 16, 17, 18, 19, 8]  # positions 7..12


def test_prefill_mask_is_causal_and_limited_to_the_window():
    meta = build_model_inputs(StepInput([_chunk(0, 5, 3, [1, 2])]), BS, window=3).meta
    (chunk,) = meta.prefills
    assert chunk.key_slots.tolist() == [7, 8, 9, 10, 11]  # positions 3..7
    assert chunk.mask.tolist() == [
        [True, True, True, False, False],  # position 5 sees 3, 4, 5
        [False, True, True, True, False],  # position 6 sees 4, 5, 6
        [False, False, True, True, True],  # position 7 sees 5, 6, 7
    ]


def test_prefill_mask_without_window_is_lower_triangular_after_the_cached_prefix():
    meta = build_model_inputs(StepInput([_chunk(0, 2, 3, [1, 2])]), BS, None).meta
    (chunk,) = meta.prefills
    assert chunk.key_slots.tolist() == [4, 5, 6, 7, 8]
    assert chunk.mask.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, True, True, True],
    ]


def test_logits_rows_are_the_last_token_of_sampling_chunks_and_all_prompt_logprob_rows():
    chunks = [
        _chunk(0, 0, 4, [1], sample=False),  # mid-prefill: no logits
        _chunk(1, 7, 1, [2, 3]),  # decode: its one row
        _chunk(2, 0, 3, [4], targets=[201, 202, 203]),  # prompt logprobs and a sample: all 3 rows
        _chunk(3, 0, 2, [5], sample=False, targets=[301, 302]),
    ]
    inputs = build_model_inputs(StepInput(chunks), BS, None)
    # flat order: seq 1 (row 0), seq 0 (rows 1-4), seq 2 (rows 5-7), seq 3 (rows 8-9)
    assert inputs.logits_indices.tolist() == [0, 5, 6, 7, 8, 9]
    assert inputs.logit_rows == [(0, 1), (1, 0), (1, 3), (4, 2)]


def _cache_history(seqs, heads, kv_heads, dh, num_slots, seed):
    """Full per-sequence q/k/v, and a cache holding each sequence's already-computed positions
    (released blocks hold garbage: another sequence may own them now)."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(kv_heads, num_slots, dh, generator=g)
    v_cache = torch.randn(kv_heads, num_slots, dh, generator=g)
    full = {}
    for c in seqs:
        length = c.start + len(c.token_ids)
        q, k, v = (torch.randn(length, h, dh, generator=g) for h in (heads, kv_heads, kv_heads))
        full[c.seq_id] = (q, k, v)
        for p in range(max(c.start, c.no_write_before)):
            block = c.block_table[p // BS]
            if block >= 0:
                k_cache[:, block * BS + p % BS] = k[p]
                v_cache[:, block * BS + p % BS] = v[p]
    return full, k_cache, v_cache


@pytest.mark.parametrize("window", [None, 6])
def test_built_inputs_drive_paged_attention_to_the_naive_result(window):
    heads, kv_heads, dh = 4, 2, 8
    released = -1 if window else 0  # with a window, blocks outside it are gone
    chunks = [
        _chunk(0, 0, 7, [10, 3]),  # fresh prompt
        _chunk(1, 13, 1, [released, 1, 12, 6]),  # decode at position 13
        _chunk(2, 9, 5, [released, 8, 2, 14], no_write_before=11),  # chunk starting inside a prefix hit
        _chunk(3, 4, 1, [5, 13]),  # decode at position 4
        _chunk(4, 0, 1, [11]),  # a one-token prompt
    ]
    if not window:
        chunks[1].block_table[0], chunks[2].block_table[0] = 0, 7
    full, k_cache, v_cache = _cache_history(chunks, heads, kv_heads, dh, 16 * BS, seed=1)
    inputs = build_model_inputs(StepInput(chunks), BS, window)
    q = torch.cat([full[c.seq_id][0][c.start : c.start + len(c.token_ids)] for c in inputs.chunks])
    k = torch.cat([full[c.seq_id][1][c.start : c.start + len(c.token_ids)] for c in inputs.chunks])
    v = torch.cat([full[c.seq_id][2][c.start : c.start + len(c.token_ids)] for c in inputs.chunks])
    write_kv(k_cache, v_cache, k, v, inputs.meta.slot_mapping)
    out = paged_attention(q, k_cache, v_cache, inputs.meta, dh**-0.5)
    ref = torch.cat([
        naive_attention(full[c.seq_id][0][c.start : c.start + len(c.token_ids)], full[c.seq_id][1],
                        full[c.seq_id][2], range(c.start, c.start + len(c.token_ids)), window, dh**-0.5)
        for c in inputs.chunks
    ])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
