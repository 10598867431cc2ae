"""Fusion of Monte-Carlo values and the judge's verdict into step labels.

The step fields are filled (``Step.num_mc_correct/num_mc_total`` from ``rollout.mc_counts``,
``Step.judge`` from ``JudgeVerdict.step_values``) and the label rules of
``jaxprm.data.labels`` are applied unchanged:

* ``"mc"``     -- ``labels.mc_threshold`` (VisualPRM: ``+`` iff mc > threshold, default 0);
* ``"judge"``  -- ``labels.judge_first_incorrect`` (``+`` before the judge's first error, ``-`` on
  it, later steps unsupervised by default);
* ``"hybrid"`` -- ``labels.hybrid``: step-wise consensus, a step is supervised only where MC and
  the judge agree (the judge's first error is ``-`` when its MC value is <= threshold too);
* ``"vlprm_v2"`` -- ``labels.vlprm_v2``: the trace-level consensus filtering of the public VL-PRM
  code (the judge's labels when it finds an error; all ``+`` when it accepts the trace and MC
  agrees; the trace dropped otherwise).

The rules, their parameters' defaults (``DEFAULT_RULE_KW``) and their names (``RULES``) come from
the one registry, ``jaxprm.data.labels.RULES``.

Every record gets ``meta["labels_by_rule"]`` (the labels of every rule), ``meta["label_rules"]``
(each rule's parameters), ``meta["consensus"]`` (the VL-PRM-style trace category) and, from
``labels.apply_label_rule``, ``meta["label_rule"]`` for the rule whose labels are in
``Step.label``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from jaxprm.data import labels as L
from jaxprm.data.labels import consensus_category, vlprm_v2_labels  # noqa: F401  (re-exported)
from jaxprm.data.schema import Record, Step

RULES = L.RULE_NAMES

DEFAULT_RULE_KW: dict[str, dict[str, Any]] = {name: dict(rule.defaults) for name, rule in L.RULES.items()}


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


def rule_labels(steps: Sequence[Step], rule: str, **kw) -> list[int | None]:
    if rule not in L.RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {RULES}")
    return L.RULES[rule].labels(steps, **kw)


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
    return L.apply_label_rule(dataclasses.replace(record, meta=meta), primary, **kw[primary])


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
