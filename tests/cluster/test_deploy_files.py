"""The deployment files pass the validators of the tools that read them, each validator rejects a
broken copy, and the files are what cluster/profiles.py generates (so they cannot drift).

Validators (each raises on an invalid document):
- `ray up` YAML: Ray's own `prepare_config` (merges the provider's defaults.yaml; the raw file lacks
  required defaults such as cluster_synced_files) then `validate_config` (ray-schema.json + checks).
- Serve config: `ServeDeploySchema` (as `serve deploy`, `serve run` and KubeRay's dashboard call use
  it), and the app's `args` as ServeSettings, which forbids unknown keys (ServeDeploySchema ignores
  unknown keys and takes `args` as any dict).
- KubeRay manifest: the v1.7.0 CRD's openAPIV3Schema with Draft 7, closed the way the API server's
  strict field validation closes it (an unknown field is an error; plain jsonschema would accept a
  misspelled field), plus its serveConfigV2 as a Serve config.
- mixserve's own rules for its pods: each drains before it stops (a preStop `mixserve drain` bounded
  by at least the app's graceful_shutdown_timeout_s, a termination grace period above that bound),
  and the keys come from Secrets, never from a value in the manifest or its Serve config.
The CRD schemas come from ../shared/schemas (beside the repo in CI); without them those tests skip.
"""

import copy
import re
from functools import cache
from pathlib import Path

import click
import pytest
import ray
import yaml
from jsonschema import Draft7Validator, ValidationError
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from mixserve.cluster.profiles import MODEL_CACHE, PROFILES
from mixserve.cluster.serve_config import (
    IMPORT_PATH, embed_in_rayservice, render, serve_config, settings_from_config,
)
from mixserve.cluster.settings import KEY_FIELDS, ServeSettings

REPO = Path(__file__).resolve().parents[2]
SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay"
RAY_VERSION = "2.60.0"
CLUSTER_YAMLS = sorted((REPO / "cluster" / "ray-up").glob("*.yaml"))
SERVE_CONFIGS = sorted((REPO / "cluster").glob("serve-config-*.yaml"))
MANIFESTS = sorted((REPO / "manifests").glob("*.yaml"))
RAYSERVICES = sorted((REPO / "manifests").glob("rayservice-*.yaml"))

needs_crds = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason=f"KubeRay CRD schemas not found at {SCHEMAS} (CI clones shared/ beside the repo)"
)


# ---- validators -----------------------------------------------------------------------------------

def validate_cluster_yaml(config: dict) -> dict:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def validate_serve_config(config: dict) -> None:
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        if app["import_path"] == IMPORT_PATH:
            if KEY_FIELDS.keys() & (app.get("args") or {}).keys():  # app_builder refuses them too
                raise ValueError("a key is written into the Serve config's args")
            ServeSettings.model_validate(app.get("args") or {})


