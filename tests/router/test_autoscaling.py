"""Autoscaling on one 2-core machine: `--min-replicas 1 --max-replicas 2` gets the logical CPUs for
both replicas on the local head it starts, adds the second replica under load and removes it once
the load is gone (with short delays set through the settings), and every request succeeds."""

import threading
import time

import httpx
import pytest
from ray import serve

from mixserve.cluster.settings import ServeSettings

from .serve_helpers import start, stop

pytestmark = pytest.mark.slow


def _replicas_running() -> int:
    app = serve.status().applications["mixserve"]
    return app.deployments["LLMServer"].replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def autoscaling(tiny_checkpoint):
    url, settings = start(tiny_checkpoint, min_replicas=1, max_replicas=2, target_ongoing_requests=1,
                          replica_cpus=1.0, threads=1, upscale_delay_s=1.0, downscale_delay_s=5.0,
                          autoscaling_look_back_s=2.0)
    yield url, settings
    stop()


def test_a_local_head_gets_the_cpus_of_every_replica_autoscaling_may_add():
    s = ServeSettings(min_replicas=1, max_replicas=3, replica_cpus=1.5, ingress_cpus=0.1)
    assert s.cpus_needed() == pytest.approx(1.5 + 0.1) and s.cpus_needed(at_most=True) == pytest.approx(4.5 + 0.1)


def test_scales_up_under_load_and_back_down_after_it(autoscaling):
    url, _ = autoscaling
    assert _replicas_running() == 1
    stop_load, statuses, peak = threading.Event(), [], [1]

    def client(i):
        while not stop_load.is_set():
            r = httpx.post(url + "/v1/completions", json={"prompt": f"load {i}", "max_tokens": 64,
                                                          "ignore_eos": True}, timeout=120)
            statuses.append(r.status_code)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    while peak[0] < 2 and time.monotonic() < deadline:
        peak[0] = max(peak[0], _replicas_running())
        time.sleep(0.5)
    stop_load.set()
    for t in threads:
        t.join(120)
    assert peak[0] == 2, "the second replica never started"
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))

    deadline = time.monotonic() + 90
    while _replicas_running() > 1:
        assert time.monotonic() < deadline, "the second replica was never removed"
        time.sleep(0.5)
    r = httpx.post(url + "/v1/completions", json={"prompt": "after", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
