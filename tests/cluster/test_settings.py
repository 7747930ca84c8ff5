"""The settings model drives the Serve deployment options and the engine arguments."""

import pytest
from pydantic import ValidationError

from mixserve.cluster.app import _llm_deployment_options
from mixserve.cluster.cli import build_parser
from mixserve.cluster.settings import ServeSettings


def test_autoscaling_settings_become_serve_autoscaling_config():
    options = _llm_deployment_options(ServeSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=6,
                                                    upscale_delay_s=2, downscale_delay_s=9))
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                             "target_ongoing_requests": 6.0, "upscale_delay_s": 2.0,
                                             "downscale_delay_s": 9.0, "look_back_period_s": 30.0}
    assert "num_replicas" not in options


def test_fixed_replicas_and_backpressure_limits():
    options = _llm_deployment_options(ServeSettings(replicas=3, max_ongoing_requests=5, max_queued_requests=7))
    assert (options["num_replicas"], options["max_ongoing_requests"], options["max_queued_requests"]) == (3, 5, 7)


def test_tensor_parallel_replica_owns_one_placement_group_with_a_bundle_per_rank():
    s = ServeSettings(tensor_parallel_size=2, replica_cpus=1, rank_cpus=4, rank_gpus=1)
    options = _llm_deployment_options(s)
    assert options["placement_group_bundles"] == [{"CPU": 1}, {"CPU": 4, "GPU": 1}, {"CPU": 4, "GPU": 1}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    engine = s.engine_config("/models/x")
    assert engine.placement.in_serve_replica and engine.placement.rank_bundle_index(0) == 1
    assert engine.placement.rank_bundle() == {"CPU": 4, "GPU": 1}


def test_cpus_needed_counts_every_actor_the_deployment_options_ask_for():
    for s in (ServeSettings(replicas=2, replica_cpus=2.0, ingress_cpus=0.1),
              ServeSettings(tensor_parallel_size=2, replica_cpus=0.5, rank_cpus=1.0),
              ServeSettings(min_replicas=0, max_replicas=3, replica_cpus=1.5)):
        options = _llm_deployment_options(s)
        bundles = options.get("placement_group_bundles") or [options["ray_actor_options"]]
        per_replica = sum(b.get("CPU", b.get("num_cpus", 0)) for b in bundles)
        replicas = options.get("num_replicas") or options["autoscaling_config"]["initial_replicas"]
        assert s.cpus_needed() == pytest.approx(replicas * per_replica + s.ingress_cpus)


def test_prefix_router_is_configured_through_serves_request_router_config():
    options = _llm_deployment_options(ServeSettings(routing_load_tokens=24, block_size=8, routing_stats_period_s=1.5))
    config = options["request_router_config"]
    assert config.request_router_class == "mixserve.router.prefix_router:PrefixAwareRouter"
    assert config.request_router_kwargs == {"load_tokens": 24, "block_size": 8}
    assert config.request_routing_stats_period_s == 1.5
    ray_router = _llm_deployment_options(ServeSettings(prefix_router="ray", imbalanced_threshold=3))
    assert ray_router["request_router_config"].request_router_kwargs == {"imbalanced_threshold": 3}
    assert "request_router_config" not in _llm_deployment_options(ServeSettings(prefix_routing=False))


@pytest.mark.parametrize("bad", [dict(min_replicas=1), dict(min_replicas=3, max_replicas=2), dict(port=0),
                                 dict(tensor_parallel_size=0), dict(dtype="int8"), dict(unknown=1),
                                 dict(quantization_calibration="/no/such/calibration.txt")])
def test_invalid_settings_are_rejected(bad):
    with pytest.raises(ValidationError):
        ServeSettings(**bad)


def test_cli_serve_flags_are_generated_from_the_settings_model():
    args = build_parser().parse_args(["serve", "--tensor-parallel-size", "2", "--replicas", "3",
                                      "--no-prefix-routing", "--rank-cpus", "0.5"])
    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    s = ServeSettings(**given)
    assert (s.tensor_parallel_size, s.replicas, s.prefix_routing, s.rank_cpus) == (2, 3, False, 0.5)
    assert s.host == "127.0.0.1"  # loopback unless told otherwise
    assert build_parser().parse_args(["serve", "--no-direct-http"]).direct_http is False  # a flag, default None
    assert build_parser().parse_args(["serve"]).direct_http is None
    args = build_parser().parse_args(["serve", "--quantization", "int8", "--quantization-calibration", "builtin"])
    weights = ServeSettings(quantization=args.quantization,
                            quantization_calibration=args.quantization_calibration).engine_config("m").weight_format()
    assert (weights.quantization, weights.calibration) == ("int8", "builtin")


def test_serve_config_entry_point_takes_the_keys_from_the_environment_and_refuses_them_in_args(monkeypatch):
    import mixserve.cluster.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "build_app", lambda settings: seen.setdefault("settings", settings))
    monkeypatch.setenv("MIXSERVE_API_KEY", "from-secret")
    monkeypatch.setenv("MIXSERVE_ADMIN_KEY", "admin-secret")
    app_module.app_builder({"replicas": 2})
    settings = seen["settings"]
    assert settings.api_key.get_secret_value() == "from-secret" and settings.replicas == 2
    assert settings.admin_key.get_secret_value() == "admin-secret"
    for field in ("api_key", "admin_key"):
        with pytest.raises(ValueError, match="must not be written into a Serve config") as refused:
            app_module.app_builder({field: "written-in-config"})
        assert "written-in-config" not in str(refused.value)


