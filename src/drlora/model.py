"""DRLoRAModel: injects expert LoRA into a transformers MoE, owns the signals and runs the allocator."""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass

import torch
from torch import nn

from .allocator import GrowthSchedule, cubic_budget, plan_growth, plan_pruning, saliency
from .config import DRLoRAConfig
from .layer import BatchTokens, ExpertLoRA, ExpertsAdapter, LinearLoRA, dr_lora_experts_forward
from .layout import MoELayer, family_of, find_moe_layers
from .router_master import RouterMaster, attach_router_master, masters_in_state_dict
from .sharding import any_sharded
from .signals import all_reduce_step_sums

logger = logging.getLogger("drlora")


@dataclass
class GrowthEvent:
    """What one growth event did: `grown[l, e]` new ranks per expert, `ranks` the rank map afterwards."""

    step: int
    grown: torch.Tensor
    ranks: torch.Tensor
    saliency: torch.Tensor
    layers_below_target: int

    def summary(self) -> str:
        pruned = int(self.grown.sum()) < 0
        verb, changed = ("pruned", -self.grown) if pruned else ("grew", self.grown)
        return (f"drlora step {self.step}: {verb} {int(changed.sum())} rank(s) on "
                f"{int((changed > 0).sum())} expert(s); mean rank {self.ranks.float().mean():.2f}; "
                f"{self.layers_below_target} layer(s) {'above' if pruned else 'below'} target")


