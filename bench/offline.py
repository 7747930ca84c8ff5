"""`mixserve bench offline`: offline generation throughput, optionally against transformers.

Workload: `num_prompts` prompts of `input_len` random token ids (seeded), `output_len` new tokens
each, greedy, EOS ignored. Two figures, both output tokens / wall time (prefill included), after a
short warm-up, on one engine:
- batch: all prompts submitted at once; with `repeats` > 1 the batch is generated that many times on
  the same engine (prefix caching is off, so no run reuses another's prompts) and the median run is
  the figure, every run's tokens/s listed beside it (this machine's speed drifts by 10-15% from one
  minute to the next, so one run can land high or low);
- one at a time (`one_at_a_time` > 0): the first `one_at_a_time` prompts, each generated alone,
  one after another (a single user's speed).
With `--compare-transformers` the same prompts go through transformers' batched `generate` in the
same process, so the ratio is taken on one machine in one run (the machine is shared and noisy;
absolute numbers drift). Every summary carries the CPU (kernels/capability.py) and the engine's
kernel report (dtype and why, each linear shape's kernel), since the figures depend on both.
"""

import json
import os
import time
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class OfflineWorkload:
    num_prompts: int = 32
    input_len: int = 128
    output_len: int = 64
    seed: int = 0

    def prompts(self, vocab_size: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed)
        return [[1] + torch.randint(3, vocab_size, (self.input_len - 1,), generator=g).tolist()
                for _ in range(self.num_prompts)]


def _figure(tokens: int, total: float, **extra) -> dict:
    return {"total_s": round(total, 3), "output_tokens": tokens, "output_tokens_per_s": round(tokens / total, 1),
            **extra}


def median_run(runs: list[dict], key: str) -> dict:
    """The median run by `key`, with every run's `key` under "runs". Of an odd count, the middle run
    itself; of an even count, the lower middle run with `key` set to the mean of the two middle
    figures (the median proper)."""
    ordered = sorted(runs, key=lambda r: r[key])
    middle = (len(ordered) - 1) // 2
    figure = ordered[middle][key] if len(ordered) % 2 else (ordered[middle][key] + ordered[middle + 1][key]) / 2
    return {**ordered[middle], key: figure, "runs": [r[key] for r in runs]}


def bench_mixserve(model: str, workload: OfflineWorkload, dtype: str = "auto", weights=None,
                   one_at_a_time: int = 0, repeats: int = 1) -> dict:
    """The batch figure (the median of `repeats` runs), and under "one_at_a_time" the sequential
    one when asked for; "dtype" is the dtype the engine computes in (auto resolved), "kernels" its
    kernel report."""
    from mixserve.workers.engine import LLMEngine
    from mixserve.workers.engine_config import EngineConfig
    from mixserve.workers.loader import WeightFormat
    from mixserve.workers.sampling_params import SamplingParams

    weights = weights or WeightFormat()
    per_seq = workload.input_len + workload.output_len
    load_start = time.perf_counter()
    engine = LLMEngine(EngineConfig(
        model=model, dtype=dtype, linear_kernel=weights.linear_kernel, quantization=weights.quantization,
        quantization_group_size=weights.group_size, quantization_calibration=weights.calibration,
        max_num_seqs=max(workload.num_prompts, 1),
        kv_cache_bytes=max(64 << 20, 2 * per_seq * workload.num_prompts * 16 << 10),
        enable_prefix_caching=False,
    ))
    load_s = time.perf_counter() - load_start
    try:
        prompts = workload.prompts(engine.model_config.vocab_size)
        params = SamplingParams(temperature=0, max_tokens=workload.output_len, ignore_eos=True)
        engine.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))  # warm-up
        runs = []
        for _ in range(max(repeats, 1)):
            steps = engine.stats.steps
            start = time.perf_counter()
            results = engine.generate(prompts, params)
            total = time.perf_counter() - start
            runs.append({**_figure(sum(len(r.outputs[0].token_ids) for r in results), total),
                         "steps": engine.stats.steps - steps})
        figure = median_run(runs, "output_tokens_per_s") if repeats > 1 else runs[0]
        result = {"engine": "mixserve", "dtype": engine.dtype_choice.name, "linear_kernel": weights.linear_kernel,
                  "quantization": weights.quantization, "calibration": weights.calibration,
                  "weight_bytes": engine.weight_bytes(), "load_s": round(load_s, 2), **figure}
        if one_at_a_time > 0:
            alone = prompts[:one_at_a_time]
            start = time.perf_counter()
            tokens = sum(len(engine.generate([p], params)[0].outputs[0].token_ids) for p in alone)
            result["one_at_a_time"] = _figure(tokens, time.perf_counter() - start, prompts=len(alone))
        result["kernels"] = engine.kernel_report()
        return result
    finally:
        engine.shutdown()


