"""Configuration of ``python -m jaxprm.synth``: defaults, config files and ``--config.x=y`` overrides.

A config file is a Python file with ``get_config()`` returning an ``ml_collections.ConfigDict``
(``--config path.py:arg`` calls ``get_config("arg")``); ``configs/synth_tiny.py`` and
``configs/synth_vlprm.py`` start from ``base_config()``. Overrides name a field by its dotted
path and are parsed by the field's current type (bool: true/false/1/0/yes/no; int; float; str
taken as is; None/tuple/list fields: a Python literal, else the string)::

    python -m jaxprm.synth --config configs/synth_tiny.py --config.num_questions=50 \\
        --config.judge.noise 0.3 --config.policy.kind=scripted --out /tmp/synth
"""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Sequence

from ml_collections import ConfigDict


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.name = "synth"
    # --- questions
    c.source = "synthetic"  # "synthetic" (embedded puzzles) | "jsonl"
    c.num_questions = 24  # synthetic: how many; jsonl: first n (0 = all)
    c.seed = 0
    c.synthetic = ConfigDict({"image_size": (112, 112), "question_types": ""})  # "" = all, else "count,sum"
    c.input = ConfigDict({"path": "", "format": "generic", "image_root": ""})
    c.source_name = ""  # Record.source; default "synth/<question source>"
    # --- rollouts
    c.rollouts_per_question = 2
    c.max_rollout_attempts = 3  # rounds of asking (re-asks for malformed outputs)
    c.max_steps_per_section = 12
    # --- Monte-Carlo values
    c.mc = ConfigDict({"num_continuations": 16, "early_stop": False, "chunk": 1})
    # --- policy
    c.policy = ConfigDict({
        "kind": "scripted",  # "scripted" | "openai"
        # scripted puzzle solver
        "error_rate": 0.5, "perception_share": 0.5, "malformed_rate": 0.1, "slip_rate": 0.05,
        "recovery_rate": 0.02, "hard_fraction": 0.0, "hard_slip_rate": 0.4, "variants": 3, "seed": 0,
        # OpenAI-compatible server
        "base_url": "http://127.0.0.1:8000/v1", "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "api_key_env": "OPENAI_API_KEY", "temperature": 1.0, "top_p": 1.0, "max_tokens": 4096,
        "n_per_request": 0,  # 0: all K continuations of a prefix in one request
        "max_workers": 16, "prefix_mode": "continue_final_message", "send_seed": False,
        "timeout": 120.0, "max_retries": 5,  # openai's per-attempt timeout and retries (backoff: openai's)
        "max_requests_per_second": 0.0,  # 0: no client-side limit
        "price_per_1k_prompt": 0.0, "price_per_1k_completion": 0.0, "extra_json": "",
    })
    # --- judge
    c.judge = ConfigDict({
        "kind": "scripted",  # "scripted" | "openai" | "none"
        "noise": 0.2, "miss_share": 0.5, "seed": 0,
        "base_url": "https://api.openai.com/v1", "model": "o4-mini", "api_key_env": "JUDGE_API_KEY",
        "temperature": -1.0,  # < 0: not sent (o-series models only take the default)
        "max_tokens": 0,  # 0: not sent
        "max_attempts": 3, "include_answer": True,
        "timeout": 300.0, "max_retries": 6,
        "max_requests_per_second": 0.0,
        "price_per_1k_prompt": 0.0011, "price_per_1k_completion": 0.0044,  # o4-mini list price, USD
        "extra_json": "", "max_workers": 4, "keep_raw_chars": 2000,
    })
    # --- labels
    c.labels = ConfigDict({
        "primary": "hybrid",  # the rule whose labels go in Step.label: mc | judge | hybrid | vlprm_v2
        "mc": {"threshold": 0.0, "after_error": "keep"},
        "judge": {"after_error": "ignore"},
        "hybrid": {"threshold": 0.0, "after_error": "ignore", "disagree": "neutral"},
        "vlprm_v2": {"threshold": 0.0},
    })
    c.ground_truth = "auto"  # auto (puzzles + scripted policy) | canonical | none
    # --- running
    c.shard_by = "hash"  # hash (stable hash of the question id) | index (position modulo n)
    c.on_question_error = "raise"  # raise | skip (logged; retried by the next run)
    c.max_consecutive_failures = 5
    c.progress = True
    return c


def load_config(spec: str) -> ConfigDict:
    """Load ``path.py`` or ``path.py:arg`` (``get_config(arg)``)."""
    path, sep, arg = str(spec).partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = "_jaxprm_synth_config_" + str(abs(hash(os.path.abspath(path))))
    mspec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mspec)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config()")
    cfg = module.get_config(arg) if sep else module.get_config()
    if not isinstance(cfg, ConfigDict):
        cfg = ConfigDict(cfg)
    return cfg


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_value(text: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        t = text.strip().lower()
        if t in _TRUE:
            return True
        if t in _FALSE:
            return False
        raise ValueError(f"--config.{key}: expected a boolean, got {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--config.{key}: expected an int, got {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"--config.{key}: expected a float, got {text!r}") from None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_override(cfg: ConfigDict, key: str, text: str) -> None:
    parts = key.split(".")
    node = cfg
    for i, p in enumerate(parts[:-1]):
        if p not in node:
            raise KeyError(f"--config.{key}: no field {'.'.join(parts[: i + 1])!r}")
        node = node[p]
    last = parts[-1]
    if not isinstance(node, ConfigDict) or last not in node:
        avail = sorted(node.keys()) if isinstance(node, ConfigDict) else []
        raise KeyError(f"--config.{key}: unknown field; available here: {avail}")
    current = node[last]
    if isinstance(current, ConfigDict):
        raise KeyError(f"--config.{key} is a group; set one of its fields: {sorted(current.keys())}")
    node[last] = _parse_value(text, current, key)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separate ``--config.a.b=v`` / ``--config.a.b v`` from the other arguments."""
    rest: list[str] = []
    overrides: list[tuple[str, str]] = []
    argv = list(argv)
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" in body:
                k, v = body.split("=", 1)
            else:
                if i + 1 >= len(argv):
                    raise ValueError(f"{a}: missing value")
                k, v = body, argv[i + 1]
                i += 1
            overrides.append((k, v))
        else:
            rest.append(a)
        i += 1
    return rest, overrides


__all__ = ["apply_override", "base_config", "load_config", "split_overrides"]
