"""Measure builtin:smollm2-moe against the dense SmolLM2-135M it is built from (numbers for docs/MODELS.md).

    python bench/builtin_model.py [--designs 10,15,30] [--steps 4] [--out bench_builtin.json]

* equivalence: max |logit difference| MoE vs dense, and perplexity of both on held-out text of each calibration
  domain (news, SIQA, arithmetic);
* routing specialisation: Jensen-Shannon divergence of per-layer expert usage between domains (mean over MoE
  layers), against a news-vs-news split-half noise floor;
* training speed (tokens/s, batch 8x128, fp32): dense SmolLM2 with PEFT LoRA on up/down (the reference) and DR-LoRA
  on MoE designs with the last N layers upcycled, steps interleaved in one process (this machine's speed drifts,
  so only numbers from one run are compared);
* expert divergence: after those training steps, how different the experts of one layer are on the same tokens
  (relative difference of their outputs; exactly 0 at the start, when every expert is a copy of the dense FFN).
"""

import argparse
import json
import math
import statistics
import time

import torch

from drlora import DRLoRAConfig, get_dr_lora_model
from drlora.builtin.smollm2_moe import (build_info, calibration_texts, ffn_inputs, fit_routers, load_dense,
                                        moe_layer_indices, token_blocks, upcycle)
from drlora.loading import load_model


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
    """Share of routed slots per expert: [num_moe_layers, num_experts]."""
    experts = [layer.mlp.experts for layer in moe.model.layers if hasattr(layer.mlp, "experts")]
    usage = torch.zeros(len(experts), experts[0].num_experts)

    def hook(i):
        def count(module, args):
            usage[i] += torch.bincount(args[1].reshape(-1), minlength=usage.shape[1]).float()
        return count

    handles = [e.register_forward_pre_hook(hook(i)) for i, e in enumerate(experts)]
    for start in range(0, len(blocks), batch):
        moe(blocks[start:start + batch])
    for h in handles:
        h.remove()
    return usage / usage.sum(-1, keepdim=True)


def js_divergence(p, q):
    """Mean over layers of the Jensen-Shannon divergence (natural log) between two usage distributions."""
    m = (p + q) / 2
    kl = lambda a, b: (a * (a.clamp_min(1e-12) / b.clamp_min(1e-12)).log()).sum(-1)  # noqa: E731
    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).mean().item()


@torch.no_grad()
def expert_divergence(drlora_model, x):
    """Mean over MoE layers and expert pairs of ||E_i(h) - E_j(h)|| / ||E_i(h)|| on the hidden states h of `x`."""
    experts = [layer.experts for layer in drlora_model.moe_layers]
    captured = {}
    handles = [e.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0]))
               for i, e in enumerate(experts)]
    drlora_model.eval()
    drlora_model(x)
    for h in handles:
        h.remove()
    values = []
    for i, module in enumerate(experts):
        h = captured[i]
        n, num = h.shape[0], module.num_experts
        outs = [module(h, torch.full((n, 1), e, dtype=torch.long), torch.ones(n, 1)) for e in range(num)]
        for a in range(num):
            for b in range(a + 1, num):
                values.append(((outs[a] - outs[b]).norm() / outs[a].norm()).item())
    return statistics.mean(values)


