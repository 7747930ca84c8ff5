"""mixserve.cluster."""
