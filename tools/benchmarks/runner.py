"""The comparison's runner: reads plan.yaml, turns each step into its rows and the call that measures
them (stages.py), runs them in order, and writes OUT/compare.json, OUT/compare.md (report.py) and
OUT/compare-*.png (plots.py).

Rules:
1. A row runs unless its stage, or a stage it needs, is in `skip`; a step whose rows are all skipped
   does not run.
2. A step returns a result (dict) or a failure (exception) per row; an exception it raises fails all
   its rows. One failing step is a row that says why, never the end of the run.
3. The exit code is 1 when a row failed or a result counted failed requests, else 0.
compare.json records the CPU (kernels/capability.py), the sizes, the served dtype, the KV cache of
the prefix stage, the ideal hit rate, every entry (with its row's tags and wall time), each engine's
best dtype and the targets checked.
"""

import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mixserve.bench.result_files import write_json
from mixserve.bench.serve import format_summary
from mixserve.bench.workloads import Workload, multi_turn_workload, random_workload, shared_prefix_workload

import stages
from peers import VllmClient
from sizes import CompareSizes, concrete_dtype, kv_bytes_per_token, prefix_kv_bytes, random_kv_bytes

PLAN_FILE = Path(__file__).resolve().with_name("plan.yaml")
STAGES = ("offline", "quantized", "transformers", "served", "tp2", "prefix", "vllm", "vllm-client")


@dataclass(slots=True)
class Row:
    """One line of the table. `needs`: the stages it runs in (skipping any of them skips it);
    `tags` go into its JSON entry and let the report find it: engine (mixserve, transformers,
    vllm), mode (offline, one-at-a-time, served, offline-bracket), dtype, client (mixserve, vllm),
    baseline, routing, quantization (mixserve offline: none, int8, int4)."""
    stage: str
    label: str
    needs: tuple[str, ...] = ()
    tags: dict = field(default_factory=dict)


Step = tuple[list[Row], Callable[[list[bool]], list]]  # rows, and the call given which rows are wanted


@dataclass(slots=True)
class Comparison:
    """What every step of one run shares."""
    model: str
    sizes: CompareSizes
    out: Path
    served_dtype: str
    prompts: stages.GivenPrompts
    workloads: dict[str, Workload]
    kv_cache: dict[str, int]  # plan.yaml's kv_cache (random, prefix) -> bytes per replica
    all_prefixes_bytes: int  # the KV bytes of every group's prefix
    client: VllmClient
    vllm_venv: Path
    kernels: dict = field(default_factory=dict)  # dtype -> the offline engine's kernel report, for served rows


def load_plan(path: Path = PLAN_FILE) -> dict:
    plan = yaml.safe_load(path.read_text())
    unknown = {s["stage"] for s in plan["steps"]} - set(STAGES)
    if unknown:
        raise ValueError(f"{path}: unknown stages {sorted(unknown)} (known: {', '.join(STAGES)})")
    return plan


def weights_label(weights) -> str:
    scheme = f"group {weights.group_size}" if weights.quantization == "int4" else "per channel"
    return f"{weights.quantization} weights ({scheme})"


def _each(step: dict, plan: dict, sizes: CompareSizes) -> list[dict]:
    each = step.get("each")
    if each is None:
        return [{}]
    if each == "offline_dtypes":
        return [{"dtype": d} for d in sizes.offline_dtypes]
    if each == "quantizations":
        return [{"quantization": q} for q in sizes.quantizations]
    if each == "routers":
        return [{"routing": name} for name in plan["routers"]]
    raise ValueError(f"plan step {step['label']!r}: `each: {each}` is none of offline_dtypes, quantizations, routers")


def _offline_step(step: dict, c: Comparison, dtype: str, quantization: str | None) -> Step:
    from mixserve.workers.loader import WeightFormat

    s, engine = c.sizes, step["engine"]
    weights = WeightFormat(quantization=quantization or "none")
    label = step["label"].format(dtype=dtype, weights=weights_label(weights))
    tags = dict(engine=engine, mode="offline", dtype=dtype, **({"quantization": weights.quantization}
                                                               if engine == "mixserve" else {}))
    rows = [Row(step["stage"], label, tags=tags)]
    alone = s.one_at_a_time if step.get("one_at_a_time") else 0
    if alone > 0:
        rows.append(Row(step["stage"], f"{label}, {alone} prompts one at a time",
                        tags=dict(tags, mode="one-at-a-time")))
    repeats = s.repeats if step.get("repeats") else 1

    def run(wanted):
        if engine == "transformers":
            return [stages.transformers_offline(c.model, c.prompts, dtype)]
        if engine == "vllm":
            return stages.vllm_offline(c.model, c.prompts, s.max_model_len, dtype, alone, repeats, c.vllm_venv, c.out)
        results = stages.mixserve_offline(c.model, c.prompts, dtype, alone, weights, repeats)
        if weights.quantization == "none":  # the served rows' fallback kernel report: unquantized
            c.kernels[results[0]["dtype"]] = results[0]["kernels"]
        return results

    return rows, run


