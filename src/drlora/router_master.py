"""A trained router: float32 master weights in a lower-precision (bf16 / fp16) model, and its warmup gate.

The gate: during warmup the router is frozen; its forward passes each parameter through `_WarmupGate`, whose
backward gives zeros until the schedule lets the router learn — in the graph, so it holds where wrappers replace the
parameters (FSDP2) and before any gradient-clipping norm is taken.

Why: in a bf16 model an AdamW update at the paper's learning rate of 2e-5 is below half a bf16 step for most router
entries, so a bf16 router barely trains (31 % of a tiny Qwen3-MoE's router entries moved in 5 steps). So the router's
parameters are upcast to float32 in place — the same Parameter objects under the same names, so the optimizer, DDP,
ZeRO-1/2 and gradient clipping see ordinary parameters — and every forward computes with a copy cast back to the
original dtype, as a mixed-precision optimizer's model copy would. The router therefore computes exactly what the
base family computes with bf16 weights, and a merged model, a PEFT export and `get_base_model().save_pretrained`
(whose state_dict this module casts back to the original dtype) reproduce the trained model. `DRLoRAModel.state_dict()`
keeps the float32 masters (`masters_in_state_dict`), so a Trainer checkpoint resumes exactly.
"""

from __future__ import annotations

import contextlib
import contextvars
import types

import torch
from torch import nn

_keep_masters = contextvars.ContextVar("drlora_keep_router_masters", default=False)


@contextlib.contextmanager
def masters_in_state_dict():
    """Within this block, state_dict() holds the routers' float32 masters instead of their original dtype."""
    token = _keep_masters.set(True)
    try:
        yield
    finally:
        _keep_masters.reset(token)


def attach_router_master(router: nn.Module, master_dtype: torch.dtype, trainable) -> RouterMaster:
    """Train `router`: its parameters narrower than `master_dtype` upcast to it, its gradient gated by `trainable()`
    (False during warmup) inside its forward."""
    original = {name: p.dtype for name, p in router.named_parameters() if p.is_floating_point()}
    return RouterMaster(router, original, master_dtype, trainable)


class _WarmupGate(torch.autograd.Function):
    """Identity forward; the backward passes the gradient on only while the router may learn, zeros otherwise.

    In the graph rather than as a hook on the parameter, because wrappers replace parameters: FSDP2's fully_shard
    computes with unsharded copies and keeps sharded ones, and a hook on the original Parameter fires on neither.
    Zeros (not None) keep DDP's reducer and FSDP2's reduce-scatter uniform, and keep the frozen router out of any
    gradient-clipping norm taken before the optimizer step."""

    @staticmethod
    def forward(ctx, weight, open_gate: bool):
        ctx.open_gate = open_gate
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.open_gate else torch.zeros_like(grad)), None


class RouterMaster:
    """One trained router: which of its parameters were upcast (from which dtype), and its warmup gate."""

    def __init__(self, router: nn.Module, original: dict[str, torch.dtype], master_dtype: torch.dtype, trainable):
        self.router = router
        self.original = original
        self.trainable = trainable
        for name, dtype in original.items():
            if dtype.itemsize < master_dtype.itemsize:
                param = router.get_parameter(name)
                param.data = param.data.to(master_dtype)
        self._owners = [(router.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], dtype)
                        for name, dtype in self.original.items()]
        self._hook = router.register_state_dict_post_hook(lambda *args: self._cast_state_dict(*args))
        self._base_forward = router.forward
        router.forward = types.MethodType(_forward_with_compute_copies, router)
        router._drlora_router_master = self

    def _cast_state_dict(self, module, state_dict, prefix, local_metadata) -> None:
        if _keep_masters.get():
            return
        for name, dtype in self.original.items():
            value = state_dict.get(prefix + name)
            if value is not None and not isinstance(value, nn.Parameter):  # keep_vars=True asks for the live ones
                state_dict[prefix + name] = value.to(dtype)

    @torch.no_grad()
    def release(self) -> None:
        """Back to a plain router: parameters in their original dtype (rounded), the class's forward, no hook."""
        for name, dtype in self.original.items():
            param = self.router.get_parameter(name)
            param.data = param.data.to(dtype)
        self._hook.remove()
        del self.router.forward
        del self.router._drlora_router_master


def _forward_with_compute_copies(self, *args, **kwargs):
    """The router's own forward, with each parameter seen through the warmup gate, as a copy in its original dtype.

    An instance attribute shadows a registered parameter of the same name (nn.Module only looks in `_parameters`
    when normal attribute lookup fails), and the copy is differentiable, so the gradient reaches the master.
    """
    master: RouterMaster = self._drlora_router_master
    open_gate = master.trainable()
    placed = []
    try:
        for owner, name, dtype in master._owners:
            owner.__dict__[name] = _WarmupGate.apply(owner._parameters[name], open_gate).to(dtype)
            placed.append((owner, name))
        return master._base_forward(*args, **kwargs)
    finally:
        for owner, name in placed:
            owner.__dict__.pop(name, None)
