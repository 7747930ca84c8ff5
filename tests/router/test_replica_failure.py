"""A replica dying under load (Ray Serve, 2 LLM-server replicas, loopback HTTP): streams it was serving
end with an SSE error event and `data: [DONE]` (never a cut connection), requests sent while it dies
that had no token yet are routed again and succeed, and /metrics drops the dead replica's series.
Scaling the LLM server down while both replicas stream: the streams on the removed replica finish."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import ray
from ray import serve

from mixserve.cluster.app import build_app
from mixserve.cluster.serve_command import APP_NAME

from .serve_helpers import start, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    url, settings = start(tiny_checkpoint, replicas=2, replica_cpus=1.0, threads=1, routing_stats_period_s=0.5)
    yield url, settings
    stop()


@pytest.fixture
def two_replicas(served):
    return served[0]


def _replica_actor(replica_id: str):
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::mixserve#LLMServer#") and actor["name"].endswith(replica_id):
            return ray.get_actor(actor["name"], namespace=actor["namespace"])
    raise LookupError(replica_id)


class _Stream(threading.Thread):
    """One streamed completion, read to its end; what it saw."""

    def __init__(self, url: str, i: int):
        super().__init__(daemon=True)
        self.url, self.i = url, i
        self.replica, self.tokens, self.events, self.done, self.failure = None, 0, [], False, None
        self.first_token = threading.Event()

    def run(self):
        prompt = FIRST_STREAM_PROMPT if self.i == 0 else f"stream {self.i} goes on"
        body = {"prompt": prompt, "max_tokens": 480, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                self.replica = r.headers["x-mixserve-replica"]
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        self.events.append(event)
                        self.tokens += "choices" in event
                        self.first_token.set()
        except httpx.HTTPError as exc:  # a cut connection: what must never happen
            self.failure = exc
        finally:
            self.first_token.set()


# a whole KV block (16 tokens) and more: requests that start with it follow stream 0 to its replica
# (prefix routing); with 480 new tokens it stays within the test server's 512-token context
FIRST_STREAM_PROMPT = "The first stream tells a long story about rivers, stones, gardens and winter light, "


class _Unstreamed(threading.Thread):
    """One non-streamed completion; its response."""

    def __init__(self, url: str, i: int):
        super().__init__(daemon=True)
        self.url, self.i, self.response = url, i, None

    def run(self):
        body = {"prompt": FIRST_STREAM_PROMPT + f"whole answer {self.i} please", "max_tokens": 400, "ignore_eos": True}
        self.response = httpx.post(self.url + "/v1/completions", json=body, timeout=120)


def test_killing_a_replica_under_load_ends_its_streams_cleanly_and_loses_no_unstarted_request(two_replicas):
    url = two_replicas
    streams = [_Stream(url, i) for i in range(12)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.first_token.wait(60)
    time.sleep(1.5)  # stream 0's prompt blocks reach the router (routing stats every 0.5 s)
    unstreamed = [_Unstreamed(url, i) for i in range(4)]  # routed to stream 0's replica, the victim
    for u in unstreamed:
        u.start()
    time.sleep(1.0)  # admitted there
    victim = streams[0].replica
    ray.kill(_replica_actor(victim), no_restart=True)
    late = []  # sent while the replica dies: none had a token yet, so each must be routed again and succeed
    for i in range(8):
        late.append(httpx.post(url + "/v1/completions", json={"prompt": f"late {i}", "max_tokens": 4}, timeout=120))
    for s in streams + unstreamed:
        s.join(120)

    # a non-streamed request on the dead replica: 503, OpenAI's error body, and the header naming the
    # replica, as its success would have (the rest finish normally)
    for u in unstreamed:
        r = u.response
        assert r.status_code in (200, 503), r.text
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "replica_failed", r.text
            assert r.headers["x-mixserve-replica"] == victim and r.headers["retry-after"] == "1"
        else:
            assert r.json()["choices"][0]["finish_reason"] == "length"
            assert r.headers["x-mixserve-replica"]
    assert any(u.response.status_code == 503 for u in unstreamed), [u.response.headers for u in unstreamed]
    assert all(r.status_code == 200 for r in late), [r.text for r in late if r.status_code != 200]
    assert all(s.failure is None and s.done for s in streams), [(s.i, s.failure, s.done) for s in streams]
    on_victim = [s for s in streams if s.replica == victim]
    assert on_victim
    for s in on_victim:
        last = s.events[-1]
        if "error" in last:  # it was still streaming when its replica died
            assert last["error"]["code"] == "replica_failed" and s.tokens > 0
        else:  # it finished before
            assert last["choices"][0]["finish_reason"] == "length"
    assert any("error" in s.events[-1] for s in on_victim)
    survivors = [s for s in streams if s.replica != victim]
    assert all(s.events[-1]["choices"][0]["finish_reason"] == "length" for s in survivors)

    deadline = time.monotonic() + 30
    while victim in httpx.get(url + "/metrics").text:
        assert time.monotonic() < deadline, "the dead replica's series are still in /metrics"
        time.sleep(0.5)



def _running_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments["LLMServer"].replica_states.get("RUNNING", 0)


def _probe_pair(url: str) -> set[str]:
    """The replicas that answer two requests sent at once. One at a time, short prompts (no whole KV
    block, so no prefix affinity) always go to the same replica: the router's fallback prefers the
    smaller known cache on equal load. Sent together, the second sees the first's load."""

    async def both():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(url + "/v1/completions",
                                                      json={"prompt": f"probe {i}", "max_tokens": 16}) for i in (0, 1)))

    return {r.headers["x-mixserve-replica"] for r in asyncio.run(both()) if r.status_code == 200}


def test_scaling_down_lets_the_removed_replica_finish_its_streams(served):
    url, settings = served
    deadline = time.monotonic() + 120  # Serve notices the death at a health check, then starts and loads a replica
    seen: set = set()
    while _running_replicas() < 2 or len(seen) < 2:  # the replacement, once the ingress's router routes to it
        assert time.monotonic() < deadline, (
            f"the killed replica's replacement never served: replicas seen {seen}, LLM-server replica states "
            f"{serve.status().applications[APP_NAME].deployments['LLMServer'].replica_states}, "
            f"Ray available {ray.available_resources()}")
        seen |= _probe_pair(url)
        time.sleep(0.2)
    streams = []
    while len({s.replica for s in streams}) < 2:
        assert len(streams) < 16, "the router sent every stream to one replica"
        streams.append(_Stream(url, 100 + len(streams)))
        streams[-1].start()
        assert streams[-1].first_token.wait(60)
    assert not any(s.done for s in streams)
    serve.run(build_app(settings.model_copy(update={"replicas": 1})), name=APP_NAME, route_prefix="/")
    for s in streams:
        s.join(120)
    assert _running_replicas() == 1
    for s in streams:  # on the replica that stayed and on the one removed while they streamed
        assert s.failure is None and s.done, (s.i, s.failure, s.events[-1:])
        assert s.events[-1]["choices"][0]["finish_reason"] == "length", s.events[-1]