def _served_step(step: dict, plan: dict, c: Comparison, routing: str | None) -> Step:
    s, engine, stage = c.sizes, step["engine"], step["stage"]
    router = plan["routers"][routing] if routing else {}
    label = step["label"].format(dtype=c.served_dtype, router=router.get("label"))
    tags = dict(engine=engine, mode="served", dtype=c.served_dtype, client="mixserve")
    if engine == "mixserve":
        tags["baseline"] = bool(step.get("baseline"))
    if routing:
        tags["routing"] = routing
    rows = [Row(stage, label, tags=tags)]
    with_client = "vllm" in step.get("clients", ())
    if with_client:
        rows.append(Row("vllm-client", f"{label} (vLLM's client)", (stage,), dict(tags, client="vllm")))
    if step.get("bracket"):
        rows.append(Row(stage, step["bracket"].format(dtype=c.served_dtype),
                        tags=dict(engine="mixserve", mode="offline-bracket", dtype=c.served_dtype)))
    settings = {**plan["shapes"].get(step.get("shape"), {}), **step.get("settings", {}), **router.get("settings", {}),
                "kv_cache_bytes": c.kv_cache[step.get("kv_cache", "random")], "dtype": c.served_dtype,
                "max_model_len": s.max_model_len, "max_num_seqs": max(s.concurrency, 8)}
    workload = c.workloads[step["workload"]]
    concurrency = getattr(s, step.get("concurrency", "concurrency"))
    repeats = s.repeats if step.get("repeats") else 1

    def run(wanted):
        client = c.client if with_client and wanted[1] else None
        if engine == "vllm":
            results = stages.vllm_served(c.model, s, c.served_dtype, workload, c.vllm_venv, c.out, client, repeats)
        elif step.get("bracket"):
            def offline():
                return stages.mixserve_offline(c.model, c.prompts, c.served_dtype, 0, None, repeats)[0]

            results, bracket = stages.bracketed_served(c.model, settings, workload, concurrency, c.kernels, client,
                                                       offline, repeats)
        elif step["workload"] == "shared-prefix":
            results = stages.prefix_served(c.model, settings, workload, concurrency, c.kernels, c.all_prefixes_bytes)
        else:
            results = stages.served(c.model, settings, workload, concurrency, c.kernels)
        out = [results[0]]
        if with_client:
            out.append(results[1] if client is not None else None)
        if step.get("bracket"):
            out.append(bracket)
        return out

    return rows, run


def build_steps(plan: dict, c: Comparison) -> list[Step]:
    steps = []
    for step in plan["steps"]:
        for each in _each(step, plan, c.sizes):
            if step["mode"] == "offline":
                steps.append(_offline_step(step, c, each.get("dtype", c.served_dtype), each.get("quantization")))
            else:
                steps.append(_served_step(step, plan, c, each.get("routing")))
    return steps


def run_plan(plan: list[Step], skip: set[str]) -> list[dict]:
    """Each step's rows that are not skipped (rules 1 and 2) -> one JSON entry per row."""
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


def run_compare(model: Path, sizes: CompareSizes, out: Path, skip: set[str], vllm_venv: Path,
                plan_file: Path = PLAN_FILE) -> int:
    from mixserve.kernels.capability import cpu_capability
    from mixserve.workers.tokenizer import Tokenizer

    from plots import plot_comparison
    from report import render_report

    model = str(model)
    plan = load_plan(plan_file)
    out.mkdir(parents=True, exist_ok=True)
    cpu = cpu_capability()
    print(f"cpu: {cpu.line()}", flush=True)
    tok = Tokenizer.from_dir(model)
    rand = random_workload(tok, sizes.num_prompts, sizes.input_len, sizes.output_len, seed=sizes.seed)
    shared = shared_prefix_workload(tok, sizes.groups, sizes.users_per_group, sizes.prefix_len, sizes.suffix_len,
                                    sizes.prefix_output_len, seed=sizes.seed)
    multi = multi_turn_workload(tok, sizes.conversations, sizes.turns, sizes.user_len, sizes.turn_output_len,
                                seed=sizes.seed)
    per_token = kv_bytes_per_token(model, sizes.dtype)
    kv_random, kv_prefix = random_kv_bytes(sizes, per_token), prefix_kv_bytes(sizes, per_token)
    c = Comparison(model=model, sizes=sizes, out=out, served_dtype=concrete_dtype(model, sizes.dtype, kv_random),
                   prompts=stages.GivenPrompts([r.prompt for r in rand.requests()], sizes.output_len),
                   workloads={"random": rand, "shared-prefix": shared, "multi-turn": multi},
                   kv_cache={"random": kv_random, "prefix": kv_prefix},
                   all_prefixes_bytes=sizes.groups * sizes.prefix_len * per_token,
                   client=VllmClient(model, sizes, vllm_venv, out), vllm_venv=vllm_venv)
    results = run_plan(build_steps(plan, c), skip)
    ideal = shared.ideal_prefix_hit_rate()
    report = render_report(results, sizes, kv_prefix, per_token, ideal, cpu.line())
    print(report["markdown"], flush=True)
    (out / "compare.md").write_text(report["markdown"] + "\n")
    write_json(out / "compare.json", {"model": model, "cpu": cpu.summary(), "cpu_line": cpu.line(),
                                      "served_dtype": c.served_dtype, "sizes": asdict(sizes),
                                      "kv_prefix_bytes": kv_prefix, "kv_bytes_per_token": per_token,
                                      "ideal_prefix_hit_rate": ideal, "plan": str(plan_file), "stages": results,
                                      "best_dtypes": report["best_dtypes"], "targets": report["targets"]})
    plot_comparison(results, report["rows"], out)
    print(f"wrote {out}/compare.md, compare.json and compare-*.png", flush=True)
    return 1 if any("failed" in e or _request_errors(e.get("result") or {}) for e in results) else 0


def _request_errors(result: dict) -> int:
    return result.get("errors") or result.get("failed") or 0
