"""`method=`: DR-LoRA and the baselines it is compared with, all on the engine's expert-LoRA layer.

Every method adapts the same projections of the same experts with the same LoRA math, optimizer, data and router
treatment (frozen in warmup, trained after, unless drlora.train_router=false); only the rank allocation differs, so
a difference in the results comes from the allocation. The budget is the same by construction — every layer holds
`num_experts * r_target` active ranks per adapted projection at the end — and `parameter_counts()` reports it.

| method           | ranks                                                                                         |
|------------------|-----------------------------------------------------------------------------------------------|
| dr-lora          | grown from r_init by saliency f·g/(r+1)^γ (the paper)                                          |
| importance-only  | grown by g/(r+1)^γ: no routing term (IncreLoRA-like; the key ablation of the routing signal)  |
| lora             | uniform r_target on every expert, r_max = r_target (PERFT-E); r_target=32 gives equal reserved |
| static-freq      | ∝ routing frequency measured on the training data before training, capped at r_max            |
| esft             | only the experts covering baseline.esft_top_p of each layer's routing score, sharing the budget |
| adalora-prune    | from r_max, pruned by smoothed importance to r_target on AdaLoRA's cubic schedule              |
"""

from __future__ import annotations

import random

from ..allocator import esft_ranks, proportional_ranks
from ..model import DRLoRAModel, get_dr_lora_model
from ..routing_stats import measure_routing
from .config import METHOD_SETTINGS

MEASURED = ("static-freq", "esft")


def build_method_model(config, base, examples: list[dict], total_steps: int, pad_token_id: int,
                       log=print) -> tuple[DRLoRAModel, dict]:
    """The base model wrapped for `config.method`, and what the method measured (for metrics.json)."""
    method = config.method
    engine = config.drlora_config(total_steps, **METHOD_SETTINGS[method])
    details: dict = {}
    ranks = None
    if method == "lora":
        engine = config.drlora_config(total_steps, **METHOD_SETTINGS[method], r_max=engine.r_target)
    elif method in MEASURED:
        routing = _measure(config, base, examples, pad_token_id, log)
        details["calibration_tokens"] = routing["tokens"]
        if method == "static-freq":
            ranks = proportional_ranks(routing["gate"], r_target=engine.r_target, r_max=engine.r_max)
        else:
            b = config.baseline
            ranks = esft_ranks(routing[b.esft_score], top_p=b.esft_top_p, r_target=engine.r_target)
            engine = config.drlora_config(total_steps, **METHOD_SETTINGS[method], r_max=int(ranks.max()))
            details["experts_adapted"] = int((ranks > 0).sum())
    model = get_dr_lora_model(base, engine)
    if ranks is not None:
        model.set_rank_map(ranks)
    return model, details


def _measure(config, base, examples, pad_token_id, log) -> dict:
    """Routing statistics on a seeded sample of the training rows (the same on every process)."""
    count = min(config.baseline.calibration_rows, len(examples))
    chosen = sorted(random.Random(config.seed).sample(range(len(examples)), count))
    log(f"drlora: {config.method}: measuring the routing on {count} training rows", flush=True)
    return measure_routing(base, [list(examples[i]["input_ids"]) for i in chosen], pad_token_id=pad_token_id)


def build_peft_model(config, base, total_steps: int):
    """`peft-lora`: vanilla PEFT LoRA through `target_parameters` on the fused expert weights, as an outside
    reference. PEFT adapts whole fused parameters (gate and up together when the experts fuse them) at one rank,
    materialises each expert's ΔW in every forward, refuses LoRA dropout on parameters (so it trains without), and
    leaves the router frozen — so its budget differs from the others' (metrics.json shows by how much)."""
    from peft import LoraConfig, get_peft_model

    from ..layout import find_moe_layers
    from ..peft_export import fused_parameter_names

    engine = config.drlora_config(total_steps, allocation="fixed")
    layers = find_moe_layers(base)
    parameters = fused_parameter_names(layers, engine.target_projections)
    rank = engine.r_target
    # PEFT refuses dropout on parameters: drlora.lora_dropout does not apply to this baseline
    lora = LoraConfig(r=rank, lora_alpha=engine.scaling * rank, lora_dropout=0.0, target_modules=[],
                      target_parameters=parameters, task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(base, lora)
    reserved = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = {"parameters": {"active": reserved, "reserved": reserved, "trainable": trainable,
                              "total": sum(p.numel() for p in model.parameters())},
               "rank_map": [[rank] * layer.num_experts for layer in layers],
               "layer_names": [layer.name for layer in layers], "r_init": rank, "r_target": rank, "r_max": rank,
               "growth_events": 0}
    return model, summary
