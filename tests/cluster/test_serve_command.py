"""`mixserve serve` as users run it (what `make serve` runs): a fresh cache, no --model, the demo
model (SmolLM2-135M-Instruct) answering a chat in English within 60 s of starting, and a clean stop
on SIGINT."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mixserve.workers.ports import free_port
from tests.helpers import interrupt


def test_mixserve_serve_answers_the_capital_of_france_within_60s_on_a_fresh_cache(tmp_path):
    port = free_port()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "RAY_ADDRESS": ""}
    cli = Path(sys.executable).parent / "mixserve"
    started = time.monotonic()
    proc = subprocess.Popen([str(cli), "serve", "--port", str(port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    answered_after = None
    try:
        while time.monotonic() - started < 60 and proc.poll() is None:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10,
                               json={"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                     "max_tokens": 16, "temperature": 0})
                if r.status_code == 200:
                    answered_after = time.monotonic() - started
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert answered_after is not None, "no chat answer within 60 s"
        answer = r.json()["choices"][0]["message"]["content"]
        assert "Paris" in answer, answer
        assert r.json()["model"] == "mixserve-demo" and r.json()["choices"][0]["finish_reason"] == "stop"
    finally:
        returncode, out = interrupt(proc)
    assert returncode == 0, out[-3000:]
    print(f"chat answered {answered_after:.1f} s after start")
