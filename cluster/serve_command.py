"""`mixserve serve`: join (or start) a Ray cluster, deploy the app, serve until SIGINT/SIGTERM."""

import signal
import threading
import time
import urllib.request

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from .app import build_app
from .settings import ServeSettings

APP_NAME = "mixserve"
GRPC_SERVICER = "mixserve.router.generate_pb2_grpc.add_GenerateServiceServicer_to_server"


def start_serve(settings: ServeSettings) -> str:
    """Deploy and wait until /health answers; returns the base URL."""
    if not ray.is_initialized():
        ray.init(address=settings.address, include_dashboard=False, log_to_driver=True)
    grpc = None
    if settings.grpc_port:
        grpc = gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])
    serve.start(http_options=HTTPOptions(host=settings.host, port=settings.port), grpc_options=grpc)
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{settings.host}:{settings.port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return url
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within 600 s")


def run_serve(settings: ServeSettings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = start_serve(settings)
    print(f"mixserve is serving on {url} (OpenAI API under /v1; Ctrl-C stops)", flush=True)
    stop.wait()
    print("shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
