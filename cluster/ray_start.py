"""Join a Ray cluster, or start a single-node one, the same way everywhere (CLI, benchmarks, tests).

Rule: connecting to an existing cluster (`address` given) is tried once — its errors are the
user's to see. Starting a local head is retried: on a loaded small machine a fresh head now and
then never publishes its GCS port before `ray.init`'s wait runs out (seen in CI right after a
previous cluster was torn down). The half-started cluster is shut down and started again. A local
head is always a new one (`address="local"`): a cluster file another Ray left behind
(/tmp/ray/ray_current_cluster) is never joined by mistake.

Working directory rule: Ray puts the driver's working directory at the front of every worker's
`sys.path`, and a local head's processes start in it. A working directory holding a folder named
like an installed package (a mixserve checkout's `kernels/` beside Hugging Face's `kernels`, which
transformers imports) would shadow that package in every worker. So `ray.init` runs from an empty
directory of its own; callers pass paths to Ray processes absolute (ServeSettings.with_absolute_paths).

A local head can be given environment variables (`head_env`): they are set while it starts, so
its raylet and every worker it spawns inherit them, and the caller's environment is restored
afterwards. A variable the caller already set wins. Joining a cluster applies none of them (its
processes have their environment already).
"""

import os
import tempfile
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
        with _working_directory(ray_working_directory()):
            ray.init(address=address, include_dashboard=False, log_to_driver=log_to_driver)
        return
    for attempt in range(1, LOCAL_START_ATTEMPTS + 1):
        try:
            with _environment(head_env or {}), _working_directory(ray_working_directory()):
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
            return
        except (RuntimeError, ConnectionError, TimeoutError):
            ray.shutdown()  # kills whatever the failed start left running
            if attempt == LOCAL_START_ATTEMPTS:
                raise
            time.sleep(2.0 * attempt)


def ray_working_directory() -> str:
    """An empty directory only this user can write to: the working directory Ray's processes start
    in and the entry Ray adds to their import path (created once per user)."""
    path = os.path.join(tempfile.gettempdir(), f"mixserve-ray-cwd-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.getuid() or st.st_mode & 0o077 or not os.path.isdir(path) or os.listdir(path):
        return tempfile.mkdtemp(prefix="mixserve-ray-cwd-")  # someone else's, or not empty: a fresh one
    return path


@contextmanager
def _working_directory(path: str) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


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
