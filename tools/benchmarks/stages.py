"""What each kind of step of the comparison measures (runner.py runs them as plan.yaml lists them).

- `mixserve_offline`: mixserve's engine in this process on the random workload's prompts: all at
  once (`repeats` times, the median run), then the first `one_at_a_time` of them one after another;
- `transformers_offline`: Hugging Face `generate` on the same prompts in one batch (bench/offline.py);
- `served`: mixserve started in this process on a free loopback port with the step's settings, our
  load generator (bench/serve.py) closed at `concurrency`, then, given a client, vLLM's client on the
  same server; Ray is shut down after each step;
- `bracketed_served`: `served` with mixserve offline measured right before and right after it (an
  A-B-A design): this VM's speed drifts within minutes, so the served figure is held to offline runs
  that bracket it in time rather than to the offline stage's, taken minutes earlier;
- `prefix_served`: `served` on the shared-prefix workload, refused when a replica's KV cache would
  hold every group's prefix (routing would then not matter);
- `vllm_served`: vLLM's OpenAI server under our load generator, then vLLM's client (peers.py).
The machine is shared: every figure carries the load average; ratios within one run are the
figures to trust. Every mixserve figure carries its engine's kernel report.
"""

import gc
import os
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

from mixserve.bench.serve import LoadConfig, run_load_sync
from mixserve.bench.workloads import Workload
from mixserve.workers.ports import free_port

import peers
from local_server import local_server
from peers import VllmClient, load_avg, vllm_server


def attempt(run: Callable[[], dict]) -> dict | Exception:
    """The result, or the exception (printed) as the row's failure."""
    try:
        return run()
    except Exception as exc:
        traceback.print_exc()
        return exc


@dataclass(slots=True)
class GivenPrompts:
    """bench/offline.py's workload interface over prompts made elsewhere (equal lengths)."""
    ids: list[list[int]]
    output_len: int

    @property
    def num_prompts(self) -> int:
        return len(self.ids)

    @property
    def input_len(self) -> int:
        return len(self.ids[0])

    def prompts(self, vocab_size: int) -> list[list[int]]:
        return self.ids


def split_one_at_a_time(result: dict, load: dict) -> list[dict]:
    """An offline result with a nested "one_at_a_time" figure -> the results of its two rows."""
    alone = result.pop("one_at_a_time", None)
    rows = [{**result, **load}]
    if alone is not None:
        common = {k: v for k, v in result.items() if k not in ("total_s", "output_tokens", "output_tokens_per_s",
                                                               "steps", "runs")}
        rows.append({**common, **alone, **load})
    return rows


def mixserve_offline(model: str, prompts: GivenPrompts, dtype: str, one_at_a_time: int, weights=None,
                     repeats: int = 1) -> list[dict]:
    """`weights`: a loader.WeightFormat (default: unquantized, each shape's fastest kernel)."""
    from mixserve.bench.offline import bench_mixserve

    before = os.getloadavg()[0]
    result = bench_mixserve(model, prompts, dtype, weights, one_at_a_time=one_at_a_time, repeats=repeats)
    gc.collect()
    return split_one_at_a_time(result, load_avg(before))


def transformers_offline(model: str, prompts: GivenPrompts, dtype: str) -> dict:
    from mixserve.bench.offline import bench_transformers

    before = os.getloadavg()[0]
    result = bench_transformers(model, prompts, dtype)
    gc.collect()
    return {**result, **load_avg(before)}


@contextmanager
def _mixserve_server(model: str, settings: dict):
    from mixserve.cluster.settings import ServeSettings

    s = ServeSettings(model=model, port=free_port(), routing_stats_period_s=0.5, **settings)
    with local_server(s, num_cpus=4) as url:  # logical CPUs: 2 replicas + ingress fit
        yield url, s


