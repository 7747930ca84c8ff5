"""`mixserve serve`: join (or start) a Ray cluster, deploy the app, serve until SIGINT/SIGTERM."""

import math
import os
import signal
import sys
import threading
import time
import urllib.request

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from mixserve.workers.model_source import resolve_model as resolve_source
from mixserve.workers.ports import free_port

from .app import build_app, resolve_model
from .ray_start import init_ray
from .settings import ServeSettings

APP_NAME = "mixserve"
GRPC_SERVICER = "mixserve.router.generate_pb2_grpc.add_GenerateServiceServicer_to_server"


def start_serve(settings: ServeSettings) -> str:
    """Deploy and wait until /health answers; returns the base URL."""
    # Resolved once here (a hub id downloads with a progress bar): a model that cannot be had or cannot
    # fit fails before Ray starts, and the replicas on this node then find it in the hub cache.
    settings = settings.with_absolute_paths()
    settings = report_sizing(settings, resolve_source(resolve_model(settings), show_progress=True))
    init_ray_for(settings)
    needed, at_most = settings.cpus_needed(), settings.cpus_needed(at_most=True)
    have = ray.cluster_resources().get("CPU", 0.0)
    if have < needed:
        print(f"warning: the app asks for {needed:g} CPUs, the Ray cluster has {have:g}; replicas stay pending "
              "until nodes join (or lower --replicas / --replica-cpus / --rank-cpus)", file=sys.stderr, flush=True)
    elif have < at_most:
        print(f"warning: autoscaling up to {settings.max_replicas} replicas needs {at_most:g} CPUs, the Ray cluster "
              f"has {have:g}; replicas beyond that stay pending until nodes join (or lower --max-replicas / "
              "--replica-cpus)", file=sys.stderr, flush=True)
    grpc = None
    if settings.grpc_port:
        grpc = gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=[GRPC_SERVICER])
    if settings.direct_http and grpc is None:
        # The replica holds --port itself and nothing needs Serve's proxy: none is started. Measured on
        # CPU class [avx2 avx512_bf16 avx512f], 2 cores: an idle proxy actor wakes ~100x/s, and with it
        # (and the controller at 0.1 s) a batch-32 decode step of a plain process beside the idle app took
        # ~80 ms instead of ~65; served throughput rose ~9% without it (and the controller at 0.5 s).
        serve.start(proxy_location="Disabled")
    else:
        if settings.direct_http:  # the replica holds --port itself; Serve's proxy (gRPC only) moves aside
            http = HTTPOptions(host="127.0.0.1", port=free_port())
        else:
            http = HTTPOptions(host=settings.host, port=settings.port)
        serve.start(http_options=http, grpc_options=grpc)
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{settings.host}:{settings.port}"
    wait_until_healthy(url)
    return url


def init_ray_for(settings: ServeSettings, *, num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Join settings.address, or start a local head with the settings' environment and, unless
    `num_cpus` says otherwise, at least the logical CPUs the app may ask for, every replica
    autoscaling may add included (Ray CPUs are scheduling units; torch threads are set by --threads),
    so `--replica-cpus 2` or `--max-replicas 3` on a 2-core laptop still starts and scales."""
    num_cpus = num_cpus or max(os.cpu_count() or 1, math.ceil(settings.cpus_needed(at_most=True)))
    init_ray(settings.address, num_cpus=num_cpus, log_to_driver=log_to_driver, head_env=settings.local_head_env())


def report_sizing(settings: ServeSettings, model_path) -> ServeSettings:
    """Print what the model at `model_path` (resolved) needs; on a local CPU head refuse a deployment
    this machine cannot hold. Returns the settings with the KV cache sized from memory when
    kv_cache_memory_fraction asks for it."""
    from mixserve.workers.config import load_model_config

    from .sizing import check_fits, kv_cache_bytes_from_memory, size_deployment

    config = load_model_config(model_path)
    if settings.kv_cache_memory_fraction is not None:
        settings = settings.model_copy(update={"kv_cache_bytes": kv_cache_bytes_from_memory(settings, config)})
    sizing = size_deployment(settings, config)
    for line in sizing.lines():
        print(line, flush=True)
    if settings.address is None and settings.device == "cpu":
        check_fits(sizing)
    return settings


def wait_until_healthy(url: str, timeout_s: float = 600.0, check_alive=None) -> None:
    """Poll `url`/health until it answers 200. `check_alive()`, if given, runs before each try and
    raises when the server being waited for has died; TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check_alive is not None:
            check_alive()
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer within {timeout_s:.0f} s")


def run_serve(settings: ServeSettings) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    url = start_serve(settings)
    try:
        from mixserve.workers.engine import describe_kernels

        report = serve.get_deployment_handle("LLMServer", APP_NAME).kernel_report.remote().result(timeout_s=60)
        print(f"engine: {describe_kernels(report)}", flush=True)
    except Exception as exc:  # the report is informative only; serving goes on
        print(f"engine: kernel report unavailable ({type(exc).__name__}: {exc})", flush=True)
    print(f"mixserve is serving on {url} (OpenAI API under /v1; Ctrl-C stops)", flush=True)
    stop.wait()
    print("shutting down", flush=True)
    serve.shutdown()
    ray.shutdown()
    return 0
