"""Start mixserve's real Serve application on loopback for the serving tests."""

import socket

from ray import serve

from mixserve.cluster.serve_command import start_serve
from mixserve.cluster.settings import ServeSettings
from tests.local_ray import start_local_ray, stop_local_ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(checkpoint, **overrides) -> tuple[str, ServeSettings]:
    settings = ServeSettings(**{
        "model": str(checkpoint), "port": free_port(), "dtype": "float32", "max_model_len": 512,
        "kv_cache_bytes": 32 << 20, "replica_cpus": 1.0, "routing_stats_period_s": 0.5, **overrides,
    })
    start_local_ray()
    return start_serve(settings), settings


def stop() -> None:
    serve.shutdown()
    stop_local_ray()


def llm_stats(app: str = "mixserve") -> dict:
    return serve.get_deployment_handle("LLMServer", app_name=app).stats.remote().result()