@cache
def _crd_v1_schema(kind: str) -> dict:
    """The CRD's openAPIV3Schema of its v1 version, as published."""
    name = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}[kind]
    crd = yaml.load((SCHEMAS / name).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@cache
def _crd_schema(kind: str) -> dict:
    return _closed(_crd_v1_schema(kind))


def _closed(schema):
    """Objects with declared properties reject other keys, as the API server's strict field
    validation does (unless the schema preserves unknown fields)."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def validate_kuberay(doc: dict) -> None:
    errors = sorted(Draft7Validator(_crd_schema(doc["kind"])).iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        raise ValidationError("; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
    if doc["kind"] == "RayService":
        validate_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))


KEYS = {"MIXSERVE_API_KEY": ("mixserve-api-key", "api-key"), "MIXSERVE_ADMIN_KEY": ("mixserve-admin-key", "admin-key")}


def validate_drain_on_stop(doc: dict) -> None:
    """The head's preStop drains the app (`mixserve drain`: its pod stops only with the whole
    cluster), a worker's its node (`--this-node`: the cluster goes on); each waits at least the
    app's graceful_shutdown_timeout_s, and the pod's terminationGracePeriodSeconds (which the hook's
    time counts against) is above the hook's bound."""
    if doc["kind"] == "RayService":
        drain_s = settings_from_config(yaml.safe_load(doc["spec"]["serveConfigV2"])).graceful_shutdown_timeout_s
    else:
        drain_s = ServeSettings().graceful_shutdown_timeout_s
    for group, pod, container in _ray_containers(_cluster_spec(doc)):
        command = (((container.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
        if command[:2] != ["mixserve", "drain"] or "--timeout-s" not in command[:-1]:
            raise ValueError(f"{group}: the preStop hook must run `mixserve drain --timeout-s S`, not {command}")
        if ("--this-node" in command) != (group != "head"):
            raise ValueError(f"{group}: a worker drains its node (--this-node), the head the whole app")
        bound = float(command[command.index("--timeout-s") + 1])
        if bound < drain_s:
            raise ValueError(f"{group}: the drain waits {bound:g} s, less than the app's {drain_s:g} s grace")
        if not pod.get("terminationGracePeriodSeconds", 30) > bound:  # Kubernetes' default: 30 s
            raise ValueError(f"{group}: terminationGracePeriodSeconds must be above the drain's {bound:g} s")


def validate_keys_from_secrets(doc: dict) -> None:
    """Every Ray container takes the API key (required or optional) and the admin key (optional)
    from their Secrets; no key is written as a value, nor into the serveConfigV2 args."""
    for group, _, container in _ray_containers(_cluster_spec(doc)):
        env = {e["name"]: e for e in container.get("env", [])}
        for name, (secret, key) in KEYS.items():
            ref = ((env.get(name) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if "value" in env.get(name, {}) or (ref.get("name"), ref.get("key")) != (secret, key):
                raise ValueError(f"{group}: {name} must come from the Secret {secret} (key {key})")
            if name == "MIXSERVE_ADMIN_KEY" and ref.get("optional") is not True:
                raise ValueError(f"{group}: the admin key's Secret must be optional (no Secret: re_isq is off)")
    if doc["kind"] == "RayService":
        validate_serve_config(yaml.safe_load(doc["spec"]["serveConfigV2"]))  # refuses a key in args


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _kuberay_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("apiVersion") == "ray.io/v1"]


def _ray_containers(cluster_spec: dict) -> list[tuple[str, dict, dict]]:
    """(group, pod spec, Ray container) of the head and each worker group."""
    groups = [("head", cluster_spec["headGroupSpec"])] + [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return [(name, g["template"]["spec"], g["template"]["spec"]["containers"][0]) for name, g in groups]


def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]


# ---- every committed file passes ------------------------------------------------------------------

def test_ray_is_the_pinned_version_the_validators_come_from():
    assert ray.__version__ == RAY_VERSION
    assert f'"ray[serve]=={RAY_VERSION}"' in (REPO / "pyproject.toml").read_text()


def test_the_deployment_files_exist():
    assert {p.name for p in CLUSTER_YAMLS} >= {"aws-gpu.yaml", "gcp-gpu.yaml", "local.yaml"}
    assert {p.name for p in SERVE_CONFIGS} == {f"serve-config-{name}.yaml" for name in PROFILES}
    assert {p.name for p in RAYSERVICES} == {f"rayservice-{name}.yaml" for name in PROFILES}
    assert (REPO / "manifests" / "raycluster-mixtral-8x7b-gpu.yaml").exists()


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_cluster_yaml_passes_ray_prepare_and_validate_config(path):
    prepared = validate_cluster_yaml(_load(path))
    assert prepared["head_node_type"] in prepared["available_node_types"]


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_passes_serve_deploy_schema(path):
    validate_serve_config(_load(path))


@needs_crds
@pytest.mark.parametrize("path", [p for p in MANIFESTS if "ray.io/v1" in p.read_text()], ids=lambda p: p.name)
def test_kuberay_manifest_passes_the_crd_schema_and_its_serve_config_the_serve_schema(path):
    docs = _kuberay_docs(path)
    assert docs
    for doc in docs:
        validate_kuberay(doc)


@pytest.mark.parametrize("path", [p for p in MANIFESTS if "ray.io/v1" in p.read_text()], ids=lambda p: p.name)
def test_kuberay_pods_drain_before_they_stop_and_take_the_keys_from_secrets(path):
    for doc in _kuberay_docs(path):
        validate_drain_on_stop(doc)
        validate_keys_from_secrets(doc)


@needs_crds
def test_closed_crd_schema_accepts_a_minimal_raycluster():
    """Closing the schema adds no requirement: a minimal valid RayCluster passes."""
    doc = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
           "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": [
               {"name": "ray-head", "image": "rayproject/ray:2.60.0", "resources": {"limits": {"cpu": "1"}}}]}}}}}
    validate_kuberay(doc)


