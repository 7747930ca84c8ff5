"""The OpenAI-compatible API on a real Ray Serve app over loopback, driven by the official
`openai` client and raw HTTP."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from mixserve.workers.engine import LLMEngine
from mixserve.workers.engine_config import EngineConfig
from mixserve.workers.sampling_params import SamplingParams

from .serve_helpers import free_port, llm_stats, start, stop, wait_until_idle

KEY = "test-key-123"
ADMIN_KEY = "test-admin-key-456"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "requests.jsonl"
    url, settings = start(tiny_checkpoint, api_key=KEY, admin_key=ADMIN_KEY, request_log=str(log),
                          grpc_port=free_port())
    yield url, settings, log
    stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    return LLMEngine(EngineConfig(model=str(tiny_checkpoint), dtype="float32", num_blocks=128))


def _post(url, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def _good_request_succeeds(url):
    r = _post(url, "/v1/completions", {"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_completion_greedy_text_equals_offline_engine(client, offline, server):
    prompt = "The quick brown fox jumps over"
    api = client.completions.create(model=_model(client), prompt=prompt, max_tokens=16, temperature=0)
    local = offline.generate([prompt], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert api.choices[0].text == local.text
    assert api.usage.completion_tokens == len(local.token_ids)
    assert api.usage.prompt_tokens == len(offline.tokenizer.encode(prompt))


def _model(client):
    return client.models.list().data[0].id


def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model=_model(client), prompt="Once upon a time", max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs).choices[0].text
    parts = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(parts) == whole


def test_chat_greedy_text_equals_offline_engine_on_the_chat_template(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    api = client.chat.completions.create(model=_model(client), messages=messages, max_tokens=12, temperature=0)
    ids = offline.tokenizer.encode_chat(messages)
    local = offline.generate([ids], SamplingParams(temperature=0, max_tokens=12))[0].outputs[0].text
    assert api.choices[0].message.content == local.removeprefix(" ")
    assert api.choices[0].message.role == "assistant"


def test_streamed_chat_with_usage_in_last_chunk(client):
    kwargs = dict(model=_model(client), messages=[{"role": "user", "content": "Hi"}], max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_token_id_prompt_n_echo_logprobs_seed(client):
    ids = [1, 415, 2936, 9060, 285, 1142]
    r = client.completions.create(model=_model(client), prompt=ids, max_tokens=6, n=2, temperature=1.0,
                                  seed=42, logprobs=2, echo=True)
    again = client.completions.create(model=_model(client), prompt=ids, max_tokens=6, n=2, temperature=1.0,
                                      seed=42, logprobs=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == [c.text for c in again.choices]  # seeded: reproducible
    prefix = r.choices[0].text[: len(r.choices[0].text) - len("".join(r.choices[0].logprobs.tokens[5:]))]
    assert prefix  # the echoed prompt text comes first
    assert all(len(top) <= 2 for top in r.choices[0].logprobs.top_logprobs)
    assert r.usage.completion_tokens == 12


def test_stop_string_ends_the_completion(client):
    kwargs = dict(model=_model(client), prompt="Hello world, this is", max_tokens=24, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    stop = text[8:11]
    stopped = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.text == text[: text.index(stop)] and stopped.finish_reason == "stop"


@pytest.mark.parametrize(
    "name, path, body, raw, status",
    [
        ("malformed JSON", "/v1/completions", None, b'{"prompt": "hi", ', 400),
        ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, None, 404),
        ("max_tokens -1", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, None, 400),
        ("temperature -1", "/v1/completions", {"prompt": "hi", "temperature": -1}, None, 400),
        ("context too long", "/v1/completions", {"prompt": [1] + [100] * 600, "max_tokens": 4}, None, 400),
        ("n = 0", "/v1/completions", {"prompt": "hi", "n": 0}, None, 400),
        ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, None, 400),
        ("out-of-vocabulary id", "/v1/completions", {"prompt": [1, 32000]}, None, 400),
        ("empty prompt", "/v1/completions", {"prompt": ""}, None, 400),
        ("2 MB body", "/v1/completions", {"prompt": "x" * (2 << 20)}, None, 413),
        ("top_k beyond int64", "/v1/completions",
         {"prompt": "Hello", "max_tokens": 5, "top_k": 9223372036854775808, "temperature": 0.7}, None, 400),
        ("seed beyond int64", "/v1/completions", {"prompt": "hi", "seed": 2**64}, None, 400),
        ("NaN temperature", "/v1/completions", None, b'{"prompt": "hi", "temperature": NaN}', 400),
        ("5000-digit integer", "/v1/completions", None, b'{"prompt": "hi", "n": ' + b"9" * 5000 + b"}", 400),
        ("JSON nested 100000 deep", "/v1/completions", None, b"[" * 100000 + b"]" * 100000, 400),
        ("negative stop id", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [-1]}, None, 400),
        ("17 stop strings", "/v1/completions", {"prompt": "hi", "stop": [str(i) for i in range(17)]}, None, 400),
    ],
)
def test_bad_input_gets_a_4xx_openai_error_and_the_server_keeps_serving(server, name, path, body, raw, status):
    url = server[0]
    if raw is not None:
        r = httpx.post(url + path, content=raw, headers={"Authorization": f"Bearer {KEY}",
                                                          "Content-Type": "application/json"}, timeout=60)
    else:
        r = _post(url, path, body)
    assert r.status_code == status, (name, r.status_code, r.text)
    error = r.json()["error"]
    assert error["message"] and error["type"]
    _good_request_succeeds(url)


def test_a_chunked_body_over_the_limit_is_413(server):
    url = server[0]

    def chunks():  # no Content-Length: the size is only known while reading
        yield b'{"prompt": "'
        for _ in range(64):
            yield b"x" * (64 << 10)
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]["message"]
    _good_request_succeeds(url)


def test_context_too_long_names_both_lengths(server):
    r = _post(server[0], "/v1/completions", {"prompt": [1] + [100] * 600, "max_tokens": 4})
    message = r.json()["error"]["message"]
    assert "512" in message and "605" in message


def test_wrong_or_missing_api_key_is_401_and_health_stays_open(server):
    url = server[0]
    assert _post(url, "/v1/completions", {"prompt": "hi"}, key="wrong").status_code == 401
    assert _post(url, "/v1/completions", {"prompt": "hi"}, key=None).status_code == 401
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/health").status_code == 200
    _good_request_succeeds(url)


def test_closing_8_streams_early_leaves_no_kv_blocks_in_use(server):
    url = server[0]
    with httpx.Client(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for i in range(8):
            body = {"prompt": f"stream number {i} " * 10, "max_tokens": 400, "stream": True, "ignore_eos": True}
            with http.stream("POST", url + "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                seen = 0
                for line in lines:
                    if line.startswith("data: "):
                        seen += 1
                        if seen == 2:
                            break
    load = wait_until_idle()
    assert (load.num_running, load.num_waiting, load.kv_usage) == (0, 0, 0.0)


def test_metrics_use_vllm_style_names(server, client):
    client.completions.create(model=_model(client), prompt="metrics", max_tokens=4)
    text = httpx.get(server[0] + "/metrics").text
    for name in ("mixserve:time_to_first_token_seconds_bucket", "mixserve:inter_token_latency_seconds_bucket",
                 "mixserve:num_requests_running", "mixserve:kv_cache_usage_perc", "mixserve:prompt_tokens_total",
                 "mixserve:generation_tokens_total", "mixserve:prefix_cache_queries_total",
                 'mixserve:http_requests_total{endpoint="/v1/completions"'):
        assert name in text.replace('model_name="' + _model(client) + '",', ""), name


def test_each_request_is_logged_as_one_json_line(server, client):
    client.completions.create(model=_model(client), prompt="log me", max_tokens=3)
    lines = [json.loads(line) for line in server[2].read_text().splitlines()]
    last = lines[-1]
    assert last["request_id"].startswith("cmpl-") and last["replica"] and last["status"] == "ok"
    assert last["prompt_tokens"] > 0 and last["completion_tokens"] == 3 and last["ttft_s"] is not None
    assert any(line["http_status"] == 401 for line in lines)


STAGES = {  # histogram -> the request log's field (router/request_log.py)
    "mixserve:request_queue_time_seconds": "queue_s",
    "mixserve:request_prefill_time_seconds": "prefill_s",
    "mixserve:request_decode_time_seconds": "decode_s",
    "mixserve:time_to_first_token_seconds": "ttft_s",
}


def _histogram_totals(url) -> dict:
    """{(histogram name, labels): (sum, count)} from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                key = (sample.name.rsplit("_", 1)[0], tuple(sorted((k, v) for k, v in sample.labels.items()
                                                                    if k != "model_name")))
                sums = totals.setdefault(key, [0.0, 0.0])
                sums[0 if sample.name.endswith("_sum") else 1] += sample.value
    return totals


