"""Writing outputs so that nothing half-written is ever seen: a temporary file beside the target, then a rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write) -> None:
    """Call `write(tmp_path)` on a temporary file in `path`'s folder, then rename it to `path`.

    A crash, a full disk or Ctrl-C leaves the old file (or none), never a truncated one. The file gets the
    permissions a plain open() would give (mkstemp's are owner-only)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path, text: str) -> None:
    """Write UTF-8 text atomically, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))


def write_json(path, data) -> None:
    """Write JSON atomically, creating the folder."""
    write_text(path, json.dumps(data, indent=2) + "\n")
