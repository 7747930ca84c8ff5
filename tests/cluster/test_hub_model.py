"""`--model org/name`: a hub id resolves offline from a pre-filled Hugging Face cache and serves; a
repository that cannot be had is one clear line, no traceback.

Each run is a subprocess with its own HF_HOME, HF_HUB_OFFLINE=1, and a sitecustomize that refuses
every connection off the loopback (and every DNS look-up of another host), so nothing here can reach
the network even by mistake; Ray's own loopback traffic still flows.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mixserve.workers.ports import free_port
from tests.helpers import interrupt

pytestmark = pytest.mark.slow

REPO, COMMIT = "testorg/tiny-moe", "0123456789abcdef0123456789abcdef01234567"

_NO_NETWORK = '''
import ipaddress, socket

def _local(host):
    """Loopback, or an address of this machine's own interfaces (Ray talks to itself on those)."""
    if host in ("localhost", "", None):
        return True
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    probe = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind((str(ip), 0))  # only an address of this machine can be bound
        return True
    except OSError:
        return False
    finally:
        probe.close()

def _guard(real):
    def connect(self, address):
        tcp = self.type == socket.SOCK_STREAM or self.type & socket.SOCK_STREAM
        if self.family in (socket.AF_INET, socket.AF_INET6) and tcp and not _local(address[0]):
            raise OSError(f"network blocked by the test: {address}")
        return real(self, address)  # (a UDP connect sends nothing: Ray uses one to find its address)
    return connect

socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo

def getaddrinfo(host, *args, **kwargs):
    if isinstance(host, bytes):
        host = host.decode()
    if not _local(host) and host != socket.gethostname():
        raise socket.gaierror(f"DNS blocked by the test: {host}")
    return _getaddrinfo(host, *args, **kwargs)

socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture(scope="module")
def hub_env(tiny_checkpoint, tmp_path_factory):
    """An HF_HOME whose hub cache holds REPO at COMMIT (refs/main -> snapshots/COMMIT), the layout
    huggingface_hub itself writes; and an environment with the network blocked."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / COMMIT)
    site = tmp_path_factory.mktemp("no-network")
    (site / "sitecustomize.py").write_text(_NO_NETWORK)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
           "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
           "XDG_CACHE_HOME": str(home / "xdg")}
    return env


def _cli() -> str:
    return str(Path(sys.executable).parent / "mixserve")


def test_the_network_really_is_blocked_in_these_subprocesses(hub_env):
    probe = "import urllib.request; urllib.request.urlopen('https://huggingface.co', timeout=5)"
    done = subprocess.run([sys.executable, "-P", "-c", probe], env=hub_env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "blocked by the test" in done.stderr


def test_a_hub_id_serves_from_the_prefilled_cache_offline(hub_env):
    port = free_port()
    proc = subprocess.Popen([_cli(), "serve", "--model", REPO, "--port", str(port)], env=hub_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started, answer = time.monotonic(), None
    try:
        while time.monotonic() - started < 90 and proc.poll() is None:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=10,
                               json={"model": REPO, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
                if r.status_code == 200:
                    answer = r.json()
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        if answer is None:
            proc.kill()
            raise AssertionError("no answer within 90 s; the server said: " + proc.communicate()[0][-4000:])
        assert answer["model"] == REPO and answer["usage"]["completion_tokens"] == 4
    finally:
        returncode, out = interrupt(proc)
    assert returncode == 0, out[-3000:]


def test_a_hub_id_at_a_revision_resolves_too(hub_env):
    done = subprocess.run([_cli(), "demo", "--model", f"{REPO}@{COMMIT}", "--max-tokens", "3"], env=hub_env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"snapshots/{COMMIT}" in done.stdout


@pytest.mark.parametrize("model,says", [
    ("testorg/not-cached", "is not in the hub cache and the hub cannot be reached"),
    (f"{REPO}@v9-missing", "is not in the hub cache"),
])
def test_a_repository_that_cannot_be_had_is_one_clear_line(hub_env, model, says):
    done = subprocess.run([_cli(), "serve", "--model", model], env=hub_env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert says in done.stderr and model in done.stderr
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
