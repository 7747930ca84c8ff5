"""The comparison's PNGs (matplotlib, Agg): latency CDFs of the served rows per workload (with
bench/result_files.py's `plot_latency_cdfs`, as `mixserve bench serve` draws them) and the table's
figures as bars (`plot_bars`): output tokens/s of the random workload, mean TTFT of the shared-prefix one.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mixserve.bench.result_files import plot_latency_cdfs  # noqa: E402


def plot_bars(labels: list[str], values: list[float | None], path: Path, ylabel: str, title: str) -> Path:
    """One bar per labelled figure; a missing figure is a zero bar marked n/a."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4))
    heights = [v or 0.0 for v in values]
    bars = ax.bar(range(len(labels)), heights, color="tab:blue")
    for bar, v in zip(bars, values):
        ax.annotate("n/a" if v is None else f"{v:.3g}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_comparison(results: list[dict], rows: list[dict], out: Path) -> None:
    """OUT/compare-{random-cdf,shared-prefix-cdf,throughput,prefix-ttft}.png from the run's entries
    and the report's rows."""
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
