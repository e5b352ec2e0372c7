"""TRL's SFTTrainer with a DRLoRAModel, the plain way: `SFTTrainer(model=drlora_model, callbacks=[DRLoRACallback()])`.

TRL's loss calls `model.base_model` for hidden states and applies the LM head itself (its fused LM-head path), and
saves and resumes the model as the Trainer does for any non-PreTrainedModel (`model.safetensors` from state_dict).
"""

import pytest
import safetensors.torch
import torch
from transformers import TrainerCallback

from drlora import DRLoRACallback, get_dr_lora_model, load_dr_lora_model
from tiny_models import small_config, tiny_moe, token_batch

trl = pytest.importorskip("trl")

STEPS, SAVE_AT = 12, 6  # small_config with total_steps from the Trainer: events at steps 2-8


def word_tokenizer():
    """A tokenizer for the tiny models' 128-token vocabulary ("w0" ... "w127"), built in memory (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(128)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="w1", eos_token="w2", unk_token="w0")


def texts():
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(64):
        length = int(torch.randint(6, 16, (1,), generator=generator))
        rows.append(" ".join(f"w{int(t)}" for t in torch.randint(3, 128, (length,), generator=generator)))
    return Dataset.from_dict({"text": rows})  # rows of different lengths: TRL pads them


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


def sft(output_dir, bf16=False, stop=None, resume=None):
    model = get_dr_lora_model(tiny_moe("qwen3_moe"), small_config(total_steps=None))
    args = trl.SFTConfig(output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                         bf16=bf16, use_cpu=True, report_to=[], save_steps=SAVE_AT, logging_steps=1, max_length=32,
                         seed=0, disable_tqdm=True)
    callbacks = [DRLoRACallback()] + ([StopAt(stop)] if stop else [])
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=texts(), processing_class=word_tokenizer(),
                             callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_sft_trainer_trains_grows_saves_reloads_and_resumes_exactly(tmp_path):
    full, trainer = sft(tmp_path / "full")
    ranks = full.rank_map()
    assert (ranks.sum(-1) == 8 * 4).all() and len(set(ranks.flatten().tolist())) > 1  # grew, unevenly
    assert losses(trainer)[-1] < losses(trainer)[0]

    # save_model: an adapter folder (written by the callback at train end) beside the Trainer's model.safetensors,
    # which holds drlora's state only — no base weight
    trainer.save_model()
    saved = safetensors.torch.load_file(tmp_path / "full" / "model.safetensors")
    assert not any("embed_tokens" in key or "self_attn" in key for key in saved)
    x = token_batch()
    with torch.no_grad():
        expected = full(x).logits
        reloaded = load_dr_lora_model(tiny_moe("qwen3_moe"), tmp_path / "full")
        assert torch.equal(reloaded(x).logits, expected)
        checkpoint = load_dr_lora_model(tiny_moe("qwen3_moe"), tmp_path / "full" / f"checkpoint-{SAVE_AT}")
        assert not torch.equal(checkpoint(x).logits, expected)  # the checkpoint's adapter is the one of step 6

    # stopped after step 6, resumed from its checkpoint: the same losses, rank map and factors as without a break
    sft(tmp_path / "cut", stop=SAVE_AT)
    resumed, resumed_trainer = sft(tmp_path / "cut", resume=str(tmp_path / "cut" / f"checkpoint-{SAVE_AT}"))
    assert losses(resumed_trainer)[-(STEPS - SAVE_AT):] == losses(trainer)[-(STEPS - SAVE_AT):]
    assert torch.equal(resumed.rank_map(), ranks)
    for (name, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name


def test_sft_trainer_with_trls_default_bf16_trains_and_grows(tmp_path):
    model, trainer = sft(tmp_path, bf16=True)  # autocast on the CPU, as TRL's default bf16=True sets it up
    assert (model.rank_map().sum(-1) == 8 * 4).all()
    assert all(torch.isfinite(torch.tensor(losses(trainer))))


def test_base_model_is_the_backbone_and_get_base_model_the_adapted_model():
    base = tiny_moe("qwen3_moe")
    model = get_dr_lora_model(base, small_config())
    assert model.get_base_model() is base and model.base_model is base.model
    assert next(iter(model.state_dict())).startswith(("model.", "last_step"))
    x = token_batch()
    with torch.no_grad():
        hidden = model.base_model(input_ids=x).last_hidden_state
        torch.testing.assert_close(model.get_output_embeddings()(hidden), model(x).logits)
