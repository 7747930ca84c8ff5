"""Per-sequence KV-cache bookkeeping on top of the block pool (vLLM v1's KV cache manager).

- Block tables are append-only, except that a block wholly outside the sliding window of every
  future query is released and its entry set to -1.
- Prefix lookup walks the sequence's full blocks while the pool holds each one; the hit is capped
  so that at least the last token is recomputed (its logits give the next token). When the whole
  sequence hits, the last token's K/V is already in a shared cached block: the runner recomputes
  the token but does not write it (positions below `num_prefix_hit_tokens` are never written).
- A block becomes cacheable once every position in it has its K/V written.
"""

from .block_pool import BlockPool
from .prefix_hash import ROOT_HASH, block_hashes
from .sequence import Sequence


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, sliding_window: int | None, enable_caching: bool = True):
        self.pool = BlockPool(num_blocks, enable_caching)
        self.block_size = block_size
        self.sliding_window = sliding_window

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    def _update_hashes(self, seq: Sequence) -> None:
        full = seq.num_tokens // self.block_size
        if len(seq.block_hashes) < full:
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            seq.block_hashes += block_hashes(seq.token_ids, self.block_size, parent, len(seq.block_hashes))

    def lookup_prefix(self, seq: Sequence) -> int:
        """Take the cached blocks of the sequence's longest cached prefix; returns tokens hit.
        Only for a sequence holding no blocks."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.pool.enable_caching or seq.params.prompt_logprobs is not None:
            return 0
        self._update_hashes(seq)
        bs = self.block_size
        parent = ROOT_HASH
        for i, block_hash in enumerate(seq.block_hashes):
            block = self.pool.lookup(block_hash, parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            if block is None:
                break
            self.pool.touch(block)
            seq.block_table.append(block)
            parent = block_hash
        hit = len(seq.block_table) * bs
        seq.num_prefix_hit_tokens = hit
        seq.num_registered_blocks = len(seq.block_table)
        seq.num_computed_tokens = min(hit, seq.num_tokens - 1)
        return hit

    def release_out_of_window(self, seq: Sequence) -> None:
        """Free blocks no query at or after position num_computed_tokens can see."""
        if self.sliding_window is None:
            return
        first_visible = seq.num_computed_tokens - self.sliding_window + 1
        for i in range(max(0, first_visible) // self.block_size):
            if seq.block_table[i] >= 0:
                self.pool.release(seq.block_table[i])
                seq.block_table[i] = -1

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for the next `num_new_tokens` of the sequence; False (nothing changed but
        window releases) when the pool has too few free blocks."""
        self.release_out_of_window(seq)
        needed = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(seq.block_table)
        if needed > self.pool.num_free:
            return False
        seq.block_table += [self.pool.allocate() for _ in range(max(0, needed))]
        return True

    def can_ever_fit(self, num_tokens: int, chunk_tokens: int) -> bool:
        """Whether a sequence of num_tokens could run with the whole pool to itself."""
        span = num_tokens
        if self.sliding_window is not None:
            span = min(span, self.sliding_window + chunk_tokens + self.block_size)
        return -(-span // self.block_size) <= self.pool.num_blocks

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks whose K/V are now complete."""
        if not self.pool.enable_caching:
            return
        self._update_hashes(seq)
        bs = self.block_size
        complete = min(seq.num_computed_tokens // bs, len(seq.block_hashes))
        for i in range(seq.num_registered_blocks, complete):
            block = seq.block_table[i]
            if block >= 0:
                parent = seq.block_hashes[i - 1] if i else ROOT_HASH
                self.pool.register(block, seq.block_hashes[i], parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
        seq.num_registered_blocks = max(seq.num_registered_blocks, complete)

    def free(self, seq: Sequence) -> None:
        """Release all of a sequence's blocks, tail first so the tail is evicted first."""
        for block in reversed(seq.block_table):
            if block >= 0:
                self.pool.release(block)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_prefix_hit_tokens = 0
        seq.num_registered_blocks = 0
