"""vLLM's offline throughput on given prompts; run by `mixserve bench compare` with the python of
the vLLM venv (it imports vLLM, never mixserve, so it is a plain script, not a mixserve module).

Usage: python bench_vllm_offline.py MODEL PROMPTS_JSON MAX_MODEL_LEN DTYPE
PROMPTS_JSON: {"prompts": [[token ids], ...], "output_len": N}. Greedy, EOS ignored, all prompts in
one `LLM.generate` call after a 2-prompt warm-up; prints one JSON line with output tokens/s (whole
call, prefill included), the same figure `bench_offline.bench_mixserve` reports.
"""

import json
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, prompts_json, max_model_len, dtype = sys.argv[1:5]
    spec = json.loads(open(prompts_json).read())
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in spec["prompts"]]
    llm = LLM(model=model, max_model_len=int(max_model_len), dtype=dtype, max_num_seqs=max(len(prompts), 1))
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=spec["output_len"], ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    total = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(json.dumps({"engine": "vllm", "total_s": round(total, 3), "output_tokens": tokens,
                      "output_tokens_per_s": round(tokens / total, 1)}), flush=True)


if __name__ == "__main__":  # vLLM starts its engine core with multiprocessing spawn
    main()
