"""Bounds on oneDNN's shape caches, so that a server's memory stops growing early.

oneDNN (bfloat16 and packed linears on CPU) compiles a kernel for every distinct (rows, weight
shape) it sees and keeps it in two LRU caches: its own primitive cache and ideep's. Each entry holds
~0.35 MiB of generated code whatever the weight's size (measured on CPU class [avx2 avx512_bf16
avx512f], 1024x256 and 4096x1024 bf16 weights alike). A server sees a new row count with nearly every
new mix of prompt lengths in a step, so at their default 1024 entries each the caches add ~700 MiB to
a replica over its first hours, which looks like a leak. Rule: cap each at KERNEL_CACHE_ENTRIES
(~120 MiB for both), far above one step's working set (a few shapes per layer kind, one row count
per expert); a new row count costs ~0.6 ms of compilation once. Both caches read their size from
the environment at their first use, so `cap_kernel_caches` must run before the process's first
oneDNN matmul; a value the user set in the environment wins.
"""

import os

KERNEL_CACHE_ENTRIES = 256
_CACHE_SIZE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's


def cap_kernel_caches(entries: int = KERNEL_CACHE_ENTRIES) -> None:
    for name in _CACHE_SIZE_VARIABLES:
        os.environ.setdefault(name, str(entries))
