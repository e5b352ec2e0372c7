"""Saving, loading and merging DR-LoRA adapters. Reads only JSON and safetensors; writes each file atomically.

`adapter_model.safetensors` holds only the active ranks, packed per projection: A rows of every expert's active
ranks stacked expert by expert ([Σ_e r_e, in]) and the matching B columns ([out, Σ_e r_e]); the rank map in
`adapter_config.json` says where each expert's block starts. Routers are saved when they were trained. A resumable
checkpoint (`include_training_state=True`) adds `training_state.safetensors`: every DR-LoRA tensor at full r_max,
the masks, the EMAs of the growth signals and the last step, so a resumed run makes the same decisions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import DRLoRAConfig
from .fileio import atomic_write
from .sharding import any_sharded, copy_whole_into, whole

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
STATE_NAME = "training_state.safetensors"


def _adapter_tensors(model) -> dict[str, torch.Tensor]:
    """The packed active ranks, extra-module LoRA and trained routers, on the CPU (sharded tensors gathered)."""
    tensors = {}
    for layer, adapter in zip(model.moe_layers, model.adapters):
        for proj, lora in adapter.projections.items():
            key = f"{layer.name}.{proj}"
            mask = lora.rank_mask  # the active slots, wherever they are (pruning leaves gaps); loading packs them low
            lora_a, lora_b = whole(lora.lora_A.detach()), whole(lora.lora_B.detach())
            tensors[f"{key}.lora_A"] = torch.cat([lora_a[e][mask[e]] for e in range(lora.num_experts)])
            tensors[f"{key}.lora_B"] = torch.cat([lora_b[e][:, mask[e]] for e in range(lora.num_experts)], 1)
    for name, module, _ in model._extra_handles:
        tensors[f"{name}.lora_A"] = whole(module.dr_lora.lora_A.detach())
        tensors[f"{name}.lora_B"] = whole(module.dr_lora.lora_B.detach())
    if model.drlora_config.train_router:
        for layer in model.moe_layers:
            for pname, param in layer.router.named_parameters():
                tensors[f"{layer.router_name}.{pname}"] = whole(param.detach())
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def _training_state(model) -> dict[str, torch.Tensor]:
    """Every DR-LoRA tensor at full r_max, the masks, the EMAs and the last step (sharded tensors gathered)."""
    state = {"last_step": model.last_step.detach().cpu().reshape(1)}
    modules = [(f"{layer.name}.dr_lora", adapter) for layer, adapter in zip(model.moe_layers, model.adapters)]
    modules += [(f"{name}.dr_lora", module.dr_lora) for name, module, _ in model._extra_handles]
    for prefix, module in modules:
        for key, value in module.state_dict(keep_vars=True).items():
            state[f"{prefix}.{key}"] = whole(value.detach()).cpu().contiguous()
    return state


def base_identity(model) -> dict:
    config = getattr(model.get_base_model(), "config", None)
    return {"model_type": model.family, "name_or_path": getattr(config, "_name_or_path", None),
            "architectures": getattr(config, "architectures", None),
            "moe_layers": [layer.shape_signature() for layer in model.moe_layers]}


def saved_dtypes(model) -> dict:
    """What dtype each part of a saved adapter is in (float32 masters by default, see DRLoRAConfig.adapter_dtype),
    and the base weights' dtype they were trained beside."""
    def name(tensor):
        return str(tensor.dtype).removeprefix("torch.")

    layer = model.moe_layers[0]
    router = name(next(layer.router.parameters())) if model.drlora_config.train_router else None
    return {"base": name(layer.experts.down_proj), "lora": name(model.expert_loras()[0].lora_A), "router": router}


def save_adapter(model, save_directory, include_training_state: bool = False) -> None:
    """Write the adapter (and the training state). A model sharded by FSDP2 is gathered: every process must call
    this, and the first process writes the same files a 1-process run writes."""
    tensors = _adapter_tensors(model)  # gathers sharded factors (a collective) before any process may return
    state = _training_state(model) if include_training_state else None
    if any_sharded(model.parameters()) and torch.distributed.get_rank() != 0:
        return
    directory = Path(save_directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the adapter folder {directory}: {err.strerror}; choose a writable path.") from err
    meta = {"drlora_version": __version__, "format": "packed-active-ranks",
            "config": model.drlora_config.to_dict(), "rank_map": model.rank_map().tolist(),
            "base_model": base_identity(model), "router_trained": model.drlora_config.train_router,
            "extra_modules": [name for name, _, _ in model._extra_handles], "dtypes": saved_dtypes(model)}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    if state is not None:
        atomic_write(directory / STATE_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2)))


def read_adapter_config(save_directory) -> dict:
    path = Path(save_directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {save_directory} is not a drlora adapter folder "
                                "(save one with model.save_pretrained).")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); the adapter is damaged.") from err


def load_dr_lora_model(model: nn.Module, save_directory, is_trainable: bool = False):
    """Attach a saved DR-LoRA adapter to `model` (the same base it was trained on).

    With `is_trainable=True` and a resumable checkpoint, the full training state (all r_max ranks, masks, EMAs,
    step) is restored so training continues exactly; otherwise only the active ranks are loaded.
    """
    from .model import get_dr_lora_model

    meta = read_adapter_config(save_directory)
    config = DRLoRAConfig.from_dict(meta["config"])
    drlora = get_dr_lora_model(model, config)
    _check_base(drlora, meta["base_model"], save_directory)
    state_path = Path(save_directory) / STATE_NAME
    if is_trainable and state_path.is_file():
        _load_training_state(drlora, load_file(str(state_path)))
    else:
        _load_active(drlora, load_file(str(Path(save_directory) / WEIGHTS_NAME)), torch.tensor(meta["rank_map"]))
    if config.train_router:
        _load_routers(drlora, save_directory)
    if not is_trainable:
        for param in drlora.parameters():
            param.requires_grad_(False)
        drlora.eval()
    return drlora