def test_stage_histograms_move_and_their_sums_match_the_request_log(server, client):
    """Queue, prefill and decode time in the engine, time to first token, and the time outside the
    engine (until the first token and the end): each request's stages are in its log line, and the
    histograms' sums are the sums over those lines."""
    url, _, log = server
    before = _histogram_totals(url)
    model = _model(client)
    client.completions.create(model=model, prompt="stage one", max_tokens=6)
    list(client.completions.create(model=model, prompt="stage two", max_tokens=6, stream=True))
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "stage three"}], max_tokens=4)
    after = _histogram_totals(url)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    last = lines[-3:]
    assert all(line["status"] == "ok" for line in last)
    for line in last:
        assert line["queue_s"] >= 0 and line["prefill_s"] > 0 and line["decode_s"] > 0
        assert 0 <= line["outside_engine_first_token_s"] <= line["ttft_s"]
        assert 0 <= line["outside_engine_s"] <= line["total_s"]
    fields = {**{(name, ()): field for name, field in STAGES.items()},
              ("mixserve:request_time_outside_engine_seconds", (("until", "first_token"),)):
                  "outside_engine_first_token_s",
              ("mixserve:request_time_outside_engine_seconds", (("until", "end"),)): "outside_engine_s"}
    for key, field in fields.items():
        moved = after[key][1] - before.get(key, (0.0, 0.0))[1]
        assert moved == 3, (key, moved)  # every request observed once
        logged = [line[field] for line in lines if line.get(field) is not None]
        assert after[key][1] == len(logged), key
        assert abs(after[key][0] - sum(logged)) < 1e-5 * len(logged) + 1e-9, (key, after[key][0], sum(logged))


