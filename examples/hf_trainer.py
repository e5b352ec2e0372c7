"""DR-LoRA with transformers.Trainer on a tiny random MoE (about 10 s on 2 CPU cores).

    python examples/hf_trainer.py [output_dir]

The only DR-LoRA-specific line in the Trainer setup is `callbacks=[DRLoRACallback()]`: it takes total_steps from
the Trainer and calls `update_and_allocate` at every optimizer step (after the gradients of all micro-batches are
accumulated and clipped, before the optimizer step); it prints a line per growth event.

Checkpoints: a DRLoRAModel is a plain nn.Module wrapper, not a PreTrainedModel, so the Trainer's own checkpoints
(save_strategy="steps") hold `safetensors.save_file(model.state_dict())` — and a DRLoRAModel's state_dict is
drlora's state alone (LoRA factors, trained routers, rank masks, routing and importance EMAs, last step; no frozen
base weight), which is what `trainer.train(resume_from_checkpoint=...)` needs to resume the growth schedule where it
stopped. DRLoRACallback also writes the adapter (`save_pretrained`) into every checkpoint folder and into
output_dir when training ends, so each loads with `load_dr_lora_model(base, folder)`.
"""

import logging
import os
import sys

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

from drlora import DRLoRACallback, DRLoRAConfig, get_dr_lora_model

VOCAB, LENGTH = 256, 32


class SkillData(torch.utils.data.Dataset):
    """Sequences of four synthetic skills in disjoint token ranges (counting, motifs, mirrors, strides)."""

    def __init__(self, size: int = 512):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        skill, start = i % 4, int(torch.randint(0, 64, (1,), generator=g))
        if skill == 0:
            row = [(start + t) % 64 for t in range(LENGTH)]
        elif skill == 1:
            motif = torch.randint(0, 64, (4,), generator=g).tolist()
            row = [motif[t % 4] for t in range(LENGTH)]
        elif skill == 2:
            half = torch.randint(0, 64, (LENGTH // 2,), generator=g).tolist()
            row = half + half[::-1]
        else:
            row = [(start + 3 * t) % 64 for t in range(LENGTH)]
        ids = torch.tensor([64 * skill + v for v in row])
        return {"input_ids": ids, "labels": ids.clone()}


def tiny_qwen2_moe() -> torch.nn.Module:
    """A random 4-layer Qwen2-MoE (16 experts, top-4, a shared expert), built from a config: no download."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                  num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                                  max_position_embeddings=LENGTH, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(config)


def main(output_dir: str = "runs/hf_trainer_example") -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # demo-sized model: threads gain nothing, and spin badly when the CPU is shared
    # total_steps is left unset: the callback takes it from the Trainer (max_steps, or epochs x batches)
    model = get_dr_lora_model(tiny_qwen2_moe(), DRLoRAConfig(r_init=4, r_target=8, r_max=16, growth_interval=10,
                                                             warmup_ratio=0.05, lora_dropout=0.0))
    model.print_trainable_parameters()
    args = TrainingArguments(output_dir=output_dir, max_steps=120, per_device_train_batch_size=8,
                             gradient_accumulation_steps=1, learning_rate=1e-2, lr_scheduler_type="linear",
                             warmup_steps=6, weight_decay=0.0, logging_steps=20,
                             save_strategy="steps", save_steps=60, save_total_limit=1,
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=SkillData(), callbacks=[DRLoRACallback()])
    trainer.train()

    print("final rank map (layers x experts):")
    for layer, row in enumerate(model.rank_map().tolist()):
        print(f"  layer {layer}: {row}  (mean {sum(row) / len(row):.1f})")

    # the Trainer's last checkpoint holds the DR-LoRA state: resume with trainer.train(resume_from_checkpoint=True)
    checkpoint = os.path.join(output_dir, f"checkpoint-{trainer.state.global_step}")
    saved = safetensors.torch.load_file(os.path.join(checkpoint, "model.safetensors"))
    state = model.state_dict()
    masks = [k for k in saved if k.endswith("rank_mask")]
    same = all(torch.equal(saved[k], state[k]) for k in masks)
    print(f"Trainer checkpoint {checkpoint}: {len(saved)} tensors, {len(masks)} rank masks "
          f"({'equal to' if same else 'DIFFERENT from'} the trained model's), last_step {int(saved['last_step'])}")

    print(f"adapter written to {output_dir} by DRLoRACallback at the end of training "
          f"({', '.join(sorted(f for f in os.listdir(output_dir) if f.startswith('adapter')))})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
