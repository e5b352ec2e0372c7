"""export_peft: vanilla PEFT loads the exported adapter and reproduces the DR-LoRA model's logits."""

import json

import pytest
import torch
from peft import PeftModel

from drlora import get_dr_lora_model
from tiny_models import FAMILIES, small_config, tiny_moe, token_batch, train


def adapted_and_peft_logits(family, tmp_path, **overrides):
    model = get_dr_lora_model(tiny_moe(family), small_config(**overrides))
    train(model, steps=6)  # through two growth events: ranks differ per expert, router trained
    assert len(set(model.rank_map().flatten().tolist())) > 1
    x = token_batch(seed=5)
    with torch.no_grad():
        expected = model(x).logits.clone()
    model.export_peft(tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_moe(family), tmp_path).eval()
    with torch.no_grad():
        return expected, peft_model(x).logits


@pytest.mark.parametrize("projections", [("up", "down"), ("gate", "up", "down")])
@pytest.mark.parametrize("family", FAMILIES)
def test_vanilla_peft_reproduces_logits(family, projections, tmp_path):
    expected, got = adapted_and_peft_logits(family, tmp_path, target_projections=projections)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 * (2 if "gate" in projections else 1)


def test_extra_modules_and_frozen_router_export(tmp_path):
    expected, got = adapted_and_peft_logits("qwen2_moe", tmp_path, extra_target_modules=("q_proj",), extra_r=3,
                                            train_router=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] is None
