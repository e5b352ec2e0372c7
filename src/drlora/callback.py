"""DRLoRACallback: a thin bridge from the HF Trainer's events to `update_and_allocate`."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger("drlora")


class DRLoRACallback(TrainerCallback):
    """Runs DR-LoRA's schedule inside `transformers.Trainer`.

    `total_steps` comes from the Trainer (`state.max_steps`) unless the config fixes it; the update runs in
    `on_pre_optimizer_step`, i.e. after the gradients of the step are accumulated (and clipped) and before the
    optimizer consumes them — the same point as the plain loop.
    """

    def __init__(self, model=None):
        self.model = model
        self.events = []

    def _drlora(self, kwargs):
        from .model import DRLoRAModel

        model = self.model or kwargs.get("model")
        while model is not None and not isinstance(model, DRLoRAModel):
            model = getattr(model, "module", None)  # DDP / accelerate wrappers
        if model is None:
            raise TypeError("DRLoRACallback needs the Trainer's model to be a DRLoRAModel (from get_dr_lora_model).")
        return model

    def on_train_begin(self, args, state, control, **kwargs):
        model = self._drlora(kwargs)
        if model.drlora_config.total_steps is None or model.drlora_config.total_steps != state.max_steps:
            if model.drlora_config.total_steps is not None:
                logger.warning("drlora: total_steps=%d in the config, but the Trainer runs %d steps; using %d.",
                               model.drlora_config.total_steps, state.max_steps, state.max_steps)
            model.set_total_steps(state.max_steps)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        event = self._drlora(kwargs).update_and_allocate(state.global_step)
        if event is not None:
            self.events.append(event)
            if state.is_world_process_zero:
                print(event.summary(), flush=True)
