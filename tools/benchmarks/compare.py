"""The whole comparison: every configuration of mixserve and its peers in turn on this machine, one
table with ratios. What runs is plan.yaml (runner.py runs it); the targets are targets.yaml.

    python -P tools/benchmarks/compare.py --preset mini --out bench-results     # = make bench-compare
    python -P tools/benchmarks/compare.py --quick --out /tmp/cq                  # tiny model, no peers: it all runs

The vLLM stages need its venv (`make peers-venv`; --vllm-venv); they are refused up front when it is
missing unless skipped. Results: OUT/compare.json, OUT/compare.md, OUT/*.png, peers' logs.
The machine is shared: every figure carries the load average, and ratios within one run are the
figures to trust. This VM's speed drifts by 10-15% from one minute to the next, so each throughput the
targets compare runs `--repeats` times and the median run is the figure, every run's listed under "runs".
"""

import argparse
import sys
from dataclasses import fields, replace
from pathlib import Path

if __name__ == "__main__":  # python -P keeps the repository root off sys.path; the lab's own folder goes on it
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from mixserve.bench.cli import model_or_preset  # noqa: E402
from mixserve.random_models.presets import PRESETS  # noqa: E402

from peers import DEFAULT_VENV, PeerMissing, vllm_python  # noqa: E402
from runner import PLAN_FILE, load_plan, run_compare  # noqa: E402
from sizes import CompareSizes  # noqa: E402

_SIZES = CompareSizes()  # the defaults the help texts name

PEER_STAGES = {"vllm", "vllm-client"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare.py",
        description="Run every configuration in turn on this machine (plan.yaml), print one markdown table with "
                    "ratios, and write OUT/compare.json, OUT/compare.md and PNG plots.",
    )
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: --preset)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="mini", help="built into the cache when no --model")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, few requests, no peers: checks that the whole comparison runs")
    p.add_argument("--num-prompts", type=int, default=None, help=f"random workload: prompts (default {_SIZES.num_prompts})")
    p.add_argument("--input-len", type=int, default=None, help=f"random workload: prompt tokens (default {_SIZES.input_len})")
    p.add_argument("--output-len", type=int, default=None, help=f"random workload: new tokens (default {_SIZES.output_len})")
    p.add_argument("--concurrency", type=int, default=None, help=f"random workload: requests in flight (default {_SIZES.concurrency})")
    p.add_argument("--groups", type=int, default=None, help=f"shared-prefix: groups (default {_SIZES.groups})")
    p.add_argument("--users-per-group", type=int, default=None, help=f"shared-prefix: users per group (default {_SIZES.users_per_group})")
    p.add_argument("--prefix-len", type=int, default=None, help=f"shared-prefix: shared tokens (default {_SIZES.prefix_len})")
    p.add_argument("--prefix-concurrency", type=int, default=None,
                   help=f"shared-prefix: requests in flight (default {_SIZES.prefix_concurrency})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=None,
                   help="served stages (both engines) and transformers (default auto: what mixserve picks here)")
    p.add_argument("--offline-dtypes", default=None,
                   help=f"comma list: dtypes of the offline runs of mixserve and vLLM (default {','.join(_SIZES.offline_dtypes)})")
    p.add_argument("--one-at-a-time", type=int, default=None, metavar="N",
                   help=f"offline runs also generate N prompts one at a time (default {_SIZES.one_at_a_time}; 0: not)")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="the throughput pairs the targets compare (offline batch of mixserve and vLLM; vLLM's client "
                        f"against each server) run N times, the median run reported (default {_SIZES.repeats}; "
                        f"--quick {CompareSizes.quick().repeats})")
    p.add_argument("--skip", default="", help="comma list of stages to leave out: offline, quantized, transformers, "
                                                "served, tp2, prefix, vllm, vllm-client (vLLM's `vllm bench serve` "
                                                "rows)")
    p.add_argument("--vllm-venv", type=Path, default=DEFAULT_VENV,
                   help="the venv of vLLM's CPU build (made by `make peers-venv`)")
    p.add_argument("--plan", type=Path, default=PLAN_FILE, help="the steps to run (default: plan.yaml beside this)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for JSON, markdown and PNG")
    p.add_argument("--seed", type=int, default=_SIZES.seed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(CompareSizes)
             if f.name != "offline_dtypes" and getattr(args, f.name, None) is not None}
    if args.offline_dtypes is not None:
        given["offline_dtypes"] = tuple(d for d in args.offline_dtypes.split(",") if d)
        if not set(given["offline_dtypes"]) <= {"float32", "bfloat16"}:
            print(f"compare.py: --offline-dtypes takes float32 and bfloat16, not {args.offline_dtypes}",
                  file=sys.stderr)
            return 2
    skip = {s for s in args.skip.split(",") if s} | ({"transformers", "vllm", "vllm-client"} if args.quick else set())
    steps = load_plan(args.plan)["steps"]
    planned = {s["stage"] for s in steps} | ({"vllm-client"} if any("vllm" in s.get("clients", ()) for s in steps)
                                              else set())
    if (planned & PEER_STAGES) - skip:
        try:
            vllm_python(args.vllm_venv)
        except PeerMissing as exc:
            print(f"compare.py: {exc}; or leave the peers out with --skip vllm,vllm-client", file=sys.stderr)
            return 2
    sizes = replace(CompareSizes.quick() if args.quick else CompareSizes(), **given)
    model = model_or_preset(args.model, "tiny" if args.quick else args.preset, args.cache_dir)
    return run_compare(model, sizes, args.out, skip, args.vllm_venv, args.plan)


if __name__ == "__main__":
    sys.exit(main())
