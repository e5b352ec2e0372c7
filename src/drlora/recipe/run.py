"""`drlora train` as a function: data -> model -> DR-LoRA -> Trainer -> evaluation -> run folder.

Everything that can be wrong with the input (configuration, data, model, schedule, output folder) is checked before
the run folder is touched, so a refused run leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback, TrainingArguments, set_seed

from .. import mkl_batch
from ..builtin import load_rows
from ..builtin.assets import cache_dir
from ..builtin.tasks import TASKS
from ..callback import DRLoRACallback
from ..data import DataError
from ..evaluate import evaluate_rows
from ..fileio import write_json, write_text
from ..host_memory import keep_freed_host_memory
from ..loading import load_model, resolve_model
from ..sharding import any_sharded
from .config import RunConfig
from .methods import build_method_model, build_peft_model
from .run_dir import RunFolder, explain_os_error
from .sft_data import ExampleDataset, LeftPadCollator, build_examples
from .trainer import (
    CheckpointMarker,
    DRLoRATrainer,
    FiniteGradientGuard,
    NonFiniteError,
    RunRecorder,
    loss_curve,
    newest_complete_checkpoint,
)

EVAL_CACHE_VERSION = 2  # 2: cached scores hold the per-item records


class TrainingStopped(RuntimeError):
    """Training stopped before the end (a diverged loss); the run folder keeps its last good checkpoint."""


def training_rows(config: RunConfig) -> list[dict]:
    rows = []
    for spec in config.data.train:
        rows += load_rows(spec, "train", kinds=("mc", "generation", "chat"))
    if not rows:
        raise DataError("the training data holds no rows.")
    return rows[:config.data.train_limit]


def evaluation_sets(config: RunConfig) -> dict[str, list[dict]]:
    """Named eval sets: data.eval, or by default the builtin tasks among data.train."""
    specs = config.data.eval if config.data.eval is not None else [s for s in config.data.train if s in TASKS]
    return {spec: load_rows(spec, config.data.eval_split)[:config.data.eval_limit] for spec in specs}


def total_steps(config: RunConfig, num_examples: int, world_size: int) -> int:
    """Optimizer steps of the run: train.max_steps, or train.epochs over the data (as the Trainer counts them)."""
    t = config.train
    if t.max_steps is not None:
        return t.max_steps
    batches_per_epoch = math.ceil(num_examples / (t.batch_size * world_size))
    return max(1, math.ceil(t.epochs * batches_per_epoch / t.gradient_accumulation_steps))


def _model_identity(spec: str) -> dict:
    """What identifies a model's weights for the eval cache: its folder, config and weight files' sizes and times."""
    folder = Path(resolve_model(spec))
    if not folder.is_dir():
        return {"id": str(spec)}
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".json"))
    return {"folder": str(folder.resolve()), "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def evaluate_sets(model, tokenizer, sets: dict, config: RunConfig, cache_for: str | None = None,
                  announce: bool = True) -> dict:
    """Scores per eval set, each with its per-item records ("items"); with `cache_for` (a model spec) the scores of an
    unmodified base model are cached. `announce=False` (the other processes of a sharded run) prints nothing."""
    results = {}
    for name, rows in sets.items():
        key = None
        if cache_for is not None:
            identity = {"model": _model_identity(cache_for), "dtype": config.dtype, "rows": rows,
                        "version": EVAL_CACHE_VERSION}
            key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
            cached = cache_dir() / "eval_cache" / f"{key}.json"
            if cached.is_file():
                results[name] = json.loads(cached.read_text())
                print(f"drlora: {name}: base-model scores from the cache ({cached.name})", flush=True)
                continue
        if announce:
            print(f"drlora: evaluating on {name} ({config.data.eval_split if name in TASKS else 'file'}, "
                  f"{len(rows)} rows)", flush=True)
        results[name] = evaluate_rows(model, tokenizer, rows, batch_size=config.train.eval_batch_size,
                                      progress=announce, items=True)
        if key is not None:
            write_json(cache_dir() / "eval_cache" / f"{key}.json", results[name])
    return results


def split_items(scores: dict | None, when: str) -> tuple[dict | None, list[dict]]:
    """(scores without their per-item records, the records as eval_items.jsonl lines tagged with `when` and set)."""
    if scores is None:
        return None, []
    lean, lines = {}, []
    for name, result in scores.items():
        lean[name] = {k: v for k, v in result.items() if k != "items"}
        lines += [{"when": when, "set": name, **item} for item in result.get("items", [])]
    return lean, lines


class _Timer(TrainerCallback):
    """Tokens and seconds of this session's training (a resumed run counts only what it ran itself)."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start, self.tokens_at_start = time.time(), state.num_input_tokens_seen

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.time() - self.start
        self.tokens = state.num_input_tokens_seen - self.tokens_at_start
        self.tokens_total = state.num_input_tokens_seen


