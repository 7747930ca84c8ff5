"""`mixserve bench serve` against a real tiny server: every workload, open and closed loop; the
workload generators; and the sizing of the comparison's shared-prefix stage."""

import json
import os

import pytest

from mixserve.cluster.bench_compare import CompareSizes, prefix_kv_bytes
from mixserve.cluster.bench_report import render_report
from mixserve.cluster.bench_workloads import build_workload
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
    assert (tmp_path / "compare.md").read_text().startswith("| configuration")


def test_report_checks_offline_against_each_peers_offline_run():
    def offline(stage, label, tok_s):
        return {"stage": stage, "label": label, "result": {"output_tokens_per_s": tok_s, "load_avg_before": [1.0],
                                                          "load_avg_after": [1.1]}}

    stages = [offline("offline", "mixserve offline", 150.0), offline("transformers", "transformers generate", 100.0),
              offline("vllm", "vLLM CPU build offline (LLM.generate)", 200.0),
              {"stage": "vllm", "label": "vLLM CPU build served", "failed": "RuntimeError: boom"}]
    report = render_report(stages, CompareSizes(), 1 << 20, 8 << 10, 0.8)
    targets = report["targets"]
    assert targets["offline_over_transformers"]["value"] == pytest.approx(1.5)
    assert targets["offline_over_transformers"]["met"]
    assert targets["offline_over_vllm_offline"]["value"] == pytest.approx(0.75)
    assert not targets["offline_over_vllm_offline"]["met"]
    assert "offline_over_vllm_offline: 0.75 (target >= 1.0) - NOT met" in report["markdown"]
    assert "| vLLM CPU build offline (LLM.generate) | random | 200.0 | 1.33x offline |" in report["markdown"]
    assert "RuntimeError: boom" in report["markdown"]
