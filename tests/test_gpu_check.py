"""bench/gpu_check.py, the prepared GPU check, in its dry mode: every check on the CPU at tiny shapes, so the script
that a GPU session runs once cannot rot between those sessions."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_passes_every_check_of_every_family_and_writes_the_report(tmp_path, capsys):
    script = gpu_check()
    assert script.main(["--dry-run", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"command", "date", "machine", "versions", "shapes", "bounds", "checks", "details", "timing", "seconds",
            "passed"} <= report.keys()
    assert {"torch", "transformers", "peft"} <= report["versions"].keys()
    assert report["passed"] and report["dry_run"]
    failed = [c for c in report["checks"] if not c["passed"]]
    assert not failed, failed
    # every family went through every part a-d, and the timing (e) ran step_time's variants
    parts = {(c["family"], c["check"][0]) for c in report["checks"]}
    assert {(f, part) for f in script.FAMILIES for part in "abcd"} <= parts
    (timing,) = report["timing"].values()
    assert set(timing["step_s"]) == set(script.TIMING_VARIANTS) and {"c/a", "c/d"} <= timing["ratios"].keys()
    # the bf16 path ran torch's grouped_mm kernel in every family, and the LoRA mattered in the comparison
    for family in script.FAMILIES:
        details = report["details"][family]
        assert details["grouped_mm_calls"] > 0 and not details["fallback_warnings"]
        assert details["lora_effect_on_logits"] >= report["bounds"]["lora_effect"]
    assert "checks passed" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a CUDA GPU")
def test_without_a_gpu_and_without_dry_run_it_refuses_in_one_sentence(tmp_path, capsys):
    assert gpu_check().main(["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available" in err and "--dry-run" in err and err.count("\n") == 1
    assert not (tmp_path / "gpu_check.json").exists()


def test_an_unknown_family_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_check().main(["--dry-run", "--families", "olmoe,mixtrel"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'mixtrel'" in err and "mixtral" in err
