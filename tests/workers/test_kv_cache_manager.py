"""workers/kv_cache_manager.py: block tables, prefix lookup, sliding-window release, free order."""

from mixserve.workers.kv_cache_manager import KVCacheManager
from mixserve.workers.prefix_hash import block_hashes
from tests.helpers import make_sequence

BS = 4


def _compute(kv: KVCacheManager, seq, n: int) -> None:
    """What the engine does for one chunk: allocate, run, mark computed, cache full blocks."""
    assert kv.allocate_slots(seq, n)
    seq.num_computed_tokens += n
    kv.cache_computed_blocks(seq)


def _cached_sequence(kv: KVCacheManager, prompt: list[int], seq_id: int = 0):
    """A sequence that computed its whole prompt and was freed: its full blocks stay cached."""
    seq = make_sequence(seq_id, prompt)
    _compute(kv, seq, len(prompt))
    table = list(seq.block_table)
    kv.free(seq)
    return table


def test_allocate_slots_takes_one_block_per_block_size_tokens():
    kv = KVCacheManager(8, BS, None)
    seq = make_sequence(0, list(range(10)))
    assert kv.allocate_slots(seq, 10)
    assert len(seq.block_table) == 3 and kv.pool.num_free == 5
    seq.num_computed_tokens = 10
    assert kv.allocate_slots(seq, 2)  # positions 10, 11 fit in block 2
    assert len(seq.block_table) == 3
    seq.num_computed_tokens = 12
    assert kv.allocate_slots(seq, 1)
    assert len(seq.block_table) == 4


def test_allocate_slots_returns_false_and_allocates_nothing_when_short():
    kv = KVCacheManager(3, BS, None)
    other = make_sequence(1, list(range(8)))
    assert kv.allocate_slots(other, 8)  # 2 of 3 blocks
    seq = make_sequence(0, list(range(9)))
    assert not kv.allocate_slots(seq, 9)  # needs 3
    assert seq.block_table == [] and kv.pool.num_free == 1
    assert kv.allocate_slots(seq, 4)


def test_cache_computed_blocks_registers_only_full_computed_blocks():
    kv = KVCacheManager(8, BS, None)
    prompt = list(range(10))
    seq = make_sequence(0, prompt)
    _compute(kv, seq, 6)  # block 0 full, block 1 half
    assert seq.num_registered_blocks == 1
    hashes = block_hashes(prompt, BS)
    assert kv.pool.lookup(hashes[0], 0, tuple(prompt[:4])) == seq.block_table[0]
    assert kv.pool.lookup(hashes[1], hashes[0], tuple(prompt[4:8])) is None
    _compute(kv, seq, 4)
    assert seq.num_registered_blocks == 2
    assert kv.pool.lookup(hashes[1], hashes[0], tuple(prompt[4:8])) == seq.block_table[1]


def test_lookup_prefix_takes_the_cached_blocks_of_a_shared_prefix():
    kv = KVCacheManager(8, BS, None)
    table = _cached_sequence(kv, list(range(10)))
    seq = make_sequence(1, list(range(8)) + [70, 71, 72])
    assert kv.lookup_prefix(seq) == 8
    assert seq.block_table == table[:2]
    assert seq.num_prefix_hit_tokens == 8 and seq.num_computed_tokens == 8
    assert all(kv.pool.ref_count[b] == 1 for b in seq.block_table)


def test_lookup_prefix_stops_at_the_first_block_that_differs():
    kv = KVCacheManager(8, BS, None)
    table = _cached_sequence(kv, list(range(12)))
    seq = make_sequence(1, [0, 1, 2, 3, 4, 5, 99, 7, 8, 9, 10, 11, 12])  # block 1 differs, block 2 equal
    assert kv.lookup_prefix(seq) == 4
    assert seq.block_table == table[:1]


def test_lookup_prefix_of_a_fully_cached_sequence_leaves_the_last_token_to_compute():
    kv = KVCacheManager(8, BS, None)
    prompt = list(range(8))
    table = _cached_sequence(kv, prompt)
    seq = make_sequence(1, prompt)
    assert kv.lookup_prefix(seq) == 8
    assert seq.num_prefix_hit_tokens == 8
    assert seq.num_computed_tokens == 7  # the last token is recomputed for its logits
    assert seq.block_table == table
    free_before = kv.pool.num_free
    assert kv.allocate_slots(seq, 1)  # its K/V slot is already in the shared block
    assert kv.pool.num_free == free_before and seq.block_table == table


