"""A mixserve server started inside a benchmark's own process: Ray (a local head, the replicas' logs
kept out of the command's output), then the Serve app as `mixserve serve` would start it; both torn
down when the block ends. Used by the comparison's served stages (stages.py) and by the soak (soak.py)."""

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def local_server(settings, num_cpus: int | None = None) -> Iterator[str]:
    """settings: cluster/settings.py's ServeSettings. Yields the server's base URL.

    num_cpus: the local head's logical CPUs; default: as `mixserve serve` starts its head."""
    import ray
    from ray import serve

    from mixserve.cluster.serve_command import init_ray_for, start_serve

    init_ray_for(settings, num_cpus=num_cpus, log_to_driver=False)
    try:
        yield start_serve(settings)
    finally:
        serve.shutdown()
        ray.shutdown()
