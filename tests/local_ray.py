"""One way for the tests to start and stop a single-node Ray cluster in the test process.

On a loaded 2-core machine a fresh Ray head occasionally never publishes its GCS port (the
GCS process gets no CPU before `ray.init`'s wait runs out, right after the previous module's
cluster was torn down). That is the machine, not mixserve, so `start_local_ray` tears the
half-started cluster down and tries again instead of failing every test of the module.
"""

import time

import ray

ATTEMPTS = 3


def start_local_ray(num_cpus: int = 4) -> None:
    if ray.is_initialized():
        return
    for attempt in range(1, ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except (RuntimeError, ConnectionError, TimeoutError):
            ray.shutdown()  # kills whatever the failed start left running
            if attempt == ATTEMPTS:
                raise
            time.sleep(2.0 * attempt)


def stop_local_ray() -> None:
    ray.shutdown()