def restore_training_state(drlora, save_directory) -> None:
    """Load a resumable checkpoint (`save_pretrained(dir, include_training_state=True)`) into an existing
    DRLoRAModel: every r_max rank, the masks, the EMAs of both growth signals, the last step and the routers — all a
    resumed training run needs to make the same decisions as an uninterrupted one. A model sharded by FSDP2 is
    restored too: every process reads the (adapter-sized) file and writes the experts it holds."""
    meta = read_adapter_config(save_directory)
    _check_base(drlora, meta["base_model"], save_directory)
    state_path = Path(save_directory) / STATE_NAME
    if not state_path.is_file():
        raise FileNotFoundError(f"{save_directory} has no {STATE_NAME}: it is an adapter, not a resumable "
                                "checkpoint (save one with include_training_state=True).")
    _load_training_state(drlora, load_file(str(state_path)))
    if drlora.drlora_config.train_router:
        _load_routers(drlora, save_directory)


@torch.no_grad()
def _load_routers(drlora, save_directory) -> None:
    weights = load_file(str(Path(save_directory) / WEIGHTS_NAME))
    for layer in drlora.moe_layers:
        for pname, param in layer.router.named_parameters():
            copy_whole_into(param, weights[f"{layer.router_name}.{pname}"])


def _check_base(drlora, saved: dict, where) -> None:
    ours = base_identity(drlora)
    if saved["model_type"] != ours["model_type"]:
        raise ValueError(f"the adapter in {where} was trained on a {saved['model_type']!r} model, not on this "
                         f"{ours['model_type']!r} one; load it onto its own base model.")
    if saved["moe_layers"] != ours["moe_layers"]:
        for a, b in zip(saved["moe_layers"], ours["moe_layers"]):
            if a != b:
                raise ValueError(f"the adapter in {where} does not fit this model: MoE layer {a['name']} was "
                                 f"{a}, this model has {b}; load it onto the base model it was trained on.")
        raise ValueError(f"the adapter in {where} has {len(saved['moe_layers'])} MoE layers, this model has "
                         f"{len(ours['moe_layers'])}; load it onto the base model it was trained on.")


@torch.no_grad()
def _load_active(drlora, tensors: dict[str, torch.Tensor], rank_map: torch.Tensor) -> None:
    for layer, adapter, ranks in zip(drlora.moe_layers, drlora.adapters, rank_map.tolist()):
        for proj, lora in adapter.projections.items():
            a, b = tensors[f"{layer.name}.{proj}.lora_A"], tensors[f"{layer.name}.{proj}.lora_B"]
            lora.set_ranks(ranks)
            start = 0
            for e, r in enumerate(ranks):
                lora.lora_A[e, :r] = a[start:start + r].to(lora.lora_A)
                lora.lora_B[e, :, :r] = b[:, start:start + r].to(lora.lora_B)
                start += r
    for name, module, _ in drlora._extra_handles:
        module.dr_lora.lora_A.copy_(tensors[f"{name}.lora_A"])
        module.dr_lora.lora_B.copy_(tensors[f"{name}.lora_B"])


@torch.no_grad()
def _load_training_state(drlora, state: dict[str, torch.Tensor]) -> None:
    drlora.last_step.copy_(state["last_step"][0])
    modules = [(f"{layer.name}.dr_lora.", adapter) for layer, adapter in zip(drlora.moe_layers, drlora.adapters)]
    modules += [(f"{name}.dr_lora.", module.dr_lora) for name, module, _ in drlora._extra_handles]
    for prefix, module in modules:
        saved = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not any_sharded(module.parameters()):
            module.load_state_dict(saved)  # (also reads older drlora versions' key names)
            continue
        ours = module.state_dict(keep_vars=True)  # sharded: each process writes the rows it holds
        if saved.keys() != ours.keys():
            missing, unexpected = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
            raise ValueError(f"the training state of {prefix[:-1]} does not match this model (missing {missing}, "
                             f"unexpected {unexpected}); resume with the drlora version and config that saved it.")
        for key, target in ours.items():
            copy_whole_into(target, saved[key])


@torch.no_grad()
def merge_and_unload(drlora) -> nn.Module:
    """Fold every ΔW into the base weights, remove drlora's modules and hooks, and return the plain model.

    The merged model is in the base weights' dtype throughout: each ΔW is computed in float32 and rounded once as it
    is added, and trained routers' float32 masters are rounded back to the dtype their forward computed with."""
    for layer, adapter in zip(drlora.moe_layers, drlora.adapters):
        experts = layer.experts
        for proj, lora in adapter.projections.items():
            layer.add_to_weight(proj, lora.delta_weight())  # [E, out, in], computed in float32
        del experts.dr_lora
        del experts.forward  # back to the class's forward (transformers' dispatch)
    for master in drlora._router_masters:  # routers back to the base dtype, as their forward computed them
        master.release()
    drlora._router_masters = []
    for handle in drlora._batch_hooks:
        handle.remove()
    drlora._batch_hooks = []
    for _, module, handle in drlora._extra_handles:
        module.weight += module.dr_lora.delta_weight().to(module.weight.dtype)
        handle.remove()
        del module.dr_lora
    drlora._extra_handles = []
    drlora._merged = True
    return drlora.get_base_model()
