"""Tensors sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`): what drlora needs to read and write them.

Why: `fully_shard` turns every parameter into a DTensor sharded along dim 0 — for the expert LoRA factors
[E, r_max, in] / [E, out, r_max] that is the expert dimension, so each process holds whole experts. Training needs
nothing from here (inside forward and backward FSDP2 hands the modules their gathered parameters, and the growth
statistics come from the LoRA's own backward). What does: growth writes the new ranks of the experts a process
holds, into its local rows (every process makes the same decision, so no collective is needed); saving and export
gather each factor whole, a collective that every process must join.
"""

from __future__ import annotations

import torch


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    """True for a DTensor (a parameter after fully_shard)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def any_sharded(tensors) -> bool:
    return any(is_sharded(t) for t in tensors)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor: gathered from every process for a DTensor (a collective: every process must call it)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def local_rows(tensor: torch.Tensor) -> tuple[slice, torch.Tensor]:
    """(the global dim-0 rows this process holds, its local tensor): the whole tensor when it is not sharded.

    Only FSDP2's layout (sharded along dim 0, or replicated) is supported; another placement is refused rather
    than written to the wrong rows.
    """
    if not is_sharded(tensor):
        return slice(None), tensor
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in tensor.placements):
        raise NotImplementedError(f"drlora writes into tensors sharded along dim 0 only (FSDP2's layout); this one "
                                  f"is placed {tensor.placements}.")
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return slice(offset[0], offset[0] + shape[0]), tensor.to_local()


@torch.no_grad()
def copy_whole_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor (as saved) into `target`; for a sharded target, only the rows this process holds."""
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"a saved tensor of shape {tuple(value.shape)} cannot be loaded into one of shape "
                         f"{tuple(target.shape)}; load it onto the model and config it was saved from.")
    rows, local = local_rows(target)
    local.copy_(value[rows].to(local.device))


def refuse_zero3(parameters) -> None:
    """DeepSpeed ZeRO-3 partitions every parameter (each gets a `ds_id`) and hands a module its gathered copy only
    inside its own forward: drlora's growth and saving read and write whole factors outside any forward, so they
    would touch an empty placeholder. Refused in one sentence instead of failing deep inside DeepSpeed."""
    if any(hasattr(p, "ds_id") for p in parameters):
        raise RuntimeError("DeepSpeed ZeRO-3 is not supported yet: it keeps the LoRA factors partitioned across "
                           "processes, and drlora's growth and saving write and read them whole; use ZeRO-2 "
                           "(configs/accelerate/deepspeed_zero2.yaml) or FSDP2 (README, 'Sharded with FSDP2').")
