"""SIGTERM (and SIGINT) drain `mixserve serve`: new requests get 503 + Retry-After while every stream
in flight runs to its end, then Serve and the local Ray head stop and the process exits 0, leaving
no process it started. The drain rule itself (cluster/drain.py) is checked on a fake app."""

import json
import os
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import psutil
import pytest

import mixserve.cluster.drain as drain

from .serve_process import start_mixserve

pytestmark = pytest.mark.slow

STREAMS = 8
MAX_TOKENS = 300
MAX_NUM_SEQS = 2  # the engine runs 2 streams at a time: the others wait in its queue when the signal comes
GRACE_S = 90  # --graceful-shutdown-timeout-s: the drain bound


def _stream(url: str, out: dict, first_chunk: threading.Event) -> None:
    body = {"prompt": "Tell me a long story.", "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    lines = []
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    first_chunk.set()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
    finally:
        first_chunk.set()
        out["lines"], out["ended"] = lines, time.monotonic()


def _wait_for_the_drain(url: str, streams_done) -> None:
    """Until /health stops answering 200 (it answers at once: a completion sent now would queue behind
    the streams in the engine until the drain ends). Fails if the streams all end first."""
    while not streams_done():
        if httpx.get(f"{url}/health", timeout=30).status_code != 200:
            return
        time.sleep(0.1)
    raise AssertionError("every stream ended before the drain was seen")


def _alive(procs: list[psutil.Process]) -> list[str]:
    alive = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_drains_every_stream_to_its_end_then_exits_0_leaving_no_process(sig, tiny_checkpoint,
                                                                                       tmp_path):
    proc, url, log = start_mixserve(tiny_checkpoint, tmp_path, {}, "--max-num-seqs", str(MAX_NUM_SEQS),
                                    "--graceful-shutdown-timeout-s", str(GRACE_S))
    started = psutil.Process(proc.pid).children(recursive=True)  # the head's gcs/raylet, its workers...
    assert any(p.name() == "raylet" for p in started)
    results = [{} for _ in range(STREAMS)]
    first = [threading.Event() for _ in range(STREAMS)]
    threads = [threading.Thread(target=_stream, args=(url, out, ev)) for out, ev in zip(results, first)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while sum(ev.is_set() for ev in first) < MAX_NUM_SEQS:  # the first streams are running
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(sig)
        signalled = time.monotonic()
        _wait_for_the_drain(url, lambda: not any(t.is_alive() for t in threads))
        # the proxy still listens while the streams go on: a new request reaches the ingress and is refused
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        refused_at = time.monotonic() - signalled
        for t in threads:
            t.join(timeout=GRACE_S + 30)
        returncode = proc.wait(timeout=GRACE_S + 60)
        exited_after = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
    output = log.read_text()
    assert returncode == 0, output[-3000:]

    # a new request during the drain: 503 + Retry-After with OpenAI's error body
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] and refused.json()["error"]["code"] == "shutting_down"
    # every stream ran to its end
    for out in results:
        assert out.get("status") == 200 and "error" not in out, out
        assert out["lines"][-1] == "[DONE]", out["lines"][-3:]
        usage = json.loads(out["lines"][-2])["usage"]
        assert usage["completion_tokens"] == MAX_TOKENS, usage
        assert out["ended"] - signalled > refused_at  # they were in flight when the refusal came
    streams_ended_after = max(out["ended"] for out in results) - signalled
    assert exited_after < GRACE_S + 30, exited_after  # the drain bound + Serve's and Ray's shutdown
    assert f"{sig.name}: draining" in output and "drain: " in output and "drained " in output, output[-3000:]

    deadline = time.monotonic() + 15  # Ray's workers notice their raylet's end within moments
    while _alive(started) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(started), _alive(started)
    drained_line = next(line for line in output.splitlines() if line.startswith("drained "))
    print(f"{sig.name}: 503 {refused_at:.1f} s after the signal; streams ended {streams_ended_after:.1f} s after; "
          f"exit {exited_after:.1f} s after; '{drained_line}'")


# ---- the drain rule on a fake app ------------------------------------------------------------------

def _fake_app(monkeypatch, readings):
    """drain_app against an app whose (requests, sequences) in flight are `readings`, one per read."""
    reads = iter(readings)
    monkeypatch.setattr(drain, "_deployments", lambda app: {"OpenAIIngress", "LLMServer"})
    monkeypatch.setattr(drain.serve, "get_deployment_handle", lambda name, app: name)
    monkeypatch.setattr(drain, "_in_flight", lambda ingress, llm: next(reads, readings[-1]))
    monkeypatch.setattr(drain, "POLL_S", 0.01)


def test_the_app_is_drained_after_two_quiet_reads_in_a_row(monkeypatch):
    _fake_app(monkeypatch, [(3, 5), (1, 2), (0, 0), (0, 1), (0, 0), (0, 0), (9, 9)])
    lines = []
    report = drain.drain_app(60, log=lines.append)
    assert report.complete and (report.requests, report.sequences) == (3, 5)
    assert "3 request(s) in flight" in lines[0]


def test_the_drain_stops_waiting_at_its_bound_or_when_cut_short(monkeypatch):
    _fake_app(monkeypatch, [(2, 2)])
    report = drain.drain_app(0.1, log=lambda line: None)
    assert not report.complete and report.left == 4 and 0.1 <= report.seconds < 5
    _fake_app(monkeypatch, [(2, 2)])
    report = drain.drain_app(60, cut_short=lambda: True, log=lambda line: None)
    assert not report.complete and report.seconds < 5


def test_the_ingress_refuses_new_requests_once_draining_and_reports_its_streams():
    from mixserve.router.request_pipeline import ApiError, RequestPipeline

    pipeline = RequestPipeline(model=None, llm=None, metrics=None, request_log=None)  # the drain needs none
    pipeline.in_flight = 3
    pipeline.refuse_while_draining()  # serving: nothing refused
    assert pipeline.drain() == 3 and pipeline.draining
    with pytest.raises(ApiError) as refused:
        pipeline.refuse_while_draining()
    assert refused.value.status == 503 and refused.value.body["error"]["code"] == "shutting_down"


# ---- mixserve drain: the preStop hook ----------------------------------------------------------------

def test_mixserve_drain_joins_the_cluster_and_drains_the_app_which_keeps_running(tiny_checkpoint, tmp_path):
    """The head pod's preStop hook: `mixserve drain` from another process returns once the streams in
    flight have ended, having turned new requests away; Serve and the app keep running (the pod's
    SIGTERM stops them)."""
    import subprocess

    from .serve_process import CLI, gcs_address_of, stop_mixserve

    proc, url, log = start_mixserve(tiny_checkpoint, tmp_path, {}, "--max-num-seqs", str(MAX_NUM_SEQS))
    results = [{} for _ in range(MAX_NUM_SEQS)]
    first = [threading.Event() for _ in results]
    threads = [threading.Thread(target=_stream, args=(url, out, ev)) for out, ev in zip(results, first)]
    try:
        for t in threads:
            t.start()
        for ev in first:
            assert ev.wait(120)
        done = subprocess.run([str(CLI), "drain", "--address", gcs_address_of(proc.pid), "--timeout-s", "60"],
                              capture_output=True, text=True, timeout=180, cwd=tmp_path,
                              env={**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token"})  # a local head's
        drained_at = time.monotonic()
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert "drained after" in done.stdout, done.stdout[-2000:]
        for t in threads:
            t.join(timeout=60)
        for out in results:
            assert out["lines"][-1] == "[DONE]" and json.loads(out["lines"][-2])["usage"]["completion_tokens"] == \
                MAX_TOKENS, out["lines"][-3:]
            assert out["ended"] <= drained_at  # the hook returned only after the streams had ended
        assert proc.poll() is None  # Serve keeps running
        assert httpx.get(f"{url}/health", timeout=30).status_code == 503
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
    finally:
        returncode = stop_mixserve(proc)
    assert returncode == 0, log.read_text()[-3000:]


def test_draining_a_node_moves_its_replica_elsewhere_after_the_stream_on_it_ends(tiny_checkpoint):
    """A worker pod's preStop hook (`mixserve drain --this-node`): Ray drains the node, Serve starts a
    replacement of its replica on another node and stops this one only once its stream has ended;
    drain_node returns when no replica of the app is left on the node."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from mixserve.cluster.app import build_app
    from mixserve.cluster.ray_start import ray_working_directory
    from mixserve.cluster.settings import ServeSettings
    from mixserve.router.engine_api import GenerateRequest
    from mixserve.workers.sampling_params import SamplingParams

    settings = ServeSettings(model=str(tiny_checkpoint), dtype="float32", max_model_len=2048, replica_cpus=1.0,
                             rank_cpus=1.0, kv_cache_bytes=32 << 20, graceful_shutdown_timeout_s=120,
                             routing_stats_period_s=0.5, warmup_s=0)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the head runs no replica
    cwd = os.getcwd()
    try:
        leaving = cluster.add_node(num_cpus=2)
        os.chdir(ray_working_directory())  # Ray's rule here (cluster/ray_start.py): no checkout on the path
        ray.init(address=cluster.address, log_to_driver=False)
        os.chdir(cwd)
        serve.start(proxy_location="Disabled")
        serve.run(build_app(settings), name=drain.APP_NAME, route_prefix=None)
        assert len(drain.replicas_on_node(leaving.node_id)) == 2  # the LLM server and the ingress
        cluster.add_node(num_cpus=2)  # where they can go

        llm = serve.get_deployment_handle(drain.LLM_DEPLOYMENT, drain.APP_NAME).options(stream=True)
        tokens, stream_ended = [], []

        def stream():
            req = GenerateRequest("long", [1] + list(range(300, 310)),
                                  SamplingParams(max_tokens=1500, ignore_eos=True, temperature=0.0))
            for chunk in llm.generate.remote(req):
                tokens.extend(chunk.choices[0].delta_token_ids)
            stream_ended.append(time.monotonic())

        streaming = threading.Thread(target=stream)
        streaming.start()
        deadline = time.monotonic() + 60
        while not tokens:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        lines = []
        assert drain.drain_node(leaving.node_id, timeout_s=120, log=lines.append), lines
        drained_at = time.monotonic()
        streaming.join(timeout=60)
        assert len(tokens) == 1500 and stream_ended and stream_ended[0] <= drained_at, (len(tokens), lines)
        after = serve.get_deployment_handle(drain.LLM_DEPLOYMENT, drain.APP_NAME).stats.remote().result(
            timeout_s=60)
        assert after["load"].idle  # the replacement serves
        print(" | ".join(lines))
    finally:
        os.chdir(cwd)
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def test_a_replica_too_busy_to_answer_counts_as_busy_and_a_dead_one_as_empty():
    class Handle:
        def __init__(self, results):
            self.results_ = results

        def broadcast(self, method):
            return SimpleNamespace(results=lambda **kw: self.results_)

    assert drain._broadcast(Handle([2, TimeoutError(), RuntimeError("actor died")]), "drain", lambda n: n) == 3


def test_the_first_stop_signal_asks_to_stop_and_the_second_to_stop_waiting():
    from mixserve.cluster.serve_command import StopSignals

    before = {sig: signal.getsignal(sig) for sig in StopSignals.SIGNALS}
    signals = StopSignals()
    try:
        signals.install()
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.wait(period_s=0.01) == "SIGTERM" and not signals.cut_short()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert signals.cut_short() and signals.received == ["SIGTERM", "SIGINT"]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
