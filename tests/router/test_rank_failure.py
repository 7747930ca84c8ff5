"""A tensor-parallel rank dying under load (Ray Serve, 1 replica with TP=2, loopback HTTP): the
replica's in-flight streams end with an SSE error event and `data: [DONE]` (never a cut
connection), the replica leaves at once (long before its next health check, 30 s apart here), and
requests sent after the failure, which had no token yet, all succeed on Serve's replacement replica
within 60 s."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray._private.state as ray_state  # the GCS's actor table (the state API needs the dashboard, off here)

from .serve_helpers import start, stop
from .test_replica_failure import _Stream

pytestmark = pytest.mark.slow

REPLICA_CLASS = "ServeReplica:mixserve:LLMServer"


@pytest.fixture(scope="module")
def tp2_server(tiny_checkpoint):
    url, _ = start(tiny_checkpoint, tensor_parallel_size=2, replica_cpus=0.5, rank_cpus=0.5, prefix_routing=False,
                   health_check_period_s=30.0, health_check_timeout_s=10.0)
    yield url
    stop()


def _pids(actor_class: str) -> list[int]:
    """Process ids of this cluster's live actors of a class."""
    return [a["Pid"] for a in ray_state.actors().values()
            if a["ActorClassName"] == actor_class and a["State"] == "ALIVE"]


def _rank_pids() -> list[int]:
    return _pids("RankWorker")


def test_a_rank_killed_under_load_ends_streams_cleanly_and_a_new_replica_serves_within_60s(tp2_server):
    url = tp2_server
    ranks, replica = _rank_pids(), _pids(REPLICA_CLASS)
    assert len(ranks) == 2 and len(replica) == 1, (ranks, replica)
    streams = [_Stream(url, i) for i in range(6)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first_token.wait(60)
    os.kill(ranks[1], signal.SIGKILL)
    killed_at = time.monotonic()
    while replica[0] in _pids(REPLICA_CLASS):
        assert time.monotonic() - killed_at < 5, "the replica whose rank died is still running"
        time.sleep(0.2)
    replica_gone_s = time.monotonic() - killed_at
    for s in streams:
        s.join(120)
    assert all(s.failure is None and s.done for s in streams), [(s.i, s.failure, s.done) for s in streams]
    cut = [s for s in streams if "error" in s.events[-1]]
    assert cut, "every stream finished before the rank died: nothing was tested"
    assert all(s.events[-1]["error"]["code"] == "replica_failed" for s in cut)

    # Requests sent after the failure have no token yet: each waits for the replacement replica (the
    # router dropped the dead one at its first failed call) and succeeds.
    with ThreadPoolExecutor(3) as pool:
        late = list(pool.map(lambda i: httpx.post(url + "/v1/completions", json={"prompt": f"after the fault {i}",
                                                                                  "max_tokens": 4}, timeout=90),
                             range(3)))
    assert [r.status_code for r in late] == [200] * 3, [r.text for r in late]
    assert time.monotonic() - killed_at < 60, "no replacement replica serving within 60 s"
    print(f"replica gone {replica_gone_s:.1f} s and a replacement serving {time.monotonic() - killed_at:.1f} s "
          f"after the rank was killed; "
          f"{len(cut)} of {len(streams)} streams ended with the error event")
    assert set(_rank_pids()).isdisjoint({ranks[1]}) and len(_rank_pids()) == 2  # the new replica's two ranks