def bench_transformers(model: str, workload: OfflineWorkload, dtype: str,
                       experts_implementation: str = "eager") -> dict:
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": getattr(torch, dtype)}
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    hf = AutoModelForCausalLM.from_pretrained(model, **kwargs).eval()
    prompts = torch.tensor(workload.prompts(hf.config.vocab_size))
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        hf.generate(prompts[:2], max_new_tokens=4, min_new_tokens=4, **gen)  # warm-up
        start = time.perf_counter()
        out = hf.generate(prompts, max_new_tokens=workload.output_len, min_new_tokens=workload.output_len, **gen)
        total = time.perf_counter() - start
    tokens = (out.shape[1] - prompts.shape[1]) * out.shape[0]
    return {"engine": f"transformers generate (experts {experts_implementation or 'default'})", "dtype": dtype,
            **_figure(int(tokens), total)}


def run_offline_bench(model: str, workload: OfflineWorkload, dtype: str = "auto", compare_transformers: bool = False,
                      weights=None, one_at_a_time: int = 0) -> dict:
    """Run the benchmark(s), print the CPU and a line per figure, and return the summary (printed
    last as JSON)."""
    from mixserve.kernels.capability import cpu_capability

    cpu = cpu_capability()
    print(f"cpu: {cpu.line()}", flush=True)
    load_before = os.getloadavg()[0]
    ours = bench_mixserve(model, workload, dtype, weights, one_at_a_time)
    calibrated = f" calibrated on {ours['calibration']}" if ours["calibration"] != "none" else ""
    print(f"mixserve ({ours['dtype']}, weights {ours['quantization']}{calibrated}, "
          f"{ours['weight_bytes'] / 2**30:.2f} GiB, loaded in {ours['load_s']} s): "
          f"{ours['output_tokens_per_s']} output tok/s ({ours['total_s']} s)", flush=True)
    if "one_at_a_time" in ours:
        alone = ours["one_at_a_time"]
        print(f"mixserve ({ours['dtype']}), {alone['prompts']} prompts one at a time: "
              f"{alone['output_tokens_per_s']} output tok/s ({alone['total_s']} s)", flush=True)
    summary = {**ours, "dtype_requested": dtype, "num_prompts": workload.num_prompts,
               "input_len": workload.input_len, "output_len": workload.output_len,
               "threads": torch.get_num_threads(), "cpu": cpu.summary(), "load_avg_1m_before": round(load_before, 2)}
    if compare_transformers:
        ref = bench_transformers(model, workload, ours["dtype"])
        print(f"{ref['engine']} ({ref['dtype']}): {ref['output_tokens_per_s']} output tok/s ({ref['total_s']} s)",
              flush=True)
        summary["transformers_output_tokens_per_s"] = ref["output_tokens_per_s"]
        summary["speedup_vs_transformers"] = round(ours["output_tokens_per_s"] / ref["output_tokens_per_s"], 2)
    summary["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(summary), flush=True)
    return summary