def test_engine_defaults_live_in_one_place_and_flow_as_typed_objects():
    """ServeSettings takes the engine's defaults from EngineConfig and builds the typed EngineConfig
    and IngressOptions the deployments get."""
    from mixserve.router.ingress import IngressOptions
    from mixserve.workers.engine_config import EngineConfig

    s, engine = ServeSettings(), EngineConfig(model="")
    built = s.engine_config("/models/x")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "kv_cache_bytes", "enable_prefix_caching"):
        assert getattr(s, name) == getattr(engine, name) == getattr(built, name), name
    options = ServeSettings(api_key="k", admin_key="a", max_model_len=99).ingress_options("/models/x", "x")
    assert isinstance(options, IngressOptions)
    assert (options.api_key, options.admin_key, options.max_model_len) == ("k", "a", 99)
    options = _llm_deployment_options(ServeSettings(health_check_period_s=2.5, graceful_shutdown_timeout_s=7))
    assert (options["health_check_period_s"], options["graceful_shutdown_timeout_s"]) == (2.5, 7)


@pytest.mark.parametrize("overrides, node_cpus, nodes, replica_cpus, rank_cpus, threads", [
    ({}, 2, 1, 2.0, 2.0, 2),  # the default shape uses every core of a 2-core machine
    ({}, 16, 1, 16.0, 16.0, 16),
    ({"replicas": 2}, 2, 1, 1.0, 1.0, 1),  # two replicas share it
    ({"replicas": 4}, 16, 2, 8.0, 8.0, 8),  # spread over two nodes, two each
    ({"min_replicas": 1, "max_replicas": 2}, 2, 1, 1.0, 1.0, 1),  # room for what autoscaling may add
    ({"tensor_parallel_size": 2}, 2, 1, 1.0, 1.0, 1),  # the ranks compute, one core each
    ({"tensor_parallel_size": 2}, 16, 1, 1.0, 8.0, 8),
    ({"replicas": 3}, 2, 1, 1.0, 1.0, 1),  # never below one CPU
    ({"replica_cpus": 0.5, "threads": 3}, 2, 1, 0.5, 2.0, 3),  # explicit values stay
])
def test_engine_cpus_and_threads_default_to_a_nodes_share(overrides, node_cpus, nodes, replica_cpus, rank_cpus,
                                                          threads):
    s = ServeSettings(**overrides).with_cpus_for(node_cpus, nodes)
    assert (s.replica_cpus, s.rank_cpus, s.engine_threads()) == (replica_cpus, rank_cpus, threads)
    assert s.engine_config("m").placement.rank_threads == threads
