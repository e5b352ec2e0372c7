"""DRLoRACallback inside transformers.Trainer: same schedule as the plain loop, total_steps from the Trainer."""

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from drlora import DRLoRACallback, get_dr_lora_model
from tiny_models import small_config, tiny_moe, token_batch


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        ids = token_batch(seed=i, batch=1)[0]
        return {"input_ids": ids, "labels": ids.clone()}


class RouterWatch(TrainerCallback):
    """Snapshots the routers after every optimizer step."""

    def __init__(self, model):
        self.model, self.history = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.history.append([layer.router.weight.detach().clone() for layer in self.model.moe_layers])


def run_trainer(tmp_path, max_steps=16, base=None, resume=None, **trainer_args):
    model = get_dr_lora_model(base or tiny_moe("olmoe"), small_config(total_steps=None, growth_interval=4,
                                                                      warmup_ratio=0.2))
    start = [layer.router.weight.detach().clone() for layer in model.moe_layers]
    watch, callback = RouterWatch(model), DRLoRACallback()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             **{"save_strategy": "no", **trainer_args})
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback, watch]).train(
        resume_from_checkpoint=resume)
    return model, callback, watch, start


def test_trainer_follows_the_schedule_and_meets_the_budget(tmp_path):
    model, callback, watch, start = run_trainer(tmp_path)
    assert model.drlora_config.total_steps == 16
    schedule = model.schedule
    assert schedule.warmup_steps == 4 and schedule.events == (4, 8, 12)
    assert [e.step for e in callback.events] == list(schedule.events)
    assert (model.rank_map().sum(-1) == 8 * 4).all()
    # router: untouched through the warmup steps 0..3, trained from step 4 on
    for step in range(schedule.warmup_steps):
        assert all(torch.equal(a, b) for a, b in zip(watch.history[step], start))
    assert all(not torch.equal(a, b) for a, b in zip(watch.history[-1], start))


def test_trainer_checkpoint_of_a_tied_model_resumes_to_the_same_adapter(tmp_path):
    def tied():
        return tiny_moe("mixtral", tie_word_embeddings=True)

    full, _, _, _ = run_trainer(tmp_path / "a", base=tied(), save_strategy="steps", save_steps=6)
    assert (tmp_path / "a" / "checkpoint-6" / "model.safetensors").is_file()
    resumed, callback, _, _ = run_trainer(tmp_path / "a", base=tied(), resume=str(tmp_path / "a" / "checkpoint-6"))
    assert [e.step for e in callback.events] == [8, 12]  # the events before step 6 came from the checkpoint
    assert len(set(full.rank_map().flatten().tolist())) > 1
    assert torch.equal(resumed.rank_map(), full.rank_map())
    for a, b in zip(resumed.expert_loras(), full.expert_loras()):
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=1e-6, rtol=1e-6)
