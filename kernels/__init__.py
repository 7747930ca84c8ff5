"""mixserve.kernels."""