# ---- each validator can fail ----------------------------------------------------------------------

def _cluster_breakages(path: Path):
    yield "misspelled top-level key", lambda c: c.update(setup_comands=c.pop("setup_commands"))
    if _load(path)["provider"]["type"] == "local":
        yield "no head_ip", lambda c: c["provider"].pop("head_ip")
    else:
        yield "head_node_type not a node type", lambda c: c.update(head_node_type="head_gpu_typo")
        yield "min_workers above global max_workers", lambda c: [
            t.update(min_workers=c["max_workers"] + 1) for n, t in c["available_node_types"].items()
            if n != c["head_node_type"]]
        yield "max_workers not an integer", lambda c: c.update(max_workers="two")


_CLUSTER_CASES = [(p, what, fn) for p in CLUSTER_YAMLS for what, fn in _cluster_breakages(p)]


@pytest.mark.parametrize("path,what,breakage", _CLUSTER_CASES, ids=[f"{p.name}-{w}" for p, w, _ in _CLUSTER_CASES])
def test_broken_cluster_yaml_fails_ray_validation(path, what, breakage):
    config = _load(path)
    breakage(config)
    with pytest.raises((ValidationError, ValueError, click.ClickException)):  # schema, Ray's checks, prepare's abort
        validate_cluster_yaml(config)


SERVE_BREAKAGES = {
    "no import_path": lambda c: c["applications"][0].pop("import_path"),
    "misspelled setting in args": lambda c: c["applications"][0]["args"].update(tensor_paralel_size=2),
    "setting of the wrong type": lambda c: c["applications"][0]["args"].update(max_num_seqs="many"),
    "port not a number": lambda c: c["http_options"].update(port="eighty"),
    "a key in args": lambda c: c["applications"][0]["args"].update(admin_key="written-in-the-config"),
}


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("what", SERVE_BREAKAGES)
def test_broken_serve_config_fails_validation(path, what):
    config = _load(path)
    SERVE_BREAKAGES[what](config)
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        validate_serve_config(config)


def _set_serve_config(doc, fn):
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    fn(config)
    doc["spec"]["serveConfigV2"] = yaml.safe_dump(config)


