"""What the soak (soak.py) judges, as plain functions: a request's outcome from what the client saw,
the dead replica's series in /metrics, the RSS-growth rule and the run's verdict.

Outcome of one request (`classify`), first rule that applies:
1. abandoned: the client closed the stream on purpose after its first token (not a failure).
2. rejected_overload: 429 or 503 with Retry-After and a JSON error that is not `replica_failed`.
3. No response at all (the connection failed before any status): failed_before_first_token.
4. Not 200: a JSON error body (error.message) is a clear error; anything else is failed_cut. A
   stream's non-200 came before its first token (the ingress awaits the first chunk before it sends
   200), so it is failed_before_first_token. A non-streamed request never shows a token before its
   answer, so its 5xx JSON error is failed_in_flight_clean, unless the server says it had generated
   0 tokens ("after 0 token(s)", router/request_pipeline.py's replica_failed message): then it was
   not in flight and is failed_before_first_token.
5. 200, not streamed: ok if the body is a JSON completion (has `choices`), else failed_cut.
6. 200, streamed: tokens = events carrying `choices` (the ingress sends none before the engine's
   first chunk). A clean end is `data: [DONE]` reached with every event JSON and no transport error.
   - an error event that is the last event before a clean end: failed_in_flight_clean after a
     token, failed_before_first_token before one;
   - no error event and a clean end with a token: ok;
   - anything else (connection broken, no [DONE], non-JSON event, an error event not followed by
     [DONE]): failed_cut after a token, failed_before_first_token before one.

Verdict (`verdict`): the run passes when failed_before_first_token == 0, failed_cut == 0, the leak
check passed, every process kind that lived through the whole run grew its RSS by less than
RSS_GROWTH_LIMIT (and there was such a process to judge), and every killed replica's series left /metrics within SERIES_GONE_LIMIT_S.
"""

import json
import re
from dataclasses import dataclass, field

OUTCOMES = ("ok", "abandoned", "rejected_overload", "failed_before_first_token", "failed_in_flight_clean",
            "failed_cut")
RSS_GROWTH_LIMIT = 0.05  # fraction of a process kind's RSS after warm-up
SERIES_GONE_LIMIT_S = 30.0  # a dead replica's /metrics series must be gone within this


@dataclass(slots=True)
class Transcript:
    """What the client saw of one request."""

    stream: bool
    status: int | None = None  # None: no response (the connection failed first)
    retry_after: str | None = None
    replica: str | None = None  # the x-mixserve-replica header
    events: list = field(default_factory=list)  # SSE data payloads: a dict, or the raw text when not JSON
    done: bool = False  # `data: [DONE]` arrived
    body: object = None  # not streamed, or not 200: the JSON body, or its raw text when not JSON
    transport_error: str | None = None
    abandoned: bool = False


@dataclass(slots=True)
class Outcome:
    kind: str  # one of OUTCOMES
    message: str | None = None
    code: str | int | None = None


def json_or_text(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _error_fields(payload) -> tuple[str | None, str | int | None]:
    """(error.message, error.code) of an OpenAI error body; (None, None) when it is not one."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        return None, None
    return str(error["message"]), error.get("code")


def _is_token_event(event) -> bool:
    return isinstance(event, dict) and bool(event.get("choices"))


def _server_says_no_token(message: str) -> bool:
    match = re.search(r"after (\d+) token", message)
    return match is not None and int(match.group(1)) == 0


def classify(t: Transcript) -> Outcome:
    """The request's outcome by the rules in this module's docstring."""
    if t.abandoned:
        return Outcome("abandoned")
    if t.status is None:
        return Outcome("failed_before_first_token", t.transport_error or "no response")
    if t.status != 200:
        message, code = _error_fields(t.body)
        if message is None:
            return Outcome("failed_cut", f"HTTP {t.status} without a JSON error: {str(t.body)[:120]}")
        if t.status in (429, 503) and t.retry_after is not None and code != "replica_failed":
            return Outcome("rejected_overload", message, code)
        if t.stream or t.status < 500 or _server_says_no_token(message):
            return Outcome("failed_before_first_token", message, code)
        return Outcome("failed_in_flight_clean", message, code)
    if not t.stream:
        if t.transport_error is None and isinstance(t.body, dict) and t.body.get("choices"):
            return Outcome("ok")
        return Outcome("failed_cut", t.transport_error or f"not a completion: {str(t.body)[:120]}")
    tokens = sum(_is_token_event(e) for e in t.events)
    clean_end = t.done and t.transport_error is None and all(isinstance(e, dict) for e in t.events)
    errors = [e for e in t.events if isinstance(e, dict) and "error" in e]
    if errors and clean_end and t.events[-1] is errors[0]:
        message, code = _error_fields(errors[0])
        if message is not None:
            return Outcome("failed_in_flight_clean" if tokens else "failed_before_first_token", message, code)
    if not errors and clean_end and tokens:
        return Outcome("ok")
    why = t.transport_error or ("an error event without a clean end" if errors
                                else "stream ended without [DONE]" if not t.done else "a non-JSON event")
    return Outcome("failed_cut" if tokens else "failed_before_first_token", why)


def message_group(message: str) -> str:
    """A failure message with its numbers as N, so that messages differing only in counts group together."""
    return re.sub(r"\d+", "N", message)


def replica_series(metrics_text: str) -> dict[str, dict[str, float]]:
    """{replica label: {sample name: value}} of every /metrics sample carrying a `replica` label."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if "replica" in sample.labels:
                out.setdefault(sample.labels["replica"], {})[sample.name] = sample.value
    return out


def rss_growth(first: dict[int, tuple[str, int]], last: dict[int, tuple[str, int]]) -> dict[str, dict]:
    """Per process kind, over the processes sampled at both ends ({pid: (kind, rss bytes)}): summed RSS
    at the start and the end and the growth as a fraction of the start."""
    out: dict[str, dict] = {}
    for pid, (kind, start) in first.items():
        if pid in last:
            k = out.setdefault(kind, {"processes": 0, "start_bytes": 0, "end_bytes": 0})
            k["processes"] += 1
            k["start_bytes"] += start
            k["end_bytes"] += last[pid][1]
    for k in out.values():
        k["growth"] = k["end_bytes"] / k["start_bytes"] - 1 if k["start_bytes"] else 0.0
    return out


def verdict(counts: dict[str, int], leak_passed: bool, growth: dict[str, dict],
            series_gone_s: list[float | None]) -> list[str]:
    """The criteria the run missed; empty when it passes."""
    problems = []
    for kind in ("failed_before_first_token", "failed_cut"):
        if counts.get(kind, 0):
            problems.append(f"{counts[kind]} request(s) {kind}")
    if not leak_passed:
        problems.append("KV usage or running/waiting requests did not return to 0 on every replica")
    if not growth:
        problems.append("no serving process lived through the run to check its RSS")
    for kind, g in sorted(growth.items()):
        if g["growth"] >= RSS_GROWTH_LIMIT:
            problems.append(f"{kind} RSS grew {g['growth']:.1%} (limit {RSS_GROWTH_LIMIT:.0%})")
    for i, gone in enumerate(series_gone_s):
        if gone is None or gone > SERIES_GONE_LIMIT_S:
            problems.append(f"kill {i + 1}: the dead replica's /metrics series were not gone within "
                            f"{SERIES_GONE_LIMIT_S:.0f} s")
    return problems
