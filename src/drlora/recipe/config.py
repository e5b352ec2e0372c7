"""The `drlora train` recipe configuration: YAML with dotted `key=value` overrides (torchtune / hydra style).

Three sections and a few top-level keys. `drlora config --show` prints every key with its default and help text.
Defaults follow the paper (METHOD.md); the growth schedule is scaled to the run length (`drlora.growth_interval:
auto` keeps the paper's ratio of 200 steps in 3,750), so a short run still grows every layer to its target.
Unknown keys and misspelt choices are refused with the closest known one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..builtin.tasks import TASKS
from ..config import DRLoRAConfig

# method -> the engine settings it fixes (drlora.recipe.methods builds the model)
METHOD_SETTINGS = {"dr-lora": {}, "importance-only": {"signal": "importance"}, "lora": {"allocation": "fixed"},
                   "static-freq": {"allocation": "fixed"}, "esft": {"allocation": "fixed"},
                   "adalora-prune": {"allocation": "prune"}, "peft-lora": {"allocation": "fixed"}}
METHODS = tuple(METHOD_SETTINGS)
SPLITS = ("train", "validation", "test")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
              "inverse_sqrt", "warmup_stable_decay")
PAPER_STEPS, PAPER_GROWTH_INTERVAL = 3750, 200


def _opt(default, help_text: str, choices: tuple | None = None):
    metadata = {"help": help_text, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    train: list[str] = _opt(["siqa"], f"Training data: builtin task names ({', '.join(TASKS)}) and/or JSONL files "
                                      "(multiple-choice, generation or chat rows).")
    eval: list[str] | None = _opt(None, "Evaluation data, scored before and after training: builtin tasks and/or "
                                        "JSONL files. null: the builtin tasks among data.train.")
    eval_split: str = _opt("test", "Split of builtin eval tasks.", SPLITS)
    eval_limit: int | None = _opt(None, "Evaluate on the first N rows of each eval task only (null: all).")
    eval_before: bool = _opt(True, "Also evaluate the base model before training (cached per model and data).")
    train_limit: int | None = _opt(None, "Train on the first N rows of the training data only (null: all).")
    max_length: int = _opt(512, "Longest training sequence in tokens; longer prompts lose their beginning.")


@dataclass
class TrainingConfig:
    max_steps: int | None = _opt(None, "Optimizer steps to run; null: train.epochs over the training data.")
    epochs: float = _opt(1.0, "Passes over the training data when max_steps is null.")
    batch_size: int = _opt(8, "Sequences per device per micro-batch.")
    gradient_accumulation_steps: int = _opt(6, "Micro-batches per optimizer step (8 x 6 = the paper's effective "
                                               "batch of 48 on one device).")
    learning_rate: float = _opt(2e-5, "Peak learning rate (the paper's 2e-5; short CPU runs need more).")
    lr_scheduler: str = _opt("linear", "Learning-rate schedule after warmup.", SCHEDULERS)
    warmup_ratio: float = _opt(0.03, "Fraction of the steps with a linearly rising learning rate.")
    weight_decay: float = _opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0: no clipping).")
    logging_steps: int = _opt(10, "Log the training loss every N steps.")
    save_steps: int | None = _opt(None, "Save a resumable checkpoint every N steps (null: about every 10% of "
                                        "the run).")
    save_total_limit: int = _opt(2, "Checkpoints to keep (the newest ones).")
    eval_batch_size: int = _opt(16, "Sequences per forward pass when evaluating.")
    mixed_precision: str = _opt("no", "Autocast: no, bf16 or fp16 (GPU). The base weights keep their dtype (see "
                                      "dtype); what drlora trains is float32 either way (drlora.adapter_dtype).",
                                ("no", "bf16", "fp16"))
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward to save memory (slower); "
                                               "DR-LoRA counts routing once per real forward and its importance is "
                                               "unchanged. Non-reentrant checkpointing (use_reentrant=False), which "
                                               "needs no input gradients for the frozen base.")
    tensorboard: bool | None = _opt(None, "Write TensorBoard logs to output_dir/logs (null: when installed).")
    keep_host_memory: bool = _opt(True, "Keep freed host memory in the process (glibc's malloc thresholds, see "
                                        "drlora.host_memory): CPU steps stop page-faulting their tensors in again "
                                        "(5-15% faster here; values unchanged), and the process holds its peak "
                                        "memory until it exits.")


@dataclass
class BaselineConfig:
    calibration_rows: int = _opt(128, "static-freq and esft: training rows whose routing is measured before "
                                      "training.")
    esft_top_p: float = _opt(0.5, "esft: adapt the experts covering this share of each layer's routing score (ESFT "
                                  "used 0.1-0.2 with 64 fine-grained experts; 0.5 keeps about half of 8).")
    esft_score: str = _opt("gate", "esft: 'gate' (mean routing weight) or 'token' (share of tokens routed).",
                           ("gate", "token"))


@dataclass
class RunConfig:
    model: str = _opt("builtin:smollm2-moe", "builtin:smollm2-moe or a local transformers MoE checkpoint folder.")
    method: str = _opt("dr-lora", "Rank allocation: dr-lora, or a baseline at the same budget (see "
                                  "drlora.recipe.methods): importance-only, lora, static-freq, esft, adalora-prune, "
                                  "peft-lora.",
                       METHODS)
    output_dir: str = _opt("runs/drlora", "The run folder: config, adapter, metrics, rank map, checkpoints.")
    overwrite: bool = _opt(False, "Replace whatever run output_dir holds.")
    resume: bool = _opt(False, "Continue the run in output_dir from its newest checkpoint.")
    seed: int = _opt(0, "Seed of the data order, LoRA initialisation and dropout.")
    dtype: str = _opt("auto", "Weights dtype: auto (the checkpoint's), float32, bfloat16 or float16.",
                      ("auto", "float32", "bfloat16", "float16"))
    trust_remote_code: bool = _opt(False, "Allow a checkpoint's own Python code (off unless you ask).")
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "What to train and evaluate on."})
    train: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "The optimisation."})
    baseline: BaselineConfig = field(default_factory=BaselineConfig,
                                     metadata={"help": "Settings of the baseline methods."})
    drlora: dict = field(default_factory=dict, metadata={"help": "DRLoRAConfig fields (growth_interval may be "
                                                                 "'auto'); see below."})

    # ---- derived ------------------------------------------------------------------------------------------------
    def drlora_config(self, total_steps: int, **method_settings) -> DRLoRAConfig:
        """The engine's configuration for a run of `total_steps` optimizer steps (validates the schedule);
        `method_settings` are what the method fixes (e.g. allocation='fixed')."""
        values = {**drlora_defaults(), **self.drlora, **method_settings, "seed": self.seed,
                  "total_steps": total_steps}
        if values["growth_interval"] == "auto":
            values["growth_interval"] = auto_growth_interval(total_steps)
        return DRLoRAConfig.from_dict(values)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["drlora"] = {**drlora_defaults(), **self.drlora}
        return data


def auto_growth_interval(total_steps: int) -> int:
    """The paper's growth interval (200 of 3,750 steps) scaled to the run: about 18 growth events in any run."""
    return max(1, round(total_steps * PAPER_GROWTH_INTERVAL / PAPER_STEPS))


