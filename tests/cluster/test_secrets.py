"""The keys (API, admin) never show: not on a command line (Ray records the driver's as its job's
entrypoint, `ps` shows every process's), not in Ray's job table, not in `serve status`, not in a
Serve config, not in a settings error or repr. They come from $MIXSERVE_API_KEY / $MIXSERVE_ADMIN_KEY
or a file (--api-key-file / --admin-key-file)."""

import json
import os
import subprocess
import sys

import httpx
import psutil
import pytest
from pydantic import ValidationError

import mixserve.cluster.serve_command as serve_command
from mixserve.cluster.cli import main
from mixserve.cluster.serve_config import serve_config
from mixserve.cluster.settings import ServeSettings, read_key_file

from .serve_process import CLI, gcs_address_of, start_mixserve, stop_mixserve

KEY = "sk-test-7f3a9c1e5b2d8046"
ADMIN = "adm-test-0b6e4d2a9f1c3857"


@pytest.mark.parametrize("flag, key", [("--api-key", KEY), ("--admin-key", ADMIN)])
def test_a_key_given_on_the_command_line_is_refused_with_exit_2_in_one_line_that_never_shows_it(flag, key):
    done = subprocess.run([str(CLI), "serve", flag, key], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 2
    assert key not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    env = "MIXSERVE_API_KEY" if flag == "--api-key" else "MIXSERVE_ADMIN_KEY"
    assert f"{flag} is refused" in line and f"${env}" in line and f"{flag}-file" in line, line


def test_keys_come_from_the_environment_or_a_file_which_wins(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(serve_command, "run_serve", lambda settings: seen.append(settings) or 0)
    monkeypatch.setenv("MIXSERVE_API_KEY", "from-the-environment")
    monkeypatch.delenv("MIXSERVE_ADMIN_KEY", raising=False)
    assert main(["serve", "--port", "9001"]) == 0
    assert seen[-1].api_key.get_secret_value() == "from-the-environment" and seen[-1].admin_key is None
    (tmp_path / "api").write_text(f"  {KEY}\n")
    (tmp_path / "admin").write_text(f"{ADMIN}\n")
    assert main(["serve", "--api-key-file", str(tmp_path / "api"), "--admin-key-file", str(tmp_path / "admin")]) == 0
    assert (seen[-1].api_key.get_secret_value(), seen[-1].admin_key.get_secret_value()) == (KEY, ADMIN)


def test_a_bad_key_file_is_named_and_its_content_never_shown(tmp_path, capsys):
    (tmp_path / "two-lines").write_text(f"{KEY}\nsecond line\n")
    (tmp_path / "empty").write_text("\n")
    for name in ("two-lines", "empty", "missing"):
        with pytest.raises(ValueError, match=name) as bad:
            read_key_file(str(tmp_path / name))
        assert KEY not in str(bad.value)
    assert main(["serve", "--api-key-file", str(tmp_path / "two-lines")]) == 2
    err = capsys.readouterr().err
    assert "two-lines" in err and KEY not in err


def test_settings_errors_reprs_and_serve_configs_never_show_the_keys():
    keys = {"api_key": KEY, "admin_key": ADMIN}
    for bad in (dict(min_replicas=1), dict(port=0), dict(unknown=1), dict(api_key=12345)):
        with pytest.raises(ValidationError) as error:
            ServeSettings(**{**keys, **bad})
        assert KEY not in str(error.value) and ADMIN not in str(error.value) and "12345" not in str(error.value)
    settings = ServeSettings(**keys)
    for text in (repr(settings), str(settings), repr(settings.ingress_options("/m", "m")),
                 json.dumps(serve_config(settings)), settings.model_dump_json()):
        assert KEY not in text and ADMIN not in text
    assert not ({"api_key", "admin_key"} & serve_config(settings)["applications"][0]["args"].keys())
    assert settings.ingress_options("/m", "m").api_key == KEY  # the ingress gets it, in memory


# ---- a real `mixserve serve` -----------------------------------------------------------------------

PROBE = """
import json, sys
import ray
from ray import serve
from ray.core.generated import gcs_pb2

ray.init(address=sys.argv[1], log_to_driver=False)
accessor = ray._private.state.state._connect_and_get_accessor()
jobs = [gcs_pb2.JobTableData.FromString(raw) for raw in accessor.get_job_table(
    skip_submission_job_info_field=False, skip_is_running_tasks_field=False)]
controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
print(json.dumps({
    "entrypoints": [job.entrypoint for job in jobs],
    "job_table": "".join(str(job) for job in jobs),
    "serve_status": str(serve.status()),
    "serve_details": json.dumps(ray.get(controller.get_serve_instance_details.remote()), default=str),
}))
"""


@pytest.mark.slow
def test_a_served_api_key_shows_in_no_command_line_job_table_or_serve_status(tiny_checkpoint, tmp_path):
    proc, url, log = start_mixserve(tiny_checkpoint, tmp_path, {"MIXSERVE_API_KEY": KEY})
    try:
        body = {"prompt": "hello", "max_tokens": 3}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        wrong = httpx.post(f"{url}/v1/completions", json=body, timeout=60, headers={"Authorization": "Bearer x"})
        assert wrong.status_code == 401 and KEY not in wrong.text
        auth = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60, headers=auth).status_code == 200
        # no admin key configured: re_isq is off, whoever asks (the API key never grants it)
        re_isq = httpx.post(f"{url}/v1/re_isq", json={"quantization": "int8"}, timeout=60, headers=auth)
        assert re_isq.status_code == 403 and re_isq.json()["error"]["type"] == "permission_error", re_isq.text

        command_lines = [" ".join(p.info["cmdline"] or ()) for p in psutil.process_iter(["cmdline"])]
        assert any(str(tiny_checkpoint) in line for line in command_lines)  # the walk sees the serve command
        assert not [line for line in command_lines if KEY in line]
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        assert KEY not in ps

        probe = subprocess.run([sys.executable, "-P", "-c", PROBE, gcs_address_of(proc.pid)], capture_output=True,
                               text=True, timeout=120, cwd=tmp_path,
                               env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"})  # a local head's
        assert probe.returncode == 0, probe.stderr[-3000:]
        seen = json.loads(probe.stdout.strip().splitlines()[-1])
        assert any("serve" in e and str(tiny_checkpoint) in e for e in seen["entrypoints"]), seen["entrypoints"]
        assert "RUNNING" in seen["serve_status"]
        for where in ("entrypoints", "job_table", "serve_status", "serve_details"):
            assert KEY not in json.dumps(seen[where]), where
    finally:
        returncode = stop_mixserve(proc)
    assert returncode == 0, log.read_text()[-3000:]
    assert KEY not in log.read_text()
