"""The committed Serve config deploys the way users deploy it, and answers.

`serve run cluster/serve-config-tiny-cpu.yaml` itself (Ray's CLI, in-process), which validates the
file with ServeDeploySchema, starts Serve with the file's http_options and hands the config to the
controller (`apply_config`, the same call `serve deploy` makes through the dashboard), which builds
the app from `import_path` + `args` in a Ray task. Only the model (the tiny checkpoint instead of the
demo cache) and the port (a free one) differ from the committed file.
"""

import sys
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml
from click.testing import CliRunner
from ray import serve
from ray.serve.scripts import cli as serve_cli

from mixserve.cluster.ray_start import init_ray
from mixserve.workers.ports import free_port

REPO = Path(__file__).resolve().parents[2]
APP = "mixserve"


@pytest.fixture(scope="module")
def local_ray():
    init_ray(num_cpus=4, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


def _wait_until_running(app: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        apps = serve.status().applications
        status = apps[app].status if app in apps else None
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            pytest.fail(f"{app} is {status}: {apps[app].message}")
        time.sleep(1)
    pytest.fail(f"{app} not RUNNING after {timeout_s:.0f} s (last status {status})")


def test_committed_tiny_cpu_serve_config_deploys_with_serve_run_and_completes(local_ray, tiny_checkpoint, tmp_path,
                                                                             monkeypatch):
    config = yaml.safe_load((REPO / "cluster" / "serve-config-tiny-cpu.yaml").read_text())
    port = free_port()
    config["http_options"].update(host="127.0.0.1", port=port)
    (app,) = config["applications"]
    assert app["name"] == APP and "model" not in app["args"]
    app["args"]["model"] = str(tiny_checkpoint)
    path = tmp_path / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    started = time.monotonic()
    # `serve run` puts its --app-dir (default: the working directory, the repository) at the front of
    # sys.path: give it an empty one, and undo the insertion after the test
    monkeypatch.setattr(sys, "path", list(sys.path))
    app_dir = tmp_path / "app-dir"
    app_dir.mkdir()
    result = CliRunner().invoke(serve_cli, ["run", str(path), "--non-blocking", "--app-dir", str(app_dir)])
    assert result.exit_code == 0, result.output
    _wait_until_running(APP, timeout_s=240)
    deployed_after = time.monotonic() - started

    url = f"http://127.0.0.1:{port}{app['route_prefix'].rstrip('/')}"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    r = httpx.post(f"{url}/v1/completions", timeout=60,
                   json={"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"]
    assert 1 <= body["usage"]["completion_tokens"] <= 8
    assert body["model"] == Path(tiny_checkpoint).name  # served under the folder name: args reached the app
    print(f"deployed and RUNNING {deployed_after:.1f} s after `serve run`")
