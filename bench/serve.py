"""`mixserve bench serve`: load an OpenAI-compatible server over its streaming API and measure it.

Load: open loop (`rate`: sessions start at Poisson arrival times, `inf` = all at once) or closed
loop (`concurrency`: that many sessions in flight; each ends before its worker starts the next).
A session's requests go one after another (workloads.py). Every request streams
(`stream_options.include_usage`), greedy, EOS ignored.

Per request, timed on the client from just before the POST:
- TTFT: until the first chunk carrying text (completions `text`, chat `delta.content`);
- ITL: (last text chunk - first text chunk) / (completion tokens - 1), tokens from `usage`
  (a chunk may carry several tokens); `chunk_gap` are the raw gaps between text chunks;
- E2E: until `data: [DONE]`.
A request is an error if the status is not 200, the stream carries an error object, the connection
fails or the stream ends without `[DONE]`; errors are counted and reported, never fatal.
Throughputs divide by the wall time from the first request to the last answer. The server's
prefix-cache counters (`<prefix>:prefix_cache_{hits,queries}_total` on /metrics, mixserve's or
vLLM's) are read before and after the run; `X-Mixserve-Replica` names the replica of each request.
Every summary records `cpu`, the CPU of the machine running this load generator (kernels/capability.py;
the server's too when it runs here, as in `bench compare`).
"""

import asyncio
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np
from tqdm.auto import tqdm

from mixserve.kernels.capability import cpu_capability
from .workloads import BenchRequest, Workload


@dataclass(slots=True)
class RequestResult:
    session: int
    turn: int
    group: int | None = None
    ok: bool = False
    status: int = 0
    error: str | None = None
    start_s: float = 0.0  # since the start of the run
    ttft_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None
    chunk_gaps_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    replica: str | None = None
    text: str = ""


