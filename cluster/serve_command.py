"""`mixserve serve`: join (or start) a Ray cluster, deploy the app, serve until SIGINT/SIGTERM.

Stop rule: the first SIGINT or SIGTERM drains the app (cluster/drain.py: new requests get 503 while
every request in flight runs to its end, at most graceful_shutdown_timeout_s); a second one stops
waiting. Then Serve is shut down (skipped on a local head whose drain was cut: stopping the head ends
everything at once, where Serve would give the replicas their own grace again) and Ray: a local head
this command started stops with all its processes; a joined cluster keeps running.
"""

import math
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Callable

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from mixserve.workers.model_source import resolve_model as resolve_source
from mixserve.workers.ports import free_port

from .app import build_app, cluster_node_cpus, resolve_model
from .drain import drain_app
from .ray_start import init_ray
from .serve_config import APP_NAME, GRPC_SERVICER, LLM_DEPLOYMENT
from .settings import ServeSettings


def start_serve(settings: ServeSettings, on_ray_up: Callable[[], None] | None = None) -> str:
    """Deploy and wait until /health answers; returns the base URL. `on_ray_up()`, if given, runs as
    soon as Ray is up (ray.init has put its own signal handlers in place)."""
    # Resolved once here (a hub id downloads with a progress bar): a model that cannot be had or cannot
    # fit fails before Ray starts, and the replicas on this node then find it in the hub cache.
    settings = report_sizing(settings.with_absolute_paths(),
                             resolve_source(resolve_model(settings), show_progress=True))
    init_ray_for(settings)
    settings = serving_settings(settings)
    print(f"engine threads: {settings.engine_threads()} per {'replica' if settings.tensor_parallel_size == 1 else 'rank'}"
          f" ({settings.replica_cpus:g} CPUs per replica" + (f", {settings.rank_cpus:g} per rank"
          if settings.tensor_parallel_size > 1 else "") + ")", flush=True)
    if on_ray_up is not None:
        on_ray_up()
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
        # The ingress holds --port itself and nothing needs Serve's proxy: none is started (an idle
        # proxy actor wakes ~100 times a second, time taken from the engine's threads on a small machine).
        serve.start(proxy_location="Disabled")
    else:
        if settings.direct_http:  # the ingress holds --port itself; Serve's proxy (gRPC only) moves aside
            http = HTTPOptions(host="127.0.0.1", port=free_port())
        else:
            http = HTTPOptions(host=settings.host, port=settings.port)
        serve.start(http_options=http, grpc_options=grpc)
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{settings.host}:{settings.port}"
    wait_until_healthy(url)
    return url


def serving_settings(settings: ServeSettings) -> ServeSettings:
    """The settings `start_serve` deploys (Ray up): local paths absolute, the ingress holding the port
    unless told otherwise, CPUs left to the default decided for this machine when it is the whole
    cluster, else for the cluster's nodes. Idempotent: redeploying its result changes nothing."""
    settings = settings.with_absolute_paths()
    if settings.direct_http is None:
        settings = settings.model_copy(update={"direct_http": True})
    if settings.address is None:
        return settings.with_cpus_for(os.cpu_count() or 1)
    return settings.with_cpus_for(*cluster_node_cpus())


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


class StopSignals:
    """SIGINT and SIGTERM, counted: the first asks to stop, the second to stop waiting. The handler
    only appends to a list (a signal handler that takes a lock can deadlock the thread it interrupts);
    `wait` polls."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: list[str] = []

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.received.append(signal.Signals(signum).name)

    def wait(self, period_s: float = 0.5) -> str:
        """Block until the first signal; its name."""
        while not self.received:
            time.sleep(period_s)
        return self.received[0]

    def cut_short(self) -> bool:
        return len(self.received) > 1


def _say(line: str) -> None:
    print(line, flush=True)


def run_serve(settings: ServeSettings) -> int:
    signals = StopSignals()
    signals.install()  # a signal while starting is kept: the app is drained (empty) and stopped once up
    # again once Ray is up: ray.init puts its own SIGTERM handlers in place (Python's sys.exit, the core
    # worker's crash handler), which would end the process without a drain
    url = start_serve(settings, on_ray_up=signals.install)
    try:
        from mixserve.workers.engine import describe_kernels

        report = serve.get_deployment_handle(LLM_DEPLOYMENT, APP_NAME).kernel_report.remote().result(timeout_s=60)
        _say(f"engine: {describe_kernels(report)}")
    except Exception as exc:  # the report is informative only; serving goes on
        _say(f"engine: kernel report unavailable ({type(exc).__name__}: {exc})")
    _say(f"mixserve is serving on {url} (OpenAI API under /v1; Ctrl-C or SIGTERM drains and stops)")
    name = signals.wait()
    _say(f"{name}: draining, then stopping (a second SIGINT/SIGTERM stops waiting)")
    stop_serving(settings, signals)
    return 0


def stop_serving(settings: ServeSettings, signals: StopSignals) -> None:
    """The stop rule (module docstring), logged."""
    try:
        report = drain_app(settings.graceful_shutdown_timeout_s, APP_NAME, signals.cut_short, _say)
    except Exception as exc:  # Serve could not be asked: stop all the same
        _say(f"drain failed ({type(exc).__name__}: {exc}); stopping without it")
        report = None
    drained = report is not None and report.complete
    if drained:
        _say(f"drained {report.requests} request(s) in {report.seconds:.1f} s")
    elif report is not None:
        why = "a second signal" if signals.cut_short() else f"the {settings.graceful_shutdown_timeout_s:g} s bound"
        _say(f"stopped waiting after {report.seconds:.1f} s ({why}); {report.left} request(s)/sequence(s) still in "
             "flight are cut")
    started = time.monotonic()
    joined = settings.address is not None
    if joined or drained:
        serve.shutdown()
    ray.shutdown()
    _say(f"stopped in {time.monotonic() - started:.1f} s; "
         + ("the Ray cluster keeps running" if joined else "the local Ray head is stopped"))
