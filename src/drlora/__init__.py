"""drlora: DR-LoRA — per-expert LoRA whose ranks grow where the task needs capacity — for transformers MoE models."""

__version__ = "0.2.0"

from .allocator import GrowthSchedule, plan_growth, saliency  # noqa: E402
from .callback import DRLoRACallback  # noqa: E402
from .config import DRLoRAConfig  # noqa: E402
from .host_memory import keep_freed_host_memory  # noqa: E402
from .model import DRLoRAModel, GrowthEvent, get_dr_lora_model  # noqa: E402
from .loading import load_model  # noqa: E402
from .run_eval import evaluate_model  # noqa: E402
from .saving import load_dr_lora_model  # noqa: E402

__all__ = ["DRLoRAConfig", "DRLoRAModel", "DRLoRACallback", "GrowthEvent", "GrowthSchedule", "evaluate_model",
           "get_dr_lora_model", "keep_freed_host_memory", "load_dr_lora_model", "load_model", "plan_growth",
           "saliency", "__version__"]
