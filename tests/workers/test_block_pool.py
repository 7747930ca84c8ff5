"""workers/block_pool.py (LRU free queue, prefix-cache registration) and workers/prefix_hash.py."""

import hashlib
from array import array

import pytest

from mixserve.workers.block_pool import BlockPool
from mixserve.workers.prefix_hash import ROOT_HASH, block_hashes, hash_block


def _registered(pool: BlockPool, block: int, tag: int) -> tuple[int, int, tuple[int, ...]]:
    """Register `block` under a made-up identity; returns (hash, parent, tokens)."""
    ident = (1000 + tag, 500 + tag, (tag, tag + 1))
    pool.register(block, *ident)
    return ident


# ---------------------------------------------------------------- free queue


def test_a_fresh_pool_hands_out_blocks_in_order():
    pool = BlockPool(4)
    assert [pool.allocate() for _ in range(4)] == [0, 1, 2, 3]
    assert pool.num_free == 0 and pool.num_used == 4


def test_a_pool_needs_at_least_one_block():
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_registered_blocks_are_reused_least_recently_freed_first():
    pool = BlockPool(4)
    blocks = [pool.allocate() for _ in range(4)]
    for b in blocks:
        _registered(pool, b, b)
    for b in (2, 0, 3, 1):
        pool.release(b)
    assert [pool.allocate() for _ in range(4)] == [2, 0, 3, 1]


def test_never_registered_blocks_are_reused_before_cached_ones():
    pool = BlockPool(6)
    for _ in range(4):
        pool.allocate()  # 0..3; blocks 4, 5 never used
    _registered(pool, 0, 0)
    _registered(pool, 1, 1)
    pool.release(0)  # cached: back of the queue
    pool.release(2)  # holds nothing: front of the queue
    pool.release(1)  # cached
    pool.release(3)  # holds nothing
    assert [pool.allocate() for _ in range(6)] == [3, 2, 4, 5, 0, 1]


def test_a_block_is_in_use_while_any_reference_remains():
    pool = BlockPool(2)
    block = pool.allocate()
    ident = _registered(pool, block, 7)
    pool.touch(block)  # a second sequence shares it
    pool.release(block)
    assert pool.num_free == 1  # still held by one sequence
    pool.release(block)
    assert pool.num_free == 2
    assert pool.lookup(*ident) == block


def test_releasing_more_often_than_taken_is_an_error():
    pool = BlockPool(1)
    block = pool.allocate()
    pool.release(block)
    with pytest.raises(AssertionError):
        pool.release(block)


# ---------------------------------------------------------------- prefix cache


def test_freed_cached_block_is_reused_until_reallocated():
    pool = BlockPool(2)
    block = pool.allocate()
    ident = _registered(pool, block, 1)
    pool.release(block)
    assert pool.lookup(*ident) == block
    pool.touch(block)  # taken back from the free queue
    assert pool.num_free == 1 and pool.ref_count[block] == 1
    pool.release(block)
    assert pool.lookup(*ident) == block  # still cached after a second free


def test_allocation_evicts_the_registration_of_the_block_it_reuses():
    pool = BlockPool(1)
    block = pool.allocate()
    ident = _registered(pool, block, 1)
    pool.release(block)
    assert pool.allocate() == block
    assert pool.lookup(*ident) is None
    assert pool.identity[block] is None and not pool.by_hash


def test_lookup_verifies_parent_hash_and_token_ids():
    pool = BlockPool(2)
    block = pool.allocate()
    block_hash, parent, tokens = _registered(pool, block, 3)
    assert pool.lookup(block_hash, parent, tokens) == block
    assert pool.lookup(block_hash, parent + 1, tokens) is None  # a colliding hash under another parent
    assert pool.lookup(block_hash, parent, tokens + (9,)) is None  # a colliding hash of other tokens
    assert pool.lookup(block_hash + 1, parent, tokens) is None


def test_first_registration_of_a_hash_wins():
    pool = BlockPool(2)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, 42, ROOT_HASH, (1, 2))
    pool.register(b, 42, ROOT_HASH, (1, 2))
    assert pool.lookup(42, ROOT_HASH, (1, 2)) == a
    assert pool.identity[b] is None


def test_a_block_keeps_its_first_identity():
    pool = BlockPool(1)
    block = pool.allocate()
    pool.register(block, 1, ROOT_HASH, (1,))
    pool.register(block, 2, ROOT_HASH, (2,))
    assert pool.lookup(1, ROOT_HASH, (1,)) == block
    assert pool.lookup(2, ROOT_HASH, (2,)) is None


def test_with_caching_disabled_nothing_is_registered_or_found():
    pool = BlockPool(2, enable_caching=False)
    block = pool.allocate()
    pool.register(block, 5, ROOT_HASH, (1,))
    pool.release(block)
    assert pool.lookup(5, ROOT_HASH, (1,)) is None and not pool.by_hash


def test_reset_prefix_cache_forgets_free_blocks_but_not_used_ones():
    pool = BlockPool(3)
    used, freed = pool.allocate(), pool.allocate()
    used_ident = _registered(pool, used, 1)
    freed_ident = _registered(pool, freed, 2)
    pool.release(freed)
    pool.reset_prefix_cache()
    assert pool.lookup(*freed_ident) is None
    assert pool.lookup(*used_ident) == used
    assert pool.num_free == 2
    pool.release(used)
    assert pool.lookup(*used_ident) == used  # its registration survived the reset


# ---------------------------------------------------------------- prefix hashes


def test_block_hash_is_blake2b_of_parent_and_token_ids():
    digest = hashlib.blake2b((7).to_bytes(8, "little"), digest_size=8)
    digest.update(array("q", [1, 2, 3]).tobytes())
    assert hash_block(7, [1, 2, 3]) == int.from_bytes(digest.digest(), "little")


def test_only_full_blocks_have_hashes_and_each_chains_from_the_previous():
    tokens = list(range(11))
    hashes = block_hashes(tokens, 4)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(ROOT_HASH, tokens[:4])
    assert hashes[1] == hash_block(hashes[0], tokens[4:8])


def test_hashes_continue_from_a_start_block():
    tokens = list(range(20))
    full = block_hashes(tokens, 4)
    assert block_hashes(tokens, 4, parent=full[1], start_block=2) == full[2:]


def test_a_hash_names_the_whole_prefix():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)  # same second block, different first
    assert a[1] != b[1]
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4) == a  # deterministic
