"""mixserve.workers."""
