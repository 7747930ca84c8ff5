"""Faults under load. Start a real mixserve (Ray Serve, in this process), send mixed traffic with
faults injected, then check that the server came back clean.

    python -P tools/benchmarks/soak.py --replicas 2 --kill-replica-at 10 --out bench-results   # = make bench-soak

Traffic: closed loop, `concurrency` workers; request i is drawn from Random(seed, i): completions or
chat, streamed (70%) or not, a short plain-text prompt (half of them after one of a few shared
prefixes), max_tokens in [8, max_tokens], greedy or temperature 0.8, EOS ignored. A
`disconnect_fraction` of the streamed requests is abandoned by the client after its first token.
It stops when `requests` were sent or `duration_s` passed, whichever comes first. Each request's
outcome is classified by soak_outcomes.py. Before the run, `warmup` requests of the same mix
(other draws; not counted, their outcomes reported) go out the same way.

Faults: `kill_at_s` (once) and `kill_every_s` (repeatedly) kill one LLM-server replica actor
(`ray.kill(..., no_restart=True)`; Serve starts a replacement itself). The victim is the replica
serving the most streams at that moment (x-mixserve-replica header), never the first replica of
the run while another is live, so that one replica lives through the whole run and its RSS is
judged. A kill waits until Serve
reports every replica RUNNING again, so one replica always lives. Per kill: the seconds until
/metrics carries no series labelled with the dead replica (polled every 1 s, for up to 60 s) and
until a request is first answered by a replica that did not exist at the kill.

Leak check, after the traffic: once every replica is RUNNING, the engines' own state is read through
`LLMServer.stats()` (the deployment handle; other methods are routed by power of two choices, so
repeated calls reach every replica), until each live replica has answered with no running or waiting
request and KV usage 0, for up to LEAK_WAIT_S. Not from /metrics: its gauges are the load attached to
the last chunk the ingress received from each replica, so they never change without traffic and a
request cancelled after its last chunk (an abandoned stream) stays counted there. The /metrics gauges
are reported as well.

RSS: the LLM-server replicas, the ingress and the HTTP proxy (the Ray processes of this run, found
among this process's descendants by their title) are sampled after warm-up and every RSS_PERIOD_S
(the series is in the JSON);
the rule (RSS_GROWTH_LIMIT) applies to the processes that lived through the whole run, from the
sample after warm-up to the one after the leak check. A killed replica and its replacement are
reported, not judged.
"""

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __name__ == "__main__":  # python -P keeps the repository root off sys.path; the lab's own folder goes on it
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402

from mixserve.bench.result_files import write_json  # noqa: E402
from mixserve.kernels.capability import cpu_capability  # noqa: E402
from mixserve.workers.engine_config import EngineConfig  # noqa: E402

from local_server import local_server  # noqa: E402
from soak_outcomes import (OUTCOMES, RSS_GROWTH_LIMIT, Transcript, classify, json_or_text,  # noqa: E402
                           message_group, replica_series, rss_growth, verdict)

APP = "mixserve"
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::mixserve#LLMServer#"
PROCESS_KINDS = (("ServeReplica:mixserve:LLMServer", "llm_replica"),
                 ("ServeReplica:mixserve:OpenAIIngress", "ingress"), ("ProxyActor", "http_proxy"))
RSS_PERIOD_S = 2.0
KILL_MARGIN_S = 60.0  # no kill this close to the end of the duration: its replacement must serve before the checks
LEAK_WAIT_S = 30.0
SERIES_POLL_S, SERIES_GIVE_UP_S = 1.0, 60.0
REPLACEMENT_WAIT_S = 180.0  # for every replica to be RUNNING again, before a kill and before the leak check
_WORDS = ("river stone light morning garden window winter paper silver orange market bridge cloud music "
          "letter forest engine station yellow quiet number people mountain ocean story kitchen island "
          "teacher summer answer circle little between because").split()
