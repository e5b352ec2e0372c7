"""`drlora compare` end to end on a tiny MoE: the run folders are ordinary `drlora train` runs, the tables are
computed from them, a second compare skips finished runs and resumes unfinished ones, a changed spec is refused
(unless overwrite), and a bad spec fails with one sentence before anything is written."""

import csv
import json
import random
import statistics
from pathlib import Path

import pytest
import yaml
from tiny_models import WORDS, save_tiny_checkpoint

from drlora.cli import main
from drlora.recipe.compare import compare, markdown_from_csv, plan
from drlora.recipe.config import ConfigError

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_home(monkeypatch, tmp_path):
    """The eval cache goes to a fresh $DRLORA_HOME."""
    monkeypatch.setenv("DRLORA_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_tiny_checkpoint(root / "model")
    rng = random.Random(0)
    rows = []
    for _ in range(80):  # the answer is the prompt's word: learnable, so held-out scores move with training
        a, b = rng.sample(WORDS, 2)
        label = rng.randrange(2)
        choices = [f" {a}", f" {b}"] if label == 0 else [f" {b}", f" {a}"]
        rows.append({"prompt": f"the {a} sat on", "choices": choices, "label": label})
    rows = list({json.dumps(r): r for r in rows}.values())  # no row in both files
    assert len(rows) >= 48
    (root / "words_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    (root / "words_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[24:48]))
    return root


def words_task(assets, **changes) -> dict:
    return {"name": "words", "train": str(assets / "words_train.jsonl"), "eval": str(assets / "words_test.jsonl"),
            **changes}


def make_spec(assets, out, **changes) -> dict:
    spec = {"output_dir": str(out),
            "config": {"model": str(assets / "model"),  # lr: enough for the two seeds to score differently
                       "train": {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 1,
                                 "learning_rate": 5e-2, "save_steps": 2},
                       "drlora": {"r_init": 2, "r_target": 4, "r_max": 8, "max_grow_per_event": 2}},
            "tasks": [words_task(assets)], "seeds": [0, 1],
            "methods": {"dr-lora": {}, "gamma-0": {"drlora": {"gamma": 0}}}}
    spec.update(changes)
    return spec


