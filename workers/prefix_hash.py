"""The identity of a KV-cache block: a chained hash of the token ids it holds.

block_hash[i] = blake2b-64(block_hash[i-1] || token ids of block i), with a fixed root. Two
sequences share block i's hash exactly when they share every token up to the end of block i, so
a hash names a whole prefix. Deterministic across processes and machines (no Python `hash`), so
the router (router/) and the engine agree on what a prefix is. Only full blocks have a hash.
"""

import hashlib
from array import array

ROOT_HASH = 0


def hash_block(parent: int, token_ids) -> int:
    digest = hashlib.blake2b(parent.to_bytes(8, "little"), digest_size=8)
    digest.update(array("q", token_ids).tobytes())
    return int.from_bytes(digest.digest(), "little")


def block_hashes(token_ids, block_size: int, parent: int = ROOT_HASH, start_block: int = 0) -> list[int]:
    """Hashes of the full blocks of `token_ids` from `start_block` on, chained from `parent`
    (the hash of block start_block-1, or ROOT_HASH)."""
    hashes = []
    for start in range(start_block * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
