"""Builtin tasks from BIG-bench, converted to drlora's JSONL format with fixed train / validation / test splits.

Each task is a multiple-choice BIG-bench task (`{"input", "target_scores"}` items). We fetch only its task.json
from the `bigbench` sdist, turn items into `{"prompt", "choices", "label"}` rows with one prompt template
("Question: …\\nAnswer:" and choices preceded by a space, as lm-evaluation-harness does), deduplicate, shuffle with
a fixed seed and cut test, validation and train. The converted files are cached; a conversion is deterministic.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..data import read_jsonl, write_jsonl
from .assets import cache_dir, extract_from_sdist

BIGBENCH_VERSION = "1.0.0"
SPLIT_SEED = 1234
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    bigbench_path: str  # folder under bigbench/benchmark_tasks holding task.json
    skill: str
    test_size: int
    validation_size: int
    question_prefix: str = "Question: "
    answer_prefix: str = "\nAnswer:"


TASKS = {t.name: t for t in (
    BuiltinTask("siqa", "social_iqa", "social commonsense (3-way)", 500, 200),
    BuiltinTask("strategyqa", "strategyqa", "multi-hop yes/no reasoning", 500, 200),
    BuiltinTask("sports", "sports_understanding", "world knowledge: is a sports statement plausible?", 300, 100,
                question_prefix="Is the following sentence plausible? ", answer_prefix="\nAnswer:"),
    BuiltinTask("emqa", "elementary_math_qa/question_only", "math word problems (5-way)", 500, 200),
    BuiltinTask("sentiment", "multiemo/all_sentence_en", "sentiment of a review sentence (4-way)", 500, 200,
                question_prefix="Is the sentiment of this opinion positive, negative, neutral or ambivalent?\n"
                                "Opinion: ", answer_prefix="\nSentiment:"),
    BuiltinTask("multiplication", "arithmetic/2_digit_multiplication", "2-digit multiplication (7-way)", 300, 100),
    BuiltinTask("subtraction", "arithmetic/2_digit_subtraction", "2-digit subtraction (7-way)", 300, 100),
    BuiltinTask("wikihow", "goal_step_wikihow/step_inference", "which step serves a wikiHow goal (4-way)", 500, 200),
)}


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def _unknown(name: str) -> ValueError:
    import difflib

    close = difflib.get_close_matches(name, TASKS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown builtin task {name!r}{hint}; builtin tasks are {', '.join(TASKS)}.")


def convert(task: BuiltinTask, task_json: dict) -> list[dict]:
    """BIG-bench multiple-choice items -> drlora rows, in file order, without duplicates."""
    rows, seen = [], set()
    for item in task_json["examples"]:
        scores = item.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        best = max(scores.values())
        if list(scores.values()).count(best) != 1:
            continue  # ambiguous gold answer
        prompt = f"{task.question_prefix}{item['input'].strip()}{task.answer_prefix}"
        key = (prompt, tuple(choices))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"prompt": prompt, "choices": [f" {c.strip()}" for c in choices],
                     "label": choices.index(next(c for c in choices if scores[c] == best))})
    return rows


def split(task: BuiltinTask, rows: list[dict]) -> dict[str, list[dict]]:
    """Seeded shuffle, then test, validation and the rest as train (disjoint by construction)."""
    order = list(range(len(rows)))
    random.Random(f"{SPLIT_SEED}:{task.name}").shuffle(order)
    test = min(task.test_size, len(rows) // 3)
    validation = min(task.validation_size, len(rows) // 8)
    picked = {"test": order[:test], "validation": order[test:test + validation], "train": order[test + validation:]}
    return {name: [rows[i] for i in idx] for name, idx in picked.items()}


def task_dir(name: str) -> Path:
    return cache_dir() / "tasks" / name


def _is_prepared(name: str) -> bool:
    return all((task_dir(name) / f"{s}.jsonl").is_file() for s in SPLITS)


def prepare_task(name: str, task_json_path: Path | None = None) -> Path:
    """Convert (fetching BIG-bench on first use) and cache a builtin task; returns its folder of split files.

    A fetch streams the whole 358 MB archive anyway, so it keeps the files of every builtin task not yet cached."""
    if name not in TASKS:
        raise _unknown(name)
    task, folder = TASKS[name], task_dir(name)
    if _is_prepared(name):
        return folder
    if task_json_path is None:
        fetched = _fetch_bigbench([t for t in TASKS.values() if not _is_prepared(t.name)])
        for other, path in fetched.items():
            if other != name:
                prepare_task(other, path)
        task_json_path = fetched[name]
    rows = convert(task, json.loads(Path(task_json_path).read_text(encoding="utf-8")))
    for split_name, split_rows in split(task, rows).items():
        write_jsonl(folder / f"{split_name}.jsonl", split_rows)
    return folder


def _fetch_bigbench(tasks) -> dict[str, Path]:
    wanted = {f"bigbench/benchmark_tasks/{t.bigbench_path}/task.json": t.name for t in tasks}
    dest = cache_dir() / "bigbench"
    print(f"drlora: fetching BIG-bench task files ({', '.join(t.name for t in tasks)}) from the bigbench "
          f"{BIGBENCH_VERSION} sdist (streamed, ~358 MB; only task.json files are kept)", flush=True)
    written = extract_from_sdist("bigbench", BIGBENCH_VERSION,
                                 lambda name: name.split("/", 1)[-1] in wanted, dest)
    found = {wanted[str(p.relative_to(dest)).split("/", 1)[-1]]: p for p in written}
    missing = [t.name for t in tasks if t.name not in found]
    if missing:
        raise RuntimeError(f"the bigbench sdist has no task file for {missing}; this drlora release expects "
                           f"bigbench=={BIGBENCH_VERSION}.")
    return found


def prepare_all() -> dict[str, Path]:
    """Fetch BIG-bench once for every builtin task that is not cached yet."""
    todo = [t for t in TASKS.values() if not _is_prepared(t.name)]
    paths = _fetch_bigbench(todo) if todo else {}
    return {name: prepare_task(name, paths.get(name)) for name in TASKS}


def load_task(name: str, split_name: str) -> list[dict]:
    """Rows of a builtin task split ('train', 'validation' or 'test')."""
    if split_name not in SPLITS:
        raise ValueError(f"unknown split {split_name!r}; choose from {', '.join(SPLITS)}.")
    return read_jsonl(prepare_task(name) / f"{split_name}.jsonl", kinds=("mc",))
