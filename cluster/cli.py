"""The `mixserve` command.

Each subcommand is a pair: `_add_<name>_parser(subparsers)` declares its arguments and sets
`handler=_run_<name>`; `main` parses and calls the handler, whose return value is the exit code.
To add a subcommand (`serve`, `bench`), write such a pair and list the adder in `_SUBCOMMANDS`.
"""

import argparse
import sys
import tempfile
from pathlib import Path

from mixserve.workers.presets import PRESETS


def _add_checkpoint_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "checkpoint",
        help="write a random-weight Mixtral/Mistral checkpoint with the real Mistral tokenizer",
        description="Write a random-weight Mixtral (or, with --dense, Mistral) checkpoint of a preset shape.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense", action="store_true", help="dense MLP (Mistral) instead of experts (Mixtral)")
    p.add_argument("--layout", choices=["hf", "mistral"], default="hf", help="Hugging Face or Mistral's own layout")
    p.add_argument("--max-shard-bytes", type=int, default=None, help="split the safetensors into shards (hf layout)")
    p.set_defaults(handler=_run_checkpoint)


def _run_checkpoint(args: argparse.Namespace) -> int:
    from mixserve.workers.random_checkpoint import write_mistral_layout, write_random_checkpoint

    if args.layout == "hf":
        out = write_random_checkpoint(
            args.out, args.preset, args.seed, dense=args.dense, max_shard_bytes=args.max_shard_bytes
        )
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.out, prefix=".hf-") as hf_dir:
            write_random_checkpoint(hf_dir, args.preset, args.seed, dense=args.dense)
            out = write_mistral_layout(hf_dir, args.out)
    print(f"wrote {args.preset} ({'dense' if args.dense else 'moe'}, {args.layout} layout, seed {args.seed}) to {out}")
    return 0


_SUBCOMMANDS = [_add_checkpoint_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixserve", description="Serve Mixtral / Mistral on a Ray cluster.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