def drlora_defaults() -> dict:
    """DRLoRAConfig's defaults as the recipe shows them (seed and total_steps come from the recipe)."""
    defaults = DRLoRAConfig().to_dict()
    for key in ("seed", "total_steps"):
        defaults.pop(key)
    defaults["growth_interval"] = "auto"
    return defaults


# ---- loading and overriding -----------------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A configuration key or value that drlora cannot use."""


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(name: str, value: Any, annotation, choices) -> Any:
    """Check `value` against the field's type (and choices), converting YAML strings like '1e-4' where clear."""
    hint = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if hint in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (annotation,) = [a for a in args if a is not type(None)]
        return _coerce(name, value, annotation, choices)
    if value is None:
        raise ConfigError(f"{name} cannot be null; give a value.")
    if typing.get_origin(annotation) is list:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name} must be a name or a list of names, got {value!r}.")
        return list(value)
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}.")
        return value
    if annotation in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if annotation is float else int(value)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}.") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (annotation is int and
                                                                               not float(value).is_integer()):
            raise ConfigError(f"{name} must be {'an integer' if annotation is int else 'a number'}, got {value!r}.")
        return annotation(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}.")
        if choices and value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}"
                              f"{_did_you_mean(value, choices)}.")
        return value
    return value


def _coerce_drlora(key: str, value: Any) -> Any:
    """Check one `drlora.<key>` value against DRLoRAConfig's field type."""
    known = drlora_defaults()
    if key not in known:
        raise ConfigError(f"unknown config key 'drlora.{key}'{_did_you_mean(key, known)}; `drlora config --show` "
                          "lists every key.")
    if key == "growth_interval" and value == "auto":
        return value
    annotation = typing.get_type_hints(DRLoRAConfig)[key]
    if typing.get_origin(annotation) is tuple:
        annotation = list[str]
    return _coerce(f"drlora.{key}", value, annotation, None)


def _apply(section, values: dict, prefix: str = "") -> None:
    """Set `values` (a nested dict) onto the dataclass `section`, checking every key and value."""
    fields = {f.name: f for f in dataclasses.fields(section)}
    hints = typing.get_type_hints(type(section))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}{_did_you_mean(key, fields)}; `drlora config --show` "
                              "lists every key.")
        if key == "drlora":
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a mapping of DRLoRAConfig fields.")
            section.drlora = {**section.drlora, **{k: _coerce_drlora(k, v) for k, v in value.items()}}
        elif dataclasses.is_dataclass(getattr(section, key)):
            if not isinstance(value, dict):
                first = dataclasses.fields(getattr(section, key))[0].name
                raise ConfigError(f"{name} is a section; set its keys, e.g. {name}.{first}=...")
            _apply(getattr(section, key), value, prefix=f"{name}.")
        else:
            setattr(section, key, _coerce(name, value, hints[key], fields[key].metadata.get("choices")))


