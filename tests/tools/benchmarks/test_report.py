"""The comparison's report (tools/benchmarks/report.py): each engine's best dtype, ratios within
the run, the targets (targets.yaml), vLLM's client as rows of their own, and the committed results
in benchmarks/ rendered again to the same tables."""

import json

import pytest

from report import load_targets, render_report, render_saved
from sizes import CompareSizes
from tests.helpers import REPOSITORY
from vllm_client import client_args, summarize_result


def _entry(stage, label, tok_s=None, failed=None, **tags):
    entry = {"stage": stage, "label": label, **tags}
    if failed:
        entry["failed"] = failed
    else:
        entry["result"] = {"output_tokens_per_s": tok_s, "load_avg_before": [1.0], "load_avg_after": [1.1]}
    return entry


def test_report_compares_each_engines_best_dtype_and_one_prompt_at_a_time():
    stages = [
        _entry("offline", "mixserve offline, float32", 100.0, engine="mixserve", mode="offline", dtype="float32"),
        _entry("offline", "mixserve 1 at a time, float32", 20.0, engine="mixserve", mode="one-at-a-time",
               dtype="float32"),
        _entry("offline", "mixserve offline, bfloat16", 150.0, engine="mixserve", mode="offline", dtype="bfloat16"),
        _entry("transformers", "transformers generate", 100.0, engine="transformers", mode="offline",
               dtype="bfloat16"),
        _entry("vllm", "vLLM offline, float32", 200.0, engine="vllm", mode="offline", dtype="float32"),
        _entry("vllm", "vLLM 1 at a time, float32", 25.0, engine="vllm", mode="one-at-a-time", dtype="float32"),
        _entry("vllm", "vLLM offline, bfloat16", 120.0, engine="vllm", mode="offline", dtype="bfloat16"),
        _entry("vllm", "vLLM CPU build served", failed="RuntimeError: boom", engine="vllm", mode="served",
               dtype="bfloat16", client="mixserve"),
    ]
    report = render_report(stages, CompareSizes(), 1 << 20, 8 << 10, 0.8, "AMD EPYC | torch ISA AVX2 | avx2")
    targets = report["targets"]
    best = report["best_dtypes"]
    assert best["mixserve"]["best"] == "bfloat16" and best["vllm"]["best"] == "float32"
    assert targets["offline_over_transformers"]["value"] == pytest.approx(1.5)  # the same dtype: bfloat16
    assert targets["offline_over_transformers"]["met"]
    assert targets["offline_best_over_vllm_best"]["value"] == pytest.approx(0.75)
    assert not targets["offline_best_over_vllm_best"]["met"]
    assert targets["one_at_a_time_over_vllm"]["value"] == pytest.approx(0.8)
    markdown = report["markdown"]
    assert markdown.startswith("CPU: AMD EPYC | torch ISA AVX2 | avx2\n")
    assert "offline_best_over_vllm_best: 0.75 (target >= 1.0) - NOT met" in markdown
    assert "| vLLM offline, float32 | random | float32 | 200.0 | 1.33x mixserve offline best |" in markdown
    assert "| vLLM 1 at a time, float32 | random | float32 | 25.0 | 1.25x mixserve 1-at-a-time best |" in markdown
    assert "- vllm best dtype offline: float32 (tok/s: float32 200.0, bfloat16 120.0; one at a time: float32 25.0)" \
        in markdown
    assert "RuntimeError: boom" in markdown


