"""Every knob of a mixserve deployment, in one pydantic model.

The single source for the CLI flags (`mixserve serve`), the Serve application builder's
arguments (`import_path: mixserve.cluster.app:app_builder`, `args:` in a Serve config) and the
deployment manifests. Values flow down from here explicitly, as typed objects (`engine_config`:
workers' EngineConfig, `ingress_options`: the ingress's IngressOptions); engine defaults come from
EngineConfig itself. Nothing below reads the environment.

Keys rule: the API key and the admin key are secrets. They come from the environment
($MIXSERVE_API_KEY, $MIXSERVE_ADMIN_KEY, e.g. Kubernetes Secrets) or a file (--api-key-file,
--admin-key-file), never from a command line (Ray records the driver's command line as its job's
entrypoint; `ps` shows it) nor a Serve config (`serve config` and the dashboard show it). Here they
are SecretStr (a repr shows stars), and a validation error never echoes the inputs.
"""

import math
import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

from mixserve.kernels.quantize import INT4_GROUP_SIZES
from mixserve.workers.calibration import check_calibration_source
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.placement_plan import PlacementPlan

API_KEY_ENV = "MIXSERVE_API_KEY"
ADMIN_KEY_ENV = "MIXSERVE_ADMIN_KEY"
KEY_FIELDS = {"api_key": API_KEY_ENV, "admin_key": ADMIN_KEY_ENV}  # settings field -> its environment variable
_ENGINE = EngineConfig(model="")  # the engine's defaults, which the settings below reuse


def api_key_from_environment() -> str | None:
    """The API key from $MIXSERVE_API_KEY (e.g. a Kubernetes Secret), for the entry points that read
    the environment: the CLI and the Serve config builder."""
    return os.environ.get(API_KEY_ENV) or None


def keys_from_environment() -> dict[str, str]:
    """The keys set in the environment, by settings field (api_key, admin_key)."""
    return {field: os.environ[env] for field, env in KEY_FIELDS.items() if os.environ.get(env)}


