"""Serving with tensor parallelism inside a replica's placement group, and backpressure."""

import concurrent.futures

import httpx
import pytest
from ray import serve

from mixserve.cluster.app import build_app
from mixserve.cluster.serve_command import wait_until_healthy
from mixserve.cluster.settings import ServeSettings
from mixserve.workers.engine import LLMEngine
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.sampling_params import SamplingParams

from mixserve.workers.ports import free_port

from .serve_helpers import start, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tp2_server(tiny_checkpoint):
    url, settings = start(tiny_checkpoint, tensor_parallel_size=2, replica_cpus=0.5, rank_cpus=0.5,
                          prefix_routing=False)
    yield url
    stop()


@pytest.fixture(scope="module")
def small_queue_server(tp2_server, tiny_checkpoint):
    """A second app on the same Serve instance, on a port of its own: one replica that takes 1 request and
    queues 1."""
    settings = ServeSettings(model=str(tiny_checkpoint), dtype="float32", max_model_len=512,
                             kv_cache_bytes=32 << 20, replica_cpus=1.0, rank_cpus=1.0, prefix_routing=False,
                             max_ongoing_requests=1, max_queued_requests=1, direct_http=True, port=free_port())
    serve.run(build_app(settings), name="small-queue", route_prefix=None, blocking=False)
    url = f"http://127.0.0.1:{settings.port}"
    wait_until_healthy(url, 120)
    return url


def test_tp2_replica_serves_the_same_greedy_text_as_the_offline_engine(tp2_server, tiny_checkpoint):
    prompt = "Tensor parallel serving"
    r = httpx.post(tp2_server + "/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0},
                   timeout=120)
    assert r.status_code == 200, r.text
    offline = LLMEngine(EngineConfig(model=str(tiny_checkpoint), dtype="float32", num_blocks=64))
    expected = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    assert r.json()["choices"][0]["text"] == expected


def test_full_queue_answers_503_with_retry_after_then_recovers(small_queue_server):
    url = small_queue_server
    body = {"prompt": "busy " * 20, "max_tokens": 300, "ignore_eos": True, "temperature": 0}

    def call(_):
        return httpx.post(url + "/v1/completions", json=body, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(call, range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert 503 in statuses and 200 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers.get("retry-after") and rejected.json()["error"]["message"], rejected.text
    ok = httpx.post(url + "/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