@dataclass(slots=True)
class LoadConfig:
    url: str
    model: str | None = None  # served model name; None = the first of /v1/models
    api_key: str | None = None
    rate: float | None = None  # requests (sessions) per second, Poisson; math.inf = all at once
    concurrency: int | None = None
    seed: int = 0  # arrival times
    warmup: int = 0  # short unrelated requests sent (at once) before the timed run
    timeout_s: float = 600.0
    progress: bool = True

    def __post_init__(self):
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate and concurrency")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _payload(cfg: LoadConfig, model: str, req: BenchRequest, messages: list[dict] | None) -> dict:
    body = {"model": model, "max_tokens": req.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if messages is not None:
        body["messages"] = messages
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(chunk: dict) -> str:
    choice = chunk["choices"][0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(client: httpx.AsyncClient, cfg: LoadConfig, endpoint: str, body: dict,
                       res: RequestResult, t0_run: float) -> RequestResult:
    """Stream one request and fill `res`; never raises for a server or connection failure."""
    start = time.perf_counter()
    res.start_s = start - t0_run
    first = last = None
    usage = None
    done = False
    try:
        async with client.stream("POST", cfg.url.rstrip("/") + endpoint, json=body, headers=cfg.headers) as resp:
            res.status = resp.status_code
            res.replica = resp.headers.get("x-mixserve-replica")
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"[:200]
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices") and (text := _chunk_text(chunk)):
                    now = time.perf_counter()
                    if first is None:
                        first = now
                        res.ttft_s = now - start
                    else:
                        res.chunk_gaps_s.append(now - last)
                    last = now
                    res.text += text
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    end = time.perf_counter()
    if res.error is None and not done:
        res.error = "stream ended without [DONE]"
    if usage:
        res.prompt_tokens = usage.get("prompt_tokens", 0)
        res.output_tokens = usage.get("completion_tokens", 0)
        res.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    else:
        res.prompt_tokens = len(body.get("prompt") or [])
        res.output_tokens = len(res.chunk_gaps_s) + (first is not None)
    if res.error is None:
        res.ok = True
        res.e2e_s = end - start
        if first is not None and res.output_tokens > 1:
            res.itl_s = (last - first) / (res.output_tokens - 1)
    return res


async def served_model(client: httpx.AsyncClient, cfg: LoadConfig) -> str:
    if cfg.model:
        return cfg.model
    r = await client.get(cfg.url.rstrip("/") + "/v1/models", headers=cfg.headers)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def scrape_prefix_counters(client: httpx.AsyncClient, url: str) -> dict[str, dict[str, float]]:
    """{replica: {"hits": tokens, "queries": tokens}} from /metrics; {} when there is none."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = await client.get(url.rstrip("/") + "/metrics")
        if r.status_code != 200:
            return {}
        families = list(text_string_to_metric_families(r.text))
    except (httpx.HTTPError, ValueError):
        return {}
    out: dict[str, dict[str, float]] = {}
    for family in families:
        for sample in family.samples:
            for kind in ("hits", "queries"):
                if sample.name.endswith(f"prefix_cache_{kind}_total"):
                    replica = sample.labels.get("replica", sample.labels.get("engine", ""))
                    out.setdefault(replica, {"hits": 0.0, "queries": 0.0})[kind] += sample.value
    return out


async def _warmup(client: httpx.AsyncClient, cfg: LoadConfig, model: str, vocab_hint: int = 1000) -> None:
    rng = random.Random(cfg.seed + 12345)
    reqs = [BenchRequest(session=-1, turn=0, max_tokens=4, prompt=[1] + [rng.randrange(300, 300 + vocab_hint)
                                                                         for _ in range(15)])
            for _ in range(cfg.warmup)]
    await asyncio.gather(*(send_request(client, cfg, "/v1/completions", _payload(cfg, model, r, None),
                                        RequestResult(-1, 0), time.perf_counter()) for r in reqs))


async def run_load(cfg: LoadConfig, workload: Workload) -> dict:
    """Run the workload against the server; returns the summary (see `summarize`)."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s, connect=30.0), limits=limits) as client:
        model = await served_model(client, cfg)
        if cfg.warmup:
            await _warmup(client, cfg, model)
        counters_before = await scrape_prefix_counters(client, cfg.url)
        load_before = os.getloadavg()
        results: list[RequestResult] = []
        label = f"{workload.name} " + (f"rate {cfg.rate}" if cfg.rate is not None else f"concurrency {cfg.concurrency}")
        bar = tqdm(total=workload.num_requests, desc=label, unit="req", disable=not cfg.progress, leave=False)
        t0 = time.perf_counter()

        async def run_session(session: list[BenchRequest]) -> None:
            messages: list[dict] | None = [] if workload.endpoint.endswith("chat/completions") else None
            for req in session:
                if messages is not None:
                    messages.append({"role": "user", "content": req.user_message})
                res = RequestResult(req.session, req.turn, req.group)
                await send_request(client, cfg, workload.endpoint, _payload(cfg, model, req, messages), res, t0)
                if messages is not None:
                    messages.append({"role": "assistant", "content": res.text})
                results.append(res)
                bar.update(1)

        if cfg.concurrency is not None:
            pending = iter(workload.sessions)

            async def worker() -> None:
                for session in pending:
                    await run_session(session)

            await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        else:
            rng = random.Random(cfg.seed)
            tasks, at = [], 0.0
            for session in workload.sessions:
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run_session(session)))
                at += rng.expovariate(cfg.rate) if math.isfinite(cfg.rate) else 0.0
            await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        bar.close()
        counters_after = await scrape_prefix_counters(client, cfg.url)
    summary = summarize(results, duration, workload)
    summary["config"] = {**{k: v for k, v in asdict(cfg).items() if k not in ("api_key", "progress")},
                         "model": model, "rate": _json_rate(cfg.rate), "workload": workload.name,
                         "endpoint": workload.endpoint, **workload.params}
    summary["load_avg_before"] = [round(x, 2) for x in load_before]
    summary["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    summary["server_prefix_cache"] = _counter_delta(counters_before, counters_after)
    summary["cpu"] = cpu_capability().summary()
    return summary


def _json_rate(rate: float | None):
    return "inf" if rate is not None and math.isinf(rate) else rate


def _counter_delta(before: dict, after: dict) -> dict:
    per = {rep: {k: after[rep][k] - before.get(rep, {}).get(k, 0.0) for k in ("hits", "queries")} for rep in after}
    hits, queries = sum(v["hits"] for v in per.values()), sum(v["queries"] for v in per.values())
    return {"per_replica": per, "hits": hits, "queries": queries, "hit_rate": hits / queries if queries else None}


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def summarize(results: list[RequestResult], duration: float, workload: Workload) -> dict:
    ok = [r for r in results if r.ok]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    output = sum(r.output_tokens for r in ok)
    return {
        "requests": len(results), "completed": len(ok), "errors": len(results) - len(ok),
        "error_messages": Counter(r.error for r in results if r.error).most_common(5),
        "duration_s": duration,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": output / duration if duration else 0.0,
        "total_token_throughput": (prompt + output) / duration if duration else 0.0,
        "prompt_tokens": prompt, "output_tokens": output, "cached_tokens": cached,
        "prefix_cache_hit_rate": cached / prompt if prompt else None,
        "ideal_prefix_hit_rate": workload.ideal_prefix_hit_rate(),
        "ttft_s": _stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": _stats([r.itl_s for r in ok if r.itl_s is not None]),
        "e2e_s": _stats([r.e2e_s for r in ok]),
        "chunk_gap_s": _stats([g for r in ok for g in r.chunk_gaps_s]),
        "replicas": dict(Counter(r.replica or "?" for r in results)),
        "per_request": [{k: v for k, v in asdict(r).items() if k not in ("text", "chunk_gaps_s")} for r in results],
    }


def run_load_sync(cfg: LoadConfig, workload: Workload) -> dict:
    return asyncio.run(run_load(cfg, workload))


def format_summary(s: dict) -> str:
    """A few lines for the terminal."""
    def ms(d: dict, key: str) -> str:
        return "-" if d.get(key) is None else f"{d[key] * 1e3:.0f}"

    c = s["config"]
    load = f"rate {c['rate']}/s" if c.get("rate") is not None else f"concurrency {c['concurrency']}"
    lines = [
        f"{c['workload']} ({load}): {s['completed']}/{s['requests']} ok, {s['errors']} errors, "
        f"{s['duration_s']:.1f} s, {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output tok/s",
    ]
    for name in ("ttft_s", "itl_s", "e2e_s"):
        d = s[name]
        lines.append(f"  {name[:-2]:>5} ms: mean {ms(d, 'mean')}  p50 {ms(d, 'p50')}  p90 {ms(d, 'p90')}  "
                     f"p99 {ms(d, 'p99')}")
    if s.get("prefix_cache_hit_rate") is not None:
        ideal = s.get("ideal_prefix_hit_rate")
        lines.append(f"  prefix-cache hit rate {s['prefix_cache_hit_rate']:.1%}"
                     + (f" (ideal {ideal:.1%})" if ideal is not None else ""))
    if len(s["replicas"]) > 1 or "?" not in s["replicas"]:
        lines.append(f"  replicas: {s['replicas']}")
    lines.append(f"  load average before {s['load_avg_before'][0]}, after {s['load_avg_after'][0]}")
    for message, n in s["error_messages"]:
        lines.append(f"  error x{n}: {message}")
    return "\n".join(lines)


def parse_loads(rate: str | None, concurrency: str | None) -> list[tuple[float | None, int | None]]:
    """`--rate 1,2,inf` or `--concurrency 1,4` as (rate, concurrency) points of a sweep."""
    if (rate is None) == (concurrency is None):
        raise ValueError("give exactly one of --rate and --concurrency")
    if rate is not None:
        return [(float(r), None) for r in rate.split(",")]
    return [(None, int(c)) for c in concurrency.split(",")]


def run_bench_serve(url: str, workload_for, loads: list[tuple[float | None, int | None]], out_dir,
                    name: str, **cfg) -> list[dict]:
    """Run one load point after another and write `<name>.json` and plots into `out_dir`.
    `workload_for(i)` builds the workload of the i-th point (a sweep reseeds each point so a
    warm prefix cache from the point before does not flatter the next one)."""
    from pathlib import Path

    from .result_files import plot_latency_cdfs, plot_sweep, write_json

    out_dir = Path(out_dir)
    print(f"cpu (this machine, the load generator's): {cpu_capability().line()}", flush=True)
    summaries = []
    for i, (rate, concurrency) in enumerate(loads):
        s = run_load_sync(LoadConfig(url, rate=rate, concurrency=concurrency, **cfg), workload_for(i))
        print(format_summary(s), flush=True)
        summaries.append(s)
    files = [write_json(out_dir / f"{name}.json", {"runs": summaries}),
             plot_latency_cdfs(summaries, out_dir / f"{name}-latency-cdf.png", f"{name}: latency CDFs")]
    if len(summaries) > 1:
        files.append(plot_sweep(summaries, out_dir / f"{name}-sweep.png", f"{name}: latency against throughput"))
    print("wrote " + ", ".join(str(f) for f in files), flush=True)
    return summaries
