"""Join a Ray cluster, or start a single-node one, the same way everywhere (CLI, benchmarks, tests).

Rule: connecting to an existing cluster (`address` given) is tried once — its errors are the
user's to see. Starting a local head is retried: on a loaded small machine a fresh head now and
then never publishes its GCS port before `ray.init`'s wait runs out (seen in CI right after a
previous cluster was torn down). The half-started cluster is shut down and started again.
"""

import time

import ray

LOCAL_START_ATTEMPTS = 3


def init_ray(address: str | None = None, *, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    if ray.is_initialized():
        return
    if address is not None:
        ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
        return
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
            return
        except (RuntimeError, ConnectionError, TimeoutError):
            ray.shutdown()  # kills whatever the failed start left running
            if attempt == LOCAL_START_ATTEMPTS:
                raise
            time.sleep(2.0 * attempt)
