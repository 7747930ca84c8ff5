"""A mixserve server started inside a benchmark's own process: Ray (a local head, the replicas' logs
kept out of the command's output), then the Serve app as `mixserve serve` would start it; both torn
down when the block ends. Used by `bench compare`'s served stages and by `bench soak`."""

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_server(settings, num_cpus: int | None = None) -> Iterator[str]:
    """settings: cluster/settings.py's ServeSettings. Yields the server's base URL.

    num_cpus: the local head's logical CPUs; default: this machine's, or more when the settings'
    replicas need more (as `mixserve serve` starts its head)."""
    import ray
    from ray import serve

    from mixserve.cluster.ray_start import init_ray
    from mixserve.cluster.serve_command import start_serve

    num_cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(settings.cpus_needed(at_most=True)))
    init_ray(num_cpus=num_cpus, log_to_driver=False, head_env=settings.local_head_env())
    try:
        yield start_serve(settings)
    finally:
        serve.shutdown()
        ray.shutdown()