def test_prefix_lookup_is_skipped_for_prompt_logprobs_and_when_caching_is_off():
    kv = KVCacheManager(8, BS, None)
    _cached_sequence(kv, list(range(8)))
    assert kv.lookup_prefix(make_sequence(1, list(range(9)), prompt_logprobs=1)) == 0
    off = KVCacheManager(8, BS, None, enable_caching=False)
    _cached_sequence(off, list(range(8)))
    seq = make_sequence(2, list(range(9)))
    assert off.lookup_prefix(seq) == 0 and seq.block_table == []


def test_a_running_sequences_blocks_are_shared_by_a_prefix_hit():
    kv = KVCacheManager(8, BS, None)
    first = make_sequence(0, list(range(9)))
    _compute(kv, first, 9)
    second = make_sequence(1, list(range(9)))
    assert kv.lookup_prefix(second) == 8
    assert second.block_table == first.block_table[:2]
    assert [kv.pool.ref_count[b] for b in second.block_table] == [2, 2]


def test_sliding_window_release_sets_minus_one_and_frees_the_blocks():
    kv = KVCacheManager(8, BS, sliding_window=5)
    seq = make_sequence(0, list(range(20)))
    _compute(kv, seq, 12)  # blocks 0, 1, 2
    table = list(seq.block_table)
    free_before = kv.pool.num_free
    # next query at position 12 sees 8..12: blocks 0 and 1 (positions 0..7) are out of every window
    assert kv.allocate_slots(seq, 1)
    assert seq.block_table[:2] == [-1, -1] and seq.block_table[2] == table[2]
    assert len(seq.block_table) == 4
    assert kv.pool.num_free == free_before + 2 - 1
    assert kv.pool.ref_count[table[0]] == 0 and kv.pool.ref_count[table[1]] == 0


def test_sliding_window_keeps_a_block_while_any_position_in_it_is_visible():
    kv = KVCacheManager(8, BS, sliding_window=5)
    seq = make_sequence(0, list(range(20)))
    _compute(kv, seq, 8)
    assert kv.allocate_slots(seq, 1)  # query 8 sees 4..8: block 0 released, block 1 kept
    assert seq.block_table[0] == -1 and seq.block_table[1] >= 0


def test_free_after_window_release_releases_each_block_once():
    kv = KVCacheManager(6, BS, sliding_window=4)
    seq = make_sequence(0, list(range(16)))
    _compute(kv, seq, 12)
    assert kv.allocate_slots(seq, 1)
    assert -1 in seq.block_table
    kv.free(seq)
    assert kv.pool.num_free == 6 and all(c == 0 for c in kv.pool.ref_count)
    assert seq.block_table == [] and seq.num_computed_tokens == 0


def test_free_releases_tail_first_so_the_tail_is_evicted_first():
    kv = KVCacheManager(3, BS, None)
    table = _cached_sequence(kv, list(range(12)))  # three cached blocks
    assert [kv.pool.allocate() for _ in range(3)] == table[::-1]


def test_free_resets_the_sequences_cache_state():
    kv = KVCacheManager(4, BS, None)
    _cached_sequence(kv, list(range(8)))
    seq = make_sequence(1, list(range(10)))
    kv.lookup_prefix(seq)
    kv.free(seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert seq.num_prefix_hit_tokens == 0 and seq.num_registered_blocks == 0
    assert kv.pool.num_free == 4


def test_can_ever_fit_counts_blocks_of_the_whole_sequence_or_of_the_window():
    kv = KVCacheManager(4, BS, None)
    assert kv.can_ever_fit(16, 16) and not kv.can_ever_fit(17, 16)
    windowed = KVCacheManager(4, BS, sliding_window=4)
    assert windowed.can_ever_fit(1000, 8)  # window 4 + chunk 8 + one block = 16 tokens
    assert not windowed.can_ever_fit(1000, 9)


def test_usage_is_the_fraction_of_blocks_in_use():
    kv = KVCacheManager(4, BS, None)
    seq = make_sequence(0, list(range(5)))
    assert kv.usage == 0
    kv.allocate_slots(seq, 5)
    assert kv.usage == 0.5