def read_key_file(path: str) -> str:
    """A key file's content, stripped of surrounding whitespace. ValueError (naming the file, never
    its content) when it cannot be read, is empty, or holds more than one line."""
    try:
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the key file {path}: {type(exc).__name__}") from None
    if not key or "\n" in key:
        raise ValueError(f"the key file {path} must hold one line: the key")
    return key


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    # model
    model: str | None = Field(None, description="checkpoint folder; None = the embedded demo model")
    served_model_name: str | None = Field(None, description="name clients send as `model` (default: folder name)")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        _ENGINE.dtype, description="auto: the checkpoint's dtype, or float32 for a 16-bit checkpoint on a CPU without "
        "native bf16 math when it fits in memory")
    linear_kernel: Literal["auto", "reference", "onednn"] = Field(
        _ENGINE.linear_kernel,
        description="auto: the fastest kernel this machine runs, timed per weight shape at load")
    quantization: Literal["none", "int8", "int4"] = Field(
        _ENGINE.quantization,
        description="weight-only quantization of the attention and expert/MLP weights at load")
    quantization_group_size: int = Field(
        _ENGINE.quantization_group_size, description="int4: input columns per scale (32, 64, 128 or 256; 32 keeps "
        "a GGUF file's Q4_0/Q4_1 blocks exactly, without going through float)")
    quantize_lm_head: bool = Field(_ENGINE.quantize_lm_head,
                                   description="quantize the LM head too (the embedding stays)")
    quantization_calibration: str = Field(
        _ENGINE.quantization_calibration, description="none: round each weight as it is; builtin (English docstrings "
        "of the Python standard library) or the path of a UTF-8 text file present on every node: observe the model "
        "on 2048 tokens of it first and scale each input channel by its activations before rounding (AWQ-style; "
        "load takes longer)")
    device: Literal["cpu", "cuda"] = _ENGINE.device
    # engine, per replica
    tensor_parallel_size: int = Field(_ENGINE.tensor_parallel_size, ge=1)
    expert_parallel: bool = Field(_ENGINE.expert_parallel,
                                  description="split MoE layers by whole experts across the ranks")
    max_model_len: int | None = Field(_ENGINE.max_model_len, ge=2)
    max_num_seqs: int = Field(_ENGINE.max_num_seqs, ge=1)
    max_num_batched_tokens: int = Field(_ENGINE.max_num_batched_tokens, ge=16)
    block_size: int = Field(_ENGINE.block_size, ge=1)
    kv_cache_bytes: int = Field(_ENGINE.kv_cache_bytes, ge=1 << 20, description="KV cache memory per rank")
    kv_cache_memory_fraction: float | None = Field(
        None, gt=0, le=1, description="size the KV cache from memory instead (vLLM's --gpu-memory-utilization): "
        "this fraction of the memory available at start, less the weights (after quantization), shared by the "
        "ranks; at most what max_num_seqs full-length sequences need; replaces kv_cache_bytes")
    enable_prefix_caching: bool = _ENGINE.enable_prefix_caching
    threads: int | None = Field(None, ge=1, description="torch threads per engine process (default: the CPUs the "
                                "replica, or with tensor parallelism each rank, was given)")
    # replicas and resources
    replicas: int = Field(1, ge=1)
    min_replicas: int | None = Field(None, ge=0, description="set with max_replicas to autoscale")
    max_replicas: int | None = Field(None, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0, description="autoscaling: load must stay high this long before a "
                                   "replica is added (Serve's default)")
    downscale_delay_s: float = Field(600.0, ge=0, description="autoscaling: load must stay low this long before a "
                                     "replica is removed (Serve's default)")
    autoscaling_look_back_s: float = Field(30.0, gt=0, description="autoscaling: the window the load is averaged "
                                           "over (Serve's default)")
    replica_cpus: float | None = Field(
        None, gt=0, description="CPUs of an LLM-server replica actor (its torch threads, without tensor parallelism); "
        "default: a node's CPUs shared by the replicas that may run on it (max_replicas when autoscaling), at least "
        "1; with tensor parallelism 1 (the ranks compute)")
    rank_cpus: float | None = Field(
        None, gt=0, description="CPUs of one tensor-parallel rank actor (its torch threads); default: a node's CPUs "
        "shared by the ranks that may run on it, at least 1")
    rank_gpus: float = Field(_ENGINE.placement.rank_gpus, ge=0, description="GPUs of one tensor-parallel rank actor")
    ingress_cpus: float = Field(0.1, gt=0)
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP/gRPC ingress")
    health_check_period_s: float = Field(5.0, gt=0, description="how often Serve checks each LLM-server replica")
    health_check_timeout_s: float = Field(60.0, gt=0, description="a replica whose check takes longer is replaced")
    graceful_shutdown_timeout_s: float = Field(
        120.0, ge=0, description="a replica being removed (scale-down, redeploy) takes no new requests and gets this "
        "long to finish the ones it has before it is stopped")
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        _ENGINE.placement.strategy, description="where a tensor-parallel replica's ranks go: STRICT_PACK on one node, "
        "STRICT_SPREAD one rank per node (the replica actor shares rank 0's node), PACK/SPREAD as Ray places them")
    max_ongoing_requests: int = Field(64, ge=1, description="requests a replica works on at once")
    max_queued_requests: int = Field(128, ge=1, description="beyond this the API answers 503 + Retry-After")
    ingress: Literal["separate", "direct"] = Field(
        "separate", description="separate: an HTTP/gRPC ingress deployment in front of the LLM-server replicas (the "
        "router sees each prompt); direct: the LLM server is its own ingress (one replica only), so a token crosses "
        "one Ray hop to the HTTP proxy instead of two")
    direct_http: bool | None = Field(
        None, description="the ingress serves HTTP on --host/--port itself (uvicorn in its process), so no token "
        "crosses a Ray hop between Serve's HTTP proxy and it; Serve's proxy then runs only for gRPC, on a free "
        "loopback port. Default: on for `mixserve serve`, off in Serve configs (Serve's proxy holds the port there)")
    warmup_s: float = Field(60.0, ge=0, description="a replica runs the step shapes it will serve (a full prefill "
                            "step, decode batches up to max_num_seqs) for at most this long before it takes "
                            "requests, so it serves at its steady speed from the first one; 0: no warm-up")
    stream_interval: int = Field(1, ge=1, description="stream a request's tokens N at a time (its first and last "
                                 "chunks at once): fewer, larger chunks cost less CPU per token")
    # routing
    prefix_routing: bool = True
    prefix_router: Literal["mixserve", "ray"] = Field(
        "mixserve", description="with prefix routing: mixserve's router (the KV blocks each replica holds, by the "
        "engine's own block hashes) or Ray Serve LLM's PrefixCacheAffinityRouter (a prefix tree of the prompts' "
        "text it routed)")
    routing_load_tokens: float = Field(
        16.0, ge=0, description="mixserve's router: a request in flight on a replica costs this many prompt tokens of "
        "prefill when choosing where a prompt goes (router/prefix_router.py): lower keeps prefixes on their replicas "
        "longer, higher balances load sooner")
    imbalanced_threshold: int = Field(8, ge=0, description="Ray's router: in-flight requests beyond the least "
                                      "loaded replica at which it stops routing by prefix")
    routing_stats_period_s: float = Field(2.0, gt=0)
    # API
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    grpc_port: int | None = Field(None, ge=1, le=65535)
    api_key: SecretStr | None = Field(
        None, min_length=1, description="clients send it as Authorization: Bearer <key>; from $MIXSERVE_API_KEY or "
        "a file, never a flag or a Serve config arg")
    admin_key: SecretStr | None = Field(
        None, min_length=1, description="POST /v1/re_isq needs it (and is refused with 403 without one); the API key "
        "never grants it. From $MIXSERVE_ADMIN_KEY or a file, never a flag or a Serve config arg")
    max_body_bytes: int = Field(1 << 20, ge=1024)
    request_log: str | None = None
    # cluster
    address: str | None = Field(None, description="'auto' or host:port of a running Ray cluster")
    serve_control_loop_s: float = Field(
        0.5, gt=0, description="period of Ray Serve's controller loop (RAY_SERVE_CONTROL_LOOP_INTERVAL_S, Ray's "
        "default 0.1 s) in a head `mixserve serve` starts; on a cluster you start, set that variable on the head. "
        "Each pass wakes the controller and Ray's GCS; on a small CPU machine those wake-ups preempt the engine's "
        "threads. Serve then reacts to health checks and load up to this much later")

    def with_absolute_paths(self) -> "ServeSettings":
        """These settings with every local path made absolute (the model when it is a local folder or
        file, the request log, a calibration text file): Ray's processes do not start in the caller's
        working directory (cluster/ray_start.py)."""
        def absolute(path: str | None) -> str | None:
            return os.path.abspath(path) if path and os.path.exists(path) else path

        update = {"model": absolute(self.model), "request_log": os.path.abspath(self.request_log)
                  if self.request_log else None}
        if self.quantization_calibration not in ("none", "builtin"):
            update["quantization_calibration"] = absolute(self.quantization_calibration)
        return self.model_copy(update=update)

    def local_head_env(self) -> dict[str, str]:
        """Environment of a local Ray head started for these settings (cluster/ray_start.py)."""
        return {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": str(self.serve_control_loop_s)}

    @model_validator(mode="after")
    def _group_size(self):
        if self.quantization_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; "
                             f"got {self.quantization_group_size}")
        return self

    @model_validator(mode="after")
    def _calibration_source(self):
        check_calibration_source(self.quantization_calibration)
        return self

    @model_validator(mode="after")
    def _direct_ingress_serves_one_replica(self):
        if self.ingress == "direct" and (self.replicas != 1 or self.min_replicas is not None):
            raise ValueError("ingress 'direct' serves one replica (the HTTP proxy cannot route by prompt); use "
                             "ingress 'separate' for several replicas or autoscaling")
        return self

    @model_validator(mode="after")
    def _autoscaling_pair(self):
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("set min_replicas and max_replicas together to autoscale")
        if self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self

    def with_cpus_for(self, node_cpus: float, nodes: int = 1) -> "ServeSettings":
        """These settings with replica_cpus and rank_cpus decided where left to the default, for a
        cluster of `nodes` nodes of `node_cpus` CPUs each: the replicas that may run at once (max_replicas
        when autoscaling) spread evenly over the nodes, each node's CPUs shared by the engines on it,
        at least 1 each (so a replica's torch threads use its share of the machine and no more)."""
        replicas = self.max_replicas if self.min_replicas is not None else self.replicas
        per_node = math.ceil(replicas / max(1, nodes))
        tp = self.tensor_parallel_size
        update = {}
        if self.replica_cpus is None:
            update["replica_cpus"] = float(max(1, math.floor(node_cpus / per_node))) if tp == 1 else 1.0
        if self.rank_cpus is None:
            update["rank_cpus"] = float(max(1, math.floor(node_cpus / (per_node * tp))))
        return self.model_copy(update=update) if update else self

    @property
    def cpus_decided(self) -> bool:
        return self.replica_cpus is not None and self.rank_cpus is not None

    def engine_threads(self) -> int:
        """torch threads of an engine process: --threads, else the CPUs it was given (a replica's with
        TP=1, a rank's with tensor parallelism), at least 1."""
        if self.threads:
            return self.threads
        cpus = self.replica_cpus if self.tensor_parallel_size == 1 else self.rank_cpus
        return max(1, int(cpus))

    def cpus_needed(self, at_most: bool = False) -> float:
        """Logical Ray CPUs the app asks for: at start (its initial replicas, each replica actor plus,
        with tensor parallelism, its rank actors, and the ingress replicas), or `at_most` once
        autoscaling has added every replica it may (max_replicas). CPUs left to the default are
        decided for this machine (with_cpus_for)."""
        if not self.cpus_decided:
            return self.with_cpus_for(os.cpu_count() or 1).cpus_needed(at_most)
        if self.min_replicas is None:
            replicas = self.replicas
        else:
            replicas = self.max_replicas if at_most else max(self.min_replicas, 1)
        ingress = 0.0 if self.ingress == "direct" else self.ingress_replicas * self.ingress_cpus
        return replicas * self.placement_plan().replica_cpus_needed(self.tensor_parallel_size) + ingress

    def placement_plan(self) -> PlacementPlan:
        """Where a replica's actors run (workers/placement_plan.py), CPUs decided for this machine
        where left to the default."""
        if not self.cpus_decided:
            return self.with_cpus_for(os.cpu_count() or 1).placement_plan()
        return PlacementPlan(rank_cpus=self.rank_cpus, rank_gpus=self.rank_gpus, strategy=self.placement_strategy,
                             replica_cpus=self.replica_cpus, rank_threads=self.engine_threads())

    def engine_config(self, model_path: str) -> EngineConfig:
        """The EngineConfig of one replica (its placement plan decides CPUs left to the default)."""
        return EngineConfig(
            model=model_path, dtype=self.dtype, linear_kernel=self.linear_kernel,
            quantization=self.quantization, quantization_group_size=self.quantization_group_size,
            quantize_lm_head=self.quantize_lm_head, quantization_calibration=self.quantization_calibration,
            block_size=self.block_size, kv_cache_bytes=self.kv_cache_bytes,
            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_prefix_caching=self.enable_prefix_caching,
            tensor_parallel_size=self.tensor_parallel_size, expert_parallel=self.expert_parallel,
            device=self.device, placement=self.placement_plan(),
        )

    def llm_server_spec(self, model_path: str):
        """What each LLM-server replica is built from (router/llm_server.py LLMServerSpec): the engine,
        the replica's torch threads (a TP replica's own process only schedules: 1), streaming, warm-up."""
        from mixserve.router.llm_server import LLMServerSpec

        return LLMServerSpec(
            engine_config=self.engine_config(model_path),
            num_threads=self.engine_threads() if self.tensor_parallel_size == 1 else 1,
            stream_interval=self.stream_interval, warmup_s=self.warmup_s,
        )

    def ingress_options(self, model_path: str, served_model_name: str):
        """The ingress's IngressOptions (router/ingress.py)."""
        from mixserve.router.ingress import IngressOptions

        return IngressOptions(
            model=model_path, served_model_name=served_model_name, block_size=self.block_size,
            max_model_len=self.max_model_len, api_key=_secret(self.api_key), admin_key=_secret(self.admin_key),
            max_body_bytes=self.max_body_bytes,
            request_log=self.request_log, prompt_text=self.prefix_routing and self.prefix_router == "ray",
            http_address=(self.host, self.port) if self.direct_http else None,
            # with the engine in the ingress and no Serve proxy, no Serve queue caps its requests
            max_in_flight=self.max_ongoing_requests + self.max_queued_requests
            if self.direct_http and self.ingress == "direct" else None,
            drain_s=self.graceful_shutdown_timeout_s,
        )
