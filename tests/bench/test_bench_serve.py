"""`mixserve bench serve` against a real tiny server: every workload, open and closed loop; the
workload generators; and the sizing of the comparison's shared-prefix stage."""

import json
import os

import pytest

from mixserve.bench.compare import CompareSizes, Row, _run_plan, prefix_kv_bytes
from mixserve.bench.report import render_report
from mixserve.bench.vllm_client import client_args, summarize_result
from mixserve.bench.workloads import build_workload
from mixserve.cluster.cli import main
from mixserve.workers.tokenizer import Tokenizer
from tests.router.serve_helpers import start, stop

SIZES = {
    "random": ["--input-len", "24", "--output-len", "6"],
    "shared-prefix": ["--groups", "2", "--prefix-len", "64", "--suffix-len", "8", "--output-len", "4"],
    "multi-turn": ["--turns", "2", "--user-len", "12", "--output-len", "6"],
}


@pytest.fixture(scope="class")
def server(tiny_checkpoint):
    url, _ = start(tiny_checkpoint)
    yield url
    stop()


def _bench(url, checkpoint, out, workload, *load, num_prompts=4, name="run", seed=0):
    code = main(["bench", "serve", "--url", url, "--tokenizer", str(checkpoint), "--workload", workload, *load,
                 "--num-prompts", str(num_prompts), "--seed", str(seed), "--out", str(out), "--name", name,
                 "--no-progress", "--warmup", "1", *SIZES[workload]])
    return code, json.loads((out / f"{name}.json").read_text())["runs"]


class TestAgainstATinyServer:
    """One real server (Ray Serve, 1 replica) for the class; stopped before the tests after it."""

    @pytest.mark.parametrize("workload", ["random", "shared-prefix", "multi-turn"])
    @pytest.mark.parametrize("load", [("--rate", "20"), ("--concurrency", "2")], ids=["open-loop", "closed-loop"])
    def test_every_workload_streams_and_reports_latencies(self, server, tiny_checkpoint, tmp_path, workload, load):
        code, runs = _bench(server, tiny_checkpoint, tmp_path, workload, *load)
        s = runs[0]
        assert code == 0
        assert s["requests"] == s["completed"] == 4 and s["errors"] == 0
        assert s["ttft_s"]["mean"] > 0 and s["itl_s"]["mean"] > 0
        assert s["e2e_s"]["p50"] >= s["ttft_s"]["p50"]
        assert s["output_tokens"] == 4 * 6 or workload == "shared-prefix"
        assert s["output_throughput"] > 0 and s["request_throughput"] > 0
        assert all(r["replica"] for r in s["per_request"])
        assert s["config"]["workload"] == workload and s["load_avg_before"]
        assert (tmp_path / "run-latency-cdf.png").stat().st_size > 0

    def test_rate_sweep_plots_latency_against_throughput(self, server, tiny_checkpoint, tmp_path):
        code, runs = _bench(server, tiny_checkpoint, tmp_path, "random", "--rate", "10,inf")
        assert code == 0 and [r["config"]["rate"] for r in runs] == [10.0, "inf"]
        assert (tmp_path / "run-sweep.png").stat().st_size > 0

    def test_shared_prefix_one_at_a_time_hits_the_ideal_rate(self, server, tiny_checkpoint, tmp_path):
        _, runs = _bench(server, tiny_checkpoint, tmp_path, "shared-prefix", "--concurrency", "1",
                         num_prompts=6, seed=7)  # prefixes no earlier test sent
        s = runs[0]
        assert s["ideal_prefix_hit_rate"] == pytest.approx(4 * 64 / (6 * 72))
        assert s["prefix_cache_hit_rate"] == pytest.approx(s["ideal_prefix_hit_rate"])
        assert s["server_prefix_cache"]["hits"] == s["cached_tokens"]

    def test_the_request_vllm_bench_serve_sends_streams_to_done_with_usage_last(self, server):
        """The body of `vllm bench serve --backend openai --dataset-name random --ignore-eos --temperature 0`
        (vllm/benchmarks/lib/endpoint_request_func.py): a text prompt, fields we do not use, and vLLM's
        reading of the stream, which takes usage only from a chunk without choices."""
        import httpx

        model = httpx.get(server + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": "the quick brown fox jumps", "repetition_penalty": 1.0, "max_tokens": 5,
                "logprobs": None, "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
                "temperature": 0.0}
        with httpx.stream("POST", server + "/v1/completions", json=body, headers={"x-request-id": "bench-0"},
                          timeout=60) as r:
            assert r.status_code == 200
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
        assert all(c["choices"] and "text" in c["choices"][0] for c in chunks[:-1])

    def test_rejected_requests_are_counted_not_fatal(self, server, tiny_checkpoint, tmp_path):
        code = main(["bench", "serve", "--url", server, "--tokenizer", str(tiny_checkpoint), "--workload", "random",
                     "--concurrency", "2", "--num-prompts", "3", "--input-len", "600", "--out", str(tmp_path),
                     "--name", "bad", "--no-progress", "--warmup", "0"])
        s = json.loads((tmp_path / "bad.json").read_text())["runs"][0]
        assert code == 1
        assert s["errors"] == 3 and s["completed"] == 0
        assert "HTTP 400" in s["error_messages"][0][0]