_PREFIXES = ("You are a careful assistant who answers in short plain sentences about travel and food.",
             "The following is a log of questions sent to a library help desk, answered one by one.",
             "Summarize the text below for a busy reader, keeping every number and every name.")


@dataclass(slots=True)
class SoakConfig:
    concurrency: int = 8
    requests: int = 400
    duration_s: float = 600.0
    kill_at_s: float | None = None
    kill_every_s: float | None = None
    disconnect_fraction: float = 0.1
    seed: int = 0
    max_tokens: int = 64
    warmup: int = 300  # requests of the same mix (other draws) before the run and its first RSS sample
    timeout_s: float = 120.0


@dataclass(slots=True)
class RequestSpec:
    endpoint: str
    body: dict
    abandon: bool


def request_spec(cfg: SoakConfig, i: int, model: str) -> RequestSpec:
    rng = random.Random(cfg.seed * 1_000_003 + i)
    chat, stream = rng.random() < 0.5, rng.random() < 0.7
    abandon = stream and rng.random() < cfg.disconnect_fraction
    text = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 40)))
    if rng.random() < 0.5:
        text = f"{rng.choice(_PREFIXES)} {text}"
    body = {"model": model, "max_tokens": rng.randint(min(8, cfg.max_tokens), cfg.max_tokens), "stream": stream,
            "temperature": rng.choice((0.0, 0.8)), "ignore_eos": True}
    if chat:
        return RequestSpec("/v1/chat/completions", {**body, "messages": [{"role": "user", "content": text}]}, abandon)
    return RequestSpec("/v1/completions", {**body, "prompt": text}, abandon)


# ---- the cluster: replicas, kills, engine state, processes --------------------------------------

def llm_replica_ids() -> dict[str, dict]:
    """{replica id: named-actor entry} of the live LLM-server replica actors."""
    import ray

    return {a["name"][len(REPLICA_ACTOR_PREFIX):]: a for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(REPLICA_ACTOR_PREFIX)}


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["LLMServer"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for_replicas(n: int, timeout_s: float = REPLACEMENT_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while running_replicas() < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def kill_replica(replica: str) -> None:
    import ray

    entry = llm_replica_ids()[replica]
    ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]), no_restart=True)


def engine_loads(expected: set[str], wait_s: float = LEAK_WAIT_S) -> dict:
    """{replica: its latest ReplicaLoad} from repeated `stats()` calls, until every expected replica
    has answered idle (ReplicaLoad.idle: no running or waiting request, KV usage 0) or `wait_s` passed."""
    from ray import serve
    from ray.exceptions import RayError
    from ray.serve.exceptions import RayServeException

    handle = serve.get_deployment_handle("LLMServer", app_name=APP)
    latest: dict = {}
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            load = handle.stats.remote().result(timeout_s=10)["load"]
        except (RayError, RayServeException, TimeoutError):  # a replica on its way out: ask again
            time.sleep(0.5)
            continue
        latest[load.replica] = load
        if expected <= {r for r, v in latest.items() if v.idle}:
            break
        time.sleep(0.1)
    return latest


def sample_rss() -> dict[int, tuple[str, int]]:
    """{pid: (kind, RSS bytes)} of this run's serving processes (PROCESS_KINDS), among our descendants."""
    import psutil

    out = {}
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
            kind = next((k for marker, k in PROCESS_KINDS if marker in title), None)
            if kind is not None:
                out[proc.pid] = (kind, proc.memory_info().rss)
        except psutil.Error:  # it exited meanwhile
            continue
    return out


# ---- the run --------------------------------------------------------------------------------------

