"""Results files of `mixserve bench serve`: the JSON summaries and their PNG plots (matplotlib, Agg).

- `plot_latency_cdfs`: one figure per set of runs, three panels (TTFT, ITL, E2E), the empirical
  CDF of each run's per-request values.
- `plot_sweep`: latency (mean and p99 TTFT, ITL, E2E) against achieved output throughput, one point
  per offered load of a sweep (`--rate 1,2,4` or `--concurrency 1,4,16`).
The benchmark lab (tools/benchmarks/) writes its files with these too.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_METRICS = (("ttft_s", "time to first token"), ("itl_s", "inter-token latency"), ("e2e_s", "end-to-end latency"))


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _run_label(s: dict) -> str:
    c = s["config"]
    load = f"rate {c['rate']}" if c.get("rate") is not None else f"conc {c['concurrency']}"
    return s.get("label") or f"{c['workload']} {load}"


def plot_latency_cdfs(summaries: list[dict], path: Path, title: str = "") -> Path:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, name) in zip(axes, _METRICS):
        for s in summaries:
            values = sorted(r[key] * 1e3 for r in s["per_request"] if r.get(key) is not None)
            if values:
                ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                        label=_run_label(s))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(title or "latency CDFs")
    return _save(fig, path)


def plot_sweep(summaries: list[dict], path: Path, title: str = "") -> Path:
    """Latency against achieved output tokens/s; points in the order of the sweep."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    x = [s["output_throughput"] for s in summaries]
    for ax, (key, name) in zip(axes, _METRICS):
        for stat, style in (("mean", "o-"), ("p99", "s--")):
            y = [None if s[key][stat] is None else s[key][stat] * 1e3 for s in summaries]
            ax.plot(x, y, style, label=stat)
        for xi, s in zip(x, summaries):
            c = s["config"]
            ax.annotate(str(c["rate"] if c.get("rate") is not None else c["concurrency"]),
                        (xi, (s[key]["mean"] or 0) * 1e3), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(f"{name} (ms)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title or "latency against throughput (labels: offered load)")
    return _save(fig, path)

