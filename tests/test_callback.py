"""DRLoRACallback inside transformers.Trainer: total_steps from the Trainer, growth on the schedule's steps, the exact
budget, the router frozen through warmup, and the Trainer's own checkpoints (also of a tied-embedding model)."""

import logging
from types import SimpleNamespace

import safetensors.torch
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from drlora import DRLoRACallback, get_dr_lora_model
from tiny_models import TokenRows, small_config, tiny_moe

MAX_STEPS = 24
NUM_EXPERTS, R_INIT, R_TARGET = 8, 2, 4
# warmup ceil(0.2 * 24) = 5; events every 4 steps up to 24 - 4 = 20
WARMUP, EVENTS = 5, (5, 9, 13, 17)


class StepWatch(TrainerCallback):
    """Snapshots the routers, the rank map and one LoRA factor after every optimizer step."""

    def __init__(self, model):
        self.model = model
        self.routers, self.ranks, self.lora_B = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.routers.append([layer.router.weight.detach().clone() for layer in self.model.moe_layers])
        self.ranks.append(self.model.rank_map())
        self.lora_B.append(self.model.expert_loras()[0].lora_B.detach().clone())


def run_trainer(output_dir, base=None, resume=None, **trainer_args):
    # total_steps is left unset: the callback must take it from the Trainer
    model = get_dr_lora_model(base or tiny_moe("olmoe"), small_config(total_steps=None, growth_interval=4,
                                                                      warmup_ratio=0.2))
    start = {"routers": [layer.router.weight.detach().clone() for layer in model.moe_layers],
             "ranks": model.rank_map()}
    watch, callback = StepWatch(model), DRLoRACallback()
    args = TrainingArguments(output_dir=str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             **{"save_strategy": "no", **trainer_args})
    Trainer(model=model, args=args, train_dataset=TokenRows(), callbacks=[callback, watch]).train(
        resume_from_checkpoint=resume)
    return model, callback, watch, start


def test_trainer_follows_the_schedule_and_meets_the_budget(tmp_path):
    model, callback, watch, start = run_trainer(tmp_path)
    assert model.drlora_config.total_steps == MAX_STEPS
    assert model.schedule.warmup_steps == WARMUP and model.schedule.events == EVENTS
    assert len(watch.ranks) == MAX_STEPS

    # growth events at the schedule's steps, and only there; each spreads the remaining budget evenly
    assert [e.step for e in callback.events] == list(EVENTS)
    before = start["ranks"]
    for step, ranks in enumerate(watch.ranks):
        assert torch.equal(ranks, before) == (step not in EVENTS), step
        before = ranks
    per_event = [NUM_EXPERTS * R_INIT + 4 * (i + 1) for i in range(len(EVENTS))]  # 16 -> 20, 24, 28, 32
    assert [e.ranks.sum(-1).tolist() for e in callback.events] == [[n, n] for n in per_event]
    final = model.rank_map()
    assert (final.sum(-1) == NUM_EXPERTS * R_TARGET).all()
    assert len(set(final.flatten().tolist())) > 1  # heterogeneous

    # the router (train_router=True by default) is untouched through warmup, trained from its first step on,
    # while the LoRA trains from step 0
    for step in range(WARMUP):
        assert all(torch.equal(a, b) for a, b in zip(watch.routers[step], start["routers"])), step
    assert all(not torch.equal(a, b) for a, b in zip(watch.routers[WARMUP], watch.routers[WARMUP - 1]))
    assert all(not torch.equal(a, b) for a, b in zip(watch.routers[-1], watch.routers[WARMUP]))
    assert watch.lora_B[0].abs().sum() > 0


def test_callback_overrides_a_different_total_steps_in_the_config(caplog):
    model = get_dr_lora_model(tiny_moe("olmoe"), small_config(total_steps=40, growth_interval=4, warmup_ratio=0.2))
    assert model.schedule.total_steps == 40
    with caplog.at_level(logging.WARNING, logger="drlora"):
        DRLoRACallback().on_train_begin(None, SimpleNamespace(max_steps=MAX_STEPS), None, model=model)
    assert model.drlora_config.total_steps == MAX_STEPS and model.schedule.events == EVENTS
    assert "total_steps=40" in caplog.text


def test_trainer_checkpoint_of_a_tied_model_resumes_to_the_same_adapter(tmp_path):
    def tied():
        return tiny_moe("mixtral", tie_word_embeddings=True)

    full, _, _, _ = run_trainer(tmp_path / "a", base=tied(), save_strategy="steps", save_steps=8)
    checkpoint = tmp_path / "a" / "checkpoint-8"
    # the Trainer saves a non-PreTrainedModel as safetensors.save_file(model.state_dict()): drlora's state only —
    # no frozen base weight (so no tied pair either, which safetensors would refuse), all of the DR-LoRA state
    saved = safetensors.torch.load_file(checkpoint / "model.safetensors")
    trained = {n for n, p in full.named_parameters() if p.requires_grad}
    assert trained <= saved.keys() and all(".dr_lora." in k or k in trained or k == "last_step" for k in saved)
    assert not any("embed_tokens" in k or "lm_head" in k for k in saved)
    assert int(saved["last_step"]) == 7
    assert any(k.endswith("rank_mask") for k in saved) and any(k.endswith("frequency.ema") for k in saved)

    resumed, callback, _, _ = run_trainer(tmp_path / "a", base=tied(), resume=str(checkpoint))
    assert resumed.get_base_model().lm_head.weight is resumed.base_model.embed_tokens.weight  # tie survived
    assert [e.step for e in callback.events] == [9, 13, 17]  # the event at step 5 came from the checkpoint
    assert len(set(full.rank_map().flatten().tolist())) > 1
    assert torch.equal(resumed.rank_map(), full.rank_map())
    for a, b in zip(resumed.expert_loras(), full.expert_loras()):
        torch.testing.assert_close(a.lora_A, b.lora_A, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=1e-6, rtol=1e-6)
