"""`--ingress direct --direct-http`: the LLM server is its own HTTP ingress (one deployment, one
replica) and serves HTTP on the port itself (no Ray hop per token; no Serve proxy runs). Same
API as the separate ingress: greedy text, streaming, chat, metrics, cancellation and the engine
calls Serve and the CLI make."""

import asyncio

import httpx
import openai
import pytest
from pydantic import ValidationError
from ray import serve

from mixserve.cluster.settings import ServeSettings
from mixserve.workers.engine import LLMEngine
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.sampling_params import SamplingParams

from .serve_helpers import start, stop, wait_until_idle


@pytest.fixture(scope="module")
def direct(tiny_checkpoint):
    url, settings = start(tiny_checkpoint, ingress="direct", direct_http=True, replica_cpus=1.0,
                          max_ongoing_requests=4, max_queued_requests=4)
    yield url, openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    stop()


def test_direct_shape_is_one_deployment_and_one_replica():
    with pytest.raises(ValidationError, match="one replica"):
        ServeSettings(ingress="direct", replicas=2)
    with pytest.raises(ValidationError, match="one replica"):
        ServeSettings(ingress="direct", min_replicas=1, max_replicas=2)


def test_direct_ingress_serves_the_same_api(direct, tiny_checkpoint):
    url, client = direct
    assert list(serve.status().applications["mixserve"].deployments) == ["LLMServer"]
    assert serve.status().proxies == {}  # no gRPC asked for: Serve's proxy is not started at all
    model = client.models.list().data[0].id
    offline = LLMEngine(EngineConfig(model=str(tiny_checkpoint), dtype="float32", num_blocks=128))
    expected = offline.generate(["The direct route"], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    text = client.completions.create(model=model, prompt="The direct route", max_tokens=12, temperature=0).choices[0].text
    assert text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="The direct route", max_tokens=12, temperature=0, stream=True))
    assert streamed == expected
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    assert chat.choices[0].message.content is not None and chat.usage.completion_tokens > 0
    bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=30)
    assert "x-request-id" not in bad.headers  # answered by the replica's own server, not Serve's HTTP proxy
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    metrics = httpx.get(url + "/metrics").text
    assert 'mixserve:http_requests_total{endpoint="/v1/completions"' in metrics.replace(f'model_name="{model}",', "")
    assert "mixserve:num_requests_running{" in metrics


def test_a_closed_stream_frees_its_blocks_in_the_engine(direct):
    url, _ = direct
    with httpx.Client(timeout=60) as http:
        body = {"prompt": "stream me " * 10, "max_tokens": 400, "stream": True, "ignore_eos": True}
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
    load = wait_until_idle()
    assert (load.num_running, load.kv_usage) == (0, 0.0)
    # /metrics shows the engine as it is now, not as the abandoned stream's last chunk left it (1 running)
    gauges = [line for line in httpx.get(url + "/metrics").text.splitlines()
              if line.startswith(("mixserve:num_requests_running{", "mixserve:kv_cache_usage_perc{"))]
    assert len(gauges) == 2 and all(float(line.split()[-1]) == 0.0 for line in gauges), gauges
    report = serve.get_deployment_handle("LLMServer", "mixserve").kernel_report.remote().result(timeout_s=60)
    assert report["linear_kernels"]


def test_direct_http_caps_requests_in_flight_with_503_and_retry_after(direct):
    url, _ = direct
    body = {"prompt": "hold the line " * 4, "max_tokens": 64, "ignore_eos": True}

    async def flood():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=40)) as client:
            return await asyncio.gather(*(client.post(url + "/v1/completions", json=body) for _ in range(40)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 8, statuses
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "server_overloaded"
    assert wait_until_idle().idle
    assert httpx.post(url + "/v1/completions", json={"prompt": "after", "max_tokens": 2}, timeout=60).status_code == 200
