"""The soak's judgement (tools/benchmarks/soak_outcomes.py), without a server: how a request's
transcript is classified, when the run fails, the RSS rule, and finding a replica's /metrics series."""

from mixserve.router.engine_api import ReplicaLoad
from mixserve.router.metrics import ServingMetrics
from soak import SoakConfig, request_spec
from soak_outcomes import Transcript, classify, message_group, replica_series, rss_growth, verdict

TOKEN = {"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
LAST = {"choices": [{"index": 0, "text": "!", "finish_reason": "length"}]}
REPLICA_FAILED = {"error": {"message": "the replica serving this request failed (RayActorError) after 3 token(s); "
                                      "retry the request", "type": "server_error", "code": "replica_failed"}}
PASSING_RSS = {"llm_replica": {"processes": 1, "start_bytes": 100, "end_bytes": 101, "growth": 0.01}}


def _stream(*events, done=True, error=None) -> Transcript:
    return Transcript(stream=True, status=200, events=list(events), done=done, transport_error=error)


def test_a_stream_read_to_done_is_ok():
    assert classify(_stream(TOKEN, LAST)).kind == "ok"


def test_a_stream_ending_with_an_error_event_and_done_after_a_token_failed_in_flight_cleanly():
    outcome = classify(_stream(TOKEN, REPLICA_FAILED))
    assert outcome.kind == "failed_in_flight_clean"
    assert outcome.code == "replica_failed" and "after 3 token(s)" in outcome.message


def test_a_stream_cut_after_tokens_without_done_is_a_cut():
    assert classify(_stream(TOKEN, TOKEN, done=False)).kind == "failed_cut"
    assert classify(_stream(TOKEN, done=False, error="RemoteProtocolError: peer closed")).kind == "failed_cut"


def test_an_error_event_not_followed_by_done_is_a_cut():
    assert classify(_stream(TOKEN, REPLICA_FAILED, done=False)).kind == "failed_cut"


def test_a_non_json_event_is_a_cut():
    assert classify(_stream(TOKEN, "Internal Server Error")).kind == "failed_cut"


def test_failures_before_any_token_are_failed_before_first_token():
    no_response = Transcript(stream=True, transport_error="ConnectError: refused")
    error_status = Transcript(stream=True, status=503, retry_after="1", body=REPLICA_FAILED)
    error_event_first = _stream(REPLICA_FAILED)
    non_stream_says_zero = Transcript(stream=False, status=503, retry_after="1", body={"error": {
        **REPLICA_FAILED["error"], "message": "the replica serving this request failed (X) after 0 token(s)"}})
    for t in (no_response, error_status, error_event_first, non_stream_says_zero):
        assert classify(t).kind == "failed_before_first_token", t


def test_a_non_streamed_5xx_json_error_after_tokens_failed_in_flight_cleanly_and_a_non_json_one_is_a_cut():
    assert classify(Transcript(stream=False, status=503, retry_after="1", body=REPLICA_FAILED)).kind == \
        "failed_in_flight_clean"
    assert classify(Transcript(stream=False, status=502, body="Bad Gateway")).kind == "failed_cut"


def test_503_with_retry_after_for_overload_is_a_rejection():
    overloaded = {"error": {"message": "the server is at capacity; retry shortly", "type": "server_overloaded",
                            "code": 503}}
    assert classify(Transcript(stream=True, status=503, retry_after="1", body=overloaded)).kind == "rejected_overload"
    assert classify(Transcript(stream=True, status=503, body=overloaded)).kind == "failed_before_first_token"


def test_a_stream_the_client_abandoned_is_not_a_failure():
    assert classify(Transcript(stream=True, status=200, events=[TOKEN], abandoned=True)).kind == "abandoned"


def test_messages_that_differ_only_in_counts_group_together():
    assert message_group("failed after 3 token(s)") == message_group("failed after 17 token(s)")


def test_the_verdict_passes_only_a_clean_run():
    clean = {"ok": 10, "abandoned": 1, "failed_in_flight_clean": 2}
    assert verdict(clean, True, PASSING_RSS, [3.0]) == []
    assert verdict({**clean, "failed_before_first_token": 1}, True, PASSING_RSS, [3.0])
    assert verdict({**clean, "failed_cut": 1}, True, PASSING_RSS, [3.0])
    assert verdict(clean, False, PASSING_RSS, [3.0])
    assert verdict(clean, True, PASSING_RSS, [None])
    assert verdict(clean, True, PASSING_RSS, [31.0])
    assert verdict(clean, True, {}, [])  # nothing was there to judge the RSS of


def test_rss_growth_counts_only_processes_sampled_at_both_ends():
    first = {1: ("llm_replica", 1000), 2: ("llm_replica", 1000), 3: ("ingress", 500)}
    last = {1: ("llm_replica", 1040), 3: ("ingress", 530), 9: ("llm_replica", 5000)}  # 2 died, 9 replaced it
    growth = rss_growth(first, last)
    assert {k: growth["llm_replica"][k] for k in ("processes", "start_bytes", "end_bytes")} == \
        {"processes": 1, "start_bytes": 1000, "end_bytes": 1040}
    assert abs(growth["llm_replica"]["growth"] - 0.04) < 1e-12
    assert abs(growth["ingress"]["growth"] - 0.06) < 1e-12
    problems = verdict({"ok": 1}, True, growth, [])
    assert len(problems) == 1 and "ingress" in problems[0]


def test_a_forgotten_replica_has_no_series_left_in_the_real_metrics_text():
    metrics = ServingMetrics("m")
    for replica in ("aaa111", "bbb222"):
        metrics.observe_load(ReplicaLoad(replica, num_running=2, num_waiting=1, kv_usage=0.25, prefix_queries=32,
                                         prefix_hits=16, preemptions=0, weight_bytes=10))
    series = replica_series(metrics.render().decode())
    assert set(series) == {"aaa111", "bbb222"}
    assert series["aaa111"]["mixserve:kv_cache_usage_perc"] == 0.25
    assert series["aaa111"]["mixserve:num_requests_running"] == 2
    metrics.forget_replica("aaa111")
    assert set(replica_series(metrics.render().decode())) == {"bbb222"}


def test_the_traffic_is_the_same_for_the_same_seed_and_mixes_endpoints_and_streaming():
    cfg = SoakConfig(seed=3, max_tokens=32, disconnect_fraction=0.5)
    specs = [request_spec(cfg, i, "m") for i in range(200)]
    assert specs[:5] == [request_spec(cfg, i, "m") for i in range(5)]
    assert {s.endpoint for s in specs} == {"/v1/completions", "/v1/chat/completions"}
    assert {s.body["stream"] for s in specs} == {True, False}
    assert all(8 <= s.body["max_tokens"] <= 32 for s in specs)
    assert any(s.abandon for s in specs) and not any(s.abandon and not s.body["stream"] for s in specs)


def test_the_soak_flags_take_the_engine_defaults():
    from mixserve.workers.engine_config import EngineConfig
    from soak import build_parser

    assert build_parser().parse_args([]).tensor_parallel_size == EngineConfig(model="m").tensor_parallel_size
