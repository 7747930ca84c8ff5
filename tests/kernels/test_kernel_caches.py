"""oneDNN's shape caches get mixserve's cap unless the user sized them (kernels/kernel_caches.py)."""

import os

from mixserve.kernels.kernel_caches import KERNEL_CACHE_ENTRIES, cap_kernel_caches


def test_caps_both_caches_and_keeps_what_the_user_set(monkeypatch):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    cap_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(KERNEL_CACHE_ENTRIES)
    assert os.environ["LRU_CACHE_CAPACITY"] == "64"
