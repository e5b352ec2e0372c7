"""Measure builtin:smollm2-moe against dense SmolLM2-135M: perplexity on held-out text of each calibration domain,
routing specialisation (Jensen-Shannon divergence of per-layer expert usage between domains) and training speed.

    python bench/builtin_model.py            # prints a JSON report (numbers for docs/MODELS.md)
"""

import json
import math
import time

import torch
from transformers import AutoModelForCausalLM

from drlora import DRLoRAConfig, get_dr_lora_model
from drlora.builtin.smollm2_moe import GGUF_WHEEL, _asset, calibration_texts, ensure_built, load_dense, token_blocks


@torch.no_grad()
def perplexity(model, blocks, batch=8):
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch):
        b = blocks[start:start + batch]
        total += model(b, labels=b).loss.item() * b.numel()
        count += b.numel()
    return math.exp(total / count)


@torch.no_grad()
def expert_usage(moe, blocks, batch=8):
    num_experts = moe.config.num_local_experts
    usage = torch.zeros(len(moe.model.layers), num_experts)

    def hook(i):
        def count(module, args):
            usage[i] += torch.bincount(args[1].reshape(-1), minlength=num_experts).float()
        return count

    handles = [layer.mlp.experts.register_forward_pre_hook(hook(i)) for i, layer in enumerate(moe.model.layers)]
    for start in range(0, len(blocks), batch):
        moe(blocks[start:start + batch])
    for h in handles:
        h.remove()
    return usage / usage.sum(-1, keepdim=True)


def js_divergence(p, q):
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp_min(1e-12) / b.clamp_min(1e-12)).log()).sum(-1)  # noqa: E731
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).mean().item()


def train_speed(model, steps=5, batch=8, length=128):
    model = get_dr_lora_model(model, DRLoRAConfig(total_steps=100, growth_interval=10))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    x = torch.randint(0, model.config.vocab_size, (batch, length))
    times = []
    for step in range(steps):
        start = time.time()
        model(x, labels=x).loss.backward()
        model.update_and_allocate(step)
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.time() - start)
    return batch * length / sorted(times[1:])[len(times[1:]) // 2]


def main():
    folder = ensure_built()
    moe = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    dense, tokenizer = load_dense(_asset(GGUF_WHEEL))
    build = json.loads((folder / "drlora_build.json").read_text())
    held_out = {name: token_blocks(tokenizer, texts[len(texts) // 2:], 4096)
                for name, texts in calibration_texts(build["seed"]).items()}
    report = {"build": build, "perplexity": {}, "js_divergence": {}}
    for name, blocks in held_out.items():
        report["perplexity"][name] = {"dense": perplexity(dense, blocks), "moe": perplexity(moe, blocks)}
    usage = {name: expert_usage(moe, blocks) for name, blocks in held_out.items()}
    names = list(usage)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            report["js_divergence"][f"{a}-{b}"] = js_divergence(usage[a], usage[b])
    half = len(held_out["news"]) // 2
    report["js_divergence"]["news-news (noise floor)"] = js_divergence(
        expert_usage(moe, held_out["news"][:half]), expert_usage(moe, held_out["news"][half:]))
    report["drlora_train_tokens_per_s"] = train_speed(moe)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
