"""The capacity study (studies/capacity.py) in miniature: it writes its tables, and it can tell allocations apart —
the oracle allocation (∝ the planted ranks) ends closer to the teacher than uniform LoRA at the same budget."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "studies"))
import capacity  # noqa: E402

pytestmark = pytest.mark.slow


def test_planted_ranks_follow_the_scenario_and_the_teacher_differs_by_exactly_the_planted_rank():
    study = capacity.StudyConfig()
    frequency = torch.tensor([[0.30, 0.05, 0.20, 0.10, 0.02, 0.13, 0.08, 0.12]])
    frequent = capacity.planted_ranks("frequent", study, frequency, seed=0)[0]
    rare = capacity.planted_ranks("rare", study, frequency, seed=0)[0]
    assert set(frequent.argsort(descending=True)[:2].tolist()) == {0, 2}
    assert set(rare.argsort(descending=True)[:2].tolist()) == {4, 1}
    assert capacity.planted_ranks("uniform", study, frequency, seed=0).unique().tolist() == [study.r_target]

    base = capacity.build_base("olmoe", study, seed=0)
    planted = capacity.planted_ranks("independent", study, torch.rand(2, 8), seed=0)
    teacher = capacity.plant(base, planted, study, seed=0)
    for layer_b, layer_t, ranks in zip(capacity.find_moe_layers(base), capacity.find_moe_layers(teacher),
                                       planted.tolist()):
        for proj in ("up", "down"):
            delta = capacity._expert_weights(layer_t, proj) - capacity._expert_weights(layer_b, proj)
            assert torch.linalg.matrix_rank(delta, rtol=1e-4).tolist() == ranks
        if layer_b.has_gate:  # gate untouched
            assert torch.equal(capacity._expert_weights(layer_t, "gate"), capacity._expert_weights(layer_b, "gate"))


def test_the_smoke_study_writes_its_tables_and_the_oracle_beats_uniform_lora(tmp_path):
    assert capacity.main(["--out", str(tmp_path), "--preset", "smoke"]) == 0
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert {r["method"] for r in runs} == {"lora", "dr-lora", "oracle"} and len(runs) == 6
    assert len({r["active_ranks"] for r in runs}) == 1  # equal budget
    table = json.loads((tmp_path / "results.json").read_text())["table"]["independent"]
    assert table["oracle"]["paired_vs_reference"]["mean"] < 0  # ahead of uniform LoRA, seed by seed on average
    assert all(r["divergence"] < 1 for r in runs if r["method"] == "oracle")
    assert table["oracle"]["spearman"]["mean"] == pytest.approx(1.0)
    markdown = (tmp_path / "results.md").read_text()
    assert "## independent" in markdown and "| oracle |" in markdown
    # resumable: a second call finds every run done and only rewrites the tables
    assert capacity.main(["--out", str(tmp_path), "--preset", "smoke"]) == 0
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 6
