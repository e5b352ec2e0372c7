"""DR-LoRA with transformers.Trainer on a tiny random MoE (under a minute on 2 CPU cores).

The only DR-LoRA-specific line in the Trainer setup is `callbacks=[DRLoRACallback()]`: it takes total_steps from
the Trainer and calls `update_and_allocate` at every optimizer step.
"""

import logging

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


def main(output_dir: str = "runs/hf_trainer_example") -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2_moe", vocab_size=VOCAB, hidden_size=64, intermediate_size=64,
                                  moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                  num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1, mlp_only_layers=[],
                                  max_position_embeddings=LENGTH, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    base = AutoModelForCausalLM.from_config(config)
    # total_steps is left unset: the callback takes it from the Trainer
    model = get_dr_lora_model(base, DRLoRAConfig(r_init=4, r_target=8, r_max=16, growth_interval=10,
                                                 warmup_ratio=0.05, lora_dropout=0.0))
    model.print_trainable_parameters()
    args = TrainingArguments(output_dir=output_dir, max_steps=120, per_device_train_batch_size=8,
                             learning_rate=3e-3, lr_scheduler_type="linear", warmup_steps=6, weight_decay=0.0,
                             logging_steps=20, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=SkillData(), callbacks=[DRLoRACallback()])
    trainer.train()
    print("final rank map (layers x experts):")
    for layer, row in enumerate(model.rank_map().tolist()):
        print(f"  layer {layer}: {row}  (mean {sum(row) / len(row):.1f})")
    model.save_pretrained(f"{output_dir}/adapter")
    print(f"adapter written to {output_dir}/adapter")


if __name__ == "__main__":
    main()
