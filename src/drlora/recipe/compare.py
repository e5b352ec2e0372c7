"""`drlora compare SPEC.yaml`: methods × tasks × seeds, each run through the very `drlora train` pipeline.

A comparison is only fair when every method gets the same data, steps, evaluation and parameter accounting, so
compare trains nothing itself: it runs `train()` on one ordinary RunConfig per (method, task, seed) and tabulates the
run folders' metrics.json. The spec (YAML, or the same dict in Python):

    output_dir: runs/compare          # required; everything goes here (relative to the working directory)
    config:                           # RunConfig keys shared by every run, nested as in a `drlora train` YAML
      train: {max_steps: 40, batch_size: 16}
    tasks:                            # builtin task names, or your JSONL files as {name, train, eval}
      - sentiment
      - {name: mytask, train: data/my_train.jsonl, eval: data/my_test.jsonl}
    seeds: [0, 1, 2]
    methods:                          # row label -> RunConfig overrides of that method (may be {})
      dr-lora: {}
      gamma-0: {drlora: {gamma: 0}}

A builtin task trains on its train split and is scored on data.eval_split (test unless the config says otherwise);
a file task trains on its train file and is scored on its eval file. A task's label (the builtin name, or the file
task's name, by default its train file's stem) names its folder and table column. A score is only worth reading on
rows the model did not train on, so compare refuses a spec that would evaluate on training rows: a bare JSONL path
(it would be both), a file task whose train and eval are the same file or whose eval file repeats training rows
verbatim (both files are read once to check), and data.eval_split: train with a builtin task.

A run's config is config_from_mappings(config, methods[label], {data: {train: [TRAIN], eval: [EVAL]}, seed,
output_dir: OUTPUT_DIR/runs/LABEL/TASK/seedN}); those keys (and overwrite, resume) are compare's, so the spec may
not set them. Every config is resolved before anything runs, so a bad spec fails (one sentence, nothing written)
before hours of training. Runs go in-process in the order seed → task → method, so a stopped study holds complete
tables of its first seeds; `jobs` > 1 (`--jobs N`) trains N of them at a time, in that order, each in its own process
on its share of the cores (compare_jobs.py). A run whose folder holds its own config.yaml and a completed metrics.json is skipped;
with its own config.yaml but no finished metrics it continues (resume); a different config.yaml (the spec changed)
is refused unless overwrite, which redoes those runs. The tables are rewritten after every run (the figures, which
take seconds, when a seed's runs are done and at the end), so a killed compare still leaves a usable partial table:

    results.csv        one row per finished run (scores as the raw fractions metrics.json holds)
    results.md         from results.csv (and the runs' eval_items.jsonl): mean ± sample std over seeds per method and
                       task; parameters per method; the first method against each other, paired by task and seed,
                       and paired item by item with bootstrap intervals, pooled over tasks and seeds, and the
                       smallest difference the study can detect; every method's gain over the base model
                       (compare_paired.py)
    results.png        score per method and task, error bars = std over seeds, the base model's score dashed
    rank_heatmaps.png  final rank maps of the dr-lora runs (config method) of the first seed, one panel per task
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
from pathlib import Path

import yaml

from ..fileio import write_text
from .compare_figures import draw_rank_heatmaps, draw_results
from .compare_paired import paired_item_lines
from .compare_tasks import Task, parse_task, refuse_leak
from .config import ConfigError, RunConfig, _did_you_mean, config_from_mappings
from .run_dir import config_differences

SPEC_KEYS = ("output_dir", "config", "tasks", "seeds", "methods")
MANAGED = {"output_dir", "seed", "overwrite", "resume", "data.train", "data.eval"}  # set per run by compare
COLUMNS = ("method", "task", "seed", "config_method", "metric", "before", "after", "acc_norm_after", "active_params",
           "reserved_params", "trainable_params", "train_time_s", "train_tokens_per_s", "steps", "run_dir")
INTS = {"seed", "active_params", "reserved_params", "trainable_params", "steps"}
FLOATS = {"before", "after", "acc_norm_after", "train_time_s", "train_tokens_per_s"}
ACTIONS = {"new": "training", "resume": "resuming", "changed": "redoing it (overwrite)"}  # by a run's state


@dataclasses.dataclass
class PlannedRun:
    label: str
    task: str  # the eval set as the run's data.eval gives it: the key of metrics.json's eval_after
    task_label: str
    seed: int
    config: RunConfig
    run_dir: Path
    name: str  # "label / task / seed N", as progress lines and messages show it
    state: str = "new"  # new | finished | resume | changed (then `changes` says what differs)
    changes: str = ""


# ---- the spec ------------------------------------------------------------------------------------------------------
def read_spec(spec) -> dict:
    """The spec as a dict, from a YAML path or a dict; one sentence for a missing file, invalid YAML or a method
    label given twice (plain YAML would keep the last one and silently drop a method)."""
    if isinstance(spec, dict):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"compare spec {path} does not exist; pass a YAML file (e.g. configs/compare/builtin.yaml).")
    try:
        text = path.read_text(encoding="utf-8")
        data, node = yaml.safe_load(text), yaml.compose(text, Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping with {', '.join(SPEC_KEYS)}, not a {type(data).__name__}.")
    methods = next((v for k, v in node.value if k.value == "methods" and isinstance(v, yaml.MappingNode)), None)
    labels = [k.value for k, _ in methods.value] if methods is not None else []
    if (twice := next((k for k in labels if labels.count(k) > 1), None)) is not None:
        raise ConfigError(f"{path} gives method {twice!r} twice; each method label may appear only once.")
    return data


def _refuse_managed(mapping: dict, where: str, prefix: str = "") -> None:
    for key, value in mapping.items():
        if f"{prefix}{key}" in MANAGED:
            raise ConfigError(f"{where} sets {prefix}{key}, which compare sets for each run (from output_dir, seeds "
                              "and tasks); remove it.")
        if isinstance(value, dict):
            _refuse_managed(value, where, f"{prefix}{key}.")


def _checked(spec: dict) -> tuple[dict, list[Task], list[int], dict[str, dict]]:
    """(shared config, tasks, seeds, methods) of a spec, each checked; one sentence naming the bad key."""
    def check(ok, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    for key in spec:
        check(key in SPEC_KEYS, f"unknown spec key {key!r}{_did_you_mean(key, SPEC_KEYS)}; a compare spec has "
                                f"{', '.join(SPEC_KEYS)}.")
    for key in ("output_dir", "tasks", "seeds", "methods"):
        check(spec.get(key) not in (None, "", [], {}), f"the spec's {key} is missing or empty; `drlora compare "
                                                       "--help` shows the format.")
    shared, tasks, seeds, methods = spec.get("config") or {}, spec["tasks"], spec["seeds"], spec["methods"]
    check(isinstance(spec["output_dir"], str), f"the spec's output_dir must be a folder, got {spec['output_dir']!r}.")
    check(isinstance(shared, dict), "the spec's config must be a mapping of RunConfig keys (as in a train YAML).")
    _refuse_managed(shared, "the spec's config")
    tasks = [tasks] if isinstance(tasks, (str, dict)) else tasks
    check(isinstance(tasks, list), "the spec's tasks must be a list of builtin task names and {name, train, eval} "
                                   "file tasks.")
    tasks = [parse_task(entry) for entry in tasks]
    for i, task in enumerate(tasks):
        twin = next((t for t in tasks[:i] if t.label == task.label), None)
        check(twin is None, f"two tasks share the label {task.label!r}; list each task once, and give file tasks "
                            "distinct names.")
    for task in tasks:  # after every cheaper check: this one reads the files
        if not task.builtin:
            refuse_leak(task)
    seeds = [seeds] if isinstance(seeds, int) else seeds
    check(isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds),
          "the spec's seeds must be a list of integers, e.g. [0, 1, 2].")
    check(len(set(seeds)) == len(seeds), f"the spec's seeds {seeds} repeat a seed; list each seed once.")
    check(isinstance(methods, dict), "the spec's methods must map row labels to config overrides, e.g. {dr-lora: {}}.")
    methods = {label: {} if over is None else over for label, over in methods.items()}
    for label, overrides in methods.items():
        check(isinstance(label, str) and label.strip() and not label.startswith(".") and not set("/\\") & set(label),
              f"method label {label!r} must be a non-empty name without slashes (it names a folder).")
        check(isinstance(overrides, dict), f"method {label!r} must map to config overrides (a mapping, may be {{}}), "
                                           f"got {type(overrides).__name__}.")
        _refuse_managed(overrides, f"method {label!r}")
    return shared, tasks, seeds, methods


def plan(spec) -> tuple[dict, list[PlannedRun]]:
    """Check the spec and resolve every run's config (writes nothing); returns (spec, runs), each run's state set."""
    spec = read_spec(spec)
    shared, tasks, seeds, methods = _checked(spec)
    try:
        config_from_mappings(shared)
    except ConfigError as err:
        raise ConfigError(f"the spec's config: {err}") from None
    runs = []
    for seed in seeds:  # seed-major: a stopped study holds whole tables of its first seeds, not some methods only
        for task in tasks:
            for label, overrides in methods.items():
                out = Path(spec["output_dir"]) / "runs" / label / task.label / f"seed{seed}"
                try:
                    config = config_from_mappings(shared, overrides, {"data": {"train": [task.train],
                                                                               "eval": [task.eval]},
                                                                      "seed": seed, "output_dir": str(out)})
                except ConfigError as err:
                    raise ConfigError(f"method {label!r}: {err}") from None
                if task.builtin and config.data.eval_split == "train":
                    raise ConfigError(f"method {label!r} would score builtin task {task.label!r} on its train split, "
                                      "the rows it trains on (data.eval_split: train); use validation or test.")
                run = PlannedRun(label, task.eval, task.label, seed, config, out,
                                 f"{label} / {task.label} / seed {seed}")
                run.state, run.changes = _state(run)
                runs.append(run)
    return {**spec, "config": shared, "tasks": tasks, "seeds": seeds, "methods": methods}, runs


def _state(run: PlannedRun) -> tuple[str, str]:
    """What the run folder holds against the resolved config: new, finished, resume or changed (and what changed)."""
    folder, saved_file = run.run_dir, run.run_dir / "config.yaml"
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return "new", ""
    if not saved_file.is_file():
        return "changed", "the folder holds files but no drlora run"
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return "changed", "its config.yaml is not valid YAML"
    changes = config_differences(saved if isinstance(saved, dict) else {}, run.config)  # as resume=true decides
    if changes:
        return "changed", "; ".join(changes[:3]) + (f"; and {len(changes) - 3} more" if len(changes) > 3 else "")
    try:
        metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = None
    return ("finished" if isinstance(metrics, dict) and metrics.get("status") == "completed" else "resume"), ""


# ---- running -------------------------------------------------------------------------------------------------------
def compare(spec, overwrite: bool = False, dry_run: bool = False, progress: bool = True, jobs: int = 1) -> list[dict]:
    """Run (with dry_run: only list) every run of the spec that is not finished, rewriting the results after each;
    returns the rows of results.csv. `jobs` > 1 trains that many runs at once, each in its own process on its share
    of the cores (compare_jobs.py). A bad spec raises ConfigError with one sentence before anything is written."""
    from .run import train

    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ConfigError(f"jobs must be a positive number of runs to train at once, got {jobs!r}.")
    spec, runs = plan(spec)
    out, first_seed, n = Path(spec["output_dir"]), spec["seeds"][0], len(runs)
    count = {s: sum(r.state == s for r in runs) for s in ("finished", "resume", "new", "changed")}
    print(f"drlora compare: {n} runs ({len(spec['methods'])} methods × {len(spec['tasks'])} tasks × "
          f"{len(spec['seeds'])} seeds) in {out}: {count['finished']} finished, {count['resume']} to resume, "
          f"{count['new']} new, {count['changed']} with another configuration"
          + (" (to redo)" if overwrite else " (refused without --overwrite)") * bool(count["changed"]), flush=True)
    changed = [r for r in runs if r.state == "changed"]
    if dry_run:
        for i, run in enumerate(runs, 1):
            print(f"[{i}/{n}] {run.name}  {run.run_dir}  {run.state}" + (f" ({run.changes})" * bool(run.changes)))
        return [_row(r) for r in runs if r.state == "finished"]
    if changed and not overwrite:
        others = f", and so do {len(changed) - 1} other run(s)" if len(changed) > 1 else ""
        raise ConfigError(f"run {changed[0].name} in {changed[0].run_dir} differs from the spec "
                          f"({changed[0].changes}){others}; pass --overwrite (overwrite=True) to redo them, or choose "
                          "another output_dir.")
    try:
        for i, run in enumerate(runs, 1):
            if run.state == "finished":
                print(f"[{i}/{n}] {run.name}: finished, skipped", flush=True)
            elif jobs == 1:
                print(f"[{i}/{n}] {run.name} ... {ACTIONS[run.state]}", flush=True)
                train(dataclasses.replace(run.config, resume=run.state == "resume",
                                          overwrite=run.state == "changed"), progress=progress)
                run.state = "finished"
                # the tables after every run; the figures (seconds each) when a seed's runs are done, and at the end
                write_results(out, runs, first_seed, figures=i < n and runs[i].seed != run.seed)
        if jobs > 1:
            from .compare_jobs import run_parallel

            run_parallel(out, runs, jobs, lambda run: write_results(out, runs, first_seed, figures=False))
    finally:  # also after a failed run: the finished ones are tabulated
        rows = write_results(out, runs, first_seed)
    print(f"drlora compare: {len(rows)} of {n} runs finished; results in {out}/ (results.csv, .md, .png)")
    return rows


# ---- results -------------------------------------------------------------------------------------------------------
def _row(run: PlannedRun) -> dict:
    """The results row of a finished run (only runs whose config.yaml is the spec's, never a stale one)."""
    metrics = json.loads((run.run_dir / "metrics.json").read_text(encoding="utf-8"))
    sets = {key: metrics.get(key) or {} for key in ("eval_before", "eval_after")}
    after, before = ((s.get(run.task) or (next(iter(s.values())) if len(s) == 1 else {}) or {})
                     for s in (sets["eval_after"], sets["eval_before"]))
    metric = next((m for m in ("acc", "exact_match", *after) if m in after and m != "n"), "")
    return {"method": run.label, "task": run.task_label, "seed": run.seed,
            "config_method": metrics.get("method", run.config.method), "metric": metric,
            "before": before.get(metric), "after": after.get(metric), "acc_norm_after": after.get("acc_norm"),
            **{f"{k}_params": (metrics.get("parameters") or {}).get(k) for k in ("active", "reserved", "trainable")},
            **{k: metrics.get(k) for k in ("train_time_s", "train_tokens_per_s", "steps")}, "run_dir": str(run.run_dir)}


def read_csv(path) -> list[dict]:
    """results.csv back as typed rows (numbers as numbers, empty cells as None)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: None if v == "" else int(v) if k in INTS else float(v) if k in FLOATS else v for k, v in r.items()}
                for r in csv.DictReader(handle)]


def write_results(out, runs: list[PlannedRun], first_seed: int, figures: bool = True) -> list[dict]:
    """(Re)write results.csv, results.md (from the csv) and, with `figures`, results.png and rank_heatmaps.png from
    the finished runs."""
    out, rows = Path(out), [_row(r) for r in runs if r.state == "finished"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", buffer.getvalue())
    write_text(out / "results.md", markdown_from_csv(out / "results.csv"))
    if rows and figures:
        draw_results(_aggregate(read_csv(out / "results.csv")), out / "results.png")
    if figures and (heat := [r for r in rows if r["config_method"] == "dr-lora" and r["seed"] == first_seed]):
        draw_rank_heatmaps(heat, out / "rank_heatmaps.png")
    return rows


def _aggregate(rows: list[dict]) -> dict:
    """Scores in percentage points per (method, task) and seed, in order of first appearance; base-model scores."""
    methods, tasks = list(dict.fromkeys(r["method"] for r in rows)), list(dict.fromkeys(r["task"] for r in rows))
    scores = {(m, t): {} for m in methods for t in tasks}
    for r in rows:
        if r["after"] is not None:
            scores[(r["method"], r["task"])][r["seed"]] = 100 * r["after"]
    for m in methods:  # average: per seed over every task (seeds that have them all), then over seeds
        seeds = set.intersection(*(set(scores[(m, t)]) for t in tasks))
        scores[(m, "average")] = {s: statistics.fmean(scores[(m, t)][s] for t in tasks) for s in sorted(seeds)}
    before = {t: [100 * r["before"] for r in rows if r["task"] == t and r["before"] is not None] for t in tasks}
    metric = {t: next(r["metric"] for r in rows if r["task"] == t) for t in tasks}
    return {"methods": methods, "tasks": tasks, "scores": scores, "before": before, "metric": metric}


def _mean_std(values) -> tuple[float, float | None]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)  # sample std


def markdown_from_csv(csv_path) -> str:
    """results.md from results.csv and the per-item records of the runs it lists: the score per method and task (mean
    ± sample std over seeds, percentage points, best mean per column in bold), the parameter accounting per method,
    the base model's scores, and the paired comparisons."""
    def cell(values) -> str:
        mean, std = _mean_std(values)
        return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"

    rows = read_csv(csv_path)
    if not rows:
        return "# drlora compare\n\nNo finished runs yet.\n"
    agg = _aggregate(rows)
    methods, columns, scores = agg["methods"], agg["tasks"] + ["average"], agg["scores"]
    seeds = ", ".join(map(str, sorted({r["seed"] for r in rows})))
    lines = ["# drlora compare", "", (f"Score after training in percentage points (acc: multiple choice, exact_match: "
             f"generation), mean ± sample std over seeds ({seeds}); best mean per column in bold."), "",
             "| method | " + " | ".join(f"{t} ({agg['metric'][t]})" if t in agg["metric"] else t for t in columns)
             + " |", "|---|" + "---:|" * len(columns)]
    best = {col: max(means, key=float) if len(means := [f"{statistics.fmean(scores[(m, col)].values()):.1f}"
                                                        for m in methods if scores[(m, col)]]) > 1 else None
            for col in columns}  # compared as shown, so equal-looking means are bold together
    for m in methods:
        cells = [cell(scores[(m, col)].values()) if scores[(m, col)] else "–" for col in columns]
        cells = [f"**{c}**" if best[col] == c.split(" ")[0] else c for c, col in zip(cells, columns, strict=True)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    base = [f"{t} {statistics.fmean(agg['before'][t]):.1f}" for t in agg["tasks"] if agg["before"][t]]
    lines += ["", f"Base model before training: {', '.join(base) if base else 'not evaluated'}.", "",
              "## Parameters per method (mean over its runs)", "",
              "| method | config method | runs | active | reserved | trainable | train time (s) | tokens/s |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        cells = [format(statistics.fmean(v), fmt) if (v := [r[key] for r in mine if r[key] is not None]) else "–"
                 for key, fmt in (("active_params", ",.0f"), ("reserved_params", ",.0f"), ("trainable_params", ",.0f"),
                                  ("train_time_s", ".1f"), ("train_tokens_per_s", ",.0f"))]
        lines.append(f"| {m} | {mine[0]['config_method']} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + _paired_lines(agg) + paired_item_lines(rows, methods, agg["tasks"])) + "\n"


def _paired_lines(agg: dict) -> list[str]:
    """The first method against every other, paired by (task, seed): differences of two runs that saw the same data
    order and evaluation are less noisy than differences of means."""
    first, others = agg["methods"][0], agg["methods"][1:]
    if not others:
        return []
    lines = ["", f"## {first} against each method, paired by task and seed", "",
             (f"Difference in percentage points ({first} − method) over the (task, seed) pairs both finished: "
              f"mean ± sample std, and in how many pairs {first} scored higher / equal / lower."), "",
             f"| method | pairs | {first} − method | higher / equal / lower |", "|---|---:|---:|---:|"]
    for m in others:
        diffs = [round(agg["scores"][(first, t)][seed] - agg["scores"][(m, t)][seed], 6) for t in agg["tasks"]
                 for seed in agg["scores"][(first, t)] if seed in agg["scores"][(m, t)]]
        if not diffs:
            lines.append(f"| {m} | 0 | – | – |")
            continue
        mean, std = _mean_std(diffs)
        tally = f"{sum(d > 0 for d in diffs)} / {sum(d == 0 for d in diffs)} / {sum(d < 0 for d in diffs)}"
        spread = "" if std is None else f" ± {std:.1f}"
        lines.append(f"| {m} | {len(diffs)} | {mean:+.1f}{spread} | {tally} |")
    return lines
