"""`drlora export RUN_DIR`: a trained run as a vanilla PEFT adapter or as a merged standalone checkpoint.

Both load with plain transformers / PEFT in a process that has never imported drlora. The output is written to a
temporary folder beside the destination and renamed when complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

FORMATS = ("peft", "merged")


def export_run(run_dir, fmt: str, out, overwrite: bool = False) -> Path:
    """Export the run in `run_dir` (or an adapter folder, with `model` read from its run's config.yaml) to `out`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose peft or merged.")
    run_dir, out = Path(run_dir).expanduser(), Path(out).expanduser()
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a drlora run folder (no config.yaml); pass the output_dir of "
                                "a finished `drlora train`.")
    config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    if out.exists() and not out.is_dir():  # even with overwrite: a file named as --out is a mistaken path, not a run
        raise FileExistsError(f"--out {out} is a file, but an export is a folder (config, weights, tokenizer); "
                              "pass the path of a new or empty folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite.")

    from ..loading import adapter_folder, load_model  # torch: only once the arguments are known to be usable

    adapter = adapter_folder(run_dir)
    model, tokenizer = load_model(config.get("model", "builtin:smollm2-moe"), adapter=adapter,
                                  dtype=config.get("dtype", "auto"),
                                  trust_remote_code=bool(config.get("trust_remote_code", False)))
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    base_dtype = str(model.moe_layers[0].experts.down_proj.dtype).removeprefix("torch.")
    try:
        if fmt == "peft":
            print(f"drlora: PEFT adapter: LoRA factors in float32 (as PEFT keeps adapters), routers in their own "
                  f"dtype; base model {base_dtype}", flush=True)
            model.export_peft(partial)
        else:
            print(f"drlora: merged checkpoint in {base_dtype}, the base weights' dtype", flush=True)
            merged = model.merge_and_unload()
            merged.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out
