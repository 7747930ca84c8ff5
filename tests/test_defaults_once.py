"""Every default is written once, in the lowest layer that uses it, and the layers above take it from
there: the weight format's in workers/loader.py's WeightFormat, the engine's in
workers/engine_config.py's EngineConfig (which takes the weight format's), the deployment's in
cluster/settings.py's ServeSettings (which takes the engine's). The dataclasses a layer only builds
from the one above (IngressOptions from ServeSettings) have no
defaults of their own for what they are given. These tests compare the copies that remain: a field's
default in ServeSettings with the engine's, a config built with nothing set with the engine's own,
and the `mixserve bench` flags that set engine knobs with the engine's defaults.
"""

import dataclasses

from mixserve.cluster.cli import build_parser
from mixserve.cluster.settings import ServeSettings
from mixserve.router.ingress import IngressOptions
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.loader import WeightFormat
from mixserve.workers.placement_plan import PlacementPlan

# what EngineConfig fields ServeSettings sets from its field of the same name (at least these)
ENGINE_KNOBS = {"dtype", "linear_kernel", "quantization", "quantization_group_size", "quantize_lm_head",
                "quantization_calibration", "block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens",
                "max_model_len", "enable_prefix_caching", "tensor_parallel_size", "expert_parallel", "device"}
PLACEMENT_KNOBS = {"placement_strategy": "strategy", "rank_gpus": "rank_gpus"}  # ServeSettings -> PlacementPlan
INGRESS_RENAMED = {"graceful_shutdown_timeout_s": "drain_s"}  # settings field -> IngressOptions field
WEIGHT_KNOBS = {"linear_kernel": "linear_kernel", "quantization": "quantization",  # EngineConfig -> WeightFormat
                "quantization_group_size": "group_size", "quantize_lm_head": "quantize_lm_head",
                "quantization_calibration": "calibration"}


def _defaults(cls) -> dict:
    """A dataclass's fields that have a default, with it."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _settings_default(name: str):
    return ServeSettings.model_fields[name].get_default(call_default_factory=True)


def test_settings_take_the_engine_defaults():
    engine = _defaults(EngineConfig)
    shared = set(engine) & set(ServeSettings.model_fields)
    assert ENGINE_KNOBS <= shared
    assert {name: _settings_default(name) for name in shared} == {name: engine[name] for name in shared}


def test_the_engine_takes_the_weight_format_defaults():
    engine, weights = _defaults(EngineConfig), _defaults(WeightFormat)
    assert set(WEIGHT_KNOBS.values()) == set(weights)
    assert {ours: engine[ours] for ours in WEIGHT_KNOBS} == \
        {ours: weights[theirs] for ours, theirs in WEIGHT_KNOBS.items()}
    assert EngineConfig(model="m").weight_format() == WeightFormat()


def test_an_engine_config_from_default_settings_is_the_engines_default():
    built, default = ServeSettings().engine_config("m"), EngineConfig(model="m")
    assert {name: getattr(built, name) for name in ENGINE_KNOBS} == \
        {name: getattr(default, name) for name in ENGINE_KNOBS}
    assert built.weight_format() == WeightFormat()


def test_settings_take_the_placement_defaults():
    plan = _defaults(PlacementPlan)
    assert {ours: _settings_default(ours) for ours in PLACEMENT_KNOBS} == \
        {ours: plan[theirs] for ours, theirs in PLACEMENT_KNOBS.items()}
    assert _defaults(EngineConfig)["placement"] == PlacementPlan()


def test_what_the_settings_hand_down_has_no_default_of_its_own():
    """IngressOptions is built from ServeSettings: a default there would be a second copy (it once
    was: block size 16, body limit 1 MiB, drain 120 s)."""
    ingress = _defaults(IngressOptions)
    for settings_name in ServeSettings.model_fields:
        name = INGRESS_RENAMED.get(settings_name, settings_name)
        if name in ingress:  # only None defaults are left: "not set" on both sides
            assert ingress[name] is None and _settings_default(settings_name) is None, name
    assert {"block_size", "max_body_bytes", "drain_s"}.isdisjoint(ingress)


def test_ingress_options_from_default_settings():
    options = ServeSettings().ingress_options("m", "served")
    assert options.block_size == EngineConfig(model="m").block_size
    assert options.max_model_len == EngineConfig(model="m").max_model_len
    assert options.max_body_bytes == _settings_default("max_body_bytes")
    assert options.drain_s == _settings_default("graceful_shutdown_timeout_s")


def test_bench_flags_take_the_engine_defaults():
    parser, default = build_parser(), EngineConfig(model="m")
    offline = parser.parse_args(["bench", "offline"])
    flags = ("dtype", "linear_kernel", "quantization", "quantization_group_size", "quantization_calibration")
    assert {name: getattr(offline, name) for name in flags} == {name: getattr(default, name) for name in flags}
