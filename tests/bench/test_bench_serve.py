"""`mixserve bench serve` against a real tiny server: every workload, open and closed loop; the
workload generators; `mixserve bench offline`'s repeated batch; and what `mixserve bench` is (offline
and serve: the benchmark lab is tools/benchmarks/, not the package)."""

import json

import pytest

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


def test_offline_bench_repeats_the_batch_on_one_engine_and_reports_the_median_run(tiny_checkpoint):
    from mixserve.bench.offline import OfflineWorkload, bench_mixserve, median_run

    assert median_run([{"x": 3}, {"x": 1}, {"x": 2}], "x") == {"x": 2, "runs": [3, 1, 2]}
    assert median_run([{"x": 3, "y": 0}, {"x": 1, "y": 1}], "x") == {"x": 2, "y": 1, "runs": [3, 1]}  # even count
    result = bench_mixserve(str(tiny_checkpoint), OfflineWorkload(num_prompts=3, input_len=16, output_len=4),
                            "float32", repeats=3)
    assert len(result["runs"]) == 3 and all(r > 0 for r in result["runs"])
    assert result["output_tokens_per_s"] == sorted(result["runs"])[1]
    assert result["output_tokens"] == 12 and result["steps"] == 4  # one run's steps: 1 prefill + 3 decodes


def test_bench_has_offline_and_serve_only_and_the_package_holds_no_benchmark_lab():
    import importlib.util

    from mixserve.cluster.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    modes = next(a for a in commands["bench"]._actions if a.dest == "bench_mode").choices
    assert set(modes) == {"offline", "serve"}
    lab = ("compare", "soak", "soak_outcomes", "report", "plots", "local_server", "vllm_client", "vllm_offline")
    assert [m for m in lab if importlib.util.find_spec(f"mixserve.bench.{m}")] == []
