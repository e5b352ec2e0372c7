"""drlora's data format: one JSON object per line (JSONL), three kinds of rows.

* multiple choice: ``{"prompt": str, "choices": [str, ...], "label": int}`` — scored by log-likelihood of each
  choice after the prompt; trained on the correct choice.
* generation: ``{"prompt": str, "completion": str}`` — scored by exact match of the greedy continuation.
* chat (training only): ``{"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}``.

Builtin tasks are converted to this format, so a user's file and a builtin go through the same code. Malformed rows
raise `DataError` with the file and line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file or row that does not follow drlora's JSONL format."""


def row_kind(row: dict) -> str:
    """'mc', 'generation' or 'chat' — raises DataError (without location) if the row is none of them."""
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError('"messages" must be a non-empty list of {"role", "content"} objects')
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(
                    message.get("content"), str):
                raise DataError(f'message {i} must be {{"role": one of {list(ROLES)}, "content": a string}}')
        return "chat"
    if not isinstance(row.get("prompt"), str):
        raise DataError('a row needs a string "prompt" (or "messages" for chat)')
    if "choices" in row:
        choices, label = row["choices"], row.get("label")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise DataError('"choices" must be a list of at least two strings')
        if "label" not in row:
            raise DataError('a multiple-choice row needs "label", the index of the correct choice in "choices" '
                            f'(0..{len(choices) - 1})')
        if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
            raise DataError(f'"label" must be an integer index into "choices" (0..{len(choices) - 1}), got {label!r}')
        return "mc"
    if isinstance(row.get("completion"), str):
        return "generation"
    raise DataError('a row with a "prompt" needs "choices" and "label" (multiple choice) or "completion" '
                    "(generation)")


def read_jsonl(path, kinds: Iterable[str] = ("mc", "generation", "chat")) -> list[dict]:
    """Read and validate a JSONL file; every row must be of one of `kinds`, and all rows of one kind."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass a JSONL file or a builtin task name.")
    rows, first_kind = [], None
    try:  # utf-8-sig: editors on Windows start UTF-8 files with a byte-order mark, which is no part of the JSON
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}; it must be a UTF-8 text file.") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            kind = row_kind(row)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from err
        except DataError as err:
            raise DataError(f"{path}, line {number}: {err}.") from None
        if kind not in kinds:
            raise DataError(f"{path}, line {number}: a {kind} row, but only {', '.join(kinds)} rows can be used here.")
        if first_kind is None:
            first_kind = kind
        elif kind != first_kind:
            raise DataError(f"{path}, line {number}: a {kind} row in a file of {first_kind} rows; use one kind "
                            "per file.")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows; it must have one JSON object per line.")
    return rows


def write_jsonl(path, rows: Iterable[dict]) -> None:
    """Write rows atomically (temporary file, then rename)."""
    from .fileio import write_text

    write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