def fsdp_version() -> int | None:
    """The FSDP version `accelerate launch` asked for (1 or 2), or None without FSDP.

    Read from the environment accelerate sets (ACCELERATE_USE_FSDP, FSDP_VERSION) rather than from its state: only
    AcceleratorState, built later by the Trainer, says FSDP — PartialState keeps saying MULTI_GPU."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    return int(os.environ.get("FSDP_VERSION", "1"))


def _refuse_unsupported_sharding() -> None:
    """FSDP1 and ZeRO-3 shard the LoRA factors in ways drlora does not read or write; refused from what
    `accelerate launch` sets, before anything is written. FSDP2 is supported (sharding.py)."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and config_file and Path(config_file).is_file():
        stage = str(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage"))
    if stage == "3":
        raise ValueError("drlora train does not support DeepSpeed ZeRO-3 yet (it partitions the LoRA factors, which "
                         "growth and checkpoints write and read whole); use configs/accelerate/fsdp2.yaml to shard "
                         "the model, or deepspeed_zero2.yaml.")
    version = fsdp_version()
    if version == 1:
        raise ValueError("drlora train supports FSDP2, not FSDP1 (its flat parameters mix the experts' LoRA factors "
                         "into one buffer); set fsdp_version: 2, as configs/accelerate/fsdp2.yaml does.")
    if version == 2 and os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false").lower() == "true":
        raise ValueError("fsdp_cpu_ram_efficient_loading must be false for drlora train: it loads the base weights on "
                         "the first process only, and drlora builds each process's adapters on real weights; set it "
                         "to false, as configs/accelerate/fsdp2.yaml does.")


def _close_progress_bar(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        bar = getattr(callback, "training_bar", None)
        if bar is not None:
            bar.close()
            callback.training_bar = None


def _checkpointing_arguments(enabled: bool) -> dict:
    """TrainingArguments' activation checkpointing keys: non-reentrant (the modern default, which needs no input
    gradients for a frozen base). transformers 5.x renamed `gradient_checkpointing` to `activation_checkpointing`
    (the old name warns); the name this transformers has is used."""
    kwargs = {"use_reentrant": False} if enabled else None
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


def training_arguments(config: RunConfig, folder: RunFolder, steps: int, progress: bool) -> TrainingArguments:
    import importlib.util

    t = config.train
    installed = importlib.util.find_spec("tensorboard") is not None
    if t.tensorboard and not installed:
        raise ValueError("train.tensorboard=true, but tensorboard is not installed; pip install tensorboard, or set "
                         "train.tensorboard=false.")
    tensorboard = t.tensorboard if t.tensorboard is not None else installed
    if tensorboard:  # transformers' TensorBoard callback reads its folder from the environment
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(folder.logs)  # this run's, also when one process runs several
    return TrainingArguments(
        output_dir=str(folder.checkpoints), max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler, warmup_steps=math.ceil(t.warmup_ratio * steps),
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps,
        save_strategy="steps", save_steps=t.save_steps or max(1, steps // 10), save_total_limit=t.save_total_limit,
        seed=config.seed, data_seed=config.seed, report_to=["tensorboard"] if tensorboard else [],
        use_cpu=not torch.cuda.is_available(),
        bf16=t.mixed_precision == "bf16", fp16=t.mixed_precision == "fp16", remove_unused_columns=False,
        logging_nan_inf_filter=False, include_num_input_tokens_seen="non_padding", disable_tqdm=not progress,
        dataloader_num_workers=0, train_sampling_strategy="group_by_length",  # little padding
        **_checkpointing_arguments(t.gradient_checkpointing))


def _tensorboard_callback(trainer):
    """The Trainer's own TensorBoardCallback (report_to=['tensorboard']), or None."""
    from transformers.integrations import TensorBoardCallback

    return next((c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)), None)


def _accounting(model) -> dict:
    """The budget and where it went, for metrics.json."""
    cfg = model.drlora_config
    return {"parameters": model.parameter_counts(), "rank_map": model.rank_map().tolist(),
            "layer_names": [layer.name for layer in model.moe_layers], "growth_events": len(model.schedule.events),
            "r_init": cfg.initial_rank, "r_target": cfg.r_target, "r_max": cfg.r_max}


def train(config: RunConfig, progress: bool = True) -> dict:
    """Run the recipe; returns metrics.json's content. Raises ConfigError / DataError / ValueError / OSError with
    one sentence for bad input (before writing anything) and TrainingStopped if the loss diverges."""
    started = time.time()
    _refuse_unsupported_sharding()
    folder = RunFolder(config.output_dir)
    folder.check_claim(config)
    if config.resume and not newest_complete_checkpoint(folder.checkpoints) and folder.config_file.is_file():
        print(f"drlora: {folder.path} has no complete checkpoint yet; starting from the beginning", flush=True)
    if config.train.keep_host_memory:
        print(f"drlora: {keep_freed_host_memory()}", flush=True)
    set_seed(config.seed)
    train_rows, eval_sets = training_rows(config), evaluation_sets(config)
    base, tokenizer = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    examples, data_stats = build_examples(tokenizer, train_rows, config.data.max_length)
    steps = total_steps(config, len(examples), PartialState().num_processes)
    args = training_arguments(config, folder, steps, progress)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    peft = config.method == "peft-lora"
    if peft:
        model, accounting = build_peft_model(config, base, steps)
        method_details = {}
    else:  # refuses dense models and infeasible schedules
        model, method_details = build_method_model(config, base, examples, steps, pad)

    state = PartialState()
    main = state.is_main_process
    if main:
        folder.claim(config)
    state.wait_for_everyone()
    checkpoint = newest_complete_checkpoint(folder.checkpoints) if config.resume else None
    eval_before, eval_seconds = None, {}
    if main and config.data.eval_before and eval_sets:
        clock = time.time()
        eval_before = evaluate_sets(model, tokenizer, eval_sets, config, cache_for=config.model)
        eval_seconds["before"] = round(time.time() - clock, 1)
    timer, recorder = _Timer(), None
    callbacks = [FiniteGradientGuard(model), CheckpointMarker(), timer]
    if not peft:
        drlora_callback = DRLoRACallback(model, save_adapter=False)  # DRLoRATrainer writes the adapter itself
        recorder = RunRecorder(drlora_callback, folder.ranks_file, model)
        callbacks[1:1] = [drlora_callback, recorder]
    trainer = DRLoRATrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                            data_collator=LeftPadCollator(pad), processing_class=tokenizer, callbacks=callbacks)
    if recorder is not None:  # the rank map goes through the Trainer's TensorBoard writer, not a second one
        recorder.tensorboard = _tensorboard_callback(trainer)
    if peft:
        schedule = "vanilla PEFT LoRA, ranks fixed"
    else:
        kind = "pruning" if model.drlora_config.allocation == "prune" else "growth"
        schedule = f"{kind} events at steps {', '.join(map(str, model.schedule.events)) or 'none'}"
    factor = None if peft else model.expert_loras()[0].lora_A
    if main and factor is not None and factor.device.type == "cpu":  # which kernel runs drlora's grouped matmuls
        print(f"drlora: {mkl_batch.describe(factor.dtype)}", flush=True)
    if main:
        print(f"drlora: training {config.method} on {data_stats['rows']:,} rows ({data_stats['tokens']:,} tokens, "
              f"{data_stats['truncated']} truncated) for {steps} steps; {schedule}"
              + (f"; resuming from {checkpoint.name}" if checkpoint else ""), flush=True)
    try:
        try:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        finally:
            _close_progress_bar(trainer)  # an error must be the last thing printed, not a stale progress bar
    except NonFiniteError as err:
        last = newest_complete_checkpoint(folder.checkpoints)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
        raise TrainingStopped(f"{err}; training stopped and {kept}; lower train.learning_rate (or raise "
                              "train.warmup_ratio) and resume=true, or start over with overwrite=true.") from None
    except OSError as err:  # a checkpoint could not be written: drop the incomplete one, keep the complete ones
        if main:
            folder.remove_incomplete_checkpoints()
        raise OSError(explain_os_error(err, f"a checkpoint in {folder.checkpoints}")) from None
    # under FSDP2 each forward gathers its layers from every process: every process evaluates the same rows in step
    # and joins the adapter's gather; only the main process keeps the scores and writes
    sharded = not peft and any_sharded(model.parameters())
    if not main and not sharded:
        return {}
    clock = time.time()
    eval_after = evaluate_sets(model, tokenizer, eval_sets, config, announce=main) if eval_sets else None
    eval_seconds["after"] = round(time.time() - clock, 1)
    if not main:
        model.save_pretrained(folder.path / "adapter.partial")  # joins the gather; the main process writes
        return {}
    eval_before, items_before = split_items(eval_before, "before")
    eval_after, items_after = split_items(eval_after, "after")
    metrics = {
        "status": "completed", "model": config.model, "method": config.method, "steps": steps,
        "train_data": config.data.train, "eval_split": config.data.eval_split, "data": data_stats,
        "wall_time_s": round(time.time() - started, 1), "train_time_s": round(timer.seconds, 1),
        "tokens_seen": int(timer.tokens_total), "train_tokens_per_s": round(timer.tokens / max(timer.seconds, 1e-9), 1),
        "train_loss": loss_curve(trainer.state.log_history), "eval_before": eval_before, "eval_after": eval_after,
        "eval_seconds": eval_seconds,
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),  # as the Trainer left it
        **(accounting if peft else _accounting(model)), "processes": args.world_size,
        "method_details": method_details,
        "rank_maps_checked_across_processes": recorder.processes_checked if recorder else None,
    }
    try:
        folder.publish_adapter(model)
        write_text(folder.items_file, "".join(json.dumps(line) + "\n" for line in items_before + items_after))
        write_json(folder.metrics_file, metrics)  # last: a completed metrics.json means every output is there
    except OSError as err:
        raise OSError(explain_os_error(err, f"the results in {folder.path}")) from None
    from .report import draw_heatmap, summary

    draw_heatmap(folder.path, folder.heatmap)
    print(summary(folder.path), flush=True)
    print(f"drlora: wrote {folder.path}/ (config.yaml, adapter/, metrics.json, eval_items.jsonl, ranks.jsonl, "
          "rank_heatmap.png, checkpoints/)", flush=True)
    return metrics