class DRLoRAModel(nn.Module):
    """A transformers MoE with DR-LoRA on its routed experts. Call it like the base model.

    Use `get_dr_lora_model` to build one. Once per optimizer step — after backward, before `optimizer.step()` —
    call `update_and_allocate(global_step)` (DRLoRACallback does it inside a Trainer). The adapted transformers model
    is `get_base_model()` (PEFT's name); `base_model` is its backbone, as on a transformers model.
    """

    def __init__(self, model: nn.Module, config: DRLoRAConfig):
        super().__init__()
        self.model = model  # state_dict keys "model.…", as PEFT's LoraModel holds it; `base_model` is the backbone
        self.drlora_config = config
        self._merged = False  # merge_and_unload() folds the adapters into the base model and removes them
        self.moe_layers: list[MoELayer] = find_moe_layers(model)
        self.family = family_of(model)
        self._check_projections()
        for param in model.parameters():
            param.requires_grad_(False)
        self._batch = BatchTokens()  # the attention mask, for the routing frequency (real tokens only)
        self._inject_experts()
        self._extra_handles = self._inject_extra_modules()
        self._router_masters: list[RouterMaster] = []
        self._router_open: tuple | None = None  # router_trainable's cache
        self._setup_routers()
        backbone = self.base_model  # every forward runs it, also TRL's, which skips the LM head and this wrapper
        self._batch_hooks = [backbone.register_forward_pre_hook(self._batch.capture, with_kwargs=True),
                             backbone.register_forward_hook(self._batch.release, always_call=True)]
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.long))
        self._schedule: GrowthSchedule | None = config.schedule() if config.total_steps is not None else None

    # ---- injection --------------------------------------------------------------------------------------------
    def _check_projections(self) -> None:
        r_max = self.drlora_config.r_max
        for layer in self.moe_layers:
            missing = [p for p in self.drlora_config.target_projections if p not in layer.projections()]
            if missing:
                raise ValueError(f"{layer.name} ({self.family}) has no {missing[0]!r} projection (its experts have "
                                 f"{', '.join(layer.projections())}); remove it from target_projections.")
            for proj in self.drlora_config.target_projections:
                geom = layer.geometry(proj)
                _check_rank("r_max", r_max, f"the {proj} projection of the experts in {layer.name}", geom.in_features,
                            geom.out_features)

    def _inject_experts(self) -> None:
        cfg = self.drlora_config
        for layer in self.moe_layers:
            weight = layer.experts.down_proj
            loras = {}
            for p_index, proj in enumerate(cfg.target_projections):
                geom = layer.geometry(proj)
                loras[proj] = ExpertLoRA(layer.num_experts, geom.in_features, geom.out_features, cfg.r_max,
                                         cfg.initial_rank, cfg.scaling, cfg.lora_dropout,
                                         seed=_mix(cfg.seed, layer.index, p_index),
                                         dtype=cfg.trainable_dtype(weight.dtype), device=weight.device)
                loras[proj].track_importance = cfg.needs_importance
            layer.experts.dr_lora = ExpertsAdapter(layer, loras, self._batch)
            layer.experts.forward = types.MethodType(dr_lora_experts_forward, layer.experts)

    def _inject_extra_modules(self) -> list:
        cfg = self.drlora_config
        handles = []
        expert_names = tuple(layer.name for layer in self.moe_layers)
        for pattern in cfg.extra_target_modules:
            matched = [(n, m) for n, m in self.get_base_model().named_modules()
                       if (n == pattern or n.endswith("." + pattern)) and not n.startswith(expert_names)]
            if not matched:
                raise ValueError(f"extra_target_modules entry {pattern!r} matches no module of this model.")
            for index, (name, module) in enumerate(matched):
                if not isinstance(module, nn.Linear):
                    raise ValueError(f"extra_target_modules entry {pattern!r} matches {name}, a "
                                     f"{type(module).__name__}; only nn.Linear modules can get plain LoRA.")
                if hasattr(module, "dr_lora"):
                    continue
                _check_rank("extra_r", cfg.extra_rank, name, module.in_features, module.out_features)
                module.dr_lora = LinearLoRA(module, cfg.extra_rank, cfg.scaling, cfg.lora_dropout,
                                            seed=_mix(cfg.seed, 10_000 + len(handles), 0),
                                            dtype=cfg.trainable_dtype(module.weight.dtype))
                handles.append((name, module, module.register_forward_hook(LinearLoRA.hook)))
        return handles

    def _setup_routers(self) -> None:
        """Routers join the optimizer from step 0 (requires_grad) and are gated to zero gradient in warmup, inside
        their forward (router_master.py: the gate holds under FSDP2 too). In a bf16/fp16 model they train as float32
        masters, unless adapter_dtype='base'."""
        if not self.drlora_config.train_router:
            return
        for layer in self.moe_layers:
            if layer.router is None:
                raise ValueError(f"train_router=True but no router was found beside {layer.name}; set "
                                 "train_router=False.")
            master_dtype = self.drlora_config.trainable_dtype(layer.experts.down_proj.dtype)
            self._router_masters.append(attach_router_master(layer.router, master_dtype,
                                                             lambda: self.router_trainable))
            for param in layer.router.parameters():
                param.requires_grad_(True)
                param.register_hook(self._gate_router_grad)  # for code that reads the weight outside forward

    def _gate_router_grad(self, grad: torch.Tensor):
        return None if self.router_trainable else torch.zeros_like(grad)

    def _router_params(self) -> list[nn.Parameter]:
        """The trained routers' parameters, looked up each time: FSDP2's fully_shard replaces every parameter."""
        if not self.drlora_config.train_router:
            return []
        return [param for layer in self.moe_layers for param in layer.router.parameters()]

    # ---- nn.Module plumbing -----------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=None, **kwargs):
        """The base model's forward. The named arguments are spelled out (as PEFT does) because the HF Trainer
        keeps only the dataset columns that appear in the model's forward signature."""
        named = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                     use_cache=use_cache, logits_to_keep=logits_to_keep)
        return self.get_base_model()(**{k: v for k, v in named.items() if v is not None}, **kwargs)

    def _own_state_names(self) -> set[str]:
        """The state_dict names of what a DRLoRAModel adds to its base model: the LoRA factors, drlora's buffers
        (rank masks, statistics, the step counter) and whatever else it trains (the routers)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad or ".dr_lora." in n}
        names |= {n for n, _ in self.named_buffers() if ".dr_lora." in n or n == "last_step"}
        return names

    def state_dict(self, *args, **kwargs):
        """drlora's state only: the LoRA factors, rank masks, statistics, step counter and trained routers.

        Why not the frozen base weights: they come from the base checkpoint, and a Trainer saves a model that is not
        a PreTrainedModel as `save_file(model.state_dict())` at every checkpoint — the whole MoE each time (tens of
        GB) where a PeftModel writes its adapter. With drlora's state alone, a Trainer / TRL / accelerate
        checkpoint is adapter-sized and resumes exactly (`load_state_dict` with strict=False, as the Trainer
        calls it; torch's distributed checkpoint calls this `ignore_frozen_params`). Trained routers appear as
        their float32 masters. `get_base_model().state_dict()` is the whole adapted model's."""
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        with masters_in_state_dict():
            state = super().state_dict(*args, **kwargs)
        own = self._own_state_names()
        for key in [k for k in state if k.startswith(prefix) and k[len(prefix):] not in own]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load drlora's state (see `state_dict`); strict checks that all of it is there. A Trainer checkpoint of
        drlora 0.2 (the whole model, under "base_model.…") loads too: its base weights are the base's own."""
        state_dict = {"model." + k.removeprefix("base_model.") if k.startswith("base_model.") else k: v
                      for k, v in state_dict.items()}
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k in self._own_state_names()]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"error loading the DRLoRAModel state: missing keys {missing[:5]}, unexpected keys "
                               f"{result.unexpected_keys[:5]}.")
        return type(result)(missing, result.unexpected_keys)

    def __getattr__(self, name: str):
        """Anything else is the adapted model's (config, generate, get_output_embeddings, _no_split_modules, ...)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_modules":  # not set up yet (unpickling): nothing to forward to
                raise
            return getattr(self.get_base_model(), name)

    def get_base_model(self) -> nn.Module:
        """The transformers model drlora adapts (a causal LM), with the adapters inside its experts modules."""
        return self._modules["model"]

    @property
    def base_model(self) -> nn.Module:
        """The adapted model's backbone: the decoder without the LM head, as `base_model` means on any transformers
        model. TRL's SFTTrainer calls it to get hidden states for its fused LM-head loss. Not a registered name:
        state_dict names follow attributes (torch's distributed checkpoint resolves them that way), and the whole
        model is registered as `model`."""
        model = self.get_base_model()
        return getattr(model, "base_model", model)

    # ---- views --------------------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[ExpertsAdapter]:
        if self._merged:  # RuntimeError, not AttributeError: __getattr__ would turn that into a riddle
            raise RuntimeError("this DRLoRAModel was merged into its base model by merge_and_unload(), which removed "
                               "its adapters; use the model merge_and_unload() returned, and call save_pretrained / "
                               "export_peft / rank_map before merging.")
        return [layer.experts.dr_lora for layer in self.moe_layers]

    def expert_loras(self) -> list[ExpertLoRA]:
        return [lora for adapter in self.adapters for lora in adapter.projections.values()]

    def rank_map(self) -> torch.Tensor:
        """Active ranks per expert: LongTensor [num_moe_layers, num_experts] (on CPU)."""
        return torch.stack([a.ranks().cpu() for a in self.adapters]).long()

    @property
    def schedule(self) -> GrowthSchedule:
        if self._schedule is None:
            self._schedule = self.drlora_config.schedule()  # raises with advice when total_steps is unset
        return self._schedule

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run length (the callback does this from the Trainer) and validate the schedule."""
        self.drlora_config.total_steps = total_steps
        self._schedule = self.drlora_config.schedule()

    @property
    def router_trainable(self) -> bool:
        """Whether the router may learn in the coming step (the one after `last_step`).

        Asked by every router forward (its warmup gate): the answer is cached until `last_step` is written (its
        version counter moves) or replaced, so the host reads the step from the device once per step, not once
        per router and forward."""
        if not self.drlora_config.train_router or self._schedule is None:
            return False
        step, cached = self.last_step, self._router_open
        if cached is None or cached[0] is not step or cached[1] != step._version or cached[2] is not self._schedule:
            cached = (step, step._version, self._schedule, self._schedule.router_trainable(int(step) + 1))
            self._router_open = cached
        return cached[3]

    def parameter_counts(self) -> dict[str, int]:
        """Active LoRA parameters (unmasked ranks), reserved LoRA parameters (r_max) and trainable parameters."""
        active = reserved = 0
        for lora in self.expert_loras():
            per_rank = lora.in_features + lora.out_features
            active += int(lora.rank_mask.sum()) * per_rank
            reserved += lora.num_experts * lora.r_max * per_rank
        for _, module, _ in self._extra_handles:
            n = module.dr_lora.lora_A.numel() + module.dr_lora.lora_B.numel()
            active += n
            reserved += n
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"active": active, "reserved": reserved, "trainable": trainable, "total": total}

    def print_trainable_parameters(self) -> None:
        c = self.parameter_counts()
        print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || "
              f"trainable%: {100 * c['trainable'] / max(c['total'], 1):.4f} || active LoRA params: {c['active']:,} "
              f"|| reserved LoRA params: {c['reserved']:,}")

    # ---- the training-step hook -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update_and_allocate(self, global_step: int) -> GrowthEvent | None:
        """Once per optimizer step, after backward and before `optimizer.step()`.

        Folds this step's routing and importance sums into their EMAs (all-reduced across processes), keeps the
        router's gradient away during warmup, and at a growth event activates new ranks. Returns the event, if any.
        """
        cfg, schedule = self.drlora_config, self.schedule
        frequencies = [a.frequency for a in self.adapters]
        importances = [lora.importance for lora in self.expert_loras()]
        if global_step <= int(self.last_step):  # already processed (a resumed run replaying a step): drop its sums
            for signal in frequencies + importances:
                signal.clear_step()
            return None
        missed = [e for e in schedule.events if int(self.last_step) < e < global_step]
        if missed:
            raise RuntimeError(f"update_and_allocate was not called at step {missed[0]}, a growth event (this call "
                               f"is step {global_step}, the last one was step {int(self.last_step)}): call it once "
                               "per optimizer step, with the 0-based step the optimizer is about to take.")
        all_reduce_step_sums(frequencies, importances)
        for freq in frequencies:
            freq.update(cfg.beta_f)
        for imp in importances:
            imp.update(cfg.beta_g)
        if not schedule.router_trainable(global_step):
            for param in self._router_params():
                param.grad = None  # the optimizer skips it: no update, no weight decay
        event = None
        if schedule.is_event(global_step):
            event = self._prune(global_step) if cfg.allocation == "prune" else self._grow(global_step)
        self.last_step.fill_(global_step)
        return event

    def saliency(self) -> torch.Tensor:
        """Current Expert Saliency Score [num_layers, num_experts]."""
        cfg = self.drlora_config
        freq = torch.stack([a.frequency.ema.float().cpu() for a in self.adapters])
        imp = torch.stack([self._layer_importance(a).cpu() for a in self.adapters])
        if cfg.signal == "importance":  # a constant term normalises to uniform: it drops out of the ranking
            freq = torch.ones_like(freq)
        elif cfg.signal == "routing":
            imp = torch.ones_like(imp)
        return saliency(freq, imp, self.rank_map(), cfg.gamma)

    def _layer_importance(self, adapter: ExpertsAdapter) -> torch.Tensor:
        mode = self.drlora_config.importance
        per_proj = [lora.importance.per_expert(mode, lora.rank_mask).float() for lora in adapter.projections.values()]
        return torch.stack(per_proj).mean(0)

    def _prune(self, step: int) -> GrowthEvent:
        """AdaLoRA-style: keep each layer's highest-importance rank slots, down to the cubic schedule's budget."""
        cfg, schedule = self.drlora_config, self.schedule
        before = self.rank_map()
        index = schedule.events.index(step)
        for adapter in self.adapters:
            loras = list(adapter.projections.values())
            num_experts = loras[0].num_experts
            keep = cubic_budget(index, schedule.num_events, num_experts * cfg.r_max, num_experts * cfg.r_target)
            scores = torch.stack([lora.importance.per_rank(cfg.importance).float() for lora in loras]).mean(0)
            mask = plan_pruning(scores.cpu(), loras[0].rank_mask.cpu(), keep)
            for lora in loras:
                lora.rank_mask.copy_(mask.to(lora.rank_mask.device))
        ranks = self.rank_map()
        above = int((ranks.sum(-1) != ranks.shape[-1] * cfg.r_target).sum())
        event = GrowthEvent(step, ranks - before, ranks, self.saliency(), above)
        logger.info(event.summary())
        return event

    @torch.no_grad()
    def set_rank_map(self, ranks: torch.Tensor) -> None:
        """Fix every expert's active rank before training (allocation='fixed': the static and ESFT baselines).
        `ranks` is [num_moe_layers, num_experts]; the budget is the caller's choice and shows in parameter_counts."""
        if self.drlora_config.allocation != "fixed":
            raise ValueError("set_rank_map needs allocation='fixed'; growing and pruning runs decide their own ranks.")
        ranks = torch.as_tensor(ranks, dtype=torch.long)
        expected = (len(self.adapters), self.adapters[0].frequency.ema.numel())
        if tuple(ranks.shape) != expected or int(ranks.min()) < 0 or int(ranks.max()) > self.drlora_config.r_max:
            r_max = self.drlora_config.r_max
            raise ValueError(f"a rank map must be {list(expected)} with ranks in [0, r_max={r_max}], "
                             f"got shape {list(ranks.shape)} and ranks {int(ranks.min())}..{int(ranks.max())}.")
        for adapter, row in zip(self.adapters, ranks):
            for lora in adapter.projections.values():
                lora.set_ranks(row)

    def _grow(self, step: int) -> GrowthEvent:
        cfg = self.drlora_config
        scores = self.saliency()
        plan = plan_growth(scores, self.rank_map(), r_target=cfg.r_target, r_max=cfg.r_max,
                           grow_per_event=cfg.grow_per_event, events_left=self.schedule.events_left(step))
        for adapter, grow in zip(self.adapters, plan):
            for lora in adapter.projections.values():
                lora.grow(grow)
                lora.importance.reset()
        ranks = self.rank_map()
        below = int((ranks.sum(-1) < ranks.shape[-1] * cfg.r_target).sum())
        event = GrowthEvent(step, plan, ranks, scores, below)
        logger.info(event.summary())
        return event

    # ---- saving, merging, exporting (see saving.py) -----------------------------------------------------------
    def save_pretrained(self, save_directory, include_training_state: bool = False) -> None:
        from .saving import save_adapter

        save_adapter(self, save_directory, include_training_state=include_training_state)

    def merge_and_unload(self) -> nn.Module:
        from .saving import merge_and_unload

        self._refuse_sharded("merge_and_unload")
        return merge_and_unload(self)

    def export_peft(self, save_directory) -> None:
        from .peft_export import export_peft

        self._refuse_sharded("export_peft")
        export_peft(self, save_directory)

    @torch.no_grad()
    def reset_adapter_state(self) -> None:
        """drlora's state as `get_dr_lora_model` creates it: seeded A, B = 0, r_init active ranks, empty statistics,
        no step taken. For a model built on the meta device and materialised with `to_empty` (the way to shard an
        MoE too large to build whole on each process): load the base weights, then call this. The routers' weights
        are the base model's, loaded with it."""
        for adapter in self.adapters:
            adapter.frequency.reset()
            for lora in adapter.projections.values():
                lora.reset_parameters()
        for _, module, _ in self._extra_handles:
            module.dr_lora.reset_parameters()
        self.last_step.fill_(-1)

    def _refuse_sharded(self, what: str) -> None:
        if any_sharded(self.parameters()):
            raise RuntimeError(f"{what} needs the whole model, and this one is sharded (FSDP2): call save_pretrained "
                               f"on every process (it gathers the adapter), then load it with load_dr_lora_model onto "
                               f"an unsharded base in one process and call {what} there.")


