"""Offline label synthesis on the embedded puzzle task (no network, seconds on a CPU).

    python -m jaxprm.synth --config configs/synth_tiny.py --out /tmp/synth_out
    python -m jaxprm.synth.report --records /tmp/synth_out

A scripted noisy solver plays the policy (wrong solutions via ``synthetic.inject_error``,
continuations consistent with their prefix) and a scripted judge that knows the ground truth is
wrong with probability ``judge.noise``; the stats file carries the label-accuracy report of
MC-only, judge-only and hybrid labels against the puzzles' ground truth.
"""
from jaxprm.synth.config import base_config


def get_config(arg: str = ""):
    c = base_config()
    c.name = "synth_tiny"
    c.source = "synthetic"
    c.num_questions = 24
    c.seed = 0
    c.synthetic.image_size = (112, 112)
    c.rollouts_per_question = 2
    c.max_rollout_attempts = 3
    c.mc.num_continuations = 16
    c.mc.early_stop = False
    c.policy.kind = "scripted"
    c.policy.error_rate = 0.5
    c.policy.malformed_rate = 0.1
    c.policy.slip_rate = 0.05
    c.policy.recovery_rate = 0.03
    c.policy.hard_fraction = 0.2  # questions this policy finds hard: correct prefixes can get MC = 0
    c.policy.hard_slip_rate = 0.4
    c.judge.kind = "scripted"
    c.judge.noise = 0.3
    c.judge.miss_share = 0.5
    c.labels.primary = "hybrid"
    c.on_question_error = "raise"
    return c
