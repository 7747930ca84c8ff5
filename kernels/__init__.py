"""Pure tensor operations (no Ray, no engine state).

Each op is a readable PyTorch reference that runs on any device; a faster device version
(packed oneDNN weights on CPU today, Triton/CUDA later) is a drop-in selected by device and
checked against the reference in tests/kernels.

Shape legend used in this package:
    T = tokens in the step (all sequences flattened), B = sequences, D = hidden size,
    H = query heads, K = KV heads, Dh = head dim, E = experts, I = expert intermediate size,
    V = vocabulary, S = cache slots (blocks x block size), L = keys attended to.
"""
