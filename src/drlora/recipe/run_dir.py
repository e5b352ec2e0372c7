"""The run folder: who may write into it, and what a finished run leaves there.

    output_dir/
      config.yaml         the resolved configuration (what `resume` compares against)
      checkpoints/        resumable checkpoints (adapter training state, optimizer, scheduler, RNG)
      ranks.jsonl         one line per growth event
      adapter/            the trained adapter (save_pretrained), written when training is done
      metrics.json        loss curve summary, eval before/after, speed, parameter counts, final rank map
      eval_items.jsonl    every eval item's result before and after training (correct, log-likelihood margin), so
                          runs can be compared item by item
      rank_heatmap.png    final ranks and growth over time
      logs/               TensorBoard logs, when installed

A folder that holds another run is refused unless `overwrite` or `resume` says what to do with it, and resuming
checks that the configuration is the one the checkpoints were made with. Finished outputs are written to a
temporary name and renamed, so nothing half-written is ever left.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import yaml

from ..fileio import write_text
from .config import ConfigError, RunConfig, to_yaml

# keys that may differ between a run and its resumption
RUNTIME_KEYS = ("resume", "overwrite", "output_dir")


def _identity(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def _differences(saved: dict, ours: dict, defaults: dict, prefix: str = "") -> list[str]:
    found = []
    for key in sorted(set(saved) | set(ours), key=str):  # a hand-edited file may hold non-string keys
        a, b = saved.get(key), ours.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, defaults.get(key) or {}, f"{prefix}{key}.")
        elif key not in saved and key in defaults and b == defaults[key]:
            continue  # a key added to drlora after the run was saved, at its default: the run did not set it
        elif a != b:
            found.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return found


def _as_saved(config: RunConfig) -> dict:
    return _identity(yaml.safe_load(to_yaml(config)))


def config_differences(saved: dict, config: RunConfig) -> list[str]:
    """What differs between a run folder's config.yaml (`saved`) and `config`, as "key was A, now B", leaving out
    the keys a resumption may change and keys newer than the saved file that keep their default. `config` goes
    through the same YAML round trip as the saved file, so only real differences count. `drlora train resume=true`
    and `drlora compare` both decide by it."""
    return _differences(_identity(saved), _as_saved(config), _as_saved(RunConfig()))


def explain_os_error(err: OSError, what: str) -> str:
    """One sentence for an OSError while writing `what`."""
    if err.errno == errno.ENOSPC:
        return f"the disk is full while writing {what}; free some space and run again with resume=true."
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {what}: {err.strerror}; choose a writable output_dir."
    return f"cannot write {what}: {err.strerror or err}."


class RunFolder:
    def __init__(self, path):
        self.path = Path(path).expanduser()
        self.checkpoints = self.path / "checkpoints"
        self.config_file = self.path / "config.yaml"
        self.ranks_file = self.path / "ranks.jsonl"
        self.metrics_file = self.path / "metrics.json"
        self.items_file = self.path / "eval_items.jsonl"
        self.adapter = self.path / "adapter"
        self.heatmap = self.path / "rank_heatmap.png"
        self.logs = self.path / "logs"

    def check_claim(self, config: RunConfig) -> None:
        """Refuse, before any work, a folder that holds another run unless overwrite or resume says what to do;
        check a resumed run's configuration. Writes nothing."""
        if config.resume and not self.config_file.is_file():
            raise ConfigError(f"resume=true, but {self.path} holds no run to resume; check output_dir, or drop "
                              "resume=true to start a new run.")
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ConfigError(f"output_dir {self.path} is a file; choose a folder.")
        if not any(self.path.iterdir()) or config.overwrite:
            return
        if not self.config_file.is_file():
            raise ConfigError(f"output_dir {self.path} is not empty and holds no drlora run; choose an empty or new "
                              "folder, or pass overwrite=true to replace its contents.")
        saved = yaml.safe_load(self.config_file.read_text(encoding="utf-8")) or {}
        if not config.resume:
            raise ConfigError(f"output_dir {self.path} already holds a run; pass resume=true to continue it, "
                              "overwrite=true to replace it, or choose another output_dir.")
        changed = config_differences(saved, config)
        if changed:
            raise ConfigError(f"cannot resume the run in {self.path} with another configuration "
                              f"({'; '.join(changed[:3])}); resume with its own configuration, or pass overwrite=true "
                              "to start over.")

    def claim(self, config: RunConfig) -> None:
        """Create (or, with overwrite, empty) the folder and write config.yaml; one sentence if it is unwritable."""
        try:
            if config.overwrite and self.path.exists():
                for child in self.path.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
            if not os.access(self.path, os.W_OK):
                raise PermissionError(errno.EACCES, "permission denied")
            if not (config.resume and self.config_file.is_file()):
                write_text(self.config_file, to_yaml(config))
        except OSError as err:
            raise OSError(explain_os_error(err, f"the run folder {self.path}")) from None

    def remove_incomplete_checkpoints(self) -> None:
        """Delete checkpoint folders that never got their completion marker (a save that failed midway)."""
        from .trainer import COMPLETE_MARKER

        if self.checkpoints.is_dir():
            for child in self.checkpoints.iterdir():
                if child.is_dir() and not (child / COMPLETE_MARKER).is_file():
                    shutil.rmtree(child, ignore_errors=True)

    def publish_adapter(self, model) -> None:
        """save_pretrained into adapter.partial, then rename it to adapter (replacing an older one)."""
        partial = self.path / "adapter.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            model.save_pretrained(partial)
            if self.adapter.exists():
                shutil.rmtree(self.adapter)
            partial.rename(self.adapter)
        except OSError as err:
            shutil.rmtree(partial, ignore_errors=True)
            raise OSError(explain_os_error(err, f"the adapter in {self.path}")) from None
