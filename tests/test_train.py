"""`drlora train` end to end on a tiny MoE checkpoint: the run folder, its adapter and evaluation, the eval cache,
companion commands, and every kind of bad input (one sentence, exit 2, nothing half-written)."""

import errno
import importlib.util
import json
import random
import subprocess
import sys

import pytest
import torch
import yaml

from drlora.cli import main
from drlora.recipe.config import load_config
from drlora.recipe.run import train
from drlora.run_eval import evaluate_model
from drlora.signals import in_backward
from tiny_models import WORDS, save_tiny_checkpoint, tiny_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_home(monkeypatch, tmp_path):
    """The eval cache goes to a fresh $DRLORA_HOME."""
    monkeypatch.setenv("DRLORA_HOME", str(tmp_path / "home"))


def mc_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(WORDS, 2)
        rows.append({"prompt": f"the {a} sat on", "choices": [f" {a}", f" {b} {b}"], "label": rng.randrange(2)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_tiny_checkpoint(root / "model")
    dense = __import__("transformers").AutoModelForCausalLM.from_config(__import__("transformers").AutoConfig.for_model(
        "llama", vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    dense.save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    write_jsonl(root / "train.jsonl", mc_rows(48, 0))
    write_jsonl(root / "eval.jsonl", mc_rows(16, 1))
    return root


def overrides(assets, out, *extra):
    return [f"model={assets / 'model'}", f"data.train=[{assets / 'train.jsonl'}]",
            f"data.eval=[{assets / 'eval.jsonl'}]",
            f"output_dir={out}", "train.max_steps=12", "train.batch_size=4", "train.gradient_accumulation_steps=1",
            "train.learning_rate=1e-2", "train.save_steps=4", "drlora.r_init=2", "drlora.r_target=4",
            "drlora.r_max=8", "drlora.max_grow_per_event=2", "drlora.lora_dropout=0.1", *extra]


def test_a_run_writes_its_folder_and_the_adapter_scores_as_recorded(assets, tmp_path, capsys):
    out = tmp_path / "run"
    metrics = train(load_config(None, overrides(assets, out)), progress=False)
    printed = capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    logs = {"logs"} if importlib.util.find_spec("tensorboard") else set()  # train.tensorboard: null = when installed
    assert names == {"config.yaml", "adapter", "ranks.jsonl", "metrics.json", "eval_items.jsonl", "rank_heatmap.png",
                     "checkpoints", *logs}
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 12
    events = [json.loads(line) for line in (out / "ranks.jsonl").read_text().splitlines()]
    assert len(events) == metrics["growth_events"] > 1 and events[-1]["ranks"] == metrics["rank_map"]
    assert all(sum(layer) == 8 * 4 for layer in metrics["rank_map"])  # exact budget
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["train_loss"]["first"] is not None and metrics["tokens_seen"] > 0
    assert set(metrics["parameters"]) == {"active", "reserved", "trainable", "total"}
    assert metrics["parameters"]["active"] < metrics["parameters"]["reserved"] < metrics["parameters"]["trainable"]
    task = str(assets / "eval.jsonl")
    assert set(metrics["eval_before"][task]) == {"acc", "acc_norm", "n"}
    # the published adapter, loaded the way `drlora eval --adapter RUN_DIR` loads it, scores what the run recorded
    again = evaluate_model(str(assets / "model"), task, adapter=out, progress=False)["results"][task]
    assert {k: again[k] for k in ("acc", "acc_norm", "n")} == metrics["eval_after"][task]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-12", "checkpoint-8"]
    assert all((out / "checkpoints" / c / "drlora_complete").is_file() for c in checkpoints)
    assert "acc" in printed and "where the ranks went" in printed and "drlora step" in printed
    assert "drlora: host memory:" in printed  # train.keep_host_memory is on by default (drlora.host_memory)
    assert "drlora: CPU grouped matmuls: " in printed  # which kernel runs them (drlora.mkl_batch)
    assert not list(out.rglob("*.partial")) and not list(out.rglob("*.tmp"))


def test_base_model_scores_are_cached_between_runs(assets, tmp_path, capsys):
    first = train(load_config(None, overrides(assets, tmp_path / "a", "train.max_steps=4")), progress=False)
    capsys.readouterr()
    second = train(load_config(None, overrides(assets, tmp_path / "b", "train.max_steps=4", "seed=1")), progress=False)
    assert "base-model scores from the cache" in capsys.readouterr().out
    assert first["eval_before"] == second["eval_before"]


def test_report_and_export_commands(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *overrides(assets, out, "train.max_steps=8")]) == 0
    (out / "rank_heatmap.png").unlink()
    assert main(["report", str(out)]) == 0
    assert "where the ranks went" in capsys.readouterr().out and (out / "rank_heatmap.png").is_file()
    for fmt in ("peft", "merged"):
        assert main(["export", str(out), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
    assert main(["export", str(out), "--format", "peft", "--out", str(tmp_path / "peft")]) == 2
    assert "already exists" in capsys.readouterr().err
    # both load with plain transformers / PEFT in a process that never imports drlora, and compute what the
    # adapter computes
    from drlora.loading import load_model

    with_adapter, _ = load_model(str(assets / "model"), adapter=out)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        torch.save({"x": x, "logits": with_adapter(x).logits}, tmp_path / "expected.pt")
    code = ("import sys, torch; from peft import PeftModel; from transformers import AutoModelForCausalLM as M; "
            "e = torch.load(sys.argv[1]); merged = M.from_pretrained(sys.argv[2]).eval(); "
            "peft = PeftModel.from_pretrained(M.from_pretrained(sys.argv[3]), sys.argv[4]).eval(); "
            "torch.testing.assert_close(merged(e['x']).logits, e['logits'], atol=1e-4, rtol=1e-4); "
            "torch.testing.assert_close(peft(e['x']).logits, e['logits'], atol=1e-4, rtol=1e-4); "
            "assert 'drlora' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "expected.pt"), str(tmp_path / "merged"),
                             str(assets / "model"), str(tmp_path / "peft")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_gradient_checkpointing_recomputes_and_changes_nothing_else(assets, tmp_path):
    """train.gradient_checkpointing=true: the decoder layers really run again in the backward (their attention
    modules, seen by a global forward hook, run inside it), and the run is the same run: loss curve, rank map and
    ranks.jsonl."""
    forwards = {False: 0, True: 0}  # attention forwards outside / inside the backward

    def count(module, args, output):
        if type(module).__name__.endswith("Attention"):  # inside the checkpointed layer (the layer's own hooks are not)
            forwards[in_backward()] += 1

    runs, seen = {}, {}
    handle = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        for checkpointing in (False, True):
            forwards.update({False: 0, True: 0})
            out = tmp_path / f"checkpointing_{checkpointing}"
            runs[checkpointing] = train(load_config(None, overrides(
                assets, out, "train.max_steps=8", "train.logging_steps=1", "data.eval=[]", "train.tensorboard=false",
                f"train.gradient_checkpointing={str(checkpointing).lower()}")), progress=False)
            seen[checkpointing] = dict(forwards)
    finally:
        handle.remove()
    assert seen[False][True] == 0 < seen[False][False]
    assert seen[True][True] == seen[True][False] == seen[False][False]  # every layer forward recomputed once
    plain, checkpointed = runs[False], runs[True]
    assert checkpointed["gradient_checkpointing"] and not plain["gradient_checkpointing"]
    config = yaml.safe_load((tmp_path / "checkpointing_True" / "config.yaml").read_text())
    assert config["train"]["gradient_checkpointing"] is True
    curve = [loss for _, loss in plain["train_loss"]["curve"]]
    assert len(curve) == 8 and [loss for _, loss in checkpointed["train_loss"]["curve"]] == pytest.approx(curve,
                                                                                                          rel=1e-6)
    assert checkpointed["rank_map"] == plain["rank_map"] and plain["growth_events"] > 1
    ranks = [(tmp_path / f"checkpointing_{c}" / "ranks.jsonl").read_text() for c in (False, True)]
    assert ranks[0] == ranks[1]


def test_tensorboard_gets_the_rank_map_of_every_growth_event(assets, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", *overrides(assets, out, "train.max_steps=8", "train.logging_steps=4", "data.eval=[]",
                                         "train.tensorboard=true")]) == 0
    (events_file,) = (out / "logs").glob("events.out.tfevents.*")  # one writer: the Trainer's own
    tb = EventAccumulator(str(events_file))
    tb.Reload()
    scalars = {tag: {e.step: e.value for e in tb.Scalars(tag)} for tag in tb.Tags()["scalars"]}
    assert "train/loss" in scalars  # the Trainer's own scalars are still there
    events = [json.loads(line) for line in (out / "ranks.jsonl").read_text().splitlines()]
    assert len(events) > 1
    assert scalars["drlora/ranks_grown"] == {e["step"]: sum(map(sum, e["grown"])) for e in events}
    assert scalars["drlora/layers_below_target"] == {e["step"]: e["layers_below_target"] for e in events}
    ranks_at = {0: [[2] * 8, [2] * 8], **{e["step"]: e["ranks"] for e in events}}  # step 0: r_init everywhere
    for i in range(2):
        for stat, reduce in (("mean", lambda r: sum(r) / len(r)), ("min", min), ("max", max)):
            expected = {step: pytest.approx(reduce(ranks[i])) for step, ranks in ranks_at.items()}
            assert scalars[f"drlora/rank_{stat}/layer{i}"] == expected, (stat, i)


# ---- bad input: one sentence, exit 2, nothing half-written -----------------------------------------------------------
def run_cli(capsys, argv):
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


@pytest.mark.parametrize("case, message", [
    ("missing data", "does not exist; pass a JSONL file or a builtin task name"),
    ("unreadable data", "it must be a UTF-8 text file"),
    ("empty data", "holds no rows"),
    ("malformed row", "line 2: not valid JSON"),
    ("dense model", "no routed experts found in this 'llama' model"),
    ("not a checkpoint", "is not a transformers checkpoint folder"),
    ("unknown key", "unknown config key 'train.lerning_rate' (did you mean 'learning_rate'?)"),
    ("typo value", "did you mean 'cosine'?"),
    ("infeasible schedule", "the growth schedule cannot reach r_target"),
    ("nothing to resume", "holds no run to resume"),
])
def test_bad_input_before_training_leaves_nothing(assets, tmp_path, capsys, case, message):
    out = tmp_path / "run"
    data = {"missing data": [f"data.train=[{tmp_path / 'nope.jsonl'}]"],
            "unreadable data": [f"data.train=[{tmp_path / 'binary.jsonl'}]"],
            "empty data": [f"data.train=[{write_jsonl(tmp_path / 'empty.jsonl', [])}]"],
            "malformed row": [f"data.train=[{tmp_path / 'bad.jsonl'}]"],
            "dense model": [f"model={assets / 'dense'}"],
            "not a checkpoint": [f"model={tmp_path}"],
            "unknown key": ["train.lerning_rate=1"],
            "typo value": ["train.lr_scheduler=cosin"],
            "infeasible schedule": ["train.max_steps=2", "drlora.max_grow_per_event=1"],
            "nothing to resume": ["resume=true"]}[case]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "choices": [" b", " c"], "label": 0}\n{"prompt": \n')
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    code, err = run_cli(capsys, overrides(assets, out, *data))
    assert code == 2 and err.startswith("drlora: error: ") and message in err, err
    assert not out.exists()


def test_an_output_dir_holding_another_run_is_refused_unless_told(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *overrides(assets, out, "train.max_steps=4")]) == 0
    before = sorted(p.name for p in out.rglob("*"))
    code, err = run_cli(capsys, overrides(assets, out, "train.max_steps=4"))
    assert code == 2 and "already holds a run; pass resume=true to continue it, overwrite=true" in err
    code, err = run_cli(capsys, overrides(assets, out, "train.max_steps=4", "train.learning_rate=0.5", "resume=true"))
    assert code == 2 and "cannot resume the run" in err and "train.learning_rate was 0.01, now 0.5" in err
    assert sorted(p.name for p in out.rglob("*")) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, err = run_cli(capsys, overrides(assets, tmp_path / "other", "train.max_steps=4"))
    assert code == 2 and "is not empty and holds no drlora run" in err
    assert main(["train", *overrides(assets, out, "train.max_steps=4", "overwrite=true", "seed=3")]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["seed"] == 3


def test_a_diverging_loss_stops_and_keeps_the_last_good_checkpoint(assets, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_cli(capsys, overrides(assets, out, "train.learning_rate=1e30", "train.save_steps=1",
                                          "train.max_grad_norm=0"))
    assert code == 2 and ("loss became nan" in err or "loss became inf" in err or "non-finite" in err), err
    assert "training stopped and the last good checkpoint is" in err and "lower train.learning_rate" in err
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    checkpoints = [p for p in (out / "checkpoints").iterdir()]
    assert checkpoints and all((c / "drlora_complete").is_file() for c in checkpoints)


def test_an_unwritable_output_folder(assets, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, err = run_cli(capsys, overrides(assets, blocker / "run"))
    assert code == 2 and "cannot write the run folder" in err


def test_a_full_disk_while_saving_leaves_no_partial_output(assets, tmp_path, capsys, monkeypatch):
    import drlora.saving

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(drlora.saving, "save_file", full)
    out = tmp_path / "run"
    code, err = run_cli(capsys, overrides(assets, out, "train.max_steps=4", "train.save_steps=100"))
    assert code == 2 and "the disk is full while writing" in err and "resume=true" in err, err
    assert not (out / "adapter").exists() and not (out / "adapter.partial").exists()
    assert not list(out.rglob("*.tmp")) and not (out / "metrics.json").exists()
