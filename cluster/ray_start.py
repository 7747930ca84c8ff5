"""Join a Ray cluster, or start a single-node one, the same way everywhere (CLI, benchmarks, tests).

Rule: connecting to an existing cluster (`address` given) is tried once — its errors are the
user's to see. Starting a local head is retried: on a loaded small machine a fresh head now and
then never publishes its GCS port before `ray.init`'s wait runs out (seen in CI right after a
previous cluster was torn down). The half-started cluster is shut down and started again.

A local head can be given environment variables (`head_env`): they are set while it starts, so
its raylet and every worker it spawns inherit them, and the caller's environment is restored
afterwards. A variable the caller already set wins. Joining a cluster applies none of them (its
processes have their environment already).
"""

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import ray

LOCAL_START_ATTEMPTS = 3


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True,
             head_env: Mapping[str, str] | None = None) -> None:
    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
        return
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            with _environment(head_env or {}):
                ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
            return
        except (RuntimeError, ConnectionError, TimeoutError):
            ray.shutdown()  # kills whatever the failed start left running
            if attempt == LOCAL_START_ATTEMPTS:
                raise
            time.sleep(2.0 * attempt)


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    """`env` in os.environ for the block (a variable already set keeps its value), then restored."""
    added = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