KUBERAY_BREAKAGES = {
    "no head pod template": lambda d: _cluster_spec(d)["headGroupSpec"].pop("template"),
    "replicas as a string": lambda d: _cluster_spec(d)["workerGroupSpecs"][0].update(replicas="1"),
    "malformed resource quantity": lambda d: _ray_containers(_cluster_spec(d))[-1][2]["resources"]["limits"].update(
        {"nvidia.com/gpu": "two"}),
    "misspelled container field": lambda d: _ray_containers(_cluster_spec(d))[0][2].update(
        volumeMount=_ray_containers(_cluster_spec(d))[0][2].pop("volumeMounts")),
    "rayStartParams value not a string": lambda d: _cluster_spec(d)["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}),
}
SERVE_CONFIG_V2_BREAKAGES = {
    "serveConfigV2 without import_path": lambda d: _set_serve_config(
        d, lambda c: c["applications"][0].pop("import_path")),
    "serveConfigV2 with a misspelled setting": lambda d: _set_serve_config(
        d, lambda c: c["applications"][0]["args"].update(tensor_paralel_size=2)),
}


def _worker_pod(d):
    return _ray_containers(_cluster_spec(d))[-1]


POD_BREAKAGES = {
    "no preStop hook": lambda d: _worker_pod(d)[2].pop("lifecycle"),
    "a preStop that sleeps": lambda d: _worker_pod(d)[2]["lifecycle"]["preStop"].update(
        exec={"command": ["sleep", "120"]}),
    "a worker that drains the whole app": lambda d: _worker_pod(d)[2]["lifecycle"]["preStop"]["exec"].update(
        command=["mixserve", "drain", "--timeout-s", "300"]),
    "a drain shorter than the app's grace": lambda d: _worker_pod(d)[2]["lifecycle"]["preStop"]["exec"].update(
        command=["mixserve", "drain", "--this-node", "--timeout-s", "5"]),
    "the grace period below the drain": lambda d: _worker_pod(d)[1].update(terminationGracePeriodSeconds=60),
    "no grace period (30 s)": lambda d: _worker_pod(d)[1].pop("terminationGracePeriodSeconds"),
    "the API key as a value": lambda d: _worker_pod(d)[2]["env"].__setitem__(
        0, {"name": "MIXSERVE_API_KEY", "value": "sk-in-the-manifest"}),
    "no admin key Secret": lambda d: _worker_pod(d)[2].update(
        env=[e for e in _worker_pod(d)[2]["env"] if e["name"] != "MIXSERVE_ADMIN_KEY"]),
}


@pytest.mark.parametrize("what", POD_BREAKAGES)
@pytest.mark.parametrize("path", [p for p in MANIFESTS if "ray.io/v1" in p.read_text()], ids=lambda p: p.name)
def test_broken_pod_rules_fail_validation(path, what):
    (doc,) = _kuberay_docs(path)
    POD_BREAKAGES[what](doc)
    with pytest.raises(ValueError):
        validate_drain_on_stop(doc)
        validate_keys_from_secrets(doc)


def test_a_key_in_serve_config_v2_fails_validation():
    (doc,) = _kuberay_docs(REPO / "manifests" / "rayservice-tiny-cpu.yaml")
    _set_serve_config(doc, lambda c: c["applications"][0]["args"].update(api_key="sk-in-the-config"))
    with pytest.raises(ValueError, match="key"):
        validate_keys_from_secrets(doc)


_KUBERAY_CASES = [(p, what) for p in MANIFESTS if "ray.io/v1" in p.read_text()
                  for what in list(KUBERAY_BREAKAGES) + (list(SERVE_CONFIG_V2_BREAKAGES) if p in RAYSERVICES else [])]


@needs_crds
@pytest.mark.parametrize("path,what", _KUBERAY_CASES, ids=[f"{p.name}-{w}" for p, w in _KUBERAY_CASES])
def test_broken_kuberay_manifest_fails_validation(path, what):
    (doc,) = _kuberay_docs(path)
    {**KUBERAY_BREAKAGES, **SERVE_CONFIG_V2_BREAKAGES}[what](doc)
    with pytest.raises((ValidationError, ValueError)):
        validate_kuberay(doc)


@needs_crds
def test_plain_crd_schema_misses_a_misspelled_field_that_the_closed_one_catches():
    (doc,) = _kuberay_docs(REPO / "manifests" / "rayservice-tiny-cpu.yaml")
    KUBERAY_BREAKAGES["misspelled container field"](doc)
    assert not list(Draft7Validator(_crd_v1_schema("RayService")).iter_errors(doc))
    with pytest.raises(ValidationError, match="volumeMount"):
        validate_kuberay(doc)


# ---- the files are the profiles, generated --------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PROFILES))
def test_committed_serve_config_is_the_profile_generated(name):
    path = REPO / "cluster" / f"serve-config-{name}.yaml"
    source = f"mixserve config --preset {name} --out cluster/serve-config-{name}.yaml"
    assert _load(path) == serve_config(PROFILES[name]), f"regenerate: {source}"
    assert path.read_text() == render(serve_config(PROFILES[name]), source), f"regenerate: {source}"


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_committed_rayservice_serve_config_is_the_profile_generated(name):
    path = REPO / "manifests" / f"rayservice-{name}.yaml"
    hint = f"regenerate: mixserve config --preset {name} --rayservice {path.relative_to(REPO)}"
    (doc,) = _kuberay_docs(path)
    assert yaml.safe_load(doc["spec"]["serveConfigV2"]) == serve_config(PROFILES[name]), hint
    assert embed_in_rayservice(path.read_text(), serve_config(PROFILES[name])) == path.read_text(), hint


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_serve_config_round_trips_to_the_same_settings(name):
    assert settings_from_config(serve_config(PROFILES[name])) == PROFILES[name]


def test_serve_config_args_hold_only_non_default_app_settings():
    config = serve_config(ServeSettings(max_num_seqs=7, host="0.0.0.0", port=9999, address="auto"))
    assert config["http_options"] == {"host": "0.0.0.0", "port": 9999}
    assert "grpc_options" not in config
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("mixserve", "/", IMPORT_PATH)
    assert app["args"] == {"max_num_seqs": 7}


def test_embed_in_rayservice_replaces_only_the_block():
    text = "a: 1\nspec:\n  serveConfigV2: |\n    old: 1\n\n    older: 2\n  rayClusterConfig:\n    x: 1\n"
    out = embed_in_rayservice(text, {"applications": []})
    assert out == "a: 1\nspec:\n  serveConfigV2: |\n    applications: []\n  rayClusterConfig:\n    x: 1\n"
    with pytest.raises(ValueError):
        embed_in_rayservice("spec: {}\n", {})


def test_config_subcommand_writes_the_committed_files(tmp_path, capsys):
    from mixserve.cluster.cli import main

    name = "tiny-cpu"
    assert main(["config", "--preset", name, "--out", str(tmp_path / "c.yaml")]) == 0
    assert _load(tmp_path / "c.yaml") == _load(REPO / "cluster" / f"serve-config-{name}.yaml")
    manifest = tmp_path / "rs.yaml"
    manifest.write_text((REPO / "manifests" / f"rayservice-{name}.yaml").read_text().replace("dtype: float32", "x: 1"))
    assert main(["config", "--preset", name, "--rayservice", str(manifest)]) == 0
    assert manifest.read_text() == (REPO / "manifests" / f"rayservice-{name}.yaml").read_text()


# ---- the files agree with each other --------------------------------------------------------------

GPU = PROFILES["mixtral-8x7b-gpu"]


def test_gpu_profile_model_is_where_the_ray_up_clusters_put_the_weights():
    assert GPU.model.startswith(MODEL_CACHE + "/")
    for name in ("aws-gpu.yaml", "gcp-gpu.yaml"):
        config = _load(REPO / "cluster" / "ray-up" / name)
        assert any(opt.endswith(f":{MODEL_CACHE}") for opt in config["docker"]["run_options"])
        assert any(f"--local-dir {GPU.model}" in cmd and "*.safetensors" in cmd
                   for cmd in config["worker_setup_commands"])
        assert any(f"--local-dir {GPU.model}" in cmd for cmd in config["head_setup_commands"])
        assert any("mixserve[cuda]" in cmd for cmd in config["setup_commands"])


def test_gpu_worker_types_fit_a_replica():
    """A replica's placement group (STRICT_PACK) must fit one worker node."""
    per_replica_gpus = GPU.tensor_parallel_size * GPU.rank_gpus
    per_replica_cpus = GPU.replica_cpus + GPU.tensor_parallel_size * GPU.rank_cpus
    gcp = _load(REPO / "cluster" / "ray-up" / "gcp-gpu.yaml")["available_node_types"]
    assert "GPU" not in gcp["head_cpu"]["resources"]
    assert gcp["gpu_2x_a100_80gb"]["resources"]["GPU"] >= per_replica_gpus
    assert gcp["gpu_2x_a100_80gb"]["resources"]["CPU"] >= per_replica_cpus
    (doc,) = _kuberay_docs(REPO / "manifests" / "rayservice-mixtral-8x7b-gpu.yaml")
    for group, _, container in _ray_containers(_cluster_spec(doc)):
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        if group == "head":
            assert "nvidia.com/gpu" not in limits
        else:
            assert int(limits["nvidia.com/gpu"]) == int(requests["nvidia.com/gpu"]) == per_replica_gpus
            assert int(limits["cpu"]) >= per_replica_cpus


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_rayservice_probes_and_pods(path):
    (doc,) = _kuberay_docs(path)
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    serve_port = config["http_options"]["port"]
    for group, pod, container in _ray_containers(_cluster_spec(doc)):
        assert {"name": "serve", "containerPort": serve_port} in container["ports"]
        assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])
        assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"])
        if group == "head":
            # KubeRay deploys serveConfigV2 only after the head is Ready: a /health probe would deadlock.
            assert "readinessProbe" not in container and "livenessProbe" not in container
        else:
            assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": serve_port}
            assert container["livenessProbe"]["httpGet"]["path"] == "/api/healthz"
    if "gpu" in path.name:
        for group, pod, container in _ray_containers(_cluster_spec(doc)):
            claim = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
            assert claim == [_load(REPO / "manifests" / "model-cache-pvc.yaml")["metadata"]["name"]]
            assert any(m["mountPath"] == MODEL_CACHE for m in container["volumeMounts"])
        fetch = _cluster_spec(doc)["headGroupSpec"]["template"]["spec"]["initContainers"][0]
        assert f"dir={GPU.model}\n" in fetch["command"][-1]


