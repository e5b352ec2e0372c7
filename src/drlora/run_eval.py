"""`drlora eval` as a function: a model (builtin, checkpoint or merged model, optionally with an adapter) on builtin
tasks or JSONL files, scored by drlora's own scorer or by lm-evaluation-harness on the same rows."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .builtin import load_rows
from .builtin.tasks import TASKS
from .fileio import write_json

BACKENDS = ("drlora", "lm-eval")


def evaluate_model(model: str, tasks, split: str = "test", adapter=None, backend: str = "drlora",
                   limit: int | None = None, batch_size: int = 16, max_new_tokens: int = 32, dtype="auto",
                   device=None, output=None, progress: bool = True, trust_remote_code: bool = False) -> dict:
    """Evaluate `model` on each of `tasks` (builtin task names or JSONL files); returns (and optionally writes to
    `output` as JSON) {"results": {task: {"acc", "acc_norm", "n"} or {"exact_match", "n"}}, ...}.

    `limit` keeps the first N rows of each split (splits are already shuffled with a fixed seed)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of rows, got {limit}.")
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise ValueError(f"no task given; name a builtin task ({', '.join(TASKS)}) or a JSONL file.")
    rows_by_task = {task: load_rows(task, split)[:limit] for task in tasks}  # fail on bad input before loading

    from .loading import adapter_folder, load_model  # torch and transformers: seconds, so after the checks above

    if adapter is not None:
        adapter = adapter_folder(adapter)
    loaded, tokenizer = load_model(model, adapter=adapter, dtype=dtype, device=device,
                                   trust_remote_code=trust_remote_code)
    report = {"model": str(model), "adapter": None if adapter is None else str(adapter), "split": split,
              "backend": backend, "limit": limit, "drlora_version": __version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "results": {}}
    for task, rows in rows_by_task.items():
        started = time.time()
        if backend == "drlora":
            from .evaluate import evaluate_rows

            scores = evaluate_rows(loaded, tokenizer, rows, batch_size=batch_size, progress=progress,
                                   max_new_tokens=max_new_tokens)
        else:
            from .lm_eval_backend import evaluate_with_lm_eval

            scores = evaluate_with_lm_eval(loaded, tokenizer, rows, batch_size=batch_size,
                                           max_new_tokens=max_new_tokens)
        report["results"][task] = {**scores, "seconds": round(time.time() - started, 1)}
    if output is not None:
        write_json(output, report)
    return report


def format_table(report: dict) -> str:
    """A small text table of a report's results. Its data column says which split of a builtin task was scored, or
    'file' for a JSONL file: files have no splits, `split` does not apply to them."""
    metrics = [m for m in ("acc", "acc_norm", "exact_match") if any(m in r for r in report["results"].values())]
    lines = [f"{'task':<14}{'data':<12}" + "".join(f"{m:>12}" for m in metrics) + f"{'n':>7}"]
    for task, result in report["results"].items():
        data = f"{report['split']} split" if task in TASKS else "file"
        cells = "".join(f"{result[m]:>12.4f}" if m in result else f"{'-':>12}" for m in metrics)
        lines.append(f"{Path(task).name if '/' in task else task:<14}{data:<12}{cells}{result['n']:>7}")
    return "\n".join(lines)
