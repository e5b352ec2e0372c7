"""DR-LoRA in a plain PyTorch loop on a tiny random MoE (runs in well under a minute on 2 CPU cores).

The data mixes four synthetic "skills" (counting, repeating, reversing, copying with an offset), each in its own
token range, so the router sends them to different experts and the growth signal has something to find.
"""

import logging
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from drlora import DRLoRAConfig, get_dr_lora_model

STEPS, BATCH, LENGTH, VOCAB = 200, 8, 32, 256


def make_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    rows = []
    for i in range(BATCH):
        skill = (step + i) % 4
        base = 64 * skill
        start = int(torch.randint(0, 64, (1,), generator=g))
        if skill == 0:  # counting
            row = [(start + t) % 64 for t in range(LENGTH)]
        elif skill == 1:  # a short motif repeated
            motif = torch.randint(0, 64, (4,), generator=g).tolist()
            row = [motif[t % 4] for t in range(LENGTH)]
        elif skill == 2:  # a half and its reverse
            half = torch.randint(0, 64, (LENGTH // 2,), generator=g).tolist()
            row = half + half[::-1]
        else:  # step of 3
            row = [(start + 3 * t) % 64 for t in range(LENGTH)]
        rows.append([base + v for v in row])
    return torch.tensor(rows)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    config = AutoConfig.for_model("olmoe", vocab_size=VOCAB, hidden_size=64, intermediate_size=32,
                                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                  num_experts=16, num_experts_per_tok=4, max_position_embeddings=LENGTH,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0)
    base = AutoModelForCausalLM.from_config(config)
    # DR-LoRA: ranks 4 -> 8 on average (of 16), growth every 16 steps after a short warmup
    model = get_dr_lora_model(base, DRLoRAConfig(r_init=4, r_target=8, r_max=16, total_steps=STEPS,
                                                 growth_interval=16, warmup_ratio=0.05, lora_dropout=0.0))
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    start = time.time()
    for step in range(STEPS):
        batch = make_batch(step)
        loss = model(batch, labels=batch).loss
        loss.backward()
        model.update_and_allocate(step)  # after backward, before optimizer.step()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == STEPS - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    print(f"trained {STEPS} steps in {time.time() - start:.1f}s")
    ranks = model.rank_map()
    print("final rank map (layers x experts):")
    for layer, row in enumerate(ranks.tolist()):
        print(f"  layer {layer}: {row}  (mean {sum(row) / len(row):.1f})")


if __name__ == "__main__":
    main()
