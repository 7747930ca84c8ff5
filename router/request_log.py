"""One log line per request: id, replica, prompt/completion tokens, status, and its stages: TTFT and
total time as the ingress saw them, queue, prefill and decode time in the engine, and the time
outside the engine (routing, Ray, relay, HTTP) until its first token and until its end.

Written through the `mixserve.requests` logger and, when a path is given, appended as JSON lines.
"""

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field

from .engine_api import GenerateChunk

logger = logging.getLogger("mixserve.requests")


@dataclass(slots=True)
class RequestRecord:
    endpoint: str
    request_id: str = ""
    replica: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_s: float | None = None
    total_s: float = 0.0
    queue_s: float | None = None  # in the engine (GenerateChunk.engine_times)
    prefill_s: float | None = None
    decode_s: float | None = None
    outside_engine_first_token_s: float | None = None  # ttft - queue - prefill
    outside_engine_s: float | None = None  # total - queue - prefill - decode
    status: str = ""
    http_status: int = 0
    finish_reasons: list = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter)
    _last_token_at: float | None = None
    _gaps: list = field(default_factory=list)  # (seconds, tokens) between streamed chunks

    def start(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id, self.prompt_tokens = request_id, prompt_tokens

    def on_chunk(self, chunk: GenerateChunk) -> None:
        now = time.perf_counter()
        self.replica = chunk.replica
        self.cached_tokens = chunk.num_cached_tokens
        self.queue_s, self.prefill_s, self.decode_s = chunk.engine_times
        new = sum(len(c.delta_token_ids) for c in chunk.choices)
        if new:
            if self.ttft_s is None:
                self.ttft_s = now - self._started
            elif self._last_token_at is not None:
                self._gaps.append((now - self._last_token_at, new))
            self._last_token_at = now
            self.completion_tokens += new
        self.finish_reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]

    def finish(self, http_status: int) -> None:
        self.total_s = time.perf_counter() - self._started
        self.http_status = http_status
        if not self.status:
            self.status = "ok" if http_status == 200 else "error"
        if self.ttft_s is not None and self.queue_s is not None and self.prefill_s is not None:
            self.outside_engine_first_token_s = max(0.0, self.ttft_s - self.queue_s - self.prefill_s)
            if self.decode_s is not None and http_status == 200:
                self.outside_engine_s = max(0.0, self.total_s - self.queue_s - self.prefill_s - self.decode_s)

    def observe(self, metrics) -> None:
        model = metrics.model
        if self.prompt_tokens and self.http_status == 200:
            metrics.prompt_tokens.labels(model).inc(self.prompt_tokens)
        if self.completion_tokens:
            metrics.generation_tokens.labels(model).inc(self.completion_tokens)
        if self.ttft_s is not None:
            metrics.ttft.labels(model).observe(self.ttft_s)
        for gap, tokens in self._gaps:
            for _ in range(tokens):
                metrics.itl.labels(model).observe(gap / tokens)
        if self.http_status == 200:
            metrics.e2e.labels(model).observe(self.total_s)
        for histogram, value in ((metrics.queue_time, self.queue_s), (metrics.prefill_time, self.prefill_s),
                                 (metrics.decode_time, self.decode_s)):
            if value is not None:
                histogram.labels(model).observe(value)
        if self.prefill_s is not None and self.decode_s is not None:
            metrics.inference_time.labels(model).observe(self.prefill_s + self.decode_s)
        for until, value in (("first_token", self.outside_engine_first_token_s), ("end", self.outside_engine_s)):
            if value is not None:
                metrics.outside_engine.labels(model, until).observe(value)
        for reason in self.finish_reasons:
            metrics.request_success.labels(model, reason).inc()

    def line(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        for key in ("ttft_s", "total_s", "queue_s", "prefill_s", "decode_s", "outside_engine_first_token_s",
                    "outside_engine_s"):
            d[key] = None if d[key] is None else round(d[key], 6)
        return d


class RequestLog:
    def __init__(self, path: str | None):
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: RequestRecord) -> None:
        line = json.dumps(record.line())
        logger.info(line)
        if self.path:
            with self._lock, open(self.path, "a") as f:
                f.write(line + "\n")
