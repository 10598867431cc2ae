"""Reading JSON Lines with positions: every reader in jaxprm reports bad input as ``file:line``."""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class BadLine:
    """A line that is not valid JSON; ``message`` already names ``file:line``."""

    message: str


def iter_jsonl(path: str | os.PathLike, name: str | None = None) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, row)`` for every non-blank line, ``where`` = ``"{name}:{lineno}"`` (1-based;
    ``name`` defaults to ``path``). A line that does not parse yields a ``BadLine`` as its row, so
    the caller decides whether to raise or skip. Lines are decoded one by one, so a line that is not
    UTF-8 is a ``BadLine`` too and the lines after it are still read."""
    label = os.fspath(path) if name is None else name
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{label}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, BadLine(f"{where}: not UTF-8: byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadLine(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
