"""What an MoE layer looks like. The only place that knows about model families.

transformers 5.x decorates every fused-experts class it can dispatch with `use_experts_implementation`, which
records the weight layout on the module (`is_transposed`, `is_concatenated`, `has_bias`, `has_gate`,
`has_post_expert_norm`) and gives it `_apply_gate`. We read that metadata and nothing else, so one code path serves
every decorated family. Families whose experts are not decorated get a clear error that names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Families with routed experts that transformers does not dispatch through `use_experts_implementation`.
UNSUPPORTED_FAMILIES = ("dbrx", "doge", "jetmoe", "llama4", "llama4_text", "longcat_flash")
_LAYOUT_ATTRS = ("is_transposed", "is_concatenated", "has_bias", "has_gate")


@dataclass(frozen=True)
class ProjectionGeometry:
    """Shape of one expert projection as a linear map: y = x @ W.T with W [out_features, in_features]."""

    in_features: int
    out_features: int


@dataclass
class MoELayer:
    """One MoE layer: its experts module, its router and the layout transformers recorded."""

    index: int
    name: str  # qualified name of the experts module
    experts: nn.Module
    router: nn.Module | None
    router_name: str | None
    num_experts: int
    hidden_size: int
    intermediate_size: int

    @property
    def has_gate(self) -> bool:
        return bool(self.experts.has_gate)

    @property
    def is_transposed(self) -> bool:
        return bool(self.experts.is_transposed)

    @property
    def is_concatenated(self) -> bool:
        return bool(self.experts.is_concatenated)

    def projections(self) -> tuple[str, ...]:
        return ("gate", "up", "down") if self.has_gate else ("up", "down")

    def geometry(self, projection: str) -> ProjectionGeometry:
        if projection == "down":
            return ProjectionGeometry(self.intermediate_size, self.hidden_size)
        return ProjectionGeometry(self.hidden_size, self.intermediate_size)

    def out_slice(self, projection: str):
        """Columns of the fused gate_up output that belong to `projection` (concatenated or interleaved)."""
        if not self.has_gate or projection == "down":
            return slice(None)
        if self.is_concatenated:
            half = self.intermediate_size
            return slice(0, half) if projection == "gate" else slice(half, 2 * half)
        return slice(0, None, 2) if projection == "gate" else slice(1, None, 2)

    def fused_weight(self, projection: str) -> nn.Parameter:
        """The experts' fused parameter that holds `projection` (down_proj, gate_up_proj or up_proj)."""
        if projection == "down":
            return self.experts.down_proj
        return self.experts.gate_up_proj if self.has_gate else self.experts.up_proj

    @torch.no_grad()
    def add_to_weight(self, projection: str, delta: torch.Tensor) -> None:
        """Add a per-expert ΔW [E, out, in] (y = x @ W.T) to the fused weight, whatever its layout (transposed,
        concatenated or interleaved gate/up), rounded once to the weight's dtype: merging, and planting a known
        update (studies/capacity.py)."""
        weight, columns = self.fused_weight(projection), self.out_slice(projection)
        if self.is_transposed:  # [E, in, out]
            weight[:, :, columns] += delta.transpose(1, 2).to(weight.dtype)
        else:  # [E, out, in]
            weight[:, columns, :] += delta.to(weight.dtype)

    def shape_signature(self) -> dict:
        """What must match for an adapter to load onto this layer."""
        return {"name": self.name, "num_experts": self.num_experts, "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size, "has_gate": self.has_gate}


def _is_dispatched_experts(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in _LAYOUT_ATTRS) and hasattr(module, "num_experts")


def family_of(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every fused-experts module of `model`, in order, with its router. Raises ValueError if there is none."""
    family = family_of(model)
    if family in UNSUPPORTED_FAMILIES:
        raise ValueError(f"model family {family!r} is not supported: transformers does not dispatch its experts "
                         "through use_experts_implementation, which drlora relies on. Supported families include "
                         "olmoe, qwen2_moe, qwen3_moe, mixtral, deepseek_v2, deepseek_v3, gpt_oss, granitemoe, "
                         "phimoe, qwen3_next and glm4_moe.")
    layers = []
    for name, module in model.named_modules():
        if not _is_dispatched_experts(module):
            continue
        if getattr(module, "_is_expert_parallel", False):
            raise ValueError(f"{name} is expert-parallel (sharded experts); drlora does not support expert "
                             "parallelism yet — load the model without it.")
        layers.append(_describe(model, len(layers), name, module))
    if not layers:
        undecorated = [n for n, m in model.named_modules() if n.endswith("experts") or "Experts" in type(m).__name__]
        if undecorated:
            raise ValueError(f"model family {family!r} has experts ({undecorated[0]}, class "
                             f"{type(model.get_submodule(undecorated[0])).__name__}) that transformers does not "
                             "dispatch through use_experts_implementation; drlora cannot adapt them.")
        raise ValueError(f"no routed experts found in this {family!r} model: drlora looked for fused-experts modules "
                         "decorated with transformers' use_experts_implementation (attributes is_transposed, "
                         "is_concatenated, has_bias, has_gate). Is this a dense model? Use plain LoRA (peft) for it.")
    return layers


def _describe(model: nn.Module, index: int, name: str, experts: nn.Module) -> MoELayer:
    num_experts = int(experts.num_experts)
    up = experts.gate_up_proj if experts.has_gate else experts.up_proj
    down = experts.down_proj
    if experts.is_transposed:  # [E, H, n*I] and [E, I, H]
        hidden, intermediate = down.shape[2], down.shape[1]
    else:  # [E, n*I, H] and [E, H, I]
        hidden, intermediate = down.shape[1], down.shape[2]
    expected_up = intermediate * (2 if experts.has_gate else 1)
    up_out = up.shape[2] if experts.is_transposed else up.shape[1]
    if up.shape[0] != num_experts or up_out != expected_up:
        raise ValueError(f"{name}: unexpected expert weight shapes {tuple(up.shape)} / {tuple(down.shape)} for "
                         f"{num_experts} experts; drlora cannot read this layout.")
    router_name, router = _find_router(model, name, num_experts, hidden)
    return MoELayer(index, name, experts, router, router_name, num_experts, hidden, intermediate)


def _find_router(model: nn.Module, experts_name: str, num_experts: int, hidden: int):
    """The router is the sibling of the experts module that holds a [num_experts, hidden] weight (directly, or
    inside it as in Hunyuan's `gate.wg`)."""
    parent_name = experts_name.rsplit(".", 1)[0] if "." in experts_name else ""
    parent = model.get_submodule(parent_name) if parent_name else model
    experts = model.get_submodule(experts_name)
    for child_name, child in parent.named_children():
        if child is experts:
            continue
        if any(tuple(p.shape) == (num_experts, hidden) for p in child.parameters()):
            return f"{parent_name}.{child_name}" if parent_name else child_name, child
    return None, None
