"""save_pretrained → load_dr_lora_model, merge_and_unload and resumable checkpoints reproduce the adapted model."""

import json

import pytest
import torch
from safetensors.torch import load_file

from drlora import DRLoRAConfig, get_dr_lora_model, load_dr_lora_model
from tiny_models import FAMILIES, small_config, tiny_moe, token_batch, train


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits.clone()


def trained(family, steps=6, **overrides):
    model = get_dr_lora_model(tiny_moe(family), small_config(**overrides))
    train(model, steps=steps)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_reproduces_logits_and_stores_only_active_ranks(family, tmp_path):
    model = trained(family, target_projections=("gate", "up", "down"))
    x = token_batch(seed=7)
    expected = logits(model, x)
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["rank_map"] == model.rank_map().tolist()
    assert meta["base_model"]["model_type"] == family
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer = model.moe_layers[0]
    assert tensors[f"{layer.name}.up.lora_A"].shape[0] == int(model.rank_map()[0].sum())
    assert f"{layer.router_name}.weight" in tensors  # the router was trained
    loaded = load_dr_lora_model(tiny_moe(family), tmp_path)
    assert torch.equal(loaded.rank_map(), model.rank_map())
    torch.testing.assert_close(logits(loaded, x), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_gives_a_plain_model_with_the_same_logits(family):
    model = trained(family, target_projections=("gate", "up", "down"))
    x = token_batch(seed=7)
    expected = logits(model, x)
    merged = model.merge_and_unload()
    assert not any("dr_lora" in name for name, _ in merged.named_modules())
    assert all("forward" not in layer.experts.__dict__ for layer in model.moe_layers)
    torch.testing.assert_close(logits(merged, x), expected, atol=1e-5, rtol=1e-5)


def test_calls_after_merging_say_the_model_was_merged(tmp_path):
    model = trained("olmoe")
    model.merge_and_unload()
    for call in (lambda: model.export_peft(tmp_path), lambda: model.save_pretrained(tmp_path), model.rank_map,
                 lambda: model.update_and_allocate(7), model.merge_and_unload):
        with pytest.raises(RuntimeError, match=r"merged into its base model by merge_and_unload\(\)"):
            call()
    assert not any(tmp_path.iterdir())


def test_extra_target_modules_save_load_and_merge(tmp_path):
    model = trained("qwen2_moe", extra_target_modules=("q_proj", "shared_expert.up_proj"))
    x = token_batch(seed=3)
    expected = logits(model, x)
    assert len(model._extra_handles) == 4  # 2 layers x (q_proj, shared_expert.up_proj)
    model.save_pretrained(tmp_path)
    loaded = load_dr_lora_model(tiny_moe("qwen2_moe"), tmp_path)
    torch.testing.assert_close(logits(loaded, x), expected, atol=0, rtol=0)
    torch.testing.assert_close(logits(loaded.merge_and_unload(), x), expected, atol=1e-5, rtol=1e-5)


def test_resume_from_training_state_continues_identically(tmp_path):
    config = dict(total_steps=12, growth_interval=3)
    reference = get_dr_lora_model(tiny_moe("olmoe"), small_config(**config))
    train(reference, steps=12)

    first = get_dr_lora_model(tiny_moe("olmoe"), small_config(**config))
    optimizer, _ = train(first, steps=5)
    first.save_pretrained(tmp_path, include_training_state=True)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")  # the trainer's job; test-only

    resumed = load_dr_lora_model(tiny_moe("olmoe"), tmp_path, is_trainable=True)
    assert int(resumed.last_step) == 4
    params = [p for p in resumed.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    train(resumed, steps=7, start=5, optimizer=optimizer)
    assert torch.equal(resumed.rank_map(), reference.rank_map())
    for a, b in zip(resumed.expert_loras(), reference.expert_loras()):
        torch.testing.assert_close(a.lora_A, b.lora_A, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=1e-6, rtol=1e-6)


def test_loading_onto_another_family_or_shape_is_refused(tmp_path):
    trained("olmoe", steps=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="trained on a 'olmoe' model, not on this 'mixtral'"):
        load_dr_lora_model(tiny_moe("mixtral"), tmp_path)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_dr_lora_model(tiny_moe("olmoe", num_experts=4), tmp_path)


def test_loading_a_folder_without_adapter_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a drlora adapter folder"):
        load_dr_lora_model(tiny_moe("olmoe"), tmp_path)


def test_unknown_config_key_in_a_saved_adapter_is_refused(tmp_path):
    trained("olmoe", steps=1).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["config"]["r_tagret"] = 3
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown DRLoRAConfig key 'r_tagret'.*did you mean 'r_target'"):
        load_dr_lora_model(tiny_moe("olmoe"), tmp_path)


def test_save_leaves_no_temporary_files(tmp_path):
    trained("olmoe", steps=1).save_pretrained(tmp_path, include_training_state=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                          "training_state.safetensors"]


def test_config_round_trips_through_dict():
    config = DRLoRAConfig(r_init=4, r_target=8, r_max=16, target_projections=("gate", "down"))
    assert DRLoRAConfig.from_dict(config.to_dict()) == config


def test_training_state_of_drlora_0_1_with_two_importance_buffers_still_loads():
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    state = model.state_dict()
    legacy = {}
    for name, value in state.items():
        if name.endswith("importance.ema"):  # 0.1 kept the A side and the B side, equal up to rounding
            legacy[name + "_a"], legacy[name + "_b"] = value + 1.0, value + 1.0
        else:
            legacy[name] = value
    model.load_state_dict(legacy)
    assert all(bool((lora.importance.ema == 1.0).all()) for lora in model.expert_loras())


def test_torchs_distributed_checkpoint_resolves_and_restores_the_drlora_state():
    """get/set_model_state_dict (what FSDP2 and accelerate checkpoint with) find each state_dict name by following
    attributes: the names must lead to the tensors they name, and the state must restore the adapted model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = trained("qwen2_moe", steps=8)
    x = token_batch()
    state = get_model_state_dict(model)
    assert state.keys() == model.state_dict().keys() and "last_step" in state
    fresh = get_dr_lora_model(tiny_moe("qwen2_moe"), small_config())
    set_model_state_dict(fresh, state)
    assert torch.equal(fresh.rank_map(), model.rank_map())
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_a_trainer_checkpoint_of_drlora_0_2_still_resumes():
    """0.2 registered the adapted model as `base_model` and saved it whole; 0.3 saves drlora's state under `model.`"""
    model = trained("olmoe", steps=8)
    old = {"base_model." + k.removeprefix("model.") if k.startswith("model.") else k: v
           for k, v in model.state_dict().items()}
    old |= {"base_model." + k: v for k, v in model.get_base_model().state_dict().items() if ".dr_lora." not in k}
    fresh = get_dr_lora_model(tiny_moe("olmoe"), small_config())
    fresh.load_state_dict(old)  # strict: every piece of drlora's state is found
    assert torch.equal(fresh.rank_map(), model.rank_map())
    x = token_batch()
    assert torch.equal(logits(fresh, x), logits(model, x))


def test_reset_adapter_state_gives_back_the_state_get_dr_lora_model_created():
    model = get_dr_lora_model(tiny_moe("qwen2_moe"), small_config(extra_target_modules=("q_proj",)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, steps=6)
    model.reset_adapter_state()
    routers = {f"model.{layer.router_name}.weight" for layer in model.moe_layers}  # base weights: trained, kept
    assert routers < initial.keys()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, initial[k])}
    assert changed == routers
