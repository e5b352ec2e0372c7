"""The `drlora` command line. Thin: every command is a call into the library.

Only what a command needs is imported, and only once it needs it: torch, transformers and peft take seconds to
import, and a typo in a config key must be refused before that.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def _build_model(args) -> int:
    from .builtin import MODELS, smollm2_moe

    if args.name not in MODELS:
        raise ValueError(f"unknown builtin model {args.name!r}; builtin models are {', '.join(MODELS)}.")
    if args.name == smollm2_moe.DENSE_NAME:
        smollm2_moe.build_dense(args.out)
        return 0
    options = {k: v for k, v in (("seed", args.seed), ("num_experts", args.num_experts), ("top_k", args.top_k),
                                 ("num_moe_layers", args.num_moe_layers)) if v is not None}
    smollm2_moe.build(args.out, **options)
    return 0


def _prepare_tasks(args) -> int:
    from .builtin.tasks import prepare_all

    for name, folder in prepare_all().items():
        print(f"{name}: {folder}")
    return 0


def _eval(args) -> int:
    from .run_eval import evaluate_model, format_table

    report = evaluate_model(args.model, args.task, split=args.split, adapter=args.adapter, backend=args.backend,
                            limit=args.limit, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            dtype=args.dtype, device=args.device, output=args.output,
                            trust_remote_code=args.trust_remote_code)
    adapter = f" + adapter {args.adapter}" if args.adapter else ""
    print(f"{args.model}{adapter} — {args.backend} scorer")  # the table says which split (or file) each row scored
    print(format_table(report))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def _split_config_args(items: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG.yaml] [key=value ...]` -> (config path or None, overrides)."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _train(args) -> int:
    from .recipe.config import load_config

    path, overrides = _split_config_args(args.items)
    config = load_config(path, overrides)  # refuses a bad key or value before the seconds of importing torch

    from .recipe.run import train

    train(config)
    return 0


def _config(args) -> int:
    from .recipe.config import describe, load_config

    path, overrides = _split_config_args(args.items)
    print(describe(load_config(path, overrides)), end="")
    return 0


def _report(args) -> int:
    from .recipe.report import report

    print(report(args.run_dir))
    return 0


def _compare(args) -> int:
    from .recipe.compare import compare

    compare(args.spec, overwrite=args.overwrite, dry_run=args.dry_run, jobs=args.jobs)
    return 0


def _export(args) -> int:
    from .recipe.export import export_run

    out = export_run(args.run_dir, args.format, args.out, overwrite=args.overwrite)
    print(f"wrote {args.format} export of {args.run_dir} to {out}")
    return 0


def _train_help() -> str:
    from .recipe.config import RunConfig, describe

    return ("Every key, its default and what it does (YAML; override any with key=value, e.g. "
            "train.learning_rate=1e-4 drlora.r_target=16):\n\n" + describe(RunConfig()))


def _compare_help() -> str:
    from .recipe import compare

    return "The spec format and what compare writes:\n\n" + compare.__doc__.split("\n\n", 1)[1]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when the help is shown: the train and compare
    epilogs import their modules (compare's pulls in matplotlib), which no other invocation should pay for."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _parser() -> argparse.ArgumentParser:
    from .builtin.tasks import TASKS

    parser = _Parser(prog="drlora", description="DR-LoRA for Mixture-of-Experts language models.")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build-model", help="build a builtin model into the cache (offline after the "
                                                    "registry downloads)")
    build.add_argument("name", help="builtin model: smollm2-moe (the MoE) or smollm2 (the dense reference)")
    build.add_argument("--out", default=None, help="folder to write (default: $DRLORA_HOME/models/NAME)")
    build.add_argument("--seed", type=int, default=None, help="seed of the router fitting (default 0)")
    build.add_argument("--num-experts", type=int, default=None, help="routed experts per MoE layer (default 8)")
    build.add_argument("--top-k", type=int, default=None, help="experts per token (default 2)")
    build.add_argument("--num-moe-layers", type=int, default=None,
                       help="how many of the upper layers become MoE layers (default 10 of 30)")
    build.set_defaults(run=_build_model)

    tasks = commands.add_parser("prepare-tasks", help="fetch and convert the builtin BIG-bench tasks")
    tasks.set_defaults(run=_prepare_tasks)

    ev = commands.add_parser("eval", help="evaluate a model (optionally with a drlora adapter) on tasks",
                             description="Multiple-choice rows are scored by log-likelihood (acc, acc_norm as "
                                         "lm-evaluation-harness defines them), generation rows by exact match.")
    ev.add_argument("--model", default="builtin:smollm2-moe",
                    help="builtin:smollm2-moe (default), builtin:smollm2, or a local checkpoint folder (e.g. a "
                         "merged model)")
    ev.add_argument("--adapter", default=None, help="a drlora adapter folder or run folder to apply to --model")
    ev.add_argument("--task", nargs="+", required=True,
                    help=f"builtin task names ({', '.join(TASKS)}) and/or JSONL files")
    ev.add_argument("--split", default="test", choices=("train", "validation", "test"),
                    help="split of builtin tasks (default test; ignored for files)")
    ev.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows of each task")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass (default 16)")
    ev.add_argument("--max-new-tokens", type=int, default=32, help="generation rows: tokens to generate (default 32)")
    ev.add_argument("--backend", default="drlora", choices=("drlora", "lm-eval"),
                    help="drlora's scorer (default) or lm-evaluation-harness on the same rows "
                         "(pip install 'drlora[eval]')")
    ev.add_argument("--output", default=None, help="write the results as JSON to this file")
    ev.add_argument("--dtype", default="auto", help="auto (the checkpoint's), float32, bfloat16 or float16")
    ev.add_argument("--device", default=None, help="e.g. cuda or cpu (default: where the model loads)")
    ev.add_argument("--trust-remote-code", action="store_true", help="allow a checkpoint's own Python code")
    ev.set_defaults(run=_eval)

    tr = commands.add_parser("train", help="fine-tune an MoE with DR-LoRA: drlora train [CONFIG.yaml] [key=value ...]",
                             description="Fine-tune a Mixture-of-Experts model with DR-LoRA on transformers' Trainer "
                                         "and write a run folder (config, adapter, metrics, rank map, checkpoints).",
                             epilog=_train_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                    help="a YAML config file and/or dotted overrides such as train.max_steps=100")
    tr.set_defaults(run=_train)

    cf = commands.add_parser("config", help="print the resolved training configuration with every key's help")
    cf.add_argument("--show", action="store_true", help="print the resolved configuration (the default action)")
    cf.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]")
    cf.set_defaults(run=_config)

    rp = commands.add_parser("report", help="re-draw a run's rank heatmap and print its summary")
    rp.add_argument("run_dir", help="the output_dir of a drlora train run")
    rp.set_defaults(run=_report)

    cm = commands.add_parser("compare", help="train methods × tasks × seeds with drlora train and tabulate them",
                             description="Run every (method, task, seed) of a spec through drlora train (resumably: "
                                         "finished runs are skipped) and write results.csv, results.md, results.png "
                                         "and rank_heatmaps.png into its output_dir.",
                             epilog=_compare_help, formatter_class=argparse.RawDescriptionHelpFormatter)
    cm.add_argument("spec", help="the compare spec (YAML), e.g. configs/compare/builtin.yaml")
    cm.add_argument("--overwrite", action="store_true",
                    help="redo the runs whose folder holds another configuration (the spec changed)")
    cm.add_argument("--dry-run", action="store_true", help="print the plan (every run and its state) and exit")
    cm.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="train N runs at once, each in its own process on 1/N of the cores, its output in "
                         "OUTPUT_DIR/logs/ (on a CPU, two one-thread runs finish sooner than two two-thread runs "
                         "in turn; the same training, float rounding aside)")
    cm.set_defaults(run=_compare)

    ex = commands.add_parser("export", help="export a run as a PEFT adapter or a merged checkpoint")
    ex.add_argument("run_dir", help="the output_dir of a drlora train run")
    ex.add_argument("--format", required=True, choices=("peft", "merged"),
                    help="peft: a vanilla PEFT adapter (PeftModel.from_pretrained); merged: a standalone checkpoint")
    ex.add_argument("--out", required=True, help="folder to write")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.set_defaults(run=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # PEFT (0.21) asks transformers 5.x for a property it deprecated; nothing a drlora user can or should change
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, ImportError, OSError) as err:
        print(f"drlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("drlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