def _check_rank(key: str, rank: int, what: str, in_features: int, out_features: int) -> None:
    """A LoRA of rank r on an in × out map can add at most min(in, out) directions: ranks beyond reserve parameters
    (and checkpoint bytes) that buy no capacity, so they are refused rather than silently wasted."""
    if rank > min(in_features, out_features):
        raise ValueError(f"{key}={rank} exceeds {what} ({in_features} in, {out_features} out): a LoRA rank above "
                         f"min(in, out) = {min(in_features, out_features)} adds parameters but no capacity; choose "
                         f"{key} <= {min(in_features, out_features)}.")


def _mix(seed: int, a: int, b: int) -> int:
    """A distinct, reproducible seed per (layer, projection)."""
    return (seed * 1_000_003 + a * 1_009 + b * 7 + 12_345) % (2**63 - 1)


def get_dr_lora_model(model: nn.Module, config: DRLoRAConfig) -> DRLoRAModel:
    """Wrap a transformers MoE model with DR-LoRA (the base model is modified in place and frozen)."""
    if not isinstance(config, DRLoRAConfig):
        raise TypeError(f"config must be a DRLoRAConfig, got {type(config).__name__}.")
    if isinstance(model, DRLoRAModel):
        raise ValueError("this model already has DR-LoRA; merge_and_unload() it first or use it as it is.")
    return DRLoRAModel(model, config)
