"""The `mixserve bench` subcommand: its parser and the handlers of its modes (offline, serve).

`add_bench_parser(subparsers)` declares `bench` and its modes, each setting `handler=_run_bench_<mode>`;
it is registered as the entry point `bench` of the group `mixserve.commands` (pyproject.toml), which
cluster/cli.py adds to the `mixserve` command without importing this package; cluster/cli.py's `main`
calls the handler, whose return value is the exit code. The comparison and the soak are not modes
here: they are the repository's tools/benchmarks/ (compare.py, soak.py).
"""

import argparse
import sys
from pathlib import Path

from mixserve.kernels.quantize import INT4_GROUP_SIZES
from mixserve.random_models.presets import PRESETS
from mixserve.workers.engine_config import EngineConfig

from .offline import OfflineWorkload

_ENGINE = EngineConfig(model="")  # the engine's defaults, which the flags below reuse
_WORKLOAD = OfflineWorkload()  # the offline workload's sizes, likewise


def model_or_preset(model: Path | None, preset: str | None, cache_dir: Path | None) -> Path:
    """--model as given; otherwise the preset built once (seed 0) into the cache folder."""
    from mixserve.random_models.random_checkpoint import default_cache_dir, ensure_demo_checkpoint, write_random_checkpoint

    if model is not None:
        return model
    cache = cache_dir or default_cache_dir()
    if preset in (None, "tiny"):
        return ensure_demo_checkpoint(cache)
    target = cache / f"preset-{preset}-seed0"
    if not (target / "config.json").exists():
        print(f"building the {preset} preset into {target} (once)", flush=True)
        write_random_checkpoint(target, preset, 0)
    return target


def add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="benchmarks", description="Benchmarks that print numbers.")
    modes = p.add_subparsers(dest="bench_mode", required=True, metavar="MODE")
    off = modes.add_parser(
        "offline",
        help="offline generation throughput of one engine in this process",
        description="Generate for random-token prompts with EOS ignored; the last line printed is a JSON summary.",
    )
    off.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: --preset)")
    off.add_argument("--preset", choices=sorted(PRESETS), default="mini", help="built into the cache when no --model")
    off.add_argument("--cache-dir", type=Path, default=None)
    off.add_argument("--num-prompts", type=int, default=_WORKLOAD.num_prompts)
    off.add_argument("--input-len", type=int, default=_WORKLOAD.input_len)
    off.add_argument("--output-len", type=int, default=_WORKLOAD.output_len)
    off.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=_ENGINE.dtype,
                     help="auto: the checkpoint's dtype where the CPU has native bf16 math, else float32")
    off.add_argument("--linear-kernel", choices=["auto", "reference", "onednn"], default=_ENGINE.linear_kernel,
                     help="auto: each weight shape's fastest kernel, timed at load")
    off.add_argument("--quantization", choices=["none", "int8", "int4"], default=_ENGINE.quantization,
                     help="weight-only quantization of the attention and expert weights at load")
    off.add_argument("--quantization-group-size", type=int, default=_ENGINE.quantization_group_size,
                     choices=INT4_GROUP_SIZES)
    off.add_argument("--quantization-calibration", default=_ENGINE.quantization_calibration,
                     metavar="none|builtin|FILE",
                     help="activation-aware quantization calibrated on this text (workers/calibration.py)")
    off.add_argument("--one-at-a-time", type=int, default=0, metavar="N",
                     help="also generate the first N prompts one after another, each alone, and report that "
                          "output tok/s (a single user's speed)")
    off.add_argument("--seed", type=int, default=_WORKLOAD.seed)
    off.add_argument("--compare-transformers", action="store_true",
                     help="also run transformers' batched generate on the same prompts (in the engine's dtype) "
                          "and report the ratio")
    off.set_defaults(handler=_run_bench_offline)
    _add_bench_serve_parser(modes)


