"""The report of the comparison (compare.py): the CPU, one markdown table of every stage, each
engine's best dtype, the ratios, the targets checked, and why tensor parallelism looks as it does on
a 2-core CPU. Rows are found by their entry's tags (runner.Row), never by label.

Ratios are taken within the run (the machine is shared; absolute figures drift with the load):
- offline rows: output tokens/s over mixserve's best offline figure (its best dtype), one-at-a-time
  rows over mixserve's best one-at-a-time figure;
- quantized rows (mixserve offline with weight-only quantized weights): output tokens/s and weight
  bytes over the unquantized mixserve row of the same dtype and mode; they take no part in any
  "best" or target, and their ratios are recorded without a target;
- served rows: over mixserve offline's best, and over mixserve served by 1 replica under the same
  client (our load generator or vLLM's `vllm bench serve`: the fair pair for vLLM's server);
- router rows (shared-prefix and multi-turn workloads, one row per router): mean TTFT over
  mixserve's prefix-aware routing's in the same workload, and the measured prefix-cache hit rate
  (cached prompt tokens / prompt tokens, from each response's `usage`), over the ideal for
  shared-prefix.
Figures checked, each by its name in the JSON's "targets": the mean TTFT of power of two choices and
of Ray's PrefixCacheAffinityRouter over prefix-aware routing's on each workload, prefix-aware's hit
rate over the ideal (shared-prefix); mixserve offline over transformers in the same dtype, mixserve's
best dtype over vLLM's best dtype, mixserve one prompt at a time over vLLM one prompt at a time; under
vLLM's client, mixserve served by 1 replica over mixserve offline measured right before and after it
in the served dtype (the "offline-bracket" row; stage 1's best when there is none) and over vLLM's
server; served ratios under our own load generator, TP=2 over 1 replica, mixserve offline in the
served dtype (with `--dtype auto`: the dtype mixserve picks) over its best dtype, quantized over
unquantized. Which of them have a target, and its value, is data: targets.yaml (a figure meets its
target when it is at least the target; the others are recorded without one).
A figure measured several times (plan.yaml's `repeats`) is its median run; the table lists every
run's figure beside it.

`render_saved` renders a saved compare.json again; run as a script, it prints that markdown:
`python -P tools/benchmarks/report.py benchmarks/compare-full-12.json`.
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":  # python -P keeps the repository root off sys.path; the lab's own folder goes on it
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402

from sizes import CompareSizes  # noqa: E402

TARGETS_FILE = Path(__file__).resolve().with_name("targets.yaml")


def load_targets(path: Path = TARGETS_FILE) -> dict[str, float]:
    """{figure name: target} from targets.yaml."""
    return {name: float(value) for name, value in yaml.safe_load(path.read_text()).items()}


TP_NOTE = (
    "TP=2 here puts one rank on each of the 2 cores. It does the same arithmetic as one replica with 2 threads and "
    "reads the same weights through the same memory bus (decode is bound by memory bandwidth, which the two cores "
    "share), and adds two all-reduces per layer per step (gloo over loopback) plus a Ray round trip per step to the "
    "ranks. So on one CPU socket it can at best match 1 replica x 2 threads and is expected to be slower; tensor "
    "parallelism pays off when each rank has its own memory bandwidth (GPUs, sockets, nodes) or the model does not "
    "fit one device."
)


def _f(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def kernel_summary(kernels: dict | None) -> str:
    """'onednn 5/6, reference 1/6' from a kernel report's linear_kernels ('onednn (reference 0.40 ms, ...)')."""
    if not kernels or not kernels.get("linear_kernels"):
        return "-"
    chosen = [str(v).split()[0] for v in kernels["linear_kernels"].values()]
    counts = {k: chosen.count(k) for k in dict.fromkeys(chosen)}
    return ", ".join(f"{k} {n}/{len(chosen)}" for k, n in counts.items())


def _quantized(row: dict) -> bool:
    return row["quantization"] not in (None, "none")