def _grpc_stub(settings):
    import grpc

    from mixserve.router import generate_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
    return generate_pb2_grpc.GenerateServiceStub(channel)


def test_grpc_generate_unary_and_streaming_match_http(server, client):
    import grpc

    from mixserve.router import generate_pb2

    settings = server[1]
    stub = _grpc_stub(settings)
    auth = (("authorization", f"Bearer {KEY}"),)
    request = generate_pb2.GenerateRequest(prompt="gRPC says", max_tokens=10, temperature=0)
    http_text = client.completions.create(model=_model(client), prompt="gRPC says", max_tokens=10,
                                          temperature=0).choices[0].text
    reply = stub.Generate(request, metadata=auth, timeout=60)
    assert reply.text == http_text and reply.completion_tokens == len(reply.token_ids) and reply.finish_reason
    parts = list(stub.GenerateStream(request, metadata=auth, timeout=60))
    assert "".join(p.text for p in parts) == http_text and parts[-1].finish_reason == reply.finish_reason
    with pytest.raises(grpc.RpcError) as denied:
        stub.Generate(request, timeout=60)
    assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as bad:
        stub.Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1, 32000]), metadata=auth, timeout=60)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "vocabulary" in bad.value.details()


def test_re_isq_switches_the_replica_to_int8_and_back_with_the_same_outputs(server):
    """POST /v1/re_isq (mistral.rs's name): the admin key required (401 without it; the API key never
    grants it), 400 for an unknown format, 409 while requests are in flight; none -> int8 shrinks the
    weights (/metrics shows it), int8 calibrated on the built-in text adds its input scales, and
    switching back gives the greedy outputs from before. (403 when the server has no admin key:
    tests/cluster/test_secrets.py.)"""
    url = server[0]
    greedy = {"prompt": [1] + list(range(300, 340)), "max_tokens": 10, "temperature": 0, "ignore_eos": True}

    def weight_bytes_in_metrics() -> float:
        lines = [line for line in httpx.get(url + "/metrics").text.splitlines()
                 if line.startswith("mixserve:weight_bytes{")]
        return float(lines[-1].rsplit(" ", 1)[1])

    before = _post(url, "/v1/completions", greedy).json()["choices"][0]["text"]
    full_bytes = weight_bytes_in_metrics()
    for key in ("wrong", None, KEY):  # a wrong key, none, the API key
        refused = _post(url, "/v1/re_isq", {"quantization": "int8"}, key=key)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_admin_key", refused.text
    bad = _post(url, "/v1/re_isq", {"quantization": "int3"}, key=ADMIN_KEY)
    assert bad.status_code == 400 and "quantization" in bad.json()["error"]["message"]

    switched = _post(url, "/v1/re_isq", {"quantization": "int8"}, key=ADMIN_KEY)
    assert switched.status_code == 200, switched.text
    assert switched.json()["quantization"] == "int8" and 0 < switched.json()["weight_bytes"] < full_bytes
    assert weight_bytes_in_metrics() == switched.json()["weight_bytes"]
    assert _post(url, "/v1/completions", greedy).status_code == 200
    # activation-aware: observed on the built-in text first; the input scales add a little. A client
    # cannot name a file on the server.
    calibrated = _post(url, "/v1/re_isq", {"quantization": "int8", "calibration": "builtin"}, key=ADMIN_KEY)
    assert calibrated.status_code == 200, calibrated.text
    assert calibrated.json()["calibration"] == "builtin"
    assert switched.json()["weight_bytes"] < calibrated.json()["weight_bytes"] < full_bytes
    assert _post(url, "/v1/completions", greedy).status_code == 200
    assert _post(url, "/v1/re_isq", {"quantization": "int8", "calibration": "/etc/passwd"},
                 key=ADMIN_KEY).status_code == 400

    # 3 requests x 16 sequences x 120 tokens: seconds of work for the engine (measured ~2.5 s each)
    long = {"prompt": "busy " * 10, "max_tokens": 120, "n": 16, "ignore_eos": True}
    with ThreadPoolExecutor(3) as pool:
        work = [pool.submit(_post, url, "/v1/completions", long) for _ in range(3)]
        deadline = time.monotonic() + 30
        while llm_stats()["load"].num_running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        busy = _post(url, "/v1/re_isq", {"quantization": "none"}, key=ADMIN_KEY)
        assert busy.status_code == 409 and "in flight" in busy.json()["error"]["message"], busy.text
        assert all(w.result().status_code == 200 for w in work)

    back = _post(url, "/v1/re_isq", {"quantization": "none"}, key=ADMIN_KEY)
    assert back.status_code == 200 and back.json()["weight_bytes"] == full_bytes
    assert _post(url, "/v1/completions", greedy).json()["choices"][0]["text"] == before