@dataclass
class _Run:
    cfg: SoakConfig
    url: str
    t0: float = 0.0
    duration_s: float = 0.0
    warmup_outcomes: dict = field(default_factory=dict)
    sent: int = 0
    results: list = field(default_factory=list)  # (index, start_s, spec endpoint, Transcript)
    streaming: Counter = field(default_factory=Counter)  # replica -> streams it is serving now
    kills: list = field(default_factory=list)
    rss_baseline: dict = field(default_factory=dict)  # pid -> (kind, rss): the sample after warm-up
    rss_first: dict = field(default_factory=dict)  # pid -> (kind, rss, seconds since t0): its first sample
    rss_last: dict = field(default_factory=dict)  # pid -> (kind, rss, seconds since t0): its latest sample
    rss_series: dict = field(default_factory=dict)  # pid -> [(seconds since t0, MiB)]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def seen_replica(self, replica: str | None) -> None:
        for kill in self.kills:
            if replica and replica not in kill["replicas_at_kill"] and kill["replacement_served_s"] is None:
                kill["replacement_served_s"] = round(self.now() - kill["at_s"], 2)

    def sample(self) -> dict[int, tuple[str, int]]:
        t, rss = round(self.now(), 1), sample_rss()
        for pid, (kind, n) in rss.items():
            self.rss_first.setdefault(pid, (kind, n, t))
            self.rss_last[pid] = (kind, n, t)
            self.rss_series.setdefault(pid, []).append((t, round(n / 2**20, 1)))
        return rss


async def send(client: httpx.AsyncClient, run: _Run, spec: RequestSpec) -> Transcript:
    """One request, read to its end (or abandoned after its first token); never raises for a failure."""
    t = Transcript(stream=spec.body["stream"])
    try:
        async with client.stream("POST", run.url + spec.endpoint, json=spec.body) as resp:
            t.status, t.retry_after = resp.status_code, resp.headers.get("retry-after")
            t.replica = resp.headers.get("x-mixserve-replica")
            run.seen_replica(t.replica)
            if not (t.stream and t.status == 200):
                t.body = json_or_text((await resp.aread()).decode(errors="replace"))
                return t
            run.streaming[t.replica] += 1
            try:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        t.done = True
                        break
                    t.events.append(json_or_text(data))
                    if spec.abandon and isinstance(t.events[-1], dict) and t.events[-1].get("choices"):
                        t.abandoned = True
                        break
            finally:
                run.streaming[t.replica] -= 1
    except (httpx.HTTPError, OSError) as exc:
        t.transport_error = f"{type(exc).__name__}: {exc}"[:200]
    return t


async def _traffic(client: httpx.AsyncClient, run: _Run, model: str) -> None:
    cfg = run.cfg

    async def worker() -> None:
        while run.sent < cfg.requests and run.now() < cfg.duration_s:
            i = run.sent
            run.sent += 1
            spec = request_spec(cfg, i, model)
            start = run.now()
            t = await send(client, run, spec)
            run.results.append((i, round(start, 3), round(run.now() - start, 3), spec.endpoint, t))

    await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))


async def _warm_up(client: httpx.AsyncClient, run: _Run, model: str) -> Counter:
    """`warmup` requests of the same mix (indices -1, -2, ...: other draws), `concurrency` at a time, so
    that the first RSS sample already holds what serving this mix allocates once; their outcomes."""
    pending = iter(range(1, run.cfg.warmup + 1))
    outcomes: Counter = Counter()

    async def worker() -> None:
        for k in pending:
            outcomes[classify(await send(client, run, request_spec(run.cfg, -k, model))).kind] += 1

    await asyncio.gather(*(worker() for _ in range(run.cfg.concurrency)))
    return outcomes


async def _series_gone(client: httpx.AsyncClient, run: _Run, kill: dict) -> None:
    while run.now() - kill["at_s"] < SERIES_GIVE_UP_S:
        try:
            text = (await client.get(run.url + "/metrics")).text
            if kill["replica"] not in replica_series(text):
                kill["metrics_gone_s"] = round(run.now() - kill["at_s"], 2)
                return
        except (httpx.HTTPError, ValueError):
            pass
        await asyncio.sleep(SERIES_POLL_S)


