"""transformers' Trainer, made to checkpoint a DR-LoRA run compactly and to stop cleanly on a diverged loss.

* Checkpoints hold the adapter's full training state (every r_max rank, masks, growth-signal EMAs, last step,
  routers) instead of the 1+ GB frozen base model; the Trainer's own optimizer, scheduler and RNG files stay. A
  checkpoint counts only once a `drlora_complete` marker is written after the Trainer finished it, so a run
  killed mid-save resumes from the previous, complete one.
* A non-finite loss, or non-finite gradients just before the optimizer step, stop training before anything can
  write NaN into the weights or a checkpoint (`NonFiniteError`), so the last checkpoint stays good.
* `RunRecorder` appends one line per growth event to ranks.jsonl and checks, with several processes, that every
  process holds the same rank map after each event.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from ..saving import restore_training_state

COMPLETE_MARKER = "drlora_complete"


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


def _unwrap(model):
    from ..model import DRLoRAModel

    while not isinstance(model, DRLoRAModel) and hasattr(model, "module"):
        model = model.module
    return model


class DRLoRATrainer(Trainer):
    """The Trainer, checkpointing a DRLoRAModel compactly (any other model, e.g. the peft-lora baseline's
    PeftModel, is checkpointed the Trainer's own way)."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from ..model import DRLoRAModel

        model = _unwrap(self.model)
        if not isinstance(model, DRLoRAModel):
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            model.save_pretrained(output_dir or self.args.output_dir, include_training_state=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from ..model import DRLoRAModel

        model = _unwrap(model or self.model)
        if not isinstance(model, DRLoRAModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_training_state(model, resume_from_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            raise NonFiniteError(f"the training loss became {float(loss)} at step {self.state.global_step}")
        return loss


class FiniteGradientGuard(TrainerCallback):
    """Checks the (clipped) gradients of the trainable parameters before the optimizer consumes them."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        norms = [p.grad.detach().abs().amax() for p in self.params if p.grad is not None]
        if norms and not torch.isfinite(torch.stack(norms)).all():
            raise NonFiniteError(f"the gradients became non-finite at step {state.global_step}")


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it (on_save comes after the last file)."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / COMPLETE_MARKER).write_text(json.dumps({"step": state.global_step}))


def newest_complete_checkpoint(folder) -> Path | None:
    """The complete checkpoint with the highest step in `folder`, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir() and (child / COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


class RunRecorder(TrainerCallback):
    """Writes ranks.jsonl (one line per growth event) from the DRLoRACallback's events, on the main process."""

    def __init__(self, drlora_callback, path, model):
        self.drlora_callback, self.path, self.model = drlora_callback, Path(path), model
        self.seen = 0
        self.processes_checked = 1

    def on_train_begin(self, args, state, control, **kwargs):
        # a resumed run replays nothing before its checkpoint: keep the events the checkpoint already holds
        if state.is_world_process_zero:
            kept = []
            if self.path.is_file():
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] < state.global_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.seen = len(self.drlora_callback.events)

    def on_step_end(self, args, state, control, **kwargs):
        events = self.drlora_callback.events[self.seen:]
        self.seen = len(self.drlora_callback.events)
        for event in events:
            self._check_processes_agree(event.ranks)
            if state.is_world_process_zero:
                top = torch.topk(event.saliency, k=min(3, event.saliency.shape[-1]), dim=-1).indices
                line = {"step": event.step, "ranks": event.ranks.tolist(), "grown": event.grown.tolist(),
                        "layers_below_target": event.layers_below_target, "top_saliency": top.tolist()}
                with self.path.open("a") as f:
                    f.write(json.dumps(line) + "\n")

    def _check_processes_agree(self, ranks: torch.Tensor) -> None:
        """Every process must hold rank 0's rank map (the growth statistics are all-reduced, so they should)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        device = next(self.model.parameters()).device
        ours = ranks.to(device)
        reference = ours.clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(ours, reference):
            raise RuntimeError(f"process {dist.get_rank()} grew different ranks than process 0; the growth "
                               "statistics were not reduced across processes — please report this as a bug.")
        self.processes_checked = dist.get_world_size()


def loss_curve(log_history: list[dict]) -> dict:
    """{"first", "last", "min", "curve": [[step, loss], ...]} from the Trainer's log history."""
    points = [[entry["step"], entry["loss"]] for entry in log_history if "loss" in entry and "step" in entry]
    finite = [loss for _, loss in points if math.isfinite(loss)]
    if not finite:
        return {"first": None, "last": None, "min": None, "curve": points}
    return {"first": finite[0], "last": finite[-1], "min": min(finite), "curve": points}
