"""Prometheus metrics of the API, served as text on /metrics of the API port.

Names follow vLLM's (`vllm:` -> `mixserve:`) so existing dashboards map over. Request metrics are
observed at the ingress when a request ends; its stages come from two clocks: the engine's (queue,
prefill, decode: router/engine_api.py GenerateChunk.engine_times) and the ingress's (time to first
token, inter-token latency, end to end), and their difference is the time the request spent outside
the engine (routing, Ray, the relay, HTTP): `request_time_outside_engine_seconds`, until its first
token and until its end. Per-replica engine gauges show each replica's latest published load
(router/engine_api.py ReplicaLoad, read at scrape time), labelled by replica; a replica that no
longer publishes (gone) loses its series.
"""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine_api import ReplicaLoad

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                    80.0)


class ServingMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        self.model = model_name
        r = self.registry
        self.http_requests = Counter("mixserve:http_requests", "HTTP requests by endpoint and status",
                                     ["model_name", "endpoint", "status"], registry=r)
        self.request_success = Counter("mixserve:request_success", "Finished requests by finish reason",
                                       ["model_name", "finished_reason"], registry=r)
        self.prompt_tokens = Counter("mixserve:prompt_tokens", "Prompt tokens processed", ["model_name"], registry=r)
        self.generation_tokens = Counter("mixserve:generation_tokens", "Tokens generated", ["model_name"], registry=r)
        self.ttft = Histogram("mixserve:time_to_first_token_seconds", "Time to first token", ["model_name"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mixserve:inter_token_latency_seconds", "Time between streamed tokens", ["model_name"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mixserve:e2e_request_latency_seconds", "Request latency", ["model_name"],
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram("mixserve:request_queue_time_seconds", "Time in the engine's waiting queue",
                                    ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prefill_time = Histogram("mixserve:request_prefill_time_seconds", "Time in the engine from first "
                                      "scheduled to first token", ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.decode_time = Histogram("mixserve:request_decode_time_seconds", "Time in the engine from first token "
                                     "to the end", ["model_name"], buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram("mixserve:request_inference_time_seconds", "Time in the engine's running "
                                        "phase (prefill + decode)", ["model_name"], buckets=_LATENCY_BUCKETS,
                                        registry=r)
        self.outside_engine = Histogram("mixserve:request_time_outside_engine_seconds", "Time of a request outside "
                                        "the engine (routing, Ray, relay, HTTP) until its first token or its end",
                                        ["model_name", "until"], buckets=_LATENCY_BUCKETS, registry=r)
        labels = ["model_name", "replica"]
        self.running = Gauge("mixserve:num_requests_running", "Sequences running on the replica", labels, registry=r)
        self.waiting = Gauge("mixserve:num_requests_waiting", "Sequences waiting on the replica", labels, registry=r)
        self.kv_usage = Gauge("mixserve:kv_cache_usage_perc", "Fraction of KV blocks in use", labels, registry=r)
        self.weight_bytes = Gauge("mixserve:weight_bytes", "Bytes of one rank's weights (quantized codes and scales "
                                  "included)", labels, registry=r)
        self.prefix_queries = Counter("mixserve:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels, registry=r)
        self.prefix_hits = Counter("mixserve:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   labels, registry=r)
        self.preemptions = Counter("mixserve:num_preemptions", "Sequences preempted", labels, registry=r)
        self._last_totals: dict[str, tuple[int, int, int]] = {}

    def observe_load(self, load: ReplicaLoad) -> None:
        labels = (self.model, load.replica)
        self.running.labels(*labels).set(load.num_running)
        self.waiting.labels(*labels).set(load.num_waiting)
        self.kv_usage.labels(*labels).set(load.kv_usage)
        self.weight_bytes.labels(*labels).set(load.weight_bytes)
        before = self._last_totals.get(load.replica, (0, 0, 0))
        now = (load.prefix_queries, load.prefix_hits, load.preemptions)
        for counter, old, new in zip((self.prefix_queries, self.prefix_hits, self.preemptions), before, now):
            if new > old:
                counter.labels(*labels).inc(new - old)
        self._last_totals[load.replica] = tuple(max(o, n) for o, n in zip(before, now))

    def observe_loads(self, loads: list[ReplicaLoad]) -> None:
        """The replicas' gauges as published now; replicas absent from `loads` lose their series."""
        for gone in set(self._last_totals) - {load.replica for load in loads}:
            self.forget_replica(gone)
        for load in loads:
            self.observe_load(load)

    def forget_replica(self, replica: str) -> None:
        """Drop every series of a replica that died, so dashboards do not keep showing its last values."""
        for metric in (self.running, self.waiting, self.kv_usage, self.weight_bytes, self.prefix_queries,
                       self.prefix_hits, self.preemptions):
            try:
                metric.remove(self.model, replica)
            except KeyError:  # it never reported this series
                pass
        self._last_totals.pop(replica, None)

    def render(self) -> bytes:
        return generate_latest(self.registry)
