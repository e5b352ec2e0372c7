"""Loading a model to train or evaluate: a builtin, a local checkpoint or a hub id, optionally with an adapter.

Only safetensors and JSON are read (`use_safetensors=True`), and `trust_remote_code` stays off unless the caller
asks for it: a checkpoint folder must never be able to run code or unpickle objects by being loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .builtin import resolve_model
from .builtin.smollm2_moe import quiet_zero_width
from .saving import CONFIG_NAME

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype):
    """'auto' (the checkpoint's own dtype), 'float32', 'bfloat16', 'float16' or a torch.dtype."""
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype or "auto"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}.")
    return DTYPES[dtype]


def adapter_folder(path) -> Path:
    """An adapter folder, given the folder itself or a training run folder that holds one in `adapter/`."""
    path = Path(path).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise FileNotFoundError(f"no drlora adapter in {path} (looked for {CONFIG_NAME} there and in {path}/adapter); "
                            "pass an adapter folder saved with save_pretrained or a drlora run folder.")


def is_peft_adapter(folder) -> bool:
    """Whether an adapter folder holds a PEFT adapter (its config names a peft_type) rather than a drlora one."""
    import json

    try:
        return "peft_type" in json.loads((Path(folder) / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def load_model(spec: str, adapter=None, dtype="auto", device=None, trust_remote_code: bool = False):
    """(model, tokenizer) for `spec` (see `drlora.builtin.resolve_model`), with a drlora adapter if given.

    With an adapter the model is a DRLoRAModel in eval mode; call `merge_and_unload()` for a plain model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(spec)
    with quiet_zero_width():
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=parse_dtype(dtype), use_safetensors=True,
                                                         trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except OSError as err:
            raise OSError(f"cannot load model {spec!r}: {err}") from err
    if device is not None:
        model.to(device)
    model.eval()
    if adapter is not None:
        folder = adapter_folder(adapter)
        if is_peft_adapter(folder):  # a peft-lora baseline run, or a `drlora export --format peft`
            from peft import PeftModel

            return PeftModel.from_pretrained(model, folder, is_trainable=False).eval(), tokenizer
        from .saving import load_dr_lora_model

        model = load_dr_lora_model(model, folder, is_trainable=False)
    return model, tokenizer