def _row(entry: dict) -> dict:
    res = entry.get("result") or {}
    workload = ((res.get("config") or {}).get("workload")
                or ("shared-prefix" if entry["stage"] == "prefix" else "random"))
    row = {"label": entry["label"], "stage": entry["stage"], "workload": workload,
           "engine": entry.get("engine"), "mode": entry.get("mode"), "client": entry.get("client"),
           "baseline": entry.get("baseline", False), "routing": entry.get("routing"),
           "dtype": res.get("dtype") or entry.get("dtype"), "kernels": kernel_summary(res.get("kernels")),
           "quantization": entry.get("quantization") or res.get("quantization"),
           "weight_bytes": res.get("weight_bytes"),
           "status": entry.get("failed") or entry.get("skipped"), "tok_s": None, "req_s": None,
           "ttft_mean_ms": None, "ttft_p99_ms": None, "itl_mean_ms": None, "e2e_p50_s": None, "hit_rate": None,
           "errors": None, "load": None, "runs": res.get("runs")}
    if not res:
        return row
    row["load"] = f"{res['load_avg_before'][0]}->{res['load_avg_after'][0]}"
    if res.get("client") == "vllm bench serve":
        s = lambda k: None if res.get(k) is None else res[k] / 1e3  # noqa: E731
        row.update(tok_s=res.get("output_throughput"), req_s=res.get("request_throughput"),
                   ttft_mean_ms=res.get("mean_ttft_ms"), ttft_p99_ms=res.get("p99_ttft_ms"),
                   itl_mean_ms=res.get("mean_itl_ms"), e2e_p50_s=s("median_e2el_ms"), errors=res.get("failed"))
        if res.get("failed"):
            messages = "; ".join(str(m)[:160] for m, _ in res.get("error_messages", [])[:2])
            total = (res.get("completed") or 0) + res["failed"]
            row["status"] = f"{res['failed']} of {total} requests failed: {messages}".replace("|", "/")
        return row
    if "config" not in res:
        row["tok_s"] = res["output_tokens_per_s"]
        return row
    ms = lambda d, k: None if d[k] is None else d[k] * 1e3  # noqa: E731
    row.update(tok_s=res["output_throughput"], req_s=res["request_throughput"],
               ttft_mean_ms=ms(res["ttft_s"], "mean"), ttft_p99_ms=ms(res["ttft_s"], "p99"),
               itl_mean_ms=ms(res["itl_s"], "mean"), e2e_p50_s=res["e2e_s"]["p50"],
               hit_rate=res["prefix_cache_hit_rate"], errors=res["errors"])
    if res["errors"]:
        messages = "; ".join(str(m)[:160] for m, _ in res["error_messages"][:2])
        row["status"] = f"{res['errors']} of {res['requests']} requests failed: {messages}".replace("|", "/")
    return row


def _best(rows: list[dict], engine: str, mode: str) -> dict | None:
    """The fastest row of `engine` in `mode` (offline: its best dtype)."""
    found = [r for r in rows if r["engine"] == engine and r["mode"] == mode and r["tok_s"]]
    return max(found, key=lambda r: r["tok_s"], default=None)


def _find(rows: list[dict], **tags) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in tags.items()) and r["tok_s"]), None)


def _ratio(num: dict | None, den: dict | None, key: str = "tok_s") -> dict | None:
    if not num or not den or not num.get(key) or not den.get(key):
        return None
    return {"value": num[key] / den[key], "of": f"{num['label']} / {den['label']}"}


def _judged(figure: dict, target: float | None) -> dict:
    """A figure with its target (None: none) and whether it meets it."""
    met = None if target is None else figure["value"] >= target
    return {"value": figure["value"], "target": target, "met": met, **({"of": figure["of"]} if "of" in figure else {})}


def best_dtypes(rows: list[dict]) -> dict:
    """Per engine with offline rows: its fastest dtype, every dtype's tok/s (batch and one at a time)."""
    out = {}
    for engine in dict.fromkeys(r["engine"] for r in rows if r["mode"] == "offline" and r["engine"]):
        best = _best(rows, engine, "offline")
        if best is None:
            continue
        per = {r["dtype"]: r["tok_s"] for r in rows if r["engine"] == engine and r["mode"] == "offline" and r["tok_s"]}
        alone = {r["dtype"]: r["tok_s"] for r in rows
                 if r["engine"] == engine and r["mode"] == "one-at-a-time" and r["tok_s"]}
        out[engine] = {"best": best["dtype"], "output_tokens_per_s": per, "one_at_a_time_tokens_per_s": alone}
    return out