def train_speed(models: dict, blocks: torch.Tensor, steps: int) -> dict:
    """Median tokens/s per model over `steps` timed steps (after one warm-up step), interleaved round-robin.

    `models` maps a name to (model, answer_tokens): None trains on every token (language-model loss); a number
    puts the loss on the last `answer_tokens` tokens only and computes the LM head only there (`logits_to_keep`),
    as supervised fine-tuning on short answers does (the SFT recipe left-pads so answers end the sequence)."""
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                  for n, (m, _) in models.items()}
    times = {n: [] for n in models}
    for step in range(steps + 1):
        batch = blocks[(step * 8) % len(blocks):][:8]
        for name, (model, answer) in models.items():
            model.train()
            start = time.perf_counter()
            if answer is None:
                loss = model(input_ids=batch, labels=batch).loss
            else:
                labels = batch[:, -(answer + 1):].clone()
                labels[:, 0] = -100  # the first kept position has no kept predecessor
                loss = model(input_ids=batch, labels=labels, logits_to_keep=answer + 1).loss
            loss.backward()
            if hasattr(model, "update_and_allocate"):
                model.update_and_allocate(step)
            optimizers[name].step()
            optimizers[name].zero_grad()
            if step:
                times[name].append(time.perf_counter() - start)
            print(f"  speed step {step} {name}: {time.perf_counter() - start:.2f} s", flush=True)
    return {n: round(batch.numel() / statistics.median(t), 1) for n, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--designs", default="10,15,30", help="numbers of upcycled upper layers to time")
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per model")
    parser.add_argument("--out", default=None, help="also write the report to this JSON file")
    args = parser.parse_args()

    moe, _ = load_model("builtin:smollm2-moe", dtype="float32")
    dense, tokenizer = load_dense()
    folder_info = build_info(moe.name_or_path)
    held_out = {name: token_blocks(tokenizer, texts[len(texts) // 2:], 4096)
                for name, texts in calibration_texts(folder_info["seed"]).items()}
    report = {"build": folder_info, "perplexity": {}, "max_abs_logit_difference": {}, "js_divergence": {}}
    for name, blocks in held_out.items():
        with torch.no_grad():
            difference = (moe(blocks[:4]).logits - dense(blocks[:4]).logits).abs().max().item()
        report["max_abs_logit_difference"][name] = difference
        report["perplexity"][name] = {"dense": perplexity(dense, blocks), "moe": perplexity(moe, blocks)}
        print(f"{name}: perplexity {report['perplexity'][name]}", flush=True)
    usage = {name: expert_usage(moe, blocks) for name, blocks in held_out.items()}
    names = list(usage)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            report["js_divergence"][f"{a}-{b}"] = js_divergence(usage[a], usage[b])
    half = len(held_out["news"]) // 2
    report["js_divergence"]["news-news (noise floor)"] = js_divergence(
        expert_usage(moe, held_out["news"][:half]), expert_usage(moe, held_out["news"][half:]))
    report["expert_usage_share_max"] = {n: u.max().item() for n, u in usage.items()}
    print(json.dumps(report["js_divergence"], indent=2), flush=True)

    del moe
    designs = [int(d) for d in args.designs.split(",")]
    num_layers, settings = dense.config.num_hidden_layers, folder_info
    calibration = torch.cat([token_blocks(tokenizer, t[: len(t) // 2], settings["calibration_tokens"])
                             for t in calibration_texts(settings["seed"]).values()])
    features = ffn_inputs(dense, calibration, moe_layer_indices(num_layers, max(designs)))
    routers = fit_routers(features, settings["num_experts"], settings["seed"], settings["router_temperature"])
    from peft import LoraConfig, get_peft_model

    def drlora_moe(n):
        moe_n = upcycle(dense, settings["num_experts"], settings["top_k"], routers, moe_layer_indices(num_layers, n))
        return get_dr_lora_model(moe_n, DRLoRAConfig(total_steps=100, growth_interval=10))

    models = {f"drlora, MoE in last {n} layers": (drlora_moe(n), None) for n in designs}
    models[f"drlora, MoE in last {designs[0]} layers, loss on the last 8 tokens"] = (drlora_moe(designs[0]), 8)
    peft_dense = get_peft_model(dense, LoraConfig(r=16, lora_alpha=32, target_modules=["up_proj", "down_proj"]))
    models["dense, PEFT LoRA r16 on up/down"] = (peft_dense, None)
    models["dense, PEFT LoRA r16 on up/down, loss on the last 8 tokens"] = (peft_dense, 8)
    train_blocks = torch.cat(list(held_out.values()))[torch.randperm(sum(len(b) for b in held_out.values()),
                                                                     generator=torch.Generator().manual_seed(0))]
    report["train_tokens_per_s"] = train_speed(models, train_blocks, args.steps)
    report["expert_divergence_after_training"] = {
        name: expert_divergence(m, train_blocks[:2]) for name, (m, _) in models.items() if hasattr(m, "moe_layers")}
    report["torch_threads"] = torch.get_num_threads()
    print(json.dumps(report, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
