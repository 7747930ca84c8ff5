"""The report of `mixserve bench compare`: one markdown table of every stage, the ratios, the
targets checked, and why tensor parallelism looks as it does on a 2-core CPU.

Ratios are taken within the run (the machine is shared; absolute figures drift with the load):
- random-workload rows: output tokens/s over mixserve offline's, and served rows over mixserve
  served by 1 replica (the fair pair for vLLM's server);
- shared-prefix rows: mean TTFT over prefix-aware routing's, and the measured prefix-cache hit
  rate (cached prompt tokens / prompt tokens, from each response's `usage`) over the ideal.
Targets: prefix-aware mean TTFT at least `TTFT_TARGET` times lower than power of two choices, a
hit rate of at least `HIT_TARGET` of the ideal, and mixserve offline at least as fast as each
peer's offline run (transformers `generate`, vLLM `LLM.generate`) on the same prompts.
"""

TTFT_TARGET = 2.0
HIT_TARGET = 0.8
OFFLINE_TARGET = 1.0

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


def _row(entry: dict) -> dict:
    res = entry.get("result") or {}
    served = "config" in res
    workload = "shared-prefix" if entry["stage"] == "prefix" else "random"
    row = {"label": entry["label"], "stage": entry["stage"], "workload": workload,
           "status": entry.get("failed") or entry.get("skipped"), "tok_s": None, "req_s": None,
           "ttft_mean_ms": None, "ttft_p99_ms": None, "itl_mean_ms": None, "e2e_p50_s": None, "hit_rate": None,
           "errors": None, "load": None}
    if not res:
        return row
    row["load"] = f"{res['load_avg_before'][0]}->{res['load_avg_after'][0]}"
    if not served:
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


def render_report(results: list[dict], sizes, kv_prefix: int, per_token: int, ideal_hit: float | None) -> dict:
    rows = [_row(e) for e in results]
    offline = next((r["tok_s"] for r in rows if r["stage"] == "offline" and r["tok_s"]), None)
    aware = next((r for r in rows if r["stage"] == "prefix" and "prefix-aware" in r["label"]), None)
    p2c = next((r for r in rows if r["stage"] == "prefix" and "power of two" in r["label"]), None)
    lines = [
        "| configuration | workload | output tok/s | ratio | req/s | TTFT mean ms | TTFT p99 ms | ITL mean ms "
        "| E2E p50 s | prefix hits (of ideal) | load 1m | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    one = next((r for r in rows if r["stage"] == "served" and "1 replica" in r["label"]), None)
    for r in rows:
        ratio = "-"
        if r["workload"] == "random" and r["tok_s"] and offline:
            ratio = f"{r['tok_s'] / offline:.2f}x offline"
            if r["req_s"] is not None and one and one["tok_s"] and r is not one:
                ratio += f", {r['tok_s'] / one['tok_s']:.2f}x 1 replica"
        elif r["workload"] == "shared-prefix" and r["ttft_mean_ms"] and aware and aware["ttft_mean_ms"]:
            ratio = f"TTFT {r['ttft_mean_ms'] / aware['ttft_mean_ms']:.2f}x prefix-aware"
        hits = "-"
        if r["hit_rate"] is not None and r["workload"] == "shared-prefix":
            hits = f"{r['hit_rate']:.1%}" + (f" ({r['hit_rate'] / ideal_hit:.0%})" if ideal_hit else "")
        lines.append(
            f"| {r['label']} | {r['workload']} | {_f(r['tok_s'], '.1f')} | {ratio} | {_f(r['req_s'], '.2f')} "
            f"| {_f(r['ttft_mean_ms'], '.0f')} | {_f(r['ttft_p99_ms'], '.0f')} | {_f(r['itl_mean_ms'], '.1f')} "
            f"| {_f(r['e2e_p50_s'], '.2f')} | {hits} | {r['load'] or '-'} | {r['status'] or ''} |"
        )
    targets = {}
    if aware and p2c and aware["ttft_mean_ms"] and p2c["ttft_mean_ms"]:
        speedup = p2c["ttft_mean_ms"] / aware["ttft_mean_ms"]
        targets["prefix_ttft_speedup"] = {"value": speedup, "target": TTFT_TARGET, "met": speedup >= TTFT_TARGET}
    if aware and aware["hit_rate"] is not None and ideal_hit:
        frac = aware["hit_rate"] / ideal_hit
        targets["prefix_hit_rate_of_ideal"] = {"value": frac, "target": HIT_TARGET, "met": frac >= HIT_TARGET}
    for name, stage, label_part in (("offline_over_transformers", "transformers", "transformers"),
                                    ("offline_over_vllm_offline", "vllm", "offline")):
        peer = next((r for r in rows if r["stage"] == stage and label_part in r["label"] and r["tok_s"]), None)
        if offline and peer:
            ratio = offline / peer["tok_s"]
            targets[name] = {"value": ratio, "target": OFFLINE_TARGET, "met": ratio >= OFFLINE_TARGET}
    tp2 = next((r for r in rows if r["stage"] == "tp2"), None)
    if one and tp2 and one["tok_s"] and tp2["tok_s"]:
        targets["tp2_over_one_replica"] = {"value": tp2["tok_s"] / one["tok_s"], "target": None, "met": None}
    lines += ["", f"Sizes: {sizes}.", f"Shared-prefix KV cache per replica: {kv_prefix / 2**20:.1f} MiB "
              f"({kv_prefix // per_token} tokens; all {sizes.groups} prefixes need "
              f"{sizes.groups * sizes.prefix_len} tokens); ideal hit rate {_f(ideal_hit, '.1%')}.", ""]
    for name, t in targets.items():
        verdict = "" if t["met"] is None else (" - met" if t["met"] else " - NOT met")
        goal = "" if t["target"] is None else f" (target >= {t['target']})"
        lines.append(f"- {name}: {t['value']:.2f}{goal}{verdict}")
    lines += ["", f"Note on TP=2: {TP_NOTE}"]
    return {"markdown": "\n".join(lines), "rows": rows, "targets": targets}