def _served_model(url: str) -> str:
    import httpx

    r = httpx.get(url.rstrip("/") + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _replica_kernels(offline_kernels: dict, dtype: str) -> dict:
    """A replica's `engine.kernel_report()` asked over Serve; where the replica has no
    `kernel_report` method, the offline engine's report in the same dtype (this process, this
    machine), marked as such, or a line saying why there is none."""
    from ray import serve

    from mixserve.cluster.serve_command import APP_NAME
    from mixserve.router.llm_server import LLMServer

    if not hasattr(LLMServer, "kernel_report"):
        why = "the replica cannot be asked (router/llm_server.py LLMServer has no kernel_report method)"
    else:
        try:
            return serve.get_deployment_handle("LLMServer", APP_NAME).kernel_report.remote().result(timeout_s=60)
        except Exception as exc:  # noqa: BLE001 - any failure only loses the report
            why = f"asking the replica failed ({type(exc).__name__}: {str(exc).strip().splitlines()[-1:]})"[:300]
    if dtype in offline_kernels:
        return {**offline_kernels[dtype], "source": f"the offline engine in {dtype}; {why}"}
    return {"unavailable": why}


def served(model: str, settings: dict, workload: Workload, concurrency: int, offline_kernels: dict,
           client: VllmClient | None = None, repeats: int = 1) -> list:
    """Our load generator against mixserve with `settings`; then, given `client`, vLLM's client
    (`repeats` runs). -> [ours, vLLM's client's result or failure (exception)] or [ours]."""
    with _mixserve_server(model, settings) as (url, s):
        summary = run_load_sync(LoadConfig(url, concurrency=concurrency, warmup=2 * s.replicas), workload)
        summary["settings"] = {k: v for k, v in s.model_dump().items() if k in settings or k == "model"}
        summary["kernels"] = _replica_kernels(offline_kernels, s.dtype)
        results = [summary]
        if client is not None:
            results.append(attempt(lambda: client.run(url, _served_model(url), "mixserve-1-replica", repeats)))
    return results


def bracketed_served(model: str, settings: dict, workload: Workload, concurrency: int, offline_kernels: dict,
                     client: VllmClient | None, offline: Callable[[], dict], repeats: int = 1) -> tuple[list, dict]:
    """-> (`served`'s results, the offline bracket: the median of both sides' runs, listed under
    "runs" in time order, the runs before first)."""
    from mixserve.bench.offline import median_run

    key = "output_tokens_per_s"
    before = offline()
    results = served(model, settings, workload, concurrency, offline_kernels, client, repeats)
    after = offline()
    figures = before.get("runs", [before[key]]) + after.get("runs", [after[key]])
    bracket = {**median_run([{**before, key: v} for v in figures], key),
               "load_avg_before": before["load_avg_before"], "load_avg_after": after["load_avg_after"]}
    return results, bracket


def prefix_served(model: str, settings: dict, workload: Workload, concurrency: int, offline_kernels: dict,
                  all_prefixes_bytes: int) -> list:
    if settings["kv_cache_bytes"] >= all_prefixes_bytes:
        raise ValueError(f"a replica's KV cache ({settings['kv_cache_bytes']} bytes) would hold every group's prefix; "
                         "raise --prefix-len or --groups")
    return served(model, settings, workload, concurrency, offline_kernels)


def vllm_offline(model: str, prompts: GivenPrompts, max_model_len: int, dtype: str, one_at_a_time: int,
                 repeats: int, venv, out) -> list[dict]:
    """vLLM's `LLM.generate` on the offline stage's prompts, in the vLLM venv (peers.py)."""
    before = os.getloadavg()[0]
    result = peers.vllm_offline(model, prompts.ids, prompts.output_len, max_model_len, dtype, one_at_a_time,
                                repeats, venv, out)
    return split_one_at_a_time(result, load_avg(before))


def vllm_served(model: str, sizes, dtype: str, workload: Workload, venv, out, client: VllmClient | None,
                repeats: int = 1) -> list:
    with vllm_server(model, sizes, dtype, venv, out) as (url, setup):
        summary = run_load_sync(LoadConfig(url, concurrency=sizes.concurrency, warmup=2), workload)
        summary["settings"] = setup
        if summary["errors"]:
            summary["error_messages"].insert(0, (f"see {setup['log']} for vLLM's own trace", 0))
        results = [summary]
        if client is not None:
            results.append(attempt(lambda: client.run(url, "peer", "vllm-served", repeats)))
    return results
