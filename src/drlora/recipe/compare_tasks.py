"""The tasks of a `drlora compare` spec: builtin task names, or a user's data as {name, train, eval} JSONL files.

A score is only worth reading on rows the model did not train on, so a file task names its held-out eval file, and
a task that would evaluate on training rows is refused before anything runs: a bare JSONL path (it would be both),
train and eval the same file, or eval rows copied verbatim from the train file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..builtin.tasks import TASKS
from ..data import DataError, read_jsonl
from .config import ConfigError, _did_you_mean

FILE_TASK_KEYS = ("name", "train", "eval")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the spec: a builtin task (train split for training, data.eval_split for scoring) or a pair of
    JSONL files."""
    label: str  # names the task's folder and table column
    train: str  # data.train of its runs
    eval: str  # data.eval of its runs, and so the key of metrics.json's eval_before / eval_after
    builtin: bool



def _example(path: str) -> str:
    """The mapping form for a bare file, as a refusal shows it."""
    stem = Path(path).stem
    return f"{{name: {stem}, train: {path}, eval: {Path(path).with_name(stem + '_test.jsonl')}}}"


def parse_task(entry) -> Task:
    """A spec task checked (not yet its files' contents): a builtin name, or a {name, train, eval} file task."""
    if isinstance(entry, str) and entry in TASKS:
        return Task(entry, entry, entry, builtin=True)
    if isinstance(entry, str) and entry and (Path(entry).suffix in (".jsonl", ".json") or "/" in entry
                                             or Path(entry).expanduser().exists()):
        raise ConfigError(f"task {entry!r} is a bare file, so compare would train and evaluate on the same rows; name "
                          f"a held-out eval file instead, e.g. {_example(entry)}.")
    if isinstance(entry, str):
        raise ConfigError(f"task {entry!r} is not a builtin task{_did_you_mean(entry, TASKS)}; builtin tasks are "
                          f"{', '.join(TASKS)}, and a JSONL task is a mapping {{name, train, eval}}.")
    if not isinstance(entry, dict):
        raise ConfigError(f"task {entry!r} must be a builtin task name or a mapping {{name, train, eval}} of JSONL "
                          "files.")
    for key in entry:
        if key not in FILE_TASK_KEYS:
            raise ConfigError(f"task {entry!r} has the unknown key {key!r}{_did_you_mean(str(key), FILE_TASK_KEYS)}; "
                              f"a file task has {', '.join(FILE_TASK_KEYS)} (name optional).")
    for key in ("train", "eval"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise ConfigError(f"task {entry!r} needs a {key} file (a JSONL path); a file task has train and eval, "
                              "e.g. {name: mytask, train: my_train.jsonl, eval: my_test.jsonl}.")
    label = entry.get("name", Path(entry["train"]).stem)
    if not isinstance(label, str) or not label.strip() or label.startswith(".") or set("/\\") & set(label) \
            or label == "average":
        raise ConfigError(f"task name {label!r} must be a non-empty name without slashes, other than 'average' (it "
                          "names a folder and a table column).")
    return Task(label, entry["train"], entry["eval"], builtin=False)


def refuse_leak(task: Task) -> None:
    """A file task whose eval rows are training rows: the same file, or rows copied verbatim (as parsed JSON) from the
    train file into the eval file. Both files are read once, whole, with the checks training and evaluation apply."""
    paths = {key: Path(getattr(task, key)).expanduser() for key in ("train", "eval")}
    for key, path in paths.items():
        if not path.is_file():
            raise ConfigError(f"task {task.label!r}: its {key} file {path} does not exist" + (
                f" (builtin tasks are listed by name alone, e.g. tasks: [{getattr(task, key)}])"
                if getattr(task, key) in TASKS else "") + ".")
    if paths["train"].resolve() == paths["eval"].resolve():
        raise ConfigError(f"task {task.label!r} trains and evaluates on the same file {paths['train']}; name a "
                          "held-out eval file.")
    try:
        train = read_jsonl(paths["train"], kinds=("mc", "generation", "chat"))
        held_out = read_jsonl(paths["eval"], kinds=("mc", "generation"))
    except DataError as err:
        raise ConfigError(f"task {task.label!r}: {err}") from None
    seen = {json.dumps(row, sort_keys=True) for row in train}
    if overlap := sum(json.dumps(row, sort_keys=True) in seen for row in held_out):
        raise ConfigError(f"task {task.label!r}: {overlap} of the {len(held_out)} eval rows in {paths['eval']} are "
                          f"also training rows in {paths['train']}; remove them from one file so the scores measure "
                          "held-out rows.")