def _run_bench_offline(args: argparse.Namespace) -> int:
    from mixserve.workers.loader import WeightFormat

    from .offline import run_offline_bench

    model = model_or_preset(args.model, args.preset, args.cache_dir)
    workload = OfflineWorkload(args.num_prompts, args.input_len, args.output_len, args.seed)
    weights = WeightFormat(args.linear_kernel, args.quantization, args.quantization_group_size,
                           calibration=args.quantization_calibration)
    run_offline_bench(str(model), workload, args.dtype, args.compare_transformers, weights, args.one_at_a_time)
    return 0


def _add_workload_arguments(p) -> None:
    """Sizes of the bench workloads (bench/workloads.py); unset = the generator's default."""
    g = p.add_argument_group("workload sizes (unset = the workload's default)")
    g.add_argument("--input-len", type=int, default=None, help="random: prompt tokens (default 128)")
    g.add_argument("--output-len", type=int, default=None, help="new tokens per request (EOS ignored)")
    g.add_argument("--range-ratio", type=float, default=None, help="random: lengths vary by +-this fraction")
    g.add_argument("--groups", type=int, default=None, help="shared-prefix: groups (system prompts; default 8)")
    g.add_argument("--prefix-len", type=int, default=None, help="shared-prefix: shared tokens (default 1024)")
    g.add_argument("--suffix-len", type=int, default=None, help="shared-prefix: per-user tokens (default 32)")
    g.add_argument("--turns", type=int, default=None, help="multi-turn: turns per conversation (default 4)")
    g.add_argument("--user-len", type=int, default=None, help="multi-turn: tokens per user message (default 64)")


def _workload_sizes(args: argparse.Namespace) -> dict:
    names = ("input_len", "output_len", "range_ratio", "groups", "prefix_len", "suffix_len", "turns", "user_len")
    return {k: getattr(args, k) for k in names}


def _add_bench_serve_parser(modes) -> None:
    from .workloads import WORKLOADS

    p = modes.add_parser(
        "serve",
        help="load a running OpenAI-compatible server and measure TTFT, ITL, latency and throughput",
        description="Open-loop (Poisson --rate) or closed-loop (--concurrency) load over the streaming API. "
                    "A comma list (--rate 1,2,4) is a sweep. Writes OUT/NAME.json and PNG plots.",
    )
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", default=None, help="bearer token (default: $MIXSERVE_API_KEY)")
    p.add_argument("--model", default=None, help="served model name (default: the first of /v1/models)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="checkpoint folder whose tokenizer builds the prompts (default: the demo model's)")
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    load = p.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", "--rates", dest="rate", default=None,
                      help="requests/s with Poisson arrivals ('inf' = all at once); a comma list sweeps")
    load.add_argument("--concurrency", default=None, help="requests in flight; a comma list sweeps")
    p.add_argument("--num-prompts", type=int, required=True, help="requests per load point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="short unrelated requests before each load point")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON and PNG results")
    p.add_argument("--name", default=None, help="file name stem (default: serve-WORKLOAD)")
    p.add_argument("--no-progress", action="store_true")
    _add_workload_arguments(p)
    p.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from mixserve.cluster.settings import api_key_from_environment
    from mixserve.workers.tokenizer import Tokenizer

    from .serve import parse_loads, run_bench_serve
    from .workloads import build_workload, default_tokenizer_dir

    try:
        loads = parse_loads(args.rate, args.concurrency)
    except ValueError as exc:
        print(f"mixserve bench serve: {exc}", file=sys.stderr)
        return 2
    tokenizer = Tokenizer.from_dir(args.tokenizer or default_tokenizer_dir())
    sizes = _workload_sizes(args)
    summaries = run_bench_serve(
        args.url, lambda i: build_workload(args.workload, tokenizer, args.num_prompts, args.seed + i, **sizes),
        loads, args.out, args.name or f"serve-{args.workload}", model=args.model,
        api_key=args.api_key or api_key_from_environment(), seed=args.seed, warmup=args.warmup,
        timeout_s=args.timeout, progress=not args.no_progress,
    )
    return 0 if all(s["completed"] for s in summaries) else 1

