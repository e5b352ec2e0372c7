"""`drlora eval` / evaluate_model: a checkpoint folder, with an adapter or merged, on JSONL rows; bad input is one
sentence and exit code 2, and nothing is written."""

import json

import pytest

from drlora import get_dr_lora_model
from drlora.cli import main
from drlora.evaluate import evaluate_multiple_choice
from drlora.run_eval import evaluate_model
from tiny_models import small_config, tiny_moe, tiny_tokenizer, train

ROWS = [{"prompt": "the cat sat on the", "choices": [" mat", " big red mat", " dog"], "label": 0},
        {"prompt": "a dog", "choices": [" ran", " sat"], "label": 1},
        {"prompt": "yes or no", "choices": [" yes", " no"], "label": 0},
        {"prompt": "the small", "choices": [" cat", " blue dog"], "label": 1}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny MoE checkpoint folder with its tokenizer, a JSONL task file and a trained adapter run folder."""
    root = tmp_path_factory.mktemp("eval")
    model, tok = tiny_moe("olmoe"), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "task.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    drlora = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    train(drlora, steps=6, lr=0.05)
    drlora.save_pretrained(root / "run" / "adapter")
    expected = evaluate_multiple_choice(drlora, tok, ROWS, progress=False)
    merged = drlora.merge_and_unload()
    merged.save_pretrained(root / "merged")
    tok.save_pretrained(root / "merged")
    return root, expected


def test_base_model_on_a_jsonl_file_writes_json(checkpoint):
    root, _ = checkpoint
    out = root / "out" / "base.json"
    report = evaluate_model(str(root / "model"), [str(root / "task.jsonl")], output=out, progress=False)
    expected = evaluate_multiple_choice(tiny_moe("olmoe"), tiny_tokenizer(), ROWS, progress=False)
    result = report["results"][str(root / "task.jsonl")]
    assert {k: result[k] for k in ("acc", "acc_norm", "n")} == expected
    assert json.loads(out.read_text())["results"] == report["results"]


def test_adapter_and_merged_model_score_like_the_trained_model(checkpoint):
    root, expected = checkpoint
    task = str(root / "task.jsonl")
    with_adapter = evaluate_model(str(root / "model"), task, adapter=root / "run", progress=False)
    merged = evaluate_model(str(root / "merged"), task, progress=False)
    for report in (with_adapter, merged):
        assert {k: report["results"][task][k] for k in ("acc", "acc_norm", "n")} == expected


def test_cli_prints_a_table(checkpoint, capsys):
    root, _ = checkpoint
    assert main(["eval", "--model", str(root / "model"), "--task", str(root / "task.jsonl"), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "acc_norm" in out and "task.jsonl" in out
    assert "split" not in out  # a file has no split


def test_the_table_says_split_for_builtin_tasks_and_file_for_files():
    from drlora.run_eval import format_table

    report = {"split": "validation", "results": {"siqa": {"acc": 0.5, "acc_norm": 0.25, "n": 4},
                                                 "/data/mine.jsonl": {"acc": 1.0, "acc_norm": 0.75, "n": 2}}}
    header, siqa, mine = format_table(report).splitlines()
    assert header.split()[:2] == ["task", "data"]
    assert siqa.split()[:3] == ["siqa", "validation", "split"]
    assert mine.split()[:2] == ["mine.jsonl", "file"] and "split" not in mine


def test_no_task_names_every_builtin_task():
    from drlora.builtin.tasks import TASKS

    with pytest.raises(ValueError, match=f"no task given; name a builtin task \\({', '.join(TASKS)}\\) or a JSONL"):
        evaluate_model("builtin:smollm2-moe", [])


@pytest.mark.parametrize("args, message", [
    (["--model", "builtin:smollm2-mo", "--task", "siqa"], "unknown builtin model 'builtin:smollm2-mo' (did you mean "
                                                           "'smollm2-moe'?)"),
    (["--task", "sqia"], "'sqia' is neither a builtin task nor a data file (did you mean 'siqa'?)"),
    (["--task", "{root}/missing.jsonl"], "missing.jsonl does not exist"),
    (["--model", "{root}/run", "--task", "{root}/task.jsonl"], "is not a transformers checkpoint folder"),
    (["--model", "{root}/model", "--adapter", "{root}/model", "--task", "{root}/task.jsonl"], "no drlora adapter in"),
    (["--model", "{root}/model", "--task", "{root}/task.jsonl", "--limit", "0"], "limit must be a positive"),
])
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(checkpoint, capsys, args, message):
    root, _ = checkpoint
    out = root / "never.json"
    argv = ["eval", *[a.format(root=root) for a in args], "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("drlora: error: ") and "\n" not in err
    assert message in err
    assert not out.exists()
