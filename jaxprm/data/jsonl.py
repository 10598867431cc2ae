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
    the caller decides whether to raise or skip."""
    label = os.fspath(path) if name is None else name
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{label}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadLine(f"{where}: invalid JSON: {e.msg} (column {e.colno})")