def parse_override(text: str) -> dict:
    """'train.learning_rate=1e-4' -> {'train': {'learning_rate': 1e-4}} (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.learning_rate=1e-4).")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: dict = {}
    cursor = nested
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return nested


def load_config(path=None, overrides: list[str] = ()) -> RunConfig:
    """The resolved configuration: defaults, then the YAML file (if any), then the overrides in order."""
    config = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a YAML file (e.g. configs/demo.yaml).")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(data).__name__}.")
        _apply(config, data)
    for text in overrides:
        _apply(config, parse_override(text))
    validate(config)
    return config


def config_from_mappings(*mappings: dict) -> RunConfig:
    """The resolved configuration from nested mappings applied in order over the defaults (what a YAML file holds),
    with the same checks as `load_config`."""
    config = RunConfig()
    for mapping in mappings:
        _apply(config, mapping)
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """Values that are of the right type but cannot work."""
    t, d = config.train, config.data
    for name, value in (("train.batch_size", t.batch_size), ("train.gradient_accumulation_steps",
                        t.gradient_accumulation_steps), ("train.logging_steps", t.logging_steps),
                        ("train.eval_batch_size", t.eval_batch_size), ("data.max_length", d.max_length),
                        ("train.save_total_limit", t.save_total_limit)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}.")
    for name, value in (("train.max_steps", t.max_steps), ("train.save_steps", t.save_steps),
                        ("data.eval_limit", d.eval_limit), ("data.train_limit", d.train_limit)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be at least 1 or null, got {value}.")
    if t.max_steps is None and not t.epochs > 0:
        raise ConfigError(f"train.epochs must be positive when train.max_steps is null, got {t.epochs}.")
    if not t.learning_rate > 0 or not math.isfinite(t.learning_rate):
        raise ConfigError(f"train.learning_rate must be a positive number, got {t.learning_rate}.")
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}.")
    if config.baseline.calibration_rows < 1:
        raise ConfigError(f"baseline.calibration_rows must be at least 1, got {config.baseline.calibration_rows}.")
    if not 0 < config.baseline.esft_top_p <= 1:
        raise ConfigError(f"baseline.esft_top_p must be in (0, 1], got {config.baseline.esft_top_p}.")
    fixed = {"allocation", "signal"} & set(config.drlora)
    if fixed and config.method != "dr-lora":
        raise ConfigError(f"method={config.method} sets drlora.{min(fixed)} itself; remove that key.")
    if not d.train:
        raise ConfigError("data.train is empty; name a builtin task or a JSONL file.")
    if config.overwrite and config.resume:
        raise ConfigError("overwrite=true and resume=true contradict each other; choose one.")
    growth = {**drlora_defaults(), **config.drlora}["growth_interval"]
    try:  # the engine's own checks, with a placeholder run length where the real one is not known yet
        DRLoRAConfig.from_dict({**drlora_defaults(), **config.drlora, **METHOD_SETTINGS[config.method],
                                "growth_interval": 1 if growth == "auto" else growth, "seed": config.seed})
    except (TypeError, ValueError) as err:
        raise ConfigError(_with_drlora_keys(str(err))) from None


def _with_drlora_keys(message: str) -> str:
    """DRLoRAConfig's message with its field names spelt as the recipe's keys (r_init -> drlora.r_init), so that it
    names what to change on the command line or in the YAML file. Quoted words are values, not keys: left alone."""
    names = "|".join(sorted(drlora_defaults(), key=len, reverse=True))
    return re.sub(rf"(?<![\w.'\"])({names})(?![\w'\"])", r"drlora.\1", message)


# ---- showing ------------------------------------------------------------------------------------------------------
def describe(config: RunConfig) -> str:
    """The resolved configuration as YAML, every key commented with its help text."""
    lines = ["# drlora train — the resolved configuration (override any key with key=value)"]

    def emit(section, indent: str, prefix: str) -> None:
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            help_text = f.metadata.get("help", "")
            choices = f.metadata.get("choices")
            if choices:
                help_text += f" One of: {', '.join(choices)}."
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:  # {help_text}")
                emit(value, indent + "  ", f"{prefix}{f.name}.")
            elif f.name == "drlora":
                lines.append(f"{indent}drlora:  # {help_text}")
                helps = DRLoRAConfig.help()
                for key, sub in {**drlora_defaults(), **value}.items():
                    text = helps.get(key, "")
                    if key == "growth_interval":
                        text += " 'auto': the paper's 200 of 3,750 steps, scaled to the run."
                    lines.append(f"{indent}  {key}: {_yaml_value(sub)}  # {text}")
            else:
                lines.append(f"{indent}{f.name}: {_yaml_value(value)}  # {help_text}")

    emit(config, "", "")
    return "\n".join(lines) + "\n"


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


def to_yaml(config: RunConfig) -> str:
    """Plain YAML of the resolved configuration (what a run folder's config.yaml holds)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
