"""`mixserve serve` as a subprocess, as users run it, for the cluster tests."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from mixserve.workers.ports import free_port

CLI = Path(sys.executable).parent / "mixserve"


def gcs_address_of(pid: int) -> str:
    """The GCS address of the local Ray head that process `pid` started (the flag its raylet and
    monitors are given)."""
    for child in psutil.Process(pid).children(recursive=True):
        for arg in child.cmdline():
            if arg.startswith("--gcs-address="):
                return arg.split("=", 1)[1]
    raise AssertionError(f"no Ray process with --gcs-address under process {pid}")


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not healthy after {timeout_s:.0f} s: {log.read_text()[-3000:]}")


def start_mixserve(checkpoint, tmp_path: Path, env: dict, *flags: str) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = tmp_path / "mixserve-serve.log"
    args = [str(CLI), "serve", "--model", str(checkpoint), "--port", str(port), "--dtype", "float32",
            "--max-model-len", "512", "--kv-cache-bytes", str(32 << 20), *flags]
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env={**os.environ, "RAY_ADDRESS": "", **env}, stdout=out,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, log)
    return proc, url, log


def stop_mixserve(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