async def _kills(client: httpx.AsyncClient, run: _Run, replicas: int, traffic: asyncio.Task, watchers: list) -> None:
    cfg = run.cfg
    at = cfg.kill_at_s if cfg.kill_at_s is not None else cfg.kill_every_s
    kept = min(await asyncio.to_thread(llm_replica_ids), default=None)  # the replica that lives throughout
    while at is not None and at <= cfg.duration_s - KILL_MARGIN_S:
        await asyncio.wait({traffic}, timeout=max(0.0, at - run.now()))
        if traffic.done():
            return
        await asyncio.to_thread(wait_for_replicas, replicas)
        live = await asyncio.to_thread(llm_replica_ids)
        if traffic.done() or not live:
            return
        candidates = {r for r in live if r != kept} or set(live)
        for _ in range(50):  # up to 5 s for a candidate to be streaming
            busy = {r: n for r, n in run.streaming.items() if n > 0 and r in candidates}
            if busy:
                break
            await asyncio.sleep(0.1)
        victim = max(busy, key=busy.get) if busy else min(candidates)
        await asyncio.to_thread(kill_replica, victim)
        kill = {"replica": victim, "at_s": round(run.now(), 2), "streams_on_it": busy.get(victim, 0),
                "replicas_at_kill": sorted(live), "metrics_gone_s": None, "replacement_served_s": None}
        run.kills.append(kill)
        print(f"[{kill['at_s']:.1f} s] killed replica {victim} ({kill['streams_on_it']} streams on it)", flush=True)
        watchers.append(asyncio.create_task(_series_gone(client, run, kill)))
        at = run.now() + cfg.kill_every_s if cfg.kill_every_s is not None else None


async def _rss_sampler(run: _Run, traffic: asyncio.Task) -> None:
    while not traffic.done():
        await asyncio.wait({traffic}, timeout=RSS_PERIOD_S)
        run.sample()


async def _soak(run: _Run, replicas: int) -> str:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(run.cfg.timeout_s, connect=30.0), limits=limits) as client:
        model = (await client.get(run.url + "/v1/models")).json()["data"][0]["id"]
        run.warmup_outcomes = dict(await _warm_up(client, run, model))
        print(f"warm-up: {run.warmup_outcomes}", flush=True)
        await asyncio.to_thread(wait_for_replicas, replicas)
        run.t0 = time.monotonic()
        run.rss_baseline = run.sample()
        traffic = asyncio.create_task(_traffic(client, run, model))
        watchers: list[asyncio.Task] = []
        helpers = [asyncio.create_task(_kills(client, run, replicas, traffic, watchers)),
                   asyncio.create_task(_rss_sampler(run, traffic))]
        await traffic
        run.duration_s = run.now()
        await asyncio.gather(*helpers)
        await asyncio.gather(*watchers)
        return model


def run_soak(settings, cfg: SoakConfig, out_dir: Path, name: str) -> int:
    """Start the server, soak it, print the summary, write `out_dir/name.json`; 0 when the verdict passes."""
    print(f"cpu: {cpu_capability().line()}", flush=True)
    with local_server(settings) as url:
        run = _Run(cfg, url)
        model = asyncio.run(_soak(run, settings.replicas))
        all_up = wait_for_replicas(settings.replicas)
        live = set(llm_replica_ids()) - {k["replica"] for k in run.kills}
        loads = engine_loads(live)
        leak_passed = all_up and bool(live) and all(r in loads and loads[r].idle for r in live)
        loads = {r: asdict(v) for r, v in loads.items()}
        gauges = replica_series(httpx.get(url + "/metrics", timeout=30).text)
        rss_end = run.sample()
    summary = summarize(run, settings, model, leak_passed, loads, gauges, all_up, rss_end)
    print(format_summary(summary), flush=True)
    print(f"wrote {write_json(out_dir / f'{name}.json', summary)}", flush=True)
    return 0 if not summary["verdict"] else 1