def test_workloads_are_seeded_and_exact(tiny_checkpoint):
    tok = Tokenizer.from_dir(tiny_checkpoint)
    a = build_workload("random", tok, 5, seed=3, input_len=40, output_len=7)
    assert a.requests()[0].prompt == build_workload("random", tok, 5, seed=3, input_len=40).requests()[0].prompt
    assert [r.prompt_len for r in a.requests()] == [40] * 5 and {r.max_tokens for r in a.requests()} == {7}
    shared = build_workload("shared-prefix", tok, 12, groups=3, prefix_len=50, suffix_len=10)
    by_group = {}
    for r in shared.requests():
        by_group.setdefault(r.group, []).append(r.prompt)
    assert all(len({tuple(p[:50]) for p in ps}) == 1 and len(ps) == 4 for ps in by_group.values())
    assert shared.ideal_prefix_hit_rate() == pytest.approx(9 * 50 / (12 * 60))
    chat = build_workload("multi-turn", tok, 6, turns=3)
    assert [len(s) for s in chat.sessions] == [3, 3] and chat.endpoint == "/v1/chat/completions"


def test_prefix_stage_cache_holds_half_the_prefixes_but_not_all():
    sizes, per_token = CompareSizes(), 8 << 10  # mini in bfloat16: 8 layers * 2 * 4 kv heads * 64 * 2 bytes
    kv = prefix_kv_bytes(sizes, per_token)
    prefix = sizes.prefix_len * per_token
    assert sizes.groups // 2 * prefix <= kv < sizes.groups * prefix


