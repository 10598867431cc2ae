"""Reading an HF ``config.json``: what every backbone's config (``qwen2_5_vl.config``,
``internvl.config``) does the same way."""
from __future__ import annotations

import json
import os
from typing import Any


def read_config_json(path: str, expected: str) -> tuple[str, dict[str, Any]]:
    """(file, parsed dict) of ``path``'s ``config.json`` (``path`` a directory or the file itself).
    ``expected`` names the directory wanted in the not-found error (e.g. "an InternVL directory")."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise FileNotFoundError(f"{f} not found: expected {expected} with config.json")
    with open(f, encoding="utf-8") as fh:
        try:
            return f, json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e


def special_token_ids(d: dict[str, Any]) -> dict[str, Any]:
    """``bos_token_id`` / ``eos_token_id`` of a (text) config dict, where set; a list of ids as a tuple."""
    return {k: (tuple(d[k]) if isinstance(d[k], list) else d[k])
            for k in ("bos_token_id", "eos_token_id") if d.get(k) is not None}