def summarize(run: _Run, settings, model: str, leak_passed: bool, loads: dict, gauges: dict, all_up: bool,
              rss_end: dict) -> dict:
    outcomes = [(i, start, e2e, endpoint, t, classify(t)) for i, start, e2e, endpoint, t in run.results]
    counts = {k: sum(o.kind == k for *_, o in outcomes) for k in OUTCOMES}
    failures = Counter((o.kind, message_group(o.message or "?"), str(o.code)) for *_, o in outcomes
                       if o.kind.startswith("failed") or o.kind == "rejected_overload")
    growth = rss_growth(run.rss_baseline, rss_end)
    others = {str(pid): {"kind": kind, "first_bytes": rss, "first_s": t, "last_bytes": run.rss_last[pid][1],
                         "last_s": run.rss_last[pid][2]}
              for pid, (kind, rss, t) in run.rss_first.items() if pid not in run.rss_baseline or pid not in rss_end}
    return {
        "config": {**asdict(run.cfg), "model": model, "replicas": settings.replicas,
                   "replica_cpus": settings.replica_cpus, "threads": settings.threads,
                   "tensor_parallel_size": settings.tensor_parallel_size},
        "cpu": cpu_capability().summary(),
        "requests": len(outcomes), "duration_s": round(run.duration_s, 2),
        "requests_per_s": round(len(outcomes) / run.duration_s, 2) if run.duration_s else 0.0,
        "counts": counts,
        "failures": [{"outcome": kind, "message": msg, "code": code, "count": n}
                     for (kind, msg, code), n in failures.most_common()],
        "replicas_seen": dict(Counter(t.replica or "-" for *_, t, _ in outcomes)),
        "kills": run.kills,
        "leak_check": {"passed": leak_passed, "all_replicas_running": all_up, "engine_loads": loads,
                       "metrics_gauges": gauges},
        "warmup_outcomes": run.warmup_outcomes,
        "rss": {"survivors": growth, "others": others, "limit": RSS_GROWTH_LIMIT,
                "series_mib": {f"{run.rss_first[pid][0]} {pid}": v for pid, v in run.rss_series.items()}},
        "verdict": verdict(counts, leak_passed, growth, [k["metrics_gone_s"] for k in run.kills]),
        "per_request": [{"i": i, "start_s": start, "e2e_s": e2e, "endpoint": endpoint, "stream": t.stream,
                         "status": t.status, "replica": t.replica, "outcome": o.kind, "message": o.message,
                         "code": o.code} for i, start, e2e, endpoint, t, o in outcomes],
    }


