"""transformers' Trainer, made to checkpoint a DR-LoRA run compactly and to stop cleanly on a diverged loss.

* Checkpoints hold the adapter's full training state (every r_max rank, masks, growth-signal EMAs, last step,
  routers) instead of the 1+ GB frozen base model; the Trainer's own optimizer, scheduler and RNG files stay. A
  checkpoint counts only once a `drlora_complete` marker is written after the Trainer finished it, so a run
  killed mid-save resumes from the previous, complete one.
* A non-finite loss, or non-finite gradients just before the optimizer step, stop training before anything can
  write NaN into the weights or a checkpoint (`NonFiniteError`), so the last checkpoint stays good. With several
  processes the decision is collective (`processes_where`): a NaN on one process stops every process at the same
  point, instead of leaving the others waiting in their next all-reduce for a process that is gone.
* `RunRecorder` appends one line per growth event to ranks.jsonl and checks, with several processes, that every
  process holds the same rank map after each event; it also writes the rank map to the run's TensorBoard log.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from ..saving import restore_training_state
from ..sharding import any_sharded, is_sharded

COMPLETE_MARKER = "drlora_complete"


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN or infinite (on this process or another one)."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def processes_where(flag: bool, device) -> list[int]:
    """The processes (ranks) on which `flag` holds, the same list on every process.

    A collective when torch.distributed runs several processes — every process must call it at the same point —
    costing one all-reduce (MAX) of a world-size vector. That is what lets one process's NaN stop all of them
    together: a process that stopped alone would leave the others waiting forever in their next all-reduce.
    Without torch.distributed it is [0] or [].
    """
    if not _distributed():
        return [0] if flag else []
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    flags[dist.get_rank()] = int(bool(flag))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.nonzero().flatten().tolist()


def _on_processes(ranks: list[int]) -> str:
    """'' with one process; ' on process 1 of 2' (or 'processes 0, 1 of 2') with several."""
    if not _distributed():
        return ""
    return f" on process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))} of {dist.get_world_size()}"


def _is_drlora(model) -> bool:
    from ..model import DRLoRAModel

    return isinstance(model, DRLoRAModel)


def _unwrap(model):
    from ..model import DRLoRAModel

    while not isinstance(model, DRLoRAModel) and hasattr(model, "module"):
        model = model.module
    return model


class ResumableLengthGroupedSampler(LengthGroupedSampler):
    """transformers' `group_by_length` order (batches of similar length, little padding), replayed exactly on resume.

    transformers draws each epoch's order from the global RNG as the epoch begins. A run resumed in its second or a
    later epoch has that RNG restored to the checkpoint's state, not to the state the epoch began with, so it
    replayed the epoch in another order (a resume at step 8 of a 12-step, 6-steps-per-epoch run ended on another
    rank map). Epoch 0 keeps the global RNG's order, so a run that never completes an epoch is unchanged; epoch
    e ≥ 1 draws from a generator seeded with (seed, e), the same on every process and in every resumed run."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.epoch == 0:
            return super().__iter__()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


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

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            sampler = ResumableLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths,
                                                    seed=self.args.data_seed if self.args.data_seed is not None
                                                    else self.args.seed)
            self._resumable_sampler = sampler
        return sampler

    def _run_epoch(self, *args, **kwargs):
        """Tells the sampler its epoch: accelerate's set_epoch does not reach a sampler under BatchSamplerShard
        (several processes), and transformers calls this with the epoch even when resuming mid-epoch."""
        sampler = getattr(self, "_resumable_sampler", None)
        if sampler is not None:
            sampler.set_epoch(inspect.signature(Trainer._run_epoch).bind(self, *args, **kwargs).arguments["epoch"])
        return super()._run_epoch(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2 the Trainer would write drlora's state only with a full state dict, from one process; every
        process joins save_pretrained instead (it gathers the sharded factors; the first process writes)."""
        model = _unwrap(self.model)
        if _is_drlora(model) and any_sharded(model.parameters()):
            model.save_pretrained(output_dir or self.args.output_dir, include_training_state=True)
            return
        super().save_model(output_dir, _internal_call)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from ..model import DRLoRAModel

        model = _unwrap(model or self.model)
        if not isinstance(model, DRLoRAModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        restore_training_state(model, resume_from_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step (forward and backward of one micro-batch), stopping every process when the loss of any
        process is not finite (one flag all-reduced per micro-batch)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        here = not bool(torch.isfinite(loss).all())
        ranks = processes_where(here, loss.device)
        if ranks:
            value = float(loss) if here else "non-finite"
            raise NonFiniteError(f"the training loss became {value}{_on_processes(ranks)} at step "
                                 f"{self.state.global_step}")
        return loss


class FiniteGradientGuard(TrainerCallback):
    """Checks the (clipped) gradients of the trainable parameters before the optimizer consumes them, on every
    process together (one flag all-reduced per optimizer step): DDP's all-reduce usually leaves every process the
    same gradients, but not every setup reduces them (or all of them) before this point."""

    def __init__(self, model):
        self.model = model

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # looked up each step (FSDP2 replaces the parameters); a sharded gradient is checked where it is held, and
        # the flag below is what every process agrees on
        grads = [p.grad for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        grads = [g.to_local() if is_sharded(g) else g for g in grads]
        norms = [g.detach().abs().amax() for g in grads if g.numel()]
        here = bool(norms) and not bool(torch.isfinite(torch.stack(norms)).all())
        ranks = processes_where(here, grads[0].device if grads else args.device)
        if ranks:
            raise NonFiniteError(f"the gradients became non-finite{_on_processes(ranks)} at step {state.global_step}")


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
    """Writes ranks.jsonl (one line per growth event) from the DRLoRACallback's events, on the main process, and
    the rank map to TensorBoard so a run's growth can be watched live.

    TensorBoard gets, at step 0 (the initial map) and at each event's step (the step ranks.jsonl records), per MoE
    layer i (row i of the rank map) `drlora/rank_mean/layer{i}`, `drlora/rank_min/layer{i}` and
    `drlora/rank_max/layer{i}`, and per event `drlora/ranks_grown` and `drlora/layers_below_target` (pruning:
    `drlora/ranks_pruned` and `drlora/layers_above_target`). They go through the writer of the Trainer's own
    TensorBoardCallback (`tensorboard`, set once the Trainer is built), so one writer owns the log folder.
    """

    def __init__(self, drlora_callback, path, model, tensorboard=None):
        self.drlora_callback, self.path, self.model = drlora_callback, Path(path), model
        self.tensorboard = tensorboard  # transformers' TensorBoardCallback; its tb_writer exists once training began
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
            if state.global_step == 0:  # the curves start at r_init (a resumed run has this point already)
                self._log_ranks(_unwrap(self.model).rank_map(), 0)
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
                self._log_event(event)

    def _writer(self):
        return getattr(self.tensorboard, "tb_writer", None)

    def _log_ranks(self, ranks: torch.Tensor, step: int) -> None:
        writer = self._writer()
        if writer is None:
            return
        ranks = ranks.float()
        for i, row in enumerate(ranks):
            writer.add_scalar(f"drlora/rank_mean/layer{i}", row.mean().item(), step)
            writer.add_scalar(f"drlora/rank_min/layer{i}", row.min().item(), step)
            writer.add_scalar(f"drlora/rank_max/layer{i}", row.max().item(), step)
        writer.flush()

    def _log_event(self, event) -> None:
        writer = self._writer()
        if writer is None:
            return
        total = int(event.grown.sum())
        if _unwrap(self.model).drlora_config.allocation == "prune":  # its layers_below_target counts layers above
            writer.add_scalar("drlora/ranks_pruned", -total, event.step)
            writer.add_scalar("drlora/layers_above_target", event.layers_below_target, event.step)
        else:
            writer.add_scalar("drlora/ranks_grown", total, event.step)
            writer.add_scalar("drlora/layers_below_target", event.layers_below_target, event.step)
        self._log_ranks(event.ranks, event.step)

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
