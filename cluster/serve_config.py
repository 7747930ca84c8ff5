"""The Serve config (`serve deploy`, `serve run`, KubeRay's serveConfigV2) generated from ServeSettings.

One application whose `import_path` is `mixserve.cluster.app:app_builder` and whose `args` are the
settings fields that differ from their defaults (app_builder validates them back into ServeSettings,
so defaults live in one place). The fields that configure Serve's proxies rather than the
application, host/port/grpc_port, become `http_options` / `grpc_options`; `address` (which cluster to
join) has no meaning inside a config that is submitted to a cluster, so it is never written; nor are
the keys (api_key, admin_key), which the nodes take from their environment (settings.py, keys rule).

The committed files are outputs of this module (see cluster/profiles.py):
    mixserve config --preset NAME --out cluster/serve-config-NAME.yaml
    mixserve config --preset NAME --rayservice manifests/rayservice-NAME.yaml
"""

import re
from pathlib import Path

import yaml

from .settings import KEY_FIELDS, ServeSettings

APP_NAME = "mixserve"  # the same name `mixserve serve` deploys under
INGRESS_DEPLOYMENT = "OpenAIIngress"  # the app's deployments (cluster/app.py); in the direct shape the LLM
LLM_DEPLOYMENT = "LLMServer"  # server is its own ingress and the only one
IMPORT_PATH = "mixserve.cluster.app:app_builder"
GRPC_SERVICER = "mixserve.router.generate_pb2_grpc.add_GenerateServiceServicer_to_server"  # Serve's gRPC proxy
PROXY_FIELDS = {"host", "port", "grpc_port"}
NOT_IN_CONFIG = {"address", *KEY_FIELDS}  # keys: from the nodes' environment only (settings.py)
_BLOCK_START = re.compile(r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[-+]?[ ]*$")


def serve_config(settings: ServeSettings, *, name: str = APP_NAME, route_prefix: str = "/") -> dict:
    """The Serve config dict for `settings` (a ServeDeploySchema document)."""
    args = settings.model_dump(exclude_defaults=True, exclude=PROXY_FIELDS | NOT_IN_CONFIG)
    config: dict = {"http_options": {"host": settings.host, "port": settings.port}}
    if settings.grpc_port:
        config["grpc_options"] = {"port": settings.grpc_port, "grpc_servicer_functions": [GRPC_SERVICER]}
    config["applications"] = [{"name": name, "route_prefix": route_prefix, "import_path": IMPORT_PATH, "args": args}]
    return config


def settings_from_config(config: dict, app_name: str = APP_NAME) -> ServeSettings:
    """The inverse: the settings a Serve config deploys (its app's args + proxy options)."""
    app = next(a for a in config["applications"] if a.get("name", "default") == app_name)
    http = config.get("http_options") or {}
    proxy = {k: v for k, v in (("host", http.get("host")), ("port", http.get("port"))) if v is not None}
    grpc_port = (config.get("grpc_options") or {}).get("port")
    return ServeSettings.model_validate({**(app.get("args") or {}), **proxy, "grpc_port": grpc_port})


def render(config: dict, source: str) -> str:
    """YAML text of a Serve config, headed by how to regenerate it."""
    header = (f"# Generated from cluster/profiles.py by:\n#   {source}\n"
              "# Edit the profile and regenerate: a test fails when this file and the profile differ.\n")
    return header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def embed_in_rayservice(manifest: str, config: dict) -> str:
    """`manifest` (YAML text holding one `serveConfigV2: |` block) with that block replaced by
    `config`; comments and everything else are kept as written."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK_START.match(line.rstrip("\n"))]
    if len(starts) != 1:
        raise ValueError(f"expected one 'serveConfigV2: |' block, found {len(starts)}")
    start = starts[0]
    indent = _BLOCK_START.match(lines[start].rstrip("\n"))["indent"]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or _indent_of(lines[end]) > len(indent)):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # keep blank lines that follow the block
        end -= 1
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    block = [f"{indent}serveConfigV2: |\n"] + [f"{indent}  {line}\n" if line else "\n" for line in body.splitlines()]
    return "".join(lines[:start] + block + lines[end:])


def write_serve_config(settings: ServeSettings, out: Path, source: str) -> None:
    Path(out).write_text(render(serve_config(settings), source))


def update_rayservice(settings: ServeSettings, manifest: Path) -> None:
    path = Path(manifest)
    path.write_text(embed_in_rayservice(path.read_text(), serve_config(settings)))


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))
