"""Export a DR-LoRA adapter as a vanilla PEFT LoRA adapter (`peft.PeftModel.from_pretrained` loads it).

PEFT (>= 0.21) adapts a fused 3-D expert parameter with `target_parameters`, using one rank for all experts of a
parameter: `lora_A.weight` is [r·E, in] with expert e's rank k in row e·r + k, and `lora_B.weight` is [out, r·E]
with it in column k·E + e (peft/tuners/lora/layer.py, `ParamWrapper.get_delta_weight`). So every expert's active
ranks are zero-padded to a common rank r. gate and up share one fused parameter in transformers; when both are
adapted, the fused delta is [B_g 0; 0 B_u]·[A_g; A_u], a rank-2·r_max update with B's rows at the layout's gate /
up positions (concatenated or interleaved). The scaling is kept by setting PEFT's lora_alpha = s · r.

PEFT's own key names are not re-derived by hand: a PEFT model is built on the meta device (no memory) from the base
model's config, and each of its LoRA weights is filled from the DR-LoRA tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora.layer import ParamWrapper
from safetensors.torch import save_file

from .fileio import atomic_write


def _padded_rank(model) -> int:
    projections = model.drlora_config.target_projections
    both = "gate" in projections and "up" in projections
    return model.drlora_config.r_max * (2 if both else 1)


@torch.no_grad()
def _fused_factors(layer, adapter, parameter: str, rank: int):
    """PEFT (A [r·E, in], B [out, r·E]) for one fused parameter ('gate_up_proj'/'up_proj' or 'down_proj')."""
    names = ["down"] if parameter == "down_proj" else [p for p in ("gate", "up") if p in adapter.projections]
    num_experts = layer.num_experts
    first = adapter.projections[names[0]]
    out = first.out_features if parameter == "down_proj" else (2 if layer.has_gate else 1) * layer.intermediate_size
    a = torch.zeros(num_experts, rank, first.in_features)
    b = torch.zeros(num_experts, out, rank)
    for slot, name in enumerate(names):
        lora = adapter.projections[name]
        mask = lora.rank_mask.cpu().float()
        cols = slice(slot * lora.r_max, (slot + 1) * lora.r_max)
        a[:, cols] = lora.lora_A.detach().float().cpu() * mask.unsqueeze(-1)
        b[:, layer.out_slice(name), cols] = lora.lora_B.detach().float().cpu() * mask.unsqueeze(1)
    return a.reshape(num_experts * rank, -1), b.permute(1, 2, 0).reshape(out, rank * num_experts)


def fused_parameter_names(layers, projections) -> list[str]:
    """PEFT `target_parameters` covering `projections` of these MoE layers: PEFT adapts whole fused weights, so
    gate or up means gate_up_proj (up_proj where the experts have no gate), and down means down_proj."""
    names = []
    for layer in layers:
        if {"gate", "up"} & set(projections):
            names.append(f"{layer.name}.{'gate_up_proj' if layer.has_gate else 'up_proj'}")
        if "down" in projections:
            names.append(f"{layer.name}.down_proj")
    return names


def _lora_config(model, rank: int) -> LoraConfig:
    cfg = model.drlora_config
    parameters = fused_parameter_names(model.moe_layers, cfg.target_projections)
    extra = [name for name, _, _ in model._extra_handles]
    pattern = {name: cfg.extra_rank for name in extra} if cfg.extra_rank != rank else {}
    alpha_pattern = {name: cfg.scaling * cfg.extra_rank for name in extra} if pattern else {}
    routers = [layer.router_name for layer in model.moe_layers] if cfg.train_router else None
    return LoraConfig(r=rank, lora_alpha=cfg.scaling * rank, lora_dropout=0.0, target_parameters=parameters,
                      target_modules=extra or [], rank_pattern=pattern, alpha_pattern=alpha_pattern,
                      modules_to_save=routers, task_type="CAUSAL_LM", bias="none",
                      base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None)


def _skeleton(model, lora_config: LoraConfig):
    """The PEFT model on the meta device, to learn PEFT's module names and key layout without allocating."""
    base = model.get_base_model()
    with torch.device("meta"):
        fresh = type(base)(base.config)
    return get_peft_model(fresh, lora_config)


def export_peft(model, save_directory) -> None:
    rank = _padded_rank(model)
    lora_config = _lora_config(model, rank)
    skeleton = _skeleton(model, lora_config)
    values: dict[str, torch.Tensor] = {}
    layers = {layer.name: (layer, adapter) for layer, adapter in zip(model.moe_layers, model.adapters)}
    extras = {name: module for name, module, _ in model._extra_handles}
    prefix = "base_model.model."
    for name, module in skeleton.named_modules():
        if isinstance(module, ParamWrapper):
            experts_name = name[len(prefix):].replace(".base_layer", "")
            layer, adapter = layers[experts_name]
            a, b = _fused_factors(layer, adapter, module.parameter_name, rank)
            values[f"{name}.lora_A.default.weight"], values[f"{name}.lora_B.default.weight"] = a, b
        elif name.startswith(prefix) and name[len(prefix):] in extras and hasattr(module, "lora_A"):
            lora = extras[name[len(prefix):]].dr_lora
            values[f"{name}.lora_A.default.weight"] = lora.lora_A.detach().float().cpu()
            values[f"{name}.lora_B.default.weight"] = lora.lora_B.detach().float().cpu()
    if lora_config.modules_to_save:
        for layer in model.moe_layers:
            for key, tensor in layer.router.state_dict().items():  # parameters and buffers (e.g. DeepSeek's bias)
                values[f"{prefix}{layer.router_name}.modules_to_save.default.{key}"] = tensor.detach().cpu()
    names = dict(skeleton.named_parameters())
    missing = [k for k in names if ("lora_" in k or "modules_to_save" in k) and k not in values]
    if missing:
        raise RuntimeError(f"export_peft could not fill PEFT weight {missing[0]}; please report this model family.")
    # every tensor in its own dtype: LoRA factors in float32 (PEFT keeps adapters of a bf16 model in float32 too),
    # routers as the base model holds them (their state_dict casts float32 masters back; DeepSeek-V3's float32
    # e_score_correction_bias stays float32 — rounding it to bf16 would change which experts are picked)
    state = {k: v.contiguous() for k, v in get_peft_model_state_dict(skeleton, state_dict=values).items()}
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / "adapter_model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    config = lora_config.to_dict()
    config["peft_type"] = "LORA"
    atomic_write(directory / "adapter_config.json", lambda p: Path(p).write_text(json.dumps(_jsonable(config), indent=2)))


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "value"):  # enums
        return value.value
    return value
