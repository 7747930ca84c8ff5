"""mixserve.router."""
