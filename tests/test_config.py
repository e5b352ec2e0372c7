"""Validation: bad configs and unsuitable models are refused with one sentence that says what would work."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from drlora import DRLoRAConfig, get_dr_lora_model
from tiny_models import small_config, tiny_moe, train


@pytest.mark.parametrize("kwargs, message", [
    (dict(r_init=0), "r_init must be a positive integer"),
    (dict(r_init=2.5), "r_init must be a positive integer"),
    (dict(r_init=16, r_target=8), "r_init <= r_target <= r_max"),
    (dict(r_target=64), "r_init <= r_target <= r_max"),
    (dict(target_projections=("up", "dwn")), "unknown projection 'dwn'.*did you mean 'down'"),
    (dict(target_projections=()), "target_projections is empty"),
    (dict(importance="prod"), "importance must be one of.*did you mean 'product'"),
    (dict(lora_dropout=1.5), "lora_dropout must be in"),
    (dict(gamma=-1), "gamma must be >= 0"),
    (dict(total_steps=300, growth_interval=200), "cannot reach r_target.*use"),
])
def test_bad_config_values_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DRLoRAConfig(**kwargs)


def test_unknown_keys_are_refused():
    with pytest.raises(TypeError):
        DRLoRAConfig(r_tagret=4)
    with pytest.raises(ValueError, match="did you mean 'growth_interval'"):
        DRLoRAConfig.from_dict({"growth_intervall": 10})


def test_paper_defaults():
    config = DRLoRAConfig(total_steps=3750)
    assert (config.r_init, config.r_target, config.r_max) == (8, 16, 32)
    assert config.scaling == 2.0 and config.grow_per_event == 3
    assert config.target_projections == ("up", "down")
    schedule = config.schedule()
    assert schedule.warmup_steps == 113 and schedule.events[-1] <= 3750 - 200


def test_dense_model_is_refused_naming_what_was_looked_for():
    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
    dense = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="no routed experts found in this 'llama' model.*use_experts_implementation"):
        get_dr_lora_model(dense, small_config())


def test_unsupported_family_is_named():
    cfg = AutoConfig.for_model("jetmoe", vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, kv_channels=8, num_local_experts=4, num_experts_per_tok=2,
                               intermediate_size=16)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(ValueError, match="model family 'jetmoe' is not supported"):
        get_dr_lora_model(model, small_config())


def test_update_without_total_steps_says_how_to_fix():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(total_steps=None))
    with pytest.raises(ValueError, match="total_steps is not set"):
        model.update_and_allocate(0)


def test_extra_module_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="'qq_proj' matches no module"):
        get_dr_lora_model(tiny_moe("olmoe"), small_config(extra_target_modules=("qq_proj",)))


def test_router_is_in_the_optimizer_from_the_start_and_frozen_during_warmup():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(total_steps=40, growth_interval=10, warmup_ratio=0.1))
    routers = [layer.router.weight for layer in model.moe_layers]
    assert all(r.requires_grad for r in routers)
    start = [r.detach().clone() for r in routers]
    optimizer, _ = train(model, steps=4, weight_decay=0.1)  # warmup is steps 0..3
    assert all(torch.equal(a, b) for a, b in zip(start, routers))
    train(model, steps=2, start=4, optimizer=optimizer)
    assert all(not torch.equal(a, b) for a, b in zip(start, routers))


def test_train_router_false_keeps_it_frozen():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(train_router=False))
    routers = [layer.router.weight for layer in model.moe_layers]
    start = [r.detach().clone() for r in routers]
    train(model, steps=6)
    assert all(not r.requires_grad for r in routers)
    assert all(torch.equal(a, b) for a, b in zip(start, routers))


def test_base_weights_are_frozen_and_lora_trainable():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(train_router=False))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".dr_lora." in name for name in trainable)
