"""vLLM's offline throughput on given prompts; run by the comparison (peers.py) with the python of
the vLLM venv (it imports vLLM, never mixserve).

Usage: python vllm_offline.py MODEL PROMPTS_JSON MAX_MODEL_LEN DTYPE [ONE_AT_A_TIME [REPEATS]]
PROMPTS_JSON: {"prompts": [[token ids], ...], "output_len": N}. Greedy, EOS ignored; after a
2-prompt warm-up, all prompts in one `LLM.generate` call (REPEATS > 1: that many calls, prefix
caching off so no call reuses another's prompts; the median call is the figure, as in
`mixserve.bench.offline.bench_mixserve`), then (ONE_AT_A_TIME > 0) the first
ONE_AT_A_TIME prompts with one `LLM.generate` call each, one after another. Prints one JSON line
with output tokens/s (whole call, prefill included), the figures `mixserve.bench.offline.bench_mixserve`
reports, the second under "one_at_a_time".
"""

import json
import statistics
import sys
import time


def main() -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, prompts_json, max_model_len, dtype = sys.argv[1:5]
    one_at_a_time = int(sys.argv[5]) if len(sys.argv) > 5 else 0
    repeats = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    spec = json.loads(open(prompts_json).read())
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    caching = {"enable_prefix_caching": False} if repeats > 1 else {}
    llm = LLM(model=model, max_model_len=int(max_model_len), dtype=dtype, max_num_seqs=max(len(prompts), 1),
              **caching)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=spec["output_len"], ignore_eos=True)

    def timed(batch: list) -> tuple[int, float]:
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - start

    batches = [timed(prompts) for _ in range(max(repeats, 1))]
    ordered = sorted(batches, key=lambda run: run[0] / run[1])
    tokens, total = ordered[(len(ordered) - 1) // 2]
    speed = statistics.median(t / s for t, s in ordered)  # an even count: the mean of the middle two
    result = {"engine": "vllm", "vllm_version": getattr(vllm, "__version__", "?"), "dtype": dtype,
              "total_s": round(total, 3), "output_tokens": tokens, "output_tokens_per_s": round(speed, 1)}
    if repeats > 1:
        result["runs"] = [round(t / s, 1) for t, s in batches]
    if one_at_a_time > 0:
        runs = [timed([p]) for p in prompts[:one_at_a_time]]
        tokens, total = sum(t for t, _ in runs), sum(s for _, s in runs)
        result["one_at_a_time"] = {"prompts": len(runs), "total_s": round(total, 3), "output_tokens": tokens,
                                   "output_tokens_per_s": round(tokens / total, 1)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing spawn
    main()
