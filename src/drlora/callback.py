"""DRLoRACallback: a thin bridge from the HF Trainer's events to `update_and_allocate`."""

from __future__ import annotations

import logging
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .sharding import any_sharded, refuse_zero3

logger = logging.getLogger("drlora")


class DRLoRACallback(TrainerCallback):
    """Runs DR-LoRA's schedule inside `transformers.Trainer`.

    `total_steps` comes from the Trainer (`state.max_steps`) unless the config fixes it; the update runs in
    `on_pre_optimizer_step`, i.e. after the gradients of the step are accumulated (and clipped) and before the
    optimizer consumes them — the same point as the plain loop.

    Saving (`save_adapter`, on by default): the Trainer checkpoints a DRLoRAModel as `model.safetensors` holding
    drlora's state (`DRLoRAModel.state_dict`), which resumes exactly but is not an adapter folder. So the callback
    also writes the adapter (`save_pretrained`: adapter_config.json, adapter_model.safetensors) into every
    checkpoint folder and, when training ends, into `args.output_dir` — where `trainer.save_model()` writes by
    default — so each of them loads with `load_dr_lora_model(base, folder)`.
    """

    def __init__(self, model=None, save_adapter: bool = True):
        self.model = model
        self.save_adapter = save_adapter
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
        refuse_zero3(model.parameters())
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

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._save(args, kwargs, folder)

    def on_train_end(self, args, state, control, **kwargs):
        self._save(args, kwargs, args.output_dir)

    def _save(self, args, kwargs, folder) -> None:
        """The main process writes; a model sharded by FSDP2 is saved by every process (save_pretrained gathers)."""
        model = self._drlora(kwargs)
        if self.save_adapter and (args.should_save or any_sharded(model.parameters())):
            model.save_pretrained(folder)
