"""lm-evaluation-harness as a second scorer for drlora's rows (optional: ``pip install 'drlora[eval]'``).

The rows are written as a local lm-eval task (a JSONL file read by the `json` dataset builder, and a task YAML)
configured to the definitions of `drlora.evaluate`: multiple choice scored by acc / acc_norm with the choices'
own leading spaces, generation by greedy decoding up to the first newline and exact match after stripping both
sides. Running a model through both backends is a check of each against the other; the result has the same keys
as `drlora.evaluate.evaluate_rows`.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml

from .evaluate import eos_token_ids, eval_mode, rows_kind

INSTALL_HINT = "the lm-eval backend needs lm-evaluation-harness; install it with pip install 'drlora[eval]'."

# Both sides of exact_match lose leading and trailing whitespace (re's \s is str.isspace, as str.strip uses).
STRIP_REGEXES = [r"^\s+", r"\s+$"]


def _lm_eval():
    """Import lm-eval only when this backend is used: it is an optional extra with a heavy import."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return lm_eval, HFLM, TaskManager


def task_config(kind: str, name: str, data_file: Path, max_new_tokens: int = 32,
                eos_ids: list[int] | None = None) -> dict:
    """The lm-eval task for rows of `kind` in `data_file`.

    The doc_to_* fields name dataset columns instead of Jinja templates ("{{prompt}}"): lm-eval passes a rendered
    template through ast.literal_eval when it looks like a number or a list, which would turn a prompt "42" or a
    completion "[1, 2]" into something else, while a column name hands over the row's value unchanged."""
    config = {
        "task": name,
        "dataset_path": "json",
        # the Arrow cache goes beside the rows (a temporary folder in a run), not into ~/.cache
        "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(data_file.parent / "cache")},
        "test_split": "test",
        "num_fewshot": 0,
        "doc_to_text": "prompt",
        "target_delimiter": "",  # our choices and completions carry their own leading space
        "metadata": {"version": 1.0},
    }
    if kind == "mc":
        config.update({
            "output_type": "multiple_choice",
            "doc_to_choice": "choices",
            "doc_to_target": "label",
            "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                            for m in ("acc", "acc_norm")],
        })
    else:
        generation_kwargs = {"until": ["\n"], "do_sample": False, "max_gen_toks": max_new_tokens}
        if eos_ids:
            generation_kwargs["eos_token_id"] = list(eos_ids)
        config.update({
            "output_type": "generate_until",
            "doc_to_target": "completion",
            "generation_kwargs": generation_kwargs,
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": False, "ignore_punctuation": False, "ignore_numbers": False,
                             "regexes_to_ignore": STRIP_REGEXES}],
        })
    return config


def write_task(rows: list[dict], folder, name: str, max_new_tokens: int = 32,
               eos_ids: list[int] | None = None) -> Path:
    """Write `rows` to folder/<name>.jsonl and an lm-eval task for them to folder/<name>.yaml; returns the YAML path.

    Only the fields the task reads are written, so extra fields of differing types cannot upset the `json` builder's
    schema inference. `eos_ids` (generation) become extra stop tokens of `model.generate`, as in our scorer."""
    kind = rows_kind(rows)
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise ValueError(f"task name {name!r} must use only letters, digits and underscores.")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    fields = ("prompt", "choices", "label") if kind == "mc" else ("prompt", "completion")
    data_file = folder / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps({k: row[k] for k in fields}, ensure_ascii=False) + "\n" for row in rows),
                         encoding="utf-8")
    task_file = folder / f"{name}.yaml"
    task_file.write_text(yaml.safe_dump(task_config(kind, name, data_file, max_new_tokens, eos_ids),
                                        sort_keys=False, allow_unicode=True), encoding="utf-8")
    return task_file


def _pretrained(model):
    """The transformers model HFLM can take: `model` itself, or the adapted model of a wrapper such as DRLoRAModel
    or PeftModel, `get_base_model()` (patched in place, so it already computes with the adapter)."""
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    if isinstance(base, PreTrainedModel):
        return base
    raise TypeError(f"the lm-eval backend needs a transformers PreTrainedModel (or a wrapper with one as "
                    f".get_base_model()); got {type(model).__name__}.")


@contextmanager
def _quiet_lm_eval():
    """lm-eval logs every task, request and warning at INFO, and `datasets` draws a bar for its one-file build; keep
    only their errors (lm-eval's own progress bars stay) for the duration, then the caller's settings again."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lm_eval", "datasets")]
    levels = [logger.level for logger in loggers]
    bars_were_disabled = datasets.are_progress_bars_disabled()
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if not bars_were_disabled:
            datasets.enable_progress_bars()


def run_lm_eval(model, tokenizer, rows: list[dict], batch_size: int = 8, max_new_tokens: int = 32,
                log_samples: bool = False) -> tuple[dict, list[dict]]:
    """lm-eval's metrics for `rows` (its results dict for the task) and, with `log_samples`, its per-row samples.

    HFLM gets add_bos_token=False and softmax_dtype=float32 because drlora's scorer encodes without special tokens
    and takes the log-softmax in float32; the global random seeds are left alone (decoding is greedy)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    pretrained, name = _pretrained(model), "drlora_rows"
    with tempfile.TemporaryDirectory(prefix="drlora-lm-eval-") as folder, _quiet_lm_eval(), eval_mode(pretrained):
        write_task(rows, folder, name, max_new_tokens=max_new_tokens, eos_ids=eos_token_ids(pretrained, tokenizer))
        # a copy: HFLM gives a tokenizer without one a pad token, and the caller's tokenizer should not change
        lm = HFLM(pretrained=pretrained, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size, add_bos_token=False,
                  softmax_dtype="float32")
        output = lm_eval.simple_evaluate(
            model=lm, tasks=[name], task_manager=TaskManager(include_path=folder, include_defaults=False),
            num_fewshot=0, bootstrap_iters=0, log_samples=log_samples, random_seed=None, numpy_random_seed=None,
            torch_random_seed=None, fewshot_random_seed=None)
    return output["results"][name], (output.get("samples") or {}).get(name, [])


def evaluate_with_lm_eval(model, tokenizer, rows: list[dict], batch_size: int = 8, max_new_tokens: int = 32) -> dict:
    """lm-evaluation-harness's scores for `rows`, with the keys of `drlora.evaluate.evaluate_rows`:
    {"acc", "acc_norm", "n"} for multiple choice, {"exact_match", "n"} for generation."""
    results, _ = run_lm_eval(model, tokenizer, rows, batch_size=batch_size, max_new_tokens=max_new_tokens)
    metrics = ("acc", "acc_norm") if rows_kind(rows) == "mc" else ("exact_match",)
    return {**{m: float(results[f"{m},none"]) for m in metrics}, "n": len(rows)}
