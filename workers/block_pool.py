"""The pool of KV-cache blocks, with automatic prefix caching (ports vLLM v1's block pool).

Rules:
- A block is in use while its reference count is > 0. Unreferenced blocks wait in a free queue
  ordered least-recently-freed first; allocation takes from the front.
- A full block of a sequence is registered under its chained prefix hash (workers/prefix_hash.py).
  When freed it keeps its contents and registration, so a later request with the same prefix can
  take it back ("touch") until allocation reuses it; reuse evicts the registration (LRU eviction).
- A lookup hit is verified against the stored parent hash and token ids, so a hash collision can
  never hand out the wrong KV.
- Blocks that were never registered hold nothing reusable and go to the front of the free queue.
"""

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class CachedIdentity:
    block_hash: int
    parent_hash: int
    token_ids: tuple[int, ...]


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_count = [0] * num_blocks
        self.identity: list[CachedIdentity | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.by_hash: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> int:
        """Take the least recently freed block; evict whatever prefix it cached."""
        block, _ = self.free_queue.popitem(last=False)
        ident = self.identity[block]
        if ident is not None:
            del self.by_hash[ident.block_hash]
            self.identity[block] = None
        self.ref_count[block] = 1
        return block

    def lookup(self, block_hash: int, parent_hash: int, token_ids: tuple[int, ...]) -> int | None:
        """The cached block holding exactly this prefix block, or None."""
        if not self.enable_caching:
            return None
        block = self.by_hash.get(block_hash)
        if block is None:
            return None
        ident = self.identity[block]
        if ident.parent_hash != parent_hash or ident.token_ids != token_ids:
            return None
        return block

    def touch(self, block: int) -> None:
        """Take a reference on a cached block (removing it from the free queue if unused)."""
        if self.ref_count[block] == 0:
            del self.free_queue[block]
        self.ref_count[block] += 1

    def register(self, block: int, block_hash: int, parent_hash: int, token_ids: tuple[int, ...]) -> None:
        """Record that a full block holds this prefix block (first writer wins)."""
        if self.enable_caching and block_hash not in self.by_hash and self.identity[block] is None:
            self.by_hash[block_hash] = block
            self.identity[block] = CachedIdentity(block_hash, parent_hash, token_ids)

    def release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} released more often than taken"
        if self.ref_count[block] == 0:
            self.free_queue[block] = None
            if self.identity[block] is None:
                self.free_queue.move_to_end(block, last=False)

    def reset_prefix_cache(self) -> None:
        """Forget every unreferenced cached block (used blocks keep their registration)."""
        for block in list(self.free_queue):
            ident = self.identity[block]
            if ident is not None:
                del self.by_hash[ident.block_hash]
                self.identity[block] = None
