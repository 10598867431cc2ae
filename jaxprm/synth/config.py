"""Configuration of ``python -m jaxprm.synth``: the defaults every synthesis config starts from, and
their checks.

Config files and overrides work as for training (``jaxprm.config``, ml_collections' config_flags): a
config file is a Python file with ``get_config()`` returning a ``ConfigDict`` (``--config path.py:arg``
calls ``get_config("arg")``); ``configs/synth_tiny.py`` and ``configs/synth_vlprm.py`` start from
``base_config()``. ``--config.a.b=value`` (or ``--config.a.b value``) overrides a field, parsed by
the field's type (bool: true/false/1/0; int; float; str as is; tuple: a Python literal such as
``(84, 84)``)::

    python -m jaxprm.synth --config configs/synth_tiny.py --config.num_questions=50 \\
        --config.judge.noise 0.3 --config.policy.kind=scripted --out /tmp/synth

Time bounds of the OpenAI-compatible clients: ``deadline`` caps one request over all its retries and
backoff (``timeout`` caps one attempt, ``max_retries`` counts retries, whichever ends first wins).
With the defaults one policy request takes at most ``policy.deadline`` = 600 s, and one judged
rollout at most ``judge.max_attempts`` x ``judge.deadline`` = 3 x 180 s = 9 minutes (client-side
rate limiting, ``max_requests_per_second``, may add its wait on top).
"""
from __future__ import annotations

import os

from ml_collections import ConfigDict

from jaxprm.config import ConfigError, Problems, load_config


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
        "deadline": 600.0,  # seconds one request may take over all its attempts (OpenAIChatClient(deadline=))
        "max_requests_per_second": 0.0,  # 0: no client-side limit
        "price_per_1k_prompt": 0.0, "price_per_1k_completion": 0.0, "extra_json": "",
    })
    # --- judge
    c.judge = ConfigDict({
        "kind": "scripted",  # "scripted" | "openai" | "none"
        "noise": 0.2, "miss_share": 0.5, "seed": 0,
        "perception_noise": -1.0,  # scripted: error rate when the true first error is a perception step (< 0: noise)
        "base_url": "https://api.openai.com/v1", "model": "o4-mini", "api_key_env": "JUDGE_API_KEY",
        "temperature": -1.0,  # < 0: not sent (o-series models only take the default)
        "max_tokens": 0,  # 0: not sent
        "max_attempts": 3, "include_answer": True,
        "timeout": 300.0, "max_retries": 6,
        "deadline": 180.0,  # seconds one judge request may take over all its retries: 3 attempts x 180 s = 9 min
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


def validate_synth_config(c) -> None:
    """Check a synthesis config; raises ``ConfigError`` naming every field to change. The choices
    come from the modules that act on them (``jaxprm.synth.run``, ``.policies``, ``.fuse``)."""
    from jaxprm.synth import fuse, run
    from jaxprm.synth.policies import PREFIX_MODES

    p = Problems()
    p.choice("source", c.source, run.QUESTION_SOURCES)
    if c.source == "jsonl":
        if p.need(bool(c.input.path), "source='jsonl' needs --config.input.path=FILE (one question per line)"):
            p.need(os.path.exists(c.input.path), f"input.path={c.input.path!r} does not exist")
    for part, kinds in (("policy", run.POLICY_KINDS), ("judge", run.JUDGE_KINDS)):
        sub = c[part]
        p.choice(f"{part}.kind", sub.kind, kinds)
        if sub.kind == "openai":
            try:
                run.parse_extra_json(sub.extra_json)
            except ValueError as e:
                p.errors.append(f"{part}.extra_json: {e}")
            for field in ("timeout", "deadline"):
                v = sub.get(field)
                p.need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                       f"{part}.{field} must be a number of seconds > 0, got {v!r}")
    if c.policy.kind == "openai":
        p.choice("policy.prefix_mode", c.policy.prefix_mode, PREFIX_MODES)
    p.choice("labels.primary", c.labels.primary, fuse.RULES)
    p.choice("ground_truth", c.ground_truth, run.GROUND_TRUTH)
    p.choice("on_question_error", c.on_question_error, run.ON_QUESTION_ERROR)
    p.raise_if_any()


__all__ = ["ConfigError", "base_config", "load_config", "validate_synth_config"]
