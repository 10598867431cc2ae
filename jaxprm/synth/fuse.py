"""Fusion of Monte-Carlo values and the judge's verdict into step labels.

The step fields are filled (``Step.num_mc_correct/num_mc_total`` from ``rollout.mc_counts``,
``Step.judge`` from ``JudgeVerdict.step_values``) and the label rules of
``jaxprm.data.labels`` are applied unchanged:

* ``"mc"``     -- ``labels.mc_threshold`` (VisualPRM: ``+`` iff mc > threshold, default 0);
* ``"judge"``  -- ``labels.judge_first_incorrect`` (``+`` before the judge's first error, ``-`` on
  it, later steps unsupervised by default);
* ``"hybrid"`` -- ``labels.hybrid``: step-wise consensus, a step is supervised only where MC and
  the judge agree (the judge's first error is ``-`` when its MC value is <= threshold too).

One more rule is provided here for comparison because it is what the public VL-PRM code does:

* ``"vlprm_v2"`` -- trace-level consensus filtering of ``mc_consensus_filtering_v2_algo`` in
  ``theogbrand/mmr_rollout_data`` (``convert_mc_to_prm_signal.py``): when the judge finds an
  error the judge's labels are used whether MC agrees or not ("o4-mini_incorrect_and_MC_agrees_
  and_disagrees"); when the judge accepts the trace it is kept (all ``+``) only if MC agrees
  that every step is correct ("o4-mini_correct_and_MC_agrees") and dropped (all None)
  otherwise ("o4-mini_correct_and_MC_disagrees"). (Their default MC threshold was 0.01.)

Every record gets ``meta["labels_by_rule"]`` (the labels of every rule), ``meta["label_rules"]``
(each rule's parameters), ``meta["consensus"]`` (the VL-PRM-style trace category) and, from
``labels.apply_label_rule``, ``meta["label_rule"]`` for the rule whose labels are in
``Step.label``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxprm.data import labels as L
from jaxprm.data.schema import NEGATIVE, POSITIVE, Record, Step

RULES = ("mc", "judge", "hybrid", "vlprm_v2")

DEFAULT_RULE_KW: dict[str, dict[str, Any]] = {
    "mc": {"threshold": 0.0, "after_error": "keep"},
    "judge": {"after_error": "ignore"},
    "hybrid": {"threshold": 0.0, "after_error": "ignore", "disagree": "neutral"},
    "vlprm_v2": {"threshold": 0.0},
}


def fill_steps(
    steps: Sequence[Step],
    mc: Sequence[tuple[int, int]] | None = None,
    judge: Sequence[int | None] | None = None,
) -> list[Step]:
    """New steps with MC counts and judge values set (labels cleared)."""
    out = []
    for i, s in enumerate(steps):
        c, t = (mc[i] if mc is not None else (None, None))
        out.append(dataclasses.replace(
            s, num_mc_correct=c, num_mc_total=t, judge=(judge[i] if judge is not None else None), label=None
        ))
    return out


def _judge_error(steps: Sequence[Step]) -> int | None:
    return next((i for i, s in enumerate(steps) if s.judge == NEGATIVE), None)


def _judged(steps: Sequence[Step]) -> bool:
    return any(s.judge is not None for s in steps)


def _mc_first_error(steps: Sequence[Step], threshold: float) -> int | None:
    return next((i for i, s in enumerate(steps) if s.mc_value is not None and s.mc_value <= threshold), None)


def vlprm_v2_labels(steps: Sequence[Step], threshold: float = 0.0) -> list[int | None]:
    n = len(steps)
    if not _judged(steps):
        return [None] * n
    err = _judge_error(steps)
    if err is not None:
        return L.judge_first_incorrect_labels(steps, after_error="ignore")
    if not any(s.mc_value is not None for s in steps):
        return [None] * n
    return [POSITIVE] * n if _mc_first_error(steps, threshold) is None else [None] * n


def consensus_category(steps: Sequence[Step], threshold: float = 0.0) -> str:
    """VL-PRM's trace categories: ``judge_correct_and_mc_agrees``, ``judge_correct_and_mc_disagrees``,
    ``judge_incorrect_and_mc_agrees`` (MC's first step <= threshold is the judge's first error),
    ``judge_incorrect_and_mc_disagrees``; ``no_judge`` / ``no_mc`` when a source is missing."""
    if not _judged(steps):
        return "no_judge"
    if not any(s.mc_value is not None for s in steps):
        return "no_mc"
    err = _judge_error(steps)
    mc_err = _mc_first_error(steps, threshold)
    if err is None:
        return "judge_correct_and_mc_agrees" if mc_err is None else "judge_correct_and_mc_disagrees"
    return "judge_incorrect_and_mc_agrees" if mc_err == err else "judge_incorrect_and_mc_disagrees"


def rule_labels(steps: Sequence[Step], rule: str, **kw) -> list[int | None]:
    if rule == "mc":
        return L.mc_threshold_labels(steps, **kw)
    if rule == "judge":
        return L.judge_first_incorrect_labels(steps, **kw)
    if rule == "hybrid":
        return L.hybrid_labels(steps, **kw)
    if rule == "vlprm_v2":
        return vlprm_v2_labels(steps, **kw)
    raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")


def merged_rule_kw(overrides: dict | None = None) -> dict[str, dict[str, Any]]:
    kw = {k: dict(v) for k, v in DEFAULT_RULE_KW.items()}
    for k, v in (overrides or {}).items():
        if k not in kw:
            raise ValueError(f"unknown rule {k!r} in label settings; expected some of {RULES}")
        kw[k].update(dict(v or {}))
    return kw


def fuse_record(record: Record, primary: str = "hybrid", rule_kw: dict | None = None) -> Record:
    """Labels of ``primary`` in ``Step.label``; every rule's labels and the consensus category in meta."""
    if primary not in RULES:
        raise ValueError(f"unknown label rule {primary!r}; expected one of {RULES}")
    kw = merged_rule_kw(rule_kw)
    by_rule = {r: rule_labels(record.steps, r, **kw[r]) for r in RULES}
    threshold = float(kw["hybrid"].get("threshold", 0.0))
    meta = dict(record.meta)
    meta["labels_by_rule"] = by_rule
    meta["label_rules"] = {r: {"name": r, **kw[r]} for r in RULES}
    meta["consensus"] = consensus_category(record.steps, threshold)
    rec = dataclasses.replace(record, meta=meta)
    if primary in L.LABEL_RULES:
        return L.apply_label_rule(rec, primary, **kw[primary])
    steps = [dataclasses.replace(s, label=lab) for s, lab in zip(rec.steps, by_rule[primary])]
    meta["label_rule"] = {"name": primary, **kw[primary]}
    return dataclasses.replace(rec, steps=steps, meta=meta)


__all__ = [
    "DEFAULT_RULE_KW",
    "RULES",
    "consensus_category",
    "fill_steps",
    "fuse_record",
    "merged_rule_kw",
    "rule_labels",
    "vlprm_v2_labels",
]