@pytest.mark.skipif(not os.environ.get("MIXSERVE_BENCH_COMPARE"), reason="~2 min: set MIXSERVE_BENCH_COMPARE=1")
def test_compare_quick_runs_every_mixserve_stage(tmp_path):
    assert main(["bench", "compare", "--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert all("result" in s for s in result["stages"] if "skipped" not in s)
    offline = [s for s in result["stages"] if s["stage"] == "offline"]
    assert sorted((s["dtype"], s["mode"]) for s in offline) == [
        ("bfloat16", "offline"), ("bfloat16", "one-at-a-time"), ("float32", "offline"), ("float32", "one-at-a-time")]
    assert all(s["result"]["kernels"]["linear_kernels"] for s in offline)
    served = [s for s in result["stages"] if s.get("mode") == "served" and "result" in s]
    assert served and all(s["result"]["kernels"] and s["result"]["cpu"] for s in served)
    assert set(result["cpu"]["flags"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert result["best_dtypes"]["mixserve"]["best"] in ("float32", "bfloat16")
    assert {s["stage"] for s in result["stages"] if "skipped" in s} == {"transformers", "vllm", "vllm-client"}
    markdown = (tmp_path / "compare.md").read_text()
    assert markdown.startswith("CPU: ") and "\n| configuration |" in markdown
    _check_quantized_rows(result, markdown)
    routed = {(s["result"]["config"]["workload"], s["routing"]) for s in result["stages"]
              if s["stage"] == "prefix" and "result" in s}
    assert routed == {(w, r) for w in ("shared-prefix", "multi-turn")
                      for r in ("power-of-two", "prefix-aware", "ray-prefix-affinity")}
    for name in ("shared_prefix_ttft_ray_prefix_affinity_over_prefix_aware",
                 "multi_turn_ttft_ray_prefix_affinity_over_prefix_aware", "multi_turn_ttft_power_of_two_over_prefix_aware"):
        assert result["targets"][name]["value"] > 0


def _check_quantized_rows(result, markdown):
    """int8 and int4 rows (batch and one at a time) in the served dtype, each lighter than and rated
    against the unquantized offline row of the same dtype and mode."""
    quantized = [s for s in result["stages"] if s["stage"] == "quantized"]
    assert sorted((s["quantization"], s["mode"]) for s in quantized) == [
        ("int4", "offline"), ("int4", "one-at-a-time"), ("int8", "offline"), ("int8", "one-at-a-time")]
    for s in quantized:
        plain = next(p for p in result["stages"] if p["stage"] == "offline" and p["quantization"] == "none"
                     and p["mode"] == s["mode"] and p["dtype"] == s["dtype"] == result["served_dtype"])
        assert s["result"]["quantization"] == s["quantization"] and s["result"]["dtype"] == s["dtype"]
        assert 0 < s["result"]["weight_bytes"] < plain["result"]["weight_bytes"]
        assert f"| {s['label']} | random | {s['dtype']} | " in markdown
        assert "x unquantized, weights 0." in markdown.split(f"| {s['label']} |")[1].splitlines()[0]
        mode = s["mode"].replace("-", "_")
        assert result["targets"][f"{s['quantization']}_{mode}_over_unquantized"]["target"] is None
    assert result["targets"]["int4_weight_bytes_over_unquantized"]["value"] < 1
    assert all(q not in result["best_dtypes"]["mixserve"]["output_tokens_per_s"] for q in ("int8", "int4"))


def test_compare_quantized_rows_next_to_the_unquantized_offline_row(tiny_checkpoint, tmp_path):
    """The offline and quantized stages alone (~15 s on the tiny model): the served dtype only."""
    assert main(["bench", "compare", "--quick", "--model", str(tiny_checkpoint), "--offline-dtypes", "float32",
                 "--skip", "served,tp2,prefix", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["served_dtype"] == "float32" and result["sizes"]["quantizations"] == ["int8", "int4"]
    _check_quantized_rows(result, (tmp_path / "compare.md").read_text())
    assert "| weights GiB |" in (tmp_path / "compare.md").read_text()


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


def test_offline_bench_repeats_the_batch_on_one_engine_and_reports_the_median_run(tiny_checkpoint):
    from mixserve.bench.offline import OfflineWorkload, bench_mixserve, median_run

    assert median_run([{"x": 3}, {"x": 1}, {"x": 2}], "x") == {"x": 2, "runs": [3, 1, 2]}
    assert median_run([{"x": 3, "y": 0}, {"x": 1, "y": 1}], "x") == {"x": 2, "y": 1, "runs": [3, 1]}  # even count
    result = bench_mixserve(str(tiny_checkpoint), OfflineWorkload(num_prompts=3, input_len=16, output_len=4),
                            "float32", repeats=3)
    assert len(result["runs"]) == 3 and all(r > 0 for r in result["runs"])
    assert result["output_tokens_per_s"] == sorted(result["runs"])[1]
    assert result["output_tokens"] == 12 and result["steps"] == 4  # one run's steps: 1 prefill + 3 decodes


def test_vllm_client_runs_the_random_workload_greedy_closed_loop_and_saves_every_request():
    args = client_args("http://127.0.0.1:8000", "peer", "/models/mini", 128, 64, 32, 32, 0, "/out", "x.json")
    pairs = dict(zip(args, args[1:]))
    assert pairs["--backend"] == "openai" and pairs["--endpoint"] == "/v1/completions"
    assert pairs["--dataset-name"] == "random" and pairs["--random-input-len"] == "128"
    assert pairs["--random-output-len"] == "64" and pairs["--num-prompts"] == "32"
    assert pairs["--max-concurrency"] == "32" and pairs["--temperature"] == "0"
    assert {"--ignore-eos", "--save-result", "--save-detailed"} <= set(args)


def test_a_row_is_skipped_when_a_stage_it_needs_is_skipped_and_fails_alone():
    def two(wanted):
        return [{"output_tokens_per_s": 1.0}, RuntimeError("client broke") if wanted[1] else None]

    def broken(wanted):
        raise ValueError("no server")

    plan = [([Row("served", "ours"), Row("vllm-client", "theirs", ("served",))], two),
            ([Row("vllm", "peer"), Row("vllm-client", "peer, theirs", ("vllm",))], broken)]
    entries = _run_plan(plan, skip={"vllm"})
    assert [sorted(k for k in ("result", "failed", "skipped") if k in e) for e in entries] == [
        ["result"], ["failed"], ["skipped"], ["skipped"]]
    assert entries[1]["failed"] == "RuntimeError: client broke"
    entries = _run_plan(plan, skip={"served"})
    assert [e["failed"] for e in entries[2:]] == ["ValueError: no server"] * 2 and "skipped" in entries[1]