def format_summary(s: dict) -> str:
    c = s["config"]
    mib = 1 / 2**20
    lines = [f"soak: {c['model']}, {c['replicas']} replicas, concurrency {c['concurrency']}: {s['requests']} "
             f"requests in {s['duration_s']:.1f} s ({s['requests_per_s']:.2f} req/s)",
             f"  cpu: {s['cpu']['model_name']} | torch ISA {s['cpu']['isa']}",
             "  outcomes: " + ", ".join(f"{k} {n}" for k, n in s["counts"].items())]
    for f in s["failures"]:
        lines.append(f"  {f['outcome']} x{f['count']} (code {f['code']}): {f['message']}")
    for i, k in enumerate(s["kills"], 1):
        lines.append(f"  kill {i} at {k['at_s']:.1f} s: replica {k['replica']} ({k['streams_on_it']} streams); "
                     f"its /metrics series gone after {k['metrics_gone_s']} s; a replacement answered after "
                     f"{k['replacement_served_s']} s")
    leak = s["leak_check"]
    lines.append(f"  leak check: {'passed' if leak['passed'] else 'FAILED'} (engine loads: "
                 + "; ".join(f"{r}: running {v['num_running']} waiting {v['num_waiting']} kv {v['kv_usage']:.3f}"
                             for r, v in leak["engine_loads"].items()) + ")")
    for kind, g in sorted(s["rss"]["survivors"].items()):
        lines.append(f"  rss {kind} ({g['processes']} lived throughout): {g['start_bytes'] * mib:.0f} -> "
                     f"{g['end_bytes'] * mib:.0f} MiB ({g['growth']:+.1%})")
    for pid, o in s["rss"]["others"].items():
        lines.append(f"  rss {o['kind']} pid {pid} (from {o['first_s']} s to {o['last_s']} s, not judged): "
                     f"{o['first_bytes'] * mib:.0f} -> {o['last_bytes'] * mib:.0f} MiB")
    lines.append("  verdict: PASS" if not s["verdict"] else "  verdict: FAIL: " + "; ".join(s["verdict"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    engine = EngineConfig(model="")  # the engine's defaults, which the flags below reuse
    p = argparse.ArgumentParser(
        prog="soak.py",
        description="Closed-loop mixed traffic (completions and chat, streamed or not, some abandoned) against a "
                    "mixserve started in this process, with replicas killed on schedule. Passes (exit 0) when no "
                    "request failed before its first token, no connection was cut, KV usage and the replicas' "
                    "queues return to 0, the serving processes' RSS grew < 5% and each dead replica left /metrics "
                    "within 30 s. Writes OUT/NAME.json.",
    )
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--replica-cpus", type=float, default=None,
                   help="Ray CPUs of an LLM-server replica (default: as mixserve serve decides them)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: its CPUs)")
    p.add_argument("--tensor-parallel-size", type=int, default=engine.tensor_parallel_size)
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--requests", type=int, default=400, help="stop after sending this many")
    p.add_argument("--duration-s", type=float, default=600.0, help="or after this many seconds")
    p.add_argument("--kill-replica-at", type=float, default=None, metavar="S",
                   help="kill the replica serving the most streams S seconds after the start")
    p.add_argument("--kill-replica-every", type=float, default=None, metavar="S",
                   help="kill a replica every S seconds (needs --replicas >= 2)")
    p.add_argument("--disconnect-fraction", type=float, default=0.1,
                   help="streamed requests the client abandons after the first token")
    p.add_argument("--max-tokens", type=int, default=64, help="upper bound of max_tokens (drawn from 8..this)")
    p.add_argument("--warmup", type=int, default=300,
                   help="requests of the same mix before the run (not counted), so that the first RSS sample is "
                        "taken once serving this mix has allocated what it keeps (oneDNN's kernel caches fill "
                        "over the first ~100-300 requests, kernels/kernel_caches.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON result")
    p.add_argument("--name", default="soak", help="file name stem")
    return p


def main(argv: list[str] | None = None) -> int:
    from mixserve.cluster.settings import ServeSettings
    from mixserve.workers.ports import free_port

    args = build_parser().parse_args(argv)
    if args.kill_replica_every is not None and args.replicas < 2:
        print("soak.py: --kill-replica-every needs --replicas >= 2", file=sys.stderr)
        return 2
    if not 0.0 <= args.disconnect_fraction <= 1.0:
        print("soak.py: --disconnect-fraction is a fraction in [0, 1]", file=sys.stderr)
        return 2
    settings = ServeSettings(model=str(args.model) if args.model else None, port=free_port(), replicas=args.replicas,
                             replica_cpus=args.replica_cpus, threads=args.threads,
                             tensor_parallel_size=args.tensor_parallel_size)
    cfg = SoakConfig(concurrency=args.concurrency, requests=args.requests, duration_s=args.duration_s,
                     kill_at_s=args.kill_replica_at, kill_every_s=args.kill_replica_every,
                     disconnect_fraction=args.disconnect_fraction, seed=args.seed, max_tokens=args.max_tokens,
                     warmup=args.warmup)
    return run_soak(settings, cfg, args.out, args.name)


if __name__ == "__main__":
    sys.exit(main())
