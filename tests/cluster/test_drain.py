"""SIGTERM (and SIGINT) drain `mixserve serve`: new requests get 503 + Retry-After while every stream
in flight runs to its end, then Serve and the local Ray head stop and the process exits 0, leaving
no process it started. The drain rule itself (cluster/drain.py) is checked on a fake app."""

import json
import signal
import threading
import time
from types import SimpleNamespace

import httpx
import psutil
import pytest

import mixserve.cluster.drain as drain

from .serve_process import start_mixserve

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
    from mixserve.router.ingress import OpenAIIngress
    from mixserve.router.request_pipeline import ApiError

    ingress = SimpleNamespace(draining=OpenAIIngress.draining, pipeline=SimpleNamespace(in_flight=3))  # no model
    OpenAIIngress._refuse_while_draining(ingress)  # serving: nothing refused
    assert OpenAIIngress.drain(ingress) == 3 and ingress.draining
    with pytest.raises(ApiError) as refused:
        OpenAIIngress._refuse_while_draining(ingress)
    assert refused.value.status == 503 and refused.value.body["error"]["code"] == "shutting_down"
