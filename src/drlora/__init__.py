"""drlora: DR-LoRA — per-expert LoRA whose ranks grow where the task needs capacity — for transformers MoE models.

The public names below are imported on first use (PEP 562): most of them pull in torch, transformers and peft
(seconds), and the command line must be able to read and refuse a configuration before paying for them.
`from drlora import get_dr_lora_model` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.3.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "GrowthSchedule": "allocator", "plan_growth": "allocator", "saliency": "allocator",
    "DRLoRACallback": "callback",
    "DRLoRAConfig": "config",
    "keep_freed_host_memory": "host_memory",
    "DRLoRAModel": "model", "GrowthEvent": "model", "get_dr_lora_model": "model",
    "load_model": "loading",
    "evaluate_model": "run_eval",
    "load_dr_lora_model": "saving",
}

__all__ = ["DRLoRAConfig", "DRLoRAModel", "DRLoRACallback", "GrowthEvent", "GrowthSchedule", "evaluate_model",
           "get_dr_lora_model", "keep_freed_host_memory", "load_dr_lora_model", "load_model", "plan_growth",
           "saliency", "__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .allocator import GrowthSchedule, plan_growth, saliency
    from .callback import DRLoRACallback
    from .config import DRLoRAConfig
    from .host_memory import keep_freed_host_memory
    from .loading import load_model
    from .model import DRLoRAModel, GrowthEvent, get_dr_lora_model
    from .run_eval import evaluate_model
    from .saving import load_dr_lora_model