def test_quantized_rows_are_rated_against_the_unquantized_row_of_their_dtype_and_mode_and_are_never_best():
    def offline(label, tok_s, quantization, weight_bytes, mode="offline", dtype="bfloat16"):
        entry = _entry("offline" if quantization == "none" else "quantized", label, tok_s, engine="mixserve",
                       mode=mode, dtype=dtype, quantization=quantization)
        entry["result"]["weight_bytes"] = weight_bytes
        return entry

    stages = [offline("none, float32", 200.0, "none", 4 << 30, dtype="float32"),
              offline("none, bfloat16", 100.0, "none", 2 << 30),
              offline("none, bfloat16, alone", 10.0, "none", 2 << 30, "one-at-a-time"),
              offline("int8, bfloat16", 120.0, "int8", 1 << 30),
              offline("int8, bfloat16, alone", 15.0, "int8", 1 << 30, "one-at-a-time"),
              offline("int4, bfloat16", 300.0, "int4", 1 << 29),
              _entry("quantized", "int4, bfloat16, alone", failed="RuntimeError: boom", engine="mixserve",
                     mode="one-at-a-time", dtype="bfloat16", quantization="int4")]
    report = render_report(stages, CompareSizes(), 1 << 20, 8 << 10, None)
    markdown = report["markdown"]
    assert "| none, bfloat16 | random | bfloat16 | 100.0 | 0.50x mixserve offline best | 2 |" in markdown
    assert "| int8, bfloat16 | random | bfloat16 | 120.0 | 1.20x unquantized, weights 0.50x | 1 |" in markdown
    assert "| int8, bfloat16, alone | random | bfloat16 | 15.0 | 1.50x unquantized, weights 0.50x | 1 |" in markdown
    assert "| int4, bfloat16 | random | bfloat16 | 300.0 | 3.00x unquantized, weights 0.25x | 0.5 |" in markdown
    assert "| int4, bfloat16, alone | random | bfloat16 | - | - | - |" in markdown
    assert report["best_dtypes"]["mixserve"] == {"best": "float32",
                                                 "output_tokens_per_s": {"float32": 200.0, "bfloat16": 100.0},
                                                 "one_at_a_time_tokens_per_s": {"bfloat16": 10.0}}
    targets = report["targets"]
    assert targets["int8_offline_over_unquantized"]["value"] == pytest.approx(1.2)
    assert targets["int8_one_at_a_time_over_unquantized"]["value"] == pytest.approx(1.5)
    assert targets["int4_offline_over_unquantized"] == {"value": pytest.approx(3.0), "target": None, "met": None,
                                                        "of": "int4, bfloat16 / none, bfloat16"}
    assert targets["int4_weight_bytes_over_unquantized"]["value"] == pytest.approx(0.25)
    assert "int4_one_at_a_time_over_unquantized" not in targets
    assert "- int4_offline_over_unquantized: 3.00\n" in markdown


def test_vllm_clients_saved_result_is_a_row_of_its_own_against_the_same_client_on_mixserve():
    def saved(tok_s, failed=0):
        return {"completed": 32 - failed, "failed": failed, "duration": 40.0, "output_throughput": tok_s,
                "request_throughput": 0.8, "mean_ttft_ms": 15000.0, "p99_ttft_ms": 20000.0, "mean_itl_ms": 340.0,
                "median_e2el_ms": 36000.0, "ttfts": [0.1] * 32, "itls": [[0.3]] * 32,
                "errors": ["Traceback ...\nClientConnectorError: refused"] * failed + [""] * (32 - failed)}

    mixserve = summarize_result(saved(25.9, failed=2))
    assert "ttfts" not in mixserve and "errors" not in mixserve
    assert mixserve["error_messages"] == [("ClientConnectorError: refused", 2)]
    load = {"load_avg_before": [1.0], "load_avg_after": [1.2]}
    stages = [{"stage": "vllm-client", "label": "mixserve served (vLLM's client)", "engine": "mixserve",
               "mode": "served", "dtype": "float32", "client": "vllm", "baseline": True,
               "result": {**mixserve, **load}},
              {"stage": "vllm-client", "label": "vLLM served (vLLM's client)", "engine": "vllm", "mode": "served",
               "dtype": "float32", "client": "vllm", "result": {**summarize_result(saved(56.1)), **load}}]
    report = render_report(stages, CompareSizes(), 1 << 20, 8 << 10, None)
    row = report["rows"][0]
    assert (row["tok_s"], row["ttft_mean_ms"], row["itl_mean_ms"], row["e2e_p50_s"]) == (25.9, 15000.0, 340.0, 36.0)
    assert row["status"] == "2 of 32 requests failed: ClientConnectorError: refused"
    assert report["targets"]["served_over_vllm_served_vllm_client"]["value"] == pytest.approx(25.9 / 56.1)
    assert report["targets"]["served_over_vllm_served_vllm_client"]["met"] is False  # issue 12's >= 1.0
    assert "| vLLM served (vLLM's client) | random | float32 | 56.1 | 2.17x 1 replica |" in report["markdown"]


