"""The `drlora` command line. Thin: every command is a call into the library."""

from __future__ import annotations

import argparse
import sys


def _build_model(args) -> int:
    from .builtin import smollm2_moe

    if args.name != smollm2_moe.NAME:
        raise ValueError(f"unknown builtin model {args.name!r}; the builtin model is {smollm2_moe.NAME!r}.")
    smollm2_moe.build(args.out, seed=args.seed)
    return 0


def _prepare_tasks(args) -> int:
    from .builtin.tasks import prepare_all

    for name, folder in prepare_all().items():
        print(f"{name}: {folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="drlora", description="DR-LoRA for Mixture-of-Experts language models.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build-model", help="build a builtin model into the cache (offline after the "
                                                    "registry downloads)")
    build.add_argument("name", help="builtin model name: smollm2-moe")
    build.add_argument("--out", default=None, help="folder to write (default: $DRLORA_HOME/models/NAME)")
    build.add_argument("--seed", type=int, default=0, help="seed of the router fitting")
    build.set_defaults(run=_build_model)
    tasks = commands.add_parser("prepare-tasks", help="fetch and convert the builtin BIG-bench tasks")
    tasks.set_defaults(run=_prepare_tasks)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as err:
        print(f"drlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