def write_spec(path, spec):
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def metrics_mtimes(out):
    return {p: p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/*/*/metrics.json"))}


def test_compare_runs_tabulates_skips_resumes_and_refuses_a_changed_spec(assets, tmp_path, capsys):
    out = tmp_path / "cmp"
    spec_file = write_spec(tmp_path / "spec.yaml", make_spec(assets, out))
    rows = compare(spec_file, progress=False)
    printed = capsys.readouterr().out
    assert "4 runs (2 methods × 1 tasks × 2 seeds)" in printed
    assert "[2/4] gamma-0 / words / seed 0 ... training" in printed
    folders = sorted(p.relative_to(out).as_posix() for p in out.glob("runs/*/*/*"))
    assert folders == ["runs/dr-lora/words/seed0", "runs/dr-lora/words/seed1", "runs/gamma-0/words/seed0",
                       "runs/gamma-0/words/seed1"]
    csv_rows = read_rows(out / "results.csv")
    assert len(csv_rows) == len(rows) == 4
    task = str(assets / "words_test.jsonl")  # the key of metrics.json's scores: the run's data.eval
    for row in csv_rows:  # every score is the run's own metrics.json
        run_dir = out / "runs" / row["method"] / "words" / f"seed{row['seed']}"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert row["metric"] == "acc" and row["config_method"] == "dr-lora"
        assert float(row["after"]) == metrics["eval_after"][task]["acc"]
        assert float(row["before"]) == metrics["eval_before"][task]["acc"]
        assert float(row["acc_norm_after"]) == metrics["eval_after"][task]["acc_norm"]
        assert int(row["trainable_params"]) == metrics["parameters"]["trainable"] and int(row["steps"]) == 4
    # one cell by hand: gamma-0 on words, mean ± sample std over the two seeds, in percentage points
    scores = [100 * float(r["after"]) for r in csv_rows if r["method"] == "gamma-0"]
    cell = f"{statistics.fmean(scores):.1f} ± {statistics.stdev(scores):.1f}"
    assert len(scores) == 2 and statistics.stdev(scores) > 0  # a real spread, so the ± is checked
    markdown = (out / "results.md").read_text()
    assert markdown == markdown_from_csv(out / "results.csv")
    line = next(row for row in markdown.splitlines() if row.startswith("| gamma-0 | "))
    assert line.split(" | ")[1].strip("*") == cell and "Base model before training: words" in markdown
    assert (out / "results.png").stat().st_size > 0 and (out / "rank_heatmaps.png").stat().st_size > 0
    # every run keeps each eval item's result before and after; the item-paired table is those runs' own numbers
    accuracy = {}
    for row in csv_rows:
        run_dir = out / "runs" / row["method"] / "words" / f"seed{row['seed']}"
        items = [json.loads(line) for line in (run_dir / "eval_items.jsonl").read_text().splitlines()]
        for when in ("before", "after"):
            mine = [item for item in items if item["when"] == when and item["set"] == task]
            assert [item["index"] for item in mine] == list(range(24))
            assert sum(item["correct"] for item in mine) / 24 == float(row[when])
            assert all((item["margin"] > 0) == bool(item["correct"]) for item in mine)
        accuracy[(row["method"], int(row["seed"]))] = 100 * float(row["after"])
    paired = next(row for row in markdown.splitlines() if row.startswith("| gamma-0 | ") and "[" in row)
    difference = statistics.fmean(accuracy[("dr-lora", s)] - accuracy[("gamma-0", s)] for s in (0, 1))
    assert paired.split(" | ")[1].startswith(f"{difference:+.1f} [") and "## dr-lora − each method, paired item by " \
        "item" in markdown and "## Gain over the base model, paired item by item" in markdown

    # again: everything is finished, nothing is touched
    before = metrics_mtimes(out)
    assert compare(spec_file, progress=False) == rows
    assert capsys.readouterr().out.count("finished, skipped") == 4 and metrics_mtimes(out) == before

    # a run without its metrics (as if killed) is the only one that runs, resuming from its last checkpoint
    lost = out / "runs/gamma-0/words/seed1/metrics.json"
    lost.unlink()
    compare(spec_file, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 3 and "[4/4] gamma-0 / words / seed 1 ... resuming" in printed
    assert lost.is_file() and {p: t for p, t in metrics_mtimes(out).items() if p != lost} == \
        {p: t for p, t in before.items() if p != lost}
    scored = ("method", "seed", "before", "after", "acc_norm_after", "trainable_params")
    assert [{k: r[k] for k in scored} for r in read_rows(out / "results.csv")] == \
        [{k: r[k] for k in scored} for r in csv_rows]  # the same final checkpoint gives the same scores

    # the spec changed: refused, naming the run and the key, and nothing is touched; overwrite redoes those runs
    changed = make_spec(assets, out)
    changed["methods"]["gamma-0"]["train"] = {"learning_rate": 2e-2}
    write_spec(spec_file, changed)
    before = metrics_mtimes(out)
    with pytest.raises(ConfigError, match=r"run gamma-0 / words / seed 0 .* \(train\.learning_rate was 0\.05, now "
                                          r"0\.02\), and so do 1 other run\(s\); pass --overwrite"):
        compare(spec_file, progress=False)
    assert metrics_mtimes(out) == before
    compare(spec_file, overwrite=True, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("finished, skipped") == 2 and printed.count("redoing it (overwrite)") == 2
    after = metrics_mtimes(out)
    assert [p.parts[-4] for p in after if after[p] != before[p]] == ["gamma-0", "gamma-0"]
    config = yaml.safe_load((out / "runs/gamma-0/words/seed1/config.yaml").read_text())
    assert config["train"]["learning_rate"] == 2e-2 and len(read_rows(out / "results.csv")) == 4


def test_jobs_trains_runs_at_once_each_logged_with_the_results_of_runs_in_turn(assets, tmp_path, capsys):
    parallel = compare(make_spec(assets, tmp_path / "par"), progress=False, jobs=2)
    printed = capsys.readouterr().out
    assert "2 runs at a time" in printed and printed.count(": finished in") == 4
    logs = sorted((tmp_path / "par").glob("logs/*/words/seed*.log"))
    assert len(logs) == 4 and all("drlora: wrote" in log.read_text() for log in logs)
    in_turn = compare(make_spec(assets, tmp_path / "seq"), progress=False)
    same = ("method", "seed", "before", "steps", "trainable_params", "active_params")
    assert [{k: r[k] for k in same} for r in parallel] == [{k: r[k] for k in same} for r in in_turn]
    for a, b in zip(parallel, in_turn):  # another thread count may round differently, never train differently
        assert abs(a["after"] - b["after"]) <= 1 / 24
        ranks = [json.loads((Path(r["run_dir"]) / "metrics.json").read_text())["rank_map"] for r in (a, b)]
        assert ranks[0] == ranks[1]
    assert (tmp_path / "par/results.md").read_text().count("|") > 0


def test_a_failed_run_under_jobs_stops_the_study_and_the_finished_runs_are_tabulated(assets, tmp_path, capsys):
    spec = make_spec(assets, tmp_path / "cmp", seeds=[0],
                     methods={"dr-lora": {}, "no-model": {"model": str(tmp_path / "not-a-model")}})
    (tmp_path / "not-a-model").mkdir()  # the spec is fine; the run fails when it loads the model, in its worker
    (tmp_path / "not-a-model" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="not-a-model"):
        compare(spec, progress=False, jobs=2)
    assert "no-model / words / seed 0: failed (see " in capsys.readouterr().out
    assert [r["method"] for r in read_rows(tmp_path / "cmp/results.csv")] == ["dr-lora"]
    with pytest.raises(ConfigError, match="jobs must be a positive number"):
        compare(spec, jobs=0)


def test_dry_run_lists_the_plan_and_writes_nothing(assets, tmp_path, capsys):
    out = tmp_path / "cmp"
    spec_file = write_spec(tmp_path / "spec.yaml", make_spec(assets, out, seeds=[3]))
    assert main(["compare", str(spec_file), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 runs (2 methods × 1 tasks × 1 seeds)" in printed and "0 finished" in printed
    assert f"[2/2] gamma-0 / words / seed 3  {out / 'runs/gamma-0/words/seed3'}  new" in printed
    assert not out.exists()


def test_a_file_task_trains_on_its_train_file_and_is_scored_on_its_eval_file(assets, tmp_path):
    unnamed = {k: v for k, v in words_task(assets).items() if k != "name"}  # labelled by the train file's stem
    _, runs = plan(make_spec(assets, tmp_path / "cmp", tasks=["sentiment", unnamed], seeds=[0]))
    train, held_out = str(assets / "words_train.jsonl"), str(assets / "words_test.jsonl")
    assert [(r.label, r.task_label, r.task) for r in runs] == [
        ("dr-lora", "sentiment", "sentiment"), ("gamma-0", "sentiment", "sentiment"),
        ("dr-lora", "words_train", held_out), ("gamma-0", "words_train", held_out)]
    assert [(r.config.data.train, r.config.data.eval) for r in runs[2:]] == [([train], [held_out])] * 2
    assert runs[0].config.data.train == runs[0].config.data.eval == ["sentiment"]  # split: train / data.eval_split
    assert runs[3].run_dir == tmp_path / "cmp/runs/gamma-0/words_train/seed0"


def test_markdown_from_a_hand_written_csv(tmp_path):
    header = "method,task,seed,config_method,metric,before,after,acc_norm_after,active_params,reserved_params," \
             "trainable_params,train_time_s,train_tokens_per_s,steps,run_dir\n"
    rows = ["A,t1,0,dr-lora,acc,0.25,0.5,0.5,1000,2000,3000,10.0,500.0,4,r",
            "A,t1,1,dr-lora,acc,0.25,0.7,0.6,1000,2000,3000,12.0,700.0,4,r",
            "A,t2,0,dr-lora,exact_match,0.0,0.2,,1000,2000,3000,10.0,500.0,4,r",
            "A,t2,1,dr-lora,exact_match,0.0,0.4,,1000,2000,3000,10.0,500.0,4,r",
            "B,t1,0,lora,acc,0.25,0.65,0.6,1500,1500,1500,5.0,900.0,4,r",
            "B,t2,0,lora,exact_match,0.0,0.1,,1500,1500,1500,5.0,900.0,4,r"]
    (tmp_path / "results.csv").write_text(header + "\n".join(rows) + "\n")
    lines = markdown_from_csv(tmp_path / "results.csv").splitlines()
    assert "| method | t1 (acc) | t2 (exact_match) | average |" in lines
    # A: t1 50, 70 -> 60.0 ± 14.1; t2 20, 40 -> 30.0 ± 14.1; average per seed 35, 55 -> 45.0 ± 14.1. B: one seed.
    assert "| A | 60.0 ± 14.1 | **30.0 ± 14.1** | **45.0 ± 14.1** |" in lines
    assert "| B | **65.0** | 10.0 | 37.5 |" in lines
    assert "Base model before training: t1 25.0, t2 0.0." in lines
    assert "| A | dr-lora | 4 | 1,000 | 2,000 | 3,000 | 10.5 | 550 |" in lines
    assert "| B | lora | 2 | 1,500 | 1,500 | 1,500 | 5.0 | 900 |" in lines
    # paired by (task, seed): only seed 0 has both; A − B = 50 − 65 on t1 and 20 − 10 on t2 -> -2.5 ± 17.7
    assert "## A against each method, paired by task and seed" in lines
    assert "| B | 2 | -2.5 ± 17.7 | 1 / 0 / 1 |" in lines


@pytest.mark.parametrize("case, message", [
    ("unknown key", "unknown spec key 'metods' (did you mean 'methods'?)"),
    ("empty methods", "the spec's methods is missing or empty"),
    ("bad override", "method 'gamma-0': unknown config key 'drlora.gama' (did you mean 'gamma'?)"),
    ("managed key", "method 'gamma-0' sets data.train, which compare sets for each run"),
    ("duplicate label", "gives method 'gamma-0' twice"),
    ("missing task", "task 'sentimnt' is not a builtin task (did you mean 'sentiment'?)"),
])
def test_bad_specs_fail_with_one_sentence_and_write_nothing(assets, tmp_path, capsys, case, message):
    out = tmp_path / "cmp"
    spec = make_spec(assets, out)
    spec_file = tmp_path / "spec.yaml"
    if case == "unknown key":
        spec["metods"] = spec.pop("methods")
    elif case == "empty methods":
        spec["methods"] = {}
    elif case == "bad override":
        spec["methods"]["gamma-0"] = {"drlora": {"gama": 0}}
    elif case == "managed key":
        spec["methods"]["gamma-0"] = {"data": {"train": ["x.jsonl"]}}
    elif case == "missing task":
        spec["tasks"] = ["sentimnt"]
    write_spec(spec_file, spec)
    if case == "duplicate label":
        spec_file.write_text(spec_file.read_text().replace("  gamma-0:", "  gamma-0: {}\n  gamma-0:"))
    assert main(["compare", str(spec_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("drlora: error: ")
    assert not out.exists()
    if case != "duplicate label":  # the Python API refuses the same spec as a dict
        with pytest.raises(ConfigError, match="^" + err[0].removeprefix("drlora: error: ")[:20]):
            compare(spec, progress=False)


@pytest.mark.parametrize("case, message", [
    ("bare file", "task '{train}' is a bare file, so compare would train and evaluate on the same rows; name a "
                  "held-out eval file instead, e.g. {{name: words_train, train: {train}, eval: "
                  "{assets}/words_train_test.jsonl}}."),
    ("same file", "task 'words' trains and evaluates on the same file {train}; name a held-out eval file."),
    ("overlapping rows", "task 'words': 2 of the 3 eval rows in {copy} are also training rows in {train}; remove them"),
    ("missing eval file", "task 'words': its eval file {assets}/nowhere.jsonl does not exist."),
    ("train split", "method 'gamma-0' would score builtin task 'sentiment' on its train split"),
])
def test_specs_that_would_score_training_rows_are_refused_before_anything_is_written(assets, tmp_path, capsys, case,
                                                                                     message):
    out, train = tmp_path / "cmp", assets / "words_train.jsonl"
    copy = tmp_path / "copied.jsonl"  # two training rows copied verbatim (keys reordered: compared as parsed JSON)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    copy.write_text("".join(json.dumps(dict(reversed(r.items()))) + "\n" for r in rows[:2]) +
                    (assets / "words_test.jsonl").read_text().splitlines(keepends=True)[0])
    same = f"{assets}/../{assets.name}/{train.name}"  # another spelling of the train file
    tasks = {"bare file": [str(train)], "same file": [words_task(assets, eval=same)],
             "overlapping rows": [words_task(assets, eval=str(copy))],
             "missing eval file": [words_task(assets, eval=str(assets / "nowhere.jsonl"))],
             "train split": ["sentiment"]}[case]
    spec = make_spec(assets, out, tasks=tasks)
    if case == "train split":
        spec["methods"]["gamma-0"]["data"] = {"eval_split": "train"}
    spec_file = write_spec(tmp_path / "spec.yaml", spec)
    assert main(["compare", str(spec_file), "--dry-run"]) == 2  # refused even where nothing would run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message.format(train=train, assets=assets, copy=copy) in err[0]
    assert not out.exists()
    with pytest.raises(ConfigError, match="^" + err[0].removeprefix("drlora: error: ")[:20]):
        compare(spec, progress=False)
