"""drlora's JSONL format and the builtin task conversion: line-numbered errors, deterministic disjoint splits."""

import json

import pytest

from drlora.builtin import tasks
from drlora.data import DataError, read_jsonl


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reads_the_three_row_kinds(tmp_path):
    mc = write(tmp_path, [json.dumps({"prompt": "Q?", "choices": [" a", " b"], "label": 1})], "mc.jsonl")
    gen = write(tmp_path, [json.dumps({"prompt": "2+2=", "completion": "4"})], "gen.jsonl")
    chat = write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "hello"}]})], "chat.jsonl")
    assert read_jsonl(mc)[0]["label"] == 1
    assert read_jsonl(gen)[0]["completion"] == "4"
    assert read_jsonl(chat)[0]["messages"][1]["role"] == "assistant"


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "Q", "choices": ["a", "b"], "label": 2}', r"line 2: \"label\" must be an integer index"),
    ('{"prompt": "Q", "choices": ["a"], "label": 0}', r"line 2: \"choices\" must be a list of at least two"),
    ('{"prompt": "Q", "choices": ["a", "b"]}', r"line 2: a multiple-choice row needs \"label\", the index of the "
                                               r"correct choice in \"choices\" \(0\.\.1\)\.$"),
    ('{"prompt": "Q", "choices": ["a", "b"], "label": null}', r"line 2: \"label\" must be an integer index into "
                                                             r"\"choices\" \(0\.\.1\), got None"),
    ('{"prompt": "Q"', "line 2: not valid JSON"),
    ('{"question": "Q"}', r"line 2: a row needs a string \"prompt\""),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "line 2: message 0 must be"),
    ('{"prompt": "Q", "completion": "A"}', "line 2: a generation row in a file of mc rows"),
])
def test_malformed_rows_are_reported_with_their_line(tmp_path, bad, message):
    good = json.dumps({"prompt": "Q?", "choices": [" a", " b"], "label": 0})
    with pytest.raises(DataError, match=message):
        read_jsonl(write(tmp_path, [good, bad]))


def test_a_utf8_byte_order_mark_reads_like_none(tmp_path):
    """Windows editors save UTF-8 with a BOM; the user's file and a builtin task go through the same reader."""
    from drlora.builtin import load_rows

    lines = [json.dumps({"prompt": "Q?", "choices": [" a", " b"], "label": 1}),
             json.dumps({"prompt": "R?", "choices": [" c", " d"], "label": 0})]
    plain = write(tmp_path, lines, "plain.jsonl")
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert read_jsonl(marked) == read_jsonl(plain)
    assert load_rows(str(marked)) == load_rows(str(plain))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="holds no rows"):
        read_jsonl(write(tmp_path, [""]))


def test_chat_rows_can_be_refused_where_they_cannot_be_scored(tmp_path):
    chat = write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "hi"}]})])
    with pytest.raises(DataError, match="only mc rows can be used here"):
        read_jsonl(chat, kinds=("mc",))


def fake_bigbench(n=90):
    examples = [{"input": f"Question number {i}?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}}
                for i in range(n)]
    examples.append(dict(examples[0]))  # a duplicate
    examples.append({"input": "tie", "target_scores": {"a": 1, "b": 1}})  # ambiguous gold
    return {"examples": examples}


def test_conversion_is_deterministic_deduplicated_and_splits_are_disjoint():
    task = tasks.TASKS["strategyqa"]
    rows = tasks.convert(task, fake_bigbench())
    assert len(rows) == 90
    assert rows[0] == {"prompt": "Question: Question number 0?\nAnswer:", "choices": [" yes", " no"], "label": 0}
    first, second = tasks.split(task, rows), tasks.split(task, tasks.convert(task, fake_bigbench()))
    assert first == second
    prompts = {name: {r["prompt"] for r in part} for name, part in first.items()}
    assert sum(len(p) for p in prompts.values()) == 90
    assert not (prompts["train"] & prompts["test"] or prompts["train"] & prompts["validation"]
                or prompts["validation"] & prompts["test"])
    assert len(first["test"]) == 30 and len(first["validation"]) == 11


def test_prepare_task_caches_files_in_drlora_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DRLORA_HOME", str(tmp_path / "home"))
    source = tmp_path / "task.json"
    source.write_text(json.dumps(fake_bigbench()))
    folder = tasks.prepare_task("siqa", source)
    assert folder == tmp_path / "home" / "tasks" / "siqa"
    assert len(tasks.load_task("siqa", "test")) == 30
    with pytest.raises(ValueError, match="unknown builtin task 'sqia'.*did you mean 'siqa'"):
        tasks.load_task("sqia", "test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        tasks.load_task("siqa", "dev")


def test_cli_reports_bad_input_in_one_line_with_exit_code_2(capsys):
    from drlora.cli import main

    assert main(["build-model", "tinyllama-moe"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "drlora: error: unknown builtin model 'tinyllama-moe'; builtin models are smollm2-moe, smollm2."


def test_written_files_get_normal_permissions_and_no_temporary_files_remain(tmp_path):
    import os

    from drlora.data import write_jsonl

    umask = os.umask(0o022)
    try:
        write_jsonl(tmp_path / "out" / "rows.jsonl", [{"prompt": "Q", "completion": "A"}])
    finally:
        os.umask(umask)
    assert oct((tmp_path / "out" / "rows.jsonl").stat().st_mode & 0o777) == oct(0o644)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["rows.jsonl"]
