"""One code path for every family transformers dispatches through use_experts_implementation."""

import pytest
import torch

from drlora import get_dr_lora_model, load_dr_lora_model
from tiny_models import MORE_FAMILY_OVERRIDES, small_config, tiny_moe, token_batch, train


@pytest.mark.parametrize("family", sorted(MORE_FAMILY_OVERRIDES))
def test_family_is_exact_at_init_trains_to_budget_and_round_trips(family, tmp_path):
    base = tiny_moe(family)
    x = token_batch()
    with torch.no_grad():
        reference = base(x).logits.clone()
    model = get_dr_lora_model(base, small_config())
    with torch.no_grad():
        assert torch.equal(model(x).logits, reference)
    train(model, steps=12)
    experts = model.moe_layers[0].num_experts
    assert (model.rank_map().sum(-1) == experts * 4).all()
    with torch.no_grad():
        adapted = model(x).logits.clone()
    model.save_pretrained(tmp_path)
    loaded = load_dr_lora_model(tiny_moe(family), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, adapted)
        torch.testing.assert_close(loaded.merge_and_unload()(x).logits, adapted, atol=1e-5, rtol=1e-5)


def test_experts_without_gate_refuse_a_gate_projection():
    with pytest.raises(ValueError, match="has no 'gate' projection"):
        get_dr_lora_model(tiny_moe("nemotron_h"), small_config(target_projections=("gate", "up")))
