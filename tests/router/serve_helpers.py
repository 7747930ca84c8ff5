"""Start mixserve's real Serve application on loopback for the serving tests."""

import time

import ray
from ray import serve

from mixserve.cluster.serve_command import init_ray_for, serving_settings, start_serve
from mixserve.cluster.settings import ServeSettings
from mixserve.workers.ports import free_port


def start(checkpoint, **overrides) -> tuple[str, ServeSettings]:
    settings = ServeSettings(**{
        "model": str(checkpoint), "port": free_port(), "dtype": "float32", "max_model_len": 512,
        "kv_cache_bytes": 32 << 20, "replica_cpus": 1.0, "routing_stats_period_s": 0.5, **overrides,
    })
    init_ray_for(settings, num_cpus=4, log_to_driver=False)  # the head's environment as `mixserve serve` gives it
    settings = serving_settings(settings)  # as deployed: a redeploy of a copy changes only what the copy changes
    return start_serve(settings), settings


def stop() -> None:
    serve.shutdown()
    ray.shutdown()


def llm_stats(app: str = "mixserve") -> dict:
    return serve.get_deployment_handle("LLMServer", app_name=app).stats.remote().result()


def wait_until_idle(timeout_s: float = 30.0, period_s: float = 0.25):
    """The LLM server's ReplicaLoad once it is idle (nothing running or waiting, no KV block in use),
    or its last load after `timeout_s`; the caller asserts `.idle`."""
    deadline = time.monotonic() + timeout_s
    while not (load := llm_stats()["load"]).idle and time.monotonic() < deadline:
        time.sleep(period_s)
    return load