def test_raycluster_is_the_rayservice_cluster_without_the_health_probes():
    (service,) = _kuberay_docs(REPO / "manifests" / "rayservice-mixtral-8x7b-gpu.yaml")
    (cluster,) = _kuberay_docs(REPO / "manifests" / "raycluster-mixtral-8x7b-gpu.yaml")
    expected = copy.deepcopy(service["spec"]["rayClusterConfig"])
    for group in expected["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            container.pop("readinessProbe"), container.pop("livenessProbe")
    assert cluster["spec"] == expected
    assert cluster["metadata"] == service["metadata"]


def test_images_are_ray_2_60_everywhere():
    for path in MANIFESTS:
        for doc in _kuberay_docs(path):
            assert _cluster_spec(doc)["rayVersion"] == RAY_VERSION
    dockerfile = (REPO / "manifests" / "Dockerfile").read_text()
    assert f"ARG BASE_IMAGE=rayproject/ray:{RAY_VERSION}-py311-gpu" in dockerfile
    for path in CLUSTER_YAMLS:
        assert _load(path)["docker"]["image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311")


def test_dockerfile_copies_what_the_package_needs():
    dockerfile = (REPO / "manifests" / "Dockerfile").read_text()
    copied = {src for line in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M) for src in line.split()}
    assert copied == {"pyproject.toml", "README.md", "kernels", "workers", "router", "cluster", "bench",
                      "random_models"}
    assert all((REPO / src).exists() for src in copied)
    package_dirs = set(re.findall(r'"mixserve\.\w+" = "(\w+)"', (REPO / "pyproject.toml").read_text()))
    assert package_dirs <= copied