def test_repeated_figures_show_their_runs_and_served_is_held_to_09x_offline_under_vllms_client():
    offline = _entry("offline", "mixserve offline, bfloat16", 300.0, engine="mixserve", mode="offline",
                     dtype="bfloat16")
    offline["result"]["runs"] = [310.0, 300.0, 280.0]
    served = {"stage": "vllm-client", "label": "mixserve served (vLLM's client)", "engine": "mixserve",
              "mode": "served", "dtype": "bfloat16", "client": "vllm", "baseline": True,
              "result": {"client": "vllm bench serve", "output_throughput": 276.0, "runs": [276.0, 290.0, 250.0],
                         "load_avg_before": [1.0], "load_avg_after": [1.2]}}
    report = render_report([offline, served], CompareSizes(), 1 << 20, 8 << 10, None)
    target = report["targets"]["served_over_offline_vllm_client"]
    assert target["value"] == pytest.approx(0.92) and target["target"] == 0.9 and target["met"]
    assert "| mixserve offline, bfloat16 | random | bfloat16 | 300.0 (median of 310/300/280) |" in report["markdown"]
    assert "| 276.0 (median of 276/290/250) | 0.92x mixserve offline best |" in report["markdown"]
    served["result"]["output_throughput"] = 260.0
    assert not render_report([offline, served], CompareSizes(), 1 << 20, 8 << 10, None)["targets"][
        "served_over_offline_vllm_client"]["met"]
    # offline measured right before and after the served stage is what served is held to, when present
    bracket = _entry("served", "mixserve offline, right before and after", 280.0, engine="mixserve",
                     mode="offline-bracket", dtype="bfloat16")
    report = render_report([offline, served, bracket], CompareSizes(), 1 << 20, 8 << 10, None)
    target = report["targets"]["served_over_offline_vllm_client"]
    assert target["value"] == pytest.approx(260 / 280) and target["met"]
    assert target["of"] == "mixserve served (vLLM's client) / mixserve offline, right before and after"
    assert "0.87x mixserve offline best, 0.93x offline right before and after |" in report["markdown"]
    assert report["best_dtypes"]["mixserve"]["output_tokens_per_s"] == {"bfloat16": 300.0}  # not a best


def test_vllm_client_runs_the_random_workload_greedy_closed_loop_and_saves_every_request():
    args = client_args("http://127.0.0.1:8000", "peer", "/models/mini", 128, 64, 32, 32, 0, "/out", "x.json")
    pairs = dict(zip(args, args[1:]))
    assert pairs["--backend"] == "openai" and pairs["--endpoint"] == "/v1/completions"
    assert pairs["--dataset-name"] == "random" and pairs["--random-input-len"] == "128"
    assert pairs["--random-output-len"] == "64" and pairs["--num-prompts"] == "32"
    assert pairs["--max-concurrency"] == "32" and pairs["--temperature"] == "0"
    assert {"--ignore-eos", "--save-result", "--save-detailed"} <= set(args)


COMMITTED = REPOSITORY / "benchmarks"


@pytest.mark.parametrize("name", ["compare-full-12", "compare-served-13"])
def test_a_committed_comparison_renders_to_its_committed_table_byte_for_byte(name):
    saved = json.loads((COMMITTED / f"{name}.json").read_text())
    assert render_saved(saved) == (COMMITTED / f"{name}.md").read_text()


@pytest.mark.parametrize("name", ["compare-routers", "compare-quantized"])
def test_a_comparison_saved_before_the_sizes_grew_renders_to_its_table_but_for_the_sizes_line(name):
    """These runs predate sizes fields (repeats; multi-turn's): the rest of their markdown is the same."""
    saved = json.loads((COMMITTED / f"{name}.json").read_text())
    drop_sizes = lambda text: [line for line in text.splitlines() if not line.startswith("Sizes: ")]  # noqa: E731
    assert drop_sizes(render_saved(saved)) == drop_sizes((COMMITTED / f"{name}.md").read_text())


def test_the_targets_are_data_and_a_figure_without_one_is_recorded_without_one():
    targets = load_targets()
    assert targets["prefix_ttft_speedup"] == 2.0 and targets["prefix_hit_rate_of_ideal"] == 0.8
    assert targets["served_over_offline_vllm_client"] == 0.9 and targets["offline_over_transformers"] == 1.0
    saved = json.loads((COMMITTED / "compare-full-12.json").read_text())
    stricter = render_saved(saved, {**targets, "prefix_ttft_speedup": 3.0})
    assert "- prefix_ttft_speedup: 2.38 (target >= 3.0) - NOT met" in stricter
    assert "- tp2_over_one_replica: 0.75\n" in stricter