def _counter(metrics_text: str, endpoint: str, status: str) -> float:
    prefix = "mixserve:http_requests_total{"
    for line in metrics_text.splitlines():
        if line.startswith(prefix) and f'endpoint="{endpoint}"' in line and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_grpc_and_http_requests_both_count_in_metrics(server, client):
    """One request pipeline (router/request_pipeline.py): a gRPC request is counted, observed and
    logged like an HTTP one, its errors included."""
    import grpc

    from mixserve.router import generate_pb2

    url, settings = server[0], server[1]
    before = httpx.get(url + "/metrics").text
    client.completions.create(model=_model(client), prompt="count me", max_tokens=3)
    stub, auth = _grpc_stub(settings), (("authorization", f"Bearer {KEY}"),)
    stub.Generate(generate_pb2.GenerateRequest(prompt="count me", max_tokens=3), metadata=auth, timeout=60)
    with pytest.raises(grpc.RpcError):
        stub.Generate(generate_pb2.GenerateRequest(prompt="count me", max_tokens=3), timeout=60)  # no key
    with pytest.raises(grpc.RpcError) as bad:
        stub.Generate(generate_pb2.GenerateRequest(prompt="x", temperature=3.0), metadata=auth, timeout=60)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in bad.value.details()
    after = httpx.get(url + "/metrics").text
    for endpoint, status in (("/v1/completions", "200"), ("grpc:Generate", "200"), ("grpc:Generate", "401"),
                             ("grpc:Generate", "400")):
        assert _counter(after, endpoint, status) == _counter(before, endpoint, status) + 1, (endpoint, status)
