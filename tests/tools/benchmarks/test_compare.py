"""The comparison (tools/benchmarks/compare.py) on the tiny model: its stages run, the plan
(plan.yaml) gives the rows and settings each stage had, a row's stage and the stages it needs decide
whether it runs, and the shared-prefix stage's KV cache holds half the prefixes."""

import json
import os
from pathlib import Path

import pytest

import stages
from compare import main
from runner import Comparison, Row, build_steps, load_plan, run_plan
from sizes import CompareSizes, prefix_kv_bytes, random_kv_bytes
from tests.helpers import REPOSITORY


def test_prefix_stage_cache_holds_half_the_prefixes_but_not_all():
    sizes, per_token = CompareSizes(), 8 << 10  # mini in bfloat16: 8 layers * 2 * 4 kv heads * 64 * 2 bytes
    kv = prefix_kv_bytes(sizes, per_token)
    prefix = sizes.prefix_len * per_token
    assert sizes.groups // 2 * prefix <= kv < sizes.groups * prefix


@pytest.mark.skipif(not os.environ.get("MIXSERVE_BENCH_COMPARE"), reason="~2 min: set MIXSERVE_BENCH_COMPARE=1")
def test_compare_quick_runs_every_mixserve_stage(tmp_path):
    assert main(["--quick", "--out", str(tmp_path)]) == 0
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
    assert main(["--quick", "--model", str(tiny_checkpoint), "--offline-dtypes", "float32",
                 "--skip", "served,tp2,prefix", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["served_dtype"] == "float32" and result["sizes"]["quantizations"] == ["int8", "int4"]
    _check_quantized_rows(result, (tmp_path / "compare.md").read_text())
    assert "| weights GiB |" in (tmp_path / "compare.md").read_text()


def test_a_row_is_skipped_when_a_stage_it_needs_is_skipped_and_fails_alone():
    def two(wanted):
        return [{"output_tokens_per_s": 1.0}, RuntimeError("client broke") if wanted[1] else None]

    def broken(wanted):
        raise ValueError("no server")

    plan = [([Row("served", "ours"), Row("vllm-client", "theirs", ("served",))], two),
            ([Row("vllm", "peer"), Row("vllm-client", "peer, theirs", ("vllm",))], broken)]
    entries = run_plan(plan, skip={"vllm"})
    assert [sorted(k for k in ("result", "failed", "skipped") if k in e) for e in entries] == [
        ["result"], ["failed"], ["skipped"], ["skipped"]]
    assert entries[1]["failed"] == "RuntimeError: client broke"
    entries = run_plan(plan, skip={"served"})
    assert [e["failed"] for e in entries[2:]] == ["ValueError: no server"] * 2 and "skipped" in entries[1]



def _committed(name):
    return json.loads((REPOSITORY / "benchmarks" / f"{name}.json").read_text())


def test_the_plan_gives_the_rows_and_server_settings_of_the_committed_full_comparison(monkeypatch):
    """plan.yaml read by the runner, at the sizes of the committed full run (compare-full-12, made
    when the plan was code): the same rows in the same order with the same tags, and each served row
    the same server settings, workload and concurrency."""
    saved = _committed("compare-full-12")
    sizes, per_token = CompareSizes.from_json(saved["sizes"]), saved["kv_bytes_per_token"]
    comparison = Comparison(model=saved["model"], sizes=sizes, out=Path("unused"), served_dtype=saved["served_dtype"],
                            prompts=None, workloads={w: w for w in ("random", "shared-prefix", "multi-turn")},
                            kv_cache={"random": random_kv_bytes(sizes, per_token), "prefix": saved["kv_prefix_bytes"]},
                            all_prefixes_bytes=sizes.groups * sizes.prefix_len * per_token, client="vLLM's client",
                            vllm_venv=Path("unused"))
    steps = build_steps(load_plan(), comparison)
    entries = [{k: v for k, v in e.items() if k not in ("result", "failed", "skipped", "wall_s")}
               for e in saved["stages"]]
    assert [{"stage": r.stage, "label": r.label, **r.tags} for rows, _ in steps for r in rows] == entries

    calls = {}

    def served(model, settings, workload, concurrency, kernels, client=None, repeats=1, *more):
        calls[len(calls)] = {"settings": settings, "workload": workload, "concurrency": concurrency}
        return [{}] + ([{}] if client else [])

    monkeypatch.setattr(stages, "served", served)
    monkeypatch.setattr(stages, "prefix_served", lambda *args: served(*args[:5]))
    monkeypatch.setattr(stages, "bracketed_served", lambda *args: (served(*args[:6], args[7]), {}))
    for rows, run in steps:
        if rows[0].tags["engine"] == "mixserve" and rows[0].tags["mode"] == "served":
            calls.clear()
            run([True] * len(rows))
            result = next(e["result"] for e in saved["stages"] if e["label"] == rows[0].label)
            assert calls[0]["settings"] == {k: v for k, v in result["settings"].items() if k != "model"}, rows[0].label
            assert calls[0]["workload"] == result["config"]["workload"], rows[0].label
            assert calls[0]["concurrency"] == result["config"]["concurrency"], rows[0].label


def test_the_peer_stages_are_refused_up_front_when_the_peers_venv_is_missing(tmp_path, capsys):
    assert main(["--vllm-venv", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "make peers-venv" in capsys.readouterr().err
    assert not (tmp_path / "compare.json").exists()
