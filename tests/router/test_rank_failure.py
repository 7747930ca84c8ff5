"""A tensor-parallel rank dying under load (Ray Serve, 1 replica with TP=2, loopback HTTP): the
replica's in-flight streams end with an SSE error event and `data: [DONE]` (never a cut
connection), its health check fails, and Serve's replacement replica serves within 60 s."""

import os
import signal
import subprocess
import time

import httpx
import pytest

from .serve_helpers import start, stop
from .test_replica_failure import _Stream


@pytest.fixture(scope="module")
def tp2_server(tiny_checkpoint):
    url, _ = start(tiny_checkpoint, tensor_parallel_size=2, replica_cpus=0.5, rank_cpus=0.5, prefix_routing=False,
                   health_check_period_s=1.0, health_check_timeout_s=10.0)
    yield url
    stop()


def _rank_pids() -> list[int]:
    done = subprocess.run(["pgrep", "-f", "ray::RankWorker"], capture_output=True, text=True)
    return [int(pid) for pid in done.stdout.split()]


def test_a_rank_killed_under_load_ends_streams_cleanly_and_a_new_replica_serves_within_60s(tp2_server):
    url = tp2_server
    ranks = _rank_pids()
    assert len(ranks) == 2, ranks
    streams = [_Stream(url, i) for i in range(6)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first_token.wait(60)
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    for s in streams:
        s.join(120)
    assert all(s.failure is None and s.done for s in streams), [(s.i, s.failure, s.done) for s in streams]
    cut = [s for s in streams if "error" in s.events[-1]]
    assert cut, "every stream finished before the rank died: nothing was tested"
    assert all(s.events[-1]["error"]["code"] == "replica_failed" for s in cut)

    while True:  # requests meanwhile get a clear 503 until the replacement replica is up
        r = httpx.post(url + "/v1/completions", json={"prompt": "after the fault", "max_tokens": 4}, timeout=60)
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["message"], r.text
        assert time.monotonic() - killed_at < 60, "no replacement replica serving within 60 s"
        time.sleep(1.0)
    print(f"replacement replica serving {time.monotonic() - killed_at:.1f} s after the rank was killed; "
          f"{len(cut)} of {len(streams)} streams ended with the error event")
    assert set(_rank_pids()).isdisjoint({ranks[1]}) and len(_rank_pids()) == 2  # the new replica's two ranks
