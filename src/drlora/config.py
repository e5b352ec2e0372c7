"""DRLoRAConfig: every knob of DR-LoRA, with the paper's defaults and validation that says what would work."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

PROJECTIONS = ("gate", "up", "down")
IMPORTANCE_MODES = ("product", "sum")
ALLOCATIONS = ("grow", "fixed", "prune")
SIGNALS = ("routing*importance", "importance", "routing")
ADAPTER_DTYPES = ("float32", "base")


def _help(text: str, default: Any = dataclasses.MISSING, **kwargs):
    """A dataclass field that carries its help text (shown by docs and the CLI)."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class DRLoRAConfig:
    """Configuration of DR-LoRA: LoRA on every routed expert, with per-expert ranks grown by saliency.

    Defaults follow the paper (DR-LoRA, arXiv 2601.04823 v5). `total_steps` is the number of optimizer steps; it may
    be left `None` when training with `DRLoRACallback`, which takes it from the Trainer.

    Not a PEFT config: trainers that take `peft_config=` (TRL's SFTTrainer) accept only PEFT's own methods, and PEFT
    registers only those it ships. Pass the model instead: `SFTTrainer(model=get_dr_lora_model(model, config),
    callbacks=[DRLoRACallback()])` (README, "With TRL").
    """

    r_init: int = _help("Active rank of every expert at the start.", 8)
    r_target: int = _help("Average active rank per expert that every MoE layer reaches at the last growth event.", 16)
    r_max: int = _help("Rank pre-allocated per expert; no expert grows beyond it.", 32)
    lora_alpha: float | None = _help("LoRA alpha; scaling s = lora_alpha / r_max is constant. None means 2 * r_max "
                                     "(s = 2, the paper's setting).", None)
    lora_dropout: float = _help("Dropout on the LoRA input (training only).", 0.1)
    target_projections: tuple[str, ...] = _help("Expert projections to adapt, any of gate / up / down.",
                                                ("up", "down"))
    extra_target_modules: tuple[str, ...] = _help(
        "Names (or name suffixes) of nn.Linear modules outside the routed experts that get a plain LoRA of uniform "
        "rank `extra_r`, e.g. ('q_proj', 'v_proj') or ('shared_expert.up_proj',). Off by default.", ())
    extra_r: int | None = _help("Rank of the plain LoRA on extra_target_modules. None means r_target.", None)
    total_steps: int | None = _help("Number of optimizer steps of the run (None: set later, e.g. by the callback).",
                                    None)
    growth_interval: int = _help("T_grow: optimizer steps between growth events.", 200)
    warmup_ratio: float = _help("Fraction of total_steps before the first growth event; the router is frozen "
                                "during it.", 0.03)
    growth_end_ratio: float = _help(
        "Fraction of total_steps by which growth ends: events run from the end of warmup to one growth_interval "
        "before the end (1.0, the paper's window) or to this fraction of the run if earlier. Ending earlier gives "
        "the grown ranks more steps to train (docs/RESULTS.md, capacity study).", 1.0)
    max_grow_per_event: int | None = _help("New ranks one expert may activate per growth event. None means "
                                           "ceil(0.1 * (r_max - r_init)).", None)
    beta_f: float = _help("EMA decay of the routing frequency.", 0.9)
    beta_g: float = _help("EMA decay of the per-rank importance.", 0.9)
    gamma: float = _help("Rank penalty exponent: saliency is f * g / (r + 1) ** gamma.", 1.2)
    importance: str = _help("How the A-side and B-side sensitivities of a rank combine: 'product' (paper) or "
                            "'sum' (authors' code). The two sides are the same number s (|Σ grad·weight| over the "
                            "A row equals it over the B column), so 'product' ranks by s² and 'sum' by 2s.",
                            "product")
    allocation: str = _help(
        "How ranks change: 'grow' (DR-LoRA: from r_init by saliency to r_target), 'fixed' (set once before training, "
        "uniform r_target unless the model is given a rank map — the LoRA, static and ESFT baselines) or 'prune' "
        "(AdaLoRA-style: from r_max, pruned by importance to r_target on a cubic schedule).", "grow")
    signal: str = _help("What the saliency multiplies: 'routing*importance' (DR-LoRA), 'importance' alone "
                        "(IncreLoRA-like ablation) or 'routing' alone.", "routing*importance")
    train_router: bool = _help("Train the router after warmup (it is in the optimizer from the start and gated "
                               "during warmup). False keeps it frozen throughout.", True)
    adapter_dtype: str = _help(
        "Storage dtype of what drlora trains — the LoRA factors and the trained router: 'float32' (default) keeps "
        "them as float32 master weights whatever the base dtype, as PEFT's autocast_adapter_dtype does, because in a "
        "bf16 model an AdamW update at lr 2e-5 is below half a bf16 step and most entries would never move; 'base' "
        "stores them in the base weights' dtype (half the adapter's memory in bf16), which only trains right with an "
        "optimizer that keeps its own float32 masters (DeepSpeed's bf16 mode; FSDP2 keeps none) or a large learning "
        "rate. Either way the matmuls run in the base weights' dtype.", "float32")
    seed: int = _help("Seed of the LoRA initialisation (identical on every process).", 0)

    def __post_init__(self) -> None:
        self.target_projections = tuple(self.target_projections)
        self.extra_target_modules = tuple(self.extra_target_modules)
        self.validate()

    # ---- derived values -------------------------------------------------------------------------------------
    @property
    def scaling(self) -> float:
        alpha = 2.0 * self.r_max if self.lora_alpha is None else float(self.lora_alpha)
        return alpha / self.r_max

    @property
    def grow_per_event(self) -> int:
        if self.max_grow_per_event is not None:
            return self.max_grow_per_event
        return max(1, math.ceil(0.1 * (self.r_max - self.r_init)))

    @property
    def initial_rank(self) -> int:
        """Active rank of every expert before training: r_init (grow), r_target (fixed) or r_max (prune)."""
        return {"grow": self.r_init, "fixed": self.r_target, "prune": self.r_max}[self.allocation]

    @property
    def needs_importance(self) -> bool:
        """Whether any decision reads the per-rank importance (fixed allocations and routing-only growth do not, so
        their backward skips the statistics)."""
        return self.allocation == "prune" or (self.allocation == "grow" and self.signal != "routing")

    def trainable_dtype(self, base_dtype):
        """The dtype drlora stores its trainable tensors in, beside base weights of `base_dtype` (adapter_dtype)."""
        import torch

        return torch.promote_types(base_dtype, torch.float32) if self.adapter_dtype == "float32" else base_dtype

    @property
    def extra_rank(self) -> int:
        return self.r_target if self.extra_r is None else self.extra_r

    # ---- validation -----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming what is wrong and what would work."""
        for name in ("r_init", "r_target", "r_max", "growth_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name, value, choices in (("allocation", self.allocation, ALLOCATIONS), ("signal", self.signal, SIGNALS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}" + _did_you_mean(str(value), choices))
        if self.allocation == "grow" and not self.r_init <= self.r_target <= self.r_max:
            raise ValueError(f"ranks must satisfy r_init <= r_target <= r_max, got r_init={self.r_init}, "
                             f"r_target={self.r_target}, r_max={self.r_max}.")
        if self.allocation != "grow" and not self.r_target <= self.r_max:
            raise ValueError(f"ranks must satisfy r_target <= r_max, got r_target={self.r_target}, "
                             f"r_max={self.r_max}.")
        if self.extra_r is not None and (not isinstance(self.extra_r, int) or self.extra_r < 1):
            raise ValueError(f"extra_r must be a positive integer or None, got {self.extra_r!r}.")
        if self.max_grow_per_event is not None and (not isinstance(self.max_grow_per_event, int)
                                                    or self.max_grow_per_event < 1):
            raise ValueError(f"max_grow_per_event must be a positive integer or None, got {self.max_grow_per_event!r}.")
        if not self.target_projections:
            raise ValueError(f"target_projections is empty; choose any of {PROJECTIONS}.")
        for proj in self.target_projections:
            if proj not in PROJECTIONS:
                raise ValueError(f"unknown projection {proj!r} in target_projections; choose from {PROJECTIONS}"
                                 + _did_you_mean(proj, PROJECTIONS))
        if len(set(self.target_projections)) != len(self.target_projections):
            raise ValueError(f"target_projections lists a projection twice: {self.target_projections}.")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}"
                             + _did_you_mean(str(self.adapter_dtype), ADAPTER_DTYPES))
        if self.importance not in IMPORTANCE_MODES:
            raise ValueError(f"importance must be one of {IMPORTANCE_MODES}, got {self.importance!r}"
                             + _did_you_mean(str(self.importance), IMPORTANCE_MODES))
        for name in ("lora_dropout", "warmup_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
        for name in ("beta_f", "beta_g"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}.")
        if not self.warmup_ratio < self.growth_end_ratio <= 1.0:
            raise ValueError(f"growth_end_ratio must be in (warmup_ratio, 1], got {self.growth_end_ratio!r} with "
                             f"warmup_ratio {self.warmup_ratio}.")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma!r}.")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be positive or None, got {self.lora_alpha!r}.")
        if self.total_steps is not None:
            self.schedule()  # raises if the growth schedule cannot reach r_target

    def schedule(self, total_steps: int | None = None):
        """The growth schedule for `total_steps` (default: self.total_steps); raises if it cannot reach r_target."""
        from .allocator import GrowthSchedule

        steps = self.total_steps if total_steps is None else total_steps
        if steps is None:
            raise ValueError("total_steps is not set: pass DRLoRAConfig(total_steps=...) or train with "
                             "DRLoRACallback, which takes it from the Trainer.")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {steps!r}.")
        start = self.r_init if self.allocation == "grow" else self.r_target  # fixed and prune need no growth
        schedule = GrowthSchedule.build(steps, self.growth_interval, self.warmup_ratio, start, self.r_target,
                                        self.grow_per_event, self.growth_end_ratio)
        if self.allocation == "fixed":  # no events; the warmup still gates the router
            return dataclasses.replace(schedule, events=())
        if self.allocation == "prune" and self.r_target < self.r_max and not schedule.events:
            raise ValueError(f"allocation='prune' needs at least one pruning event, but {steps} steps with "
                             f"growth_interval {self.growth_interval} give none; lower growth_interval.")
        return schedule

    # ---- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["target_projections"] = list(self.target_projections)
        data["extra_target_modules"] = list(self.extra_target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DRLoRAConfig:
        """Build from a dict, refusing unknown keys with a suggestion of the closest known one."""
        known = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in known:
                raise ValueError(f"unknown DRLoRAConfig key {key!r}" + _did_you_mean(key, known)
                                 + f" Known keys: {', '.join(known)}.")
        return cls(**data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text, for docs and command-line interfaces."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)." if close else "."