def render_report(results: list[dict], sizes, kv_prefix: int, per_token: int, ideal_hit: float | None,
                  cpu_line: str | None = None, targets: dict[str, float] | None = None) -> dict:
    """The report of a run's entries (runner.run_plan); `targets`: by figure name (default: targets.yaml)."""
    goals = load_targets() if targets is None else targets
    rows = [_row(e) for e in results]
    plain = [r for r in rows if not _quantized(r)]  # every best, baseline and target: unquantized weights
    offline = _best(plain, "mixserve", "offline")
    bracket = _find(plain, engine="mixserve", mode="offline-bracket")
    alone = _best(plain, "mixserve", "one-at-a-time")
    baselines = {c: _find(plain, engine="mixserve", mode="served", client=c, baseline=True)
                 for c in ("mixserve", "vllm")}
    unquantized = {id(r): _find(plain, engine="mixserve", mode=r["mode"], dtype=r["dtype"])
                   for r in rows if _quantized(r)}
    routed = {(r["workload"], r["routing"]): r for r in rows if r["routing"]}  # the prefix stage's rows
    aware, p2c = routed.get(("shared-prefix", "prefix-aware")), routed.get(("shared-prefix", "power-of-two"))
    lines = [] if cpu_line is None else [f"CPU: {cpu_line}", ""]
    lines += [
        "| configuration | workload | dtype | output tok/s | ratio | weights GiB | req/s | TTFT mean ms | TTFT p99 ms "
        "| ITL mean ms | E2E p50 s | prefix hits (of ideal) | kernels | load 1m | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratios = []
        if r["workload"] == "random" and r["tok_s"]:
            if _quantized(r):
                speed = _ratio(r, unquantized[id(r)])
                weights = _ratio(r, unquantized[id(r)], "weight_bytes")
                ratios += [f"{speed['value']:.2f}x unquantized"] if speed else []
                ratios += [f"weights {weights['value']:.2f}x"] if weights else []
            elif r["mode"] == "one-at-a-time" and alone:
                ratios.append(f"{r['tok_s'] / alone['tok_s']:.2f}x mixserve 1-at-a-time best")
            elif r["mode"] != "one-at-a-time" and offline:
                ratios.append(f"{r['tok_s'] / offline['tok_s']:.2f}x mixserve offline best")
            if r["mode"] == "served" and r["engine"] == "mixserve" and bracket:
                ratios.append(f"{r['tok_s'] / bracket['tok_s']:.2f}x offline right before and after")
            base = baselines.get(r["client"])
            if r["mode"] == "served" and base and r is not base:
                ratios.append(f"{r['tok_s'] / base['tok_s']:.2f}x 1 replica")
        elif r["routing"] and r["ttft_mean_ms"]:
            ours = routed.get((r["workload"], "prefix-aware"))
            if ours and ours["ttft_mean_ms"]:
                ratios.append(f"TTFT {r['ttft_mean_ms'] / ours['ttft_mean_ms']:.2f}x prefix-aware")
        ratio = ", ".join(ratios) or "-"
        hits = "-"
        if r["hit_rate"] is not None and r["workload"] == "shared-prefix":
            hits = f"{r['hit_rate']:.1%}" + (f" ({r['hit_rate'] / ideal_hit:.0%})" if ideal_hit else "")
        elif r["hit_rate"] is not None and r["routing"]:
            hits = f"{r['hit_rate']:.1%}"
        gib = None if r["weight_bytes"] is None else r["weight_bytes"] / 2**30
        runs = f" (median of {'/'.join(f'{v:.0f}' for v in r['runs'])})" if r["runs"] else ""
        lines.append(
            f"| {r['label']} | {r['workload']} | {r['dtype'] or '-'} | {_f(r['tok_s'], '.1f')}{runs} | {ratio} "
            f"| {_f(gib, '.3g')} | {_f(r['req_s'], '.2f')} | {_f(r['ttft_mean_ms'], '.0f')} "
            f"| {_f(r['ttft_p99_ms'], '.0f')} | {_f(r['itl_mean_ms'], '.1f')} | {_f(r['e2e_p50_s'], '.2f')} | {hits} "
            f"| {r['kernels']} | {r['load'] or '-'} | {r['status'] or ''} |"
        )
    figures = {}
    if aware and p2c and aware["ttft_mean_ms"] and p2c["ttft_mean_ms"]:
        figures["prefix_ttft_speedup"] = {"value": p2c["ttft_mean_ms"] / aware["ttft_mean_ms"]}
    for workload in ("shared-prefix", "multi-turn"):
        ours = routed.get((workload, "prefix-aware"))
        for other in ("ray-prefix-affinity", "power-of-two"):
            them = routed.get((workload, other))
            if workload == "shared-prefix" and other == "power-of-two":
                continue  # prefix_ttft_speedup above
            if ours and them and ours["ttft_mean_ms"] and them["ttft_mean_ms"]:
                figures[f"{workload.replace('-', '_')}_ttft_{other.replace('-', '_')}_over_prefix_aware"] = {
                    "value": them["ttft_mean_ms"] / ours["ttft_mean_ms"]}
    if aware and aware["hit_rate"] is not None and ideal_hit:
        figures["prefix_hit_rate_of_ideal"] = {"value": aware["hit_rate"] / ideal_hit}
    hf = _find(plain, engine="transformers", mode="offline")
    same_dtype = _find(plain, engine="mixserve", mode="offline", dtype=hf["dtype"]) if hf else None
    vllm_served = {c: _find(plain, engine="vllm", mode="served", client=c) for c in ("mixserve", "vllm")}
    tp2 = next((r for r in plain if r["stage"] == "tp2" and r["tok_s"]), None)
    served_dtype = next((r["dtype"] for r in plain if r["engine"] == "mixserve" and r["mode"] == "served"), None)
    for name, ratio in (
        ("offline_over_transformers", _ratio(same_dtype, hf)),
        ("offline_best_over_vllm_best", _ratio(offline, _best(rows, "vllm", "offline"))),
        ("one_at_a_time_over_vllm", _ratio(alone, _best(rows, "vllm", "one-at-a-time"))),
        ("served_over_offline_vllm_client", _ratio(baselines["vllm"], bracket or offline)),
        ("served_over_vllm_served", _ratio(baselines["mixserve"], vllm_served["mixserve"])),
        ("served_over_vllm_served_vllm_client", _ratio(baselines["vllm"], vllm_served["vllm"])),
        ("tp2_over_one_replica", _ratio(tp2, baselines["mixserve"])),
        ("served_dtype_over_best", _ratio(_find(plain, engine="mixserve", mode="offline", dtype=served_dtype),
                                          offline)),
        *[(f"{r['quantization']}_{r['mode'].replace('-', '_')}_over_unquantized", _ratio(r, unquantized[id(r)]))
          for r in rows if _quantized(r)],
        *[(f"{r['quantization']}_weight_bytes_over_unquantized", _ratio(r, unquantized[id(r)], "weight_bytes"))
          for r in rows if _quantized(r) and r["mode"] == "offline"],
    ):
        if ratio is not None:
            figures[name] = ratio
    targets = {name: _judged(figure, goals.get(name)) for name, figure in figures.items()}
    best = best_dtypes(plain)
    lines += ["", f"Sizes: {sizes}.", f"Shared-prefix KV cache per replica: {kv_prefix / 2**20:.1f} MiB "
              f"({kv_prefix // per_token} tokens; all {sizes.groups} prefixes need "
              f"{sizes.groups * sizes.prefix_len} tokens); ideal hit rate {_f(ideal_hit, '.1%')}.", ""]
    for engine, b in best.items():
        figures = ", ".join(f"{d} {v:.1f}" for d, v in b["output_tokens_per_s"].items())
        alone_figures = ", ".join(f"{d} {v:.1f}" for d, v in b["one_at_a_time_tokens_per_s"].items())
        lines.append(f"- {engine} best dtype offline: {b['best']} (tok/s: {figures}"
                     + (f"; one at a time: {alone_figures}" if alone_figures else "") + ")")
    for name, t in targets.items():
        verdict = "" if t["met"] is None else (" - met" if t["met"] else " - NOT met")
        goal = "" if t["target"] is None else f" (target >= {t['target']})"
        lines.append(f"- {name}: {t['value']:.2f}{goal}{verdict}")
    lines += ["", f"Note on TP=2: {TP_NOTE}"]
    return {"markdown": "\n".join(lines), "rows": rows, "targets": targets, "best_dtypes": best}


def render_saved(saved: dict, targets: dict[str, float] | None = None) -> str:
    """The markdown of a saved compare.json (its compare.md), rendered again from its entries. A run
    saved before compare.json recorded the ideal hit rate gets the shared-prefix workload's from its
    sizes (the same figure: the prompts have exact lengths)."""
    sizes = CompareSizes.from_json(saved["sizes"])
    ideal = saved.get("ideal_prefix_hit_rate", sizes.ideal_prefix_hit_rate())
    return render_report(saved["stages"], sizes, saved["kv_prefix_bytes"], saved["kv_bytes_per_token"], ideal,
                         saved.get("cpu_line"), targets)["markdown"] + "\n"


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(render_saved(json.loads(Path(path).read_text())), end="")
