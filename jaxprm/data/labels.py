"""Step-label rules: turn what label synthesis recorded on each step into a training label.

Every rule is a pure function. Given a ``Record`` it returns a *new* ``Record`` whose steps carry
``label`` (1 = "+", 0 = "-", None = not supervised) and whose ``meta["label_rule"]`` records the
rule and its parameters; given a list of ``Step`` it returns a new list of steps. Inputs are never
modified. ``*_labels`` variants return just the list of labels.

Inputs a rule may use, per step (see ``jaxprm.data.schema.Step``):

- ``mc_value`` = ``num_mc_correct / num_mc_total``: the Monte-Carlo estimate of the probability
  that a continuation from this step prefix reaches the right answer. ``None`` when the counts are
  missing or ``num_mc_total == 0`` (VisualPRM's pipeline writes ``0/0`` for steps it did not roll
  out after an early stop).
- ``judge``: 1 = the judge accepts the step, 0 = the judge's *first* incorrect step,
  None = not judged (or after the judge's first error).

Rules
-----
``mc_threshold`` ("mc") -- VisualPRM (arXiv 2503.10291): a step is correct iff ``mc > threshold``
    (the VisualPRM400K card: "consider the step correct if mc_i > 0"; the same strict
    ``>`` is used by ``visualprm_data_pipeline_postprocess.py`` in OpenGVLab/InternVL, whose
    ``--mc-threshold`` defaults to 0.0). ``after_error`` controls steps after the first step whose MC
    value is ``<= threshold``: ``"keep"`` labels them independently (VisualPRM), ``"negative"``
    makes them all "-" (the VL-PRM MC-only conversion: "once we find a negative step, all subsequent
    steps are negative"), ``"ignore"`` leaves them unsupervised (early stop).

``judge_first_incorrect`` ("judge") -- the LLM-as-judge rule: steps before the judge's first
    incorrect step are "+", that step is "-", later steps are unsupervised (``after_error="ignore"``,
    the default: the transcript stops at the error) or "-" (``after_error="negative"``). This is how
    the VL-PRM300K ``conversations`` are described ("based on first_incorrect_step", the o4-mini
    judge's) and what the v2 consensus algorithm of ``convert_mc_to_prm_signal.py``
    (theogbrand/mmr_rollout_data) does for traces the judge rejects: it takes the first incorrect
    step from o4-mini, not from MC, and early-stops there. A step before the error that the judge
    did not rate (``judge is None``) is a missing-information step, handled by ``neutral``.

``hybrid`` ("hybrid") -- our step-wise reading of VL-PRM's fusion of MC estimation with an
    o4-mini judge (arXiv 2509.23250, "hybrid data synthesis framework that combines MCTS with
    judgments from a strong VLM"; dataset column ``consensus_filtering_algo_label`` with values such
    as ``o4-mini_incorrect_and_MC_agrees_and_disagrees``; the consensus-filtering idea follows Qwen's
    "Lessons of developing PRMs", arXiv 2501.07301). The public code filters whole traces (keep a
    trace when MC and the judge agree that it is all correct, or agree on where it first goes
    wrong); we apply the same agreement test step by step, so a trace is never dropped, only the
    steps the two sources disagree on lose their label. Exactly what we implement:

    ==========================================  ===========================================
    step                                         label
    ==========================================  ===========================================
    before the judge's first error, judge = 1    "+" if mc > threshold (agreement);
                                                 disagreement (mc <= threshold) -> ``disagree``
    the judge's first error (judge = 0)          "-" if mc <= threshold (agreement);
                                                 disagreement (mc > threshold) -> ``disagree``
    after the judge's first error                ``after_error``: None ("ignore") or "-"
    mc is None, or judge is None before error    missing information -> ``neutral``
    ==========================================  ===========================================

    ``disagree="neutral"`` (default) gives disagreeing steps the ``neutral`` label, so with the
    defaults only steps on which MC and the judge agree are supervised. ``disagree="judge"`` /
    ``"mc"`` let one source win instead.

``vlprm_v2`` ("vlprm_v2") -- the trace-level consensus filtering of the public VL-PRM code
    (``mc_consensus_filtering_v2_algo`` in ``theogbrand/mmr_rollout_data``,
    ``convert_mc_to_prm_signal.py``): when the judge finds an error the judge's labels are used
    whether MC agrees or not ("o4-mini_incorrect_and_MC_agrees_and_disagrees"); when the judge
    accepts the trace it is kept (all "+") only if MC agrees that every step is correct
    ("o4-mini_correct_and_MC_agrees") and dropped (all None) otherwise
    ("o4-mini_correct_and_MC_disagrees"). A trace without judge verdicts, or (when the judge
    accepts it) without MC values, is dropped too. (Their default MC threshold was 0.01.)
    ``consensus_category`` names the trace's category.

``neutral`` (``mc``, ``judge``, ``hybrid``): the label of a step the rule cannot decide --
    ``"ignore"`` -> None (unsupervised, the default), ``"positive"`` -> 1, ``"negative"`` -> 0.

The registry ``RULES`` (name -> ``LabelRule``: labels function, record function, the defaults
label synthesis records, a one-line doc) is the one list of rules: importers
(``label_rule=``), training (``data.label_rule``) and synthesis (``labels.primary``) all read it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from jaxprm.data.schema import NEGATIVE, POSITIVE, Record, Step

NEUTRAL_CHOICES = ("ignore", "positive", "negative")
AFTER_ERROR_CHOICES = ("ignore", "negative")
MC_AFTER_ERROR_CHOICES = ("keep", "ignore", "negative")
DISAGREE_CHOICES = ("neutral", "judge", "mc")



def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _neutral_label(neutral: str) -> int | None:
    _check_choice("neutral", neutral, NEUTRAL_CHOICES)
    return {"ignore": None, "positive": POSITIVE, "negative": NEGATIVE}[neutral]


def _after_label(after_error: str) -> int | None:
    return None if after_error == "ignore" else NEGATIVE


def _check_threshold(threshold: Any) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise ValueError(f"threshold must be a number, got {threshold!r}")
    return float(threshold)


# -- label lists ------------------------------------------------------------------------------------
def mc_threshold_labels(
    steps: Sequence[Step], threshold: float = 0.0, *, neutral: str = "ignore", after_error: str = "keep"
) -> list[int | None]:
    """Labels of the ``mc > threshold`` rule (see module docstring)."""
    threshold = _check_threshold(threshold)
    nl = _neutral_label(neutral)
    _check_choice("after_error", after_error, MC_AFTER_ERROR_CHOICES)
    labels: list[int | None] = []
    seen_error = False
    for s in steps:
        if seen_error and after_error != "keep":
            labels.append(_after_label(after_error))
            continue
        v = s.mc_value
        if v is None:
            labels.append(nl)
        elif v > threshold:
            labels.append(POSITIVE)
        else:
            labels.append(NEGATIVE)
            seen_error = True
    return labels


def _first_judge_error(steps: Sequence[Step]) -> int | None:
    for i, s in enumerate(steps):
        if s.judge == NEGATIVE:
            return i
    return None


def _first_mc_error(steps: Sequence[Step], threshold: float) -> int | None:
    return next((i for i, s in enumerate(steps) if s.mc_value is not None and s.mc_value <= threshold), None)


def _judged(steps: Sequence[Step]) -> bool:
    return any(s.judge is not None for s in steps)


def _has_mc(steps: Sequence[Step]) -> bool:
    return any(s.mc_value is not None for s in steps)


def judge_first_incorrect_labels(
    steps: Sequence[Step], *, neutral: str = "ignore", after_error: str = "ignore"
) -> list[int | None]:
    """Labels of the judge's-first-incorrect-step rule (see module docstring)."""
    nl = _neutral_label(neutral)
    _check_choice("after_error", after_error, AFTER_ERROR_CHOICES)
    err = _first_judge_error(steps)
    labels: list[int | None] = []
    for i, s in enumerate(steps):
        if err is not None and i > err:
            labels.append(_after_label(after_error))
        elif err is not None and i == err:
            labels.append(NEGATIVE)
        elif s.judge == POSITIVE:
            labels.append(POSITIVE)
        else:  # not judged
            labels.append(nl)
    return labels


def hybrid_labels(
    steps: Sequence[Step],
    threshold: float = 0.0,
    *,
    neutral: str = "ignore",
    after_error: str = "ignore",
    disagree: str = "neutral",
) -> list[int | None]:
    """Labels of the MC + judge fusion (see the table in the module docstring)."""
    threshold = _check_threshold(threshold)
    nl = _neutral_label(neutral)
    _check_choice("after_error", after_error, AFTER_ERROR_CHOICES)
    _check_choice("disagree", disagree, DISAGREE_CHOICES)
    err = _first_judge_error(steps)
    labels: list[int | None] = []
    for i, s in enumerate(steps):
        if err is not None and i > err:
            labels.append(_after_label(after_error))
            continue
        judge = NEGATIVE if (err is not None and i == err) else s.judge
        v = s.mc_value
        if judge is None or v is None:
            labels.append(nl)
            continue
        mc = POSITIVE if v > threshold else NEGATIVE
        if mc == judge:
            labels.append(judge)
        elif disagree == "judge":
            labels.append(judge)
        elif disagree == "mc":
            labels.append(mc)
        else:
            labels.append(nl)
    return labels


def vlprm_v2_labels(steps: Sequence[Step], threshold: float = 0.0) -> list[int | None]:
    """Labels of VL-PRM's trace-level consensus filtering (see module docstring)."""
    threshold = _check_threshold(threshold)
    n = len(steps)
    if not _judged(steps):
        return [None] * n
    if _first_judge_error(steps) is not None:
        return judge_first_incorrect_labels(steps, after_error="ignore")
    if not _has_mc(steps):
        return [None] * n
    return [POSITIVE] * n if _first_mc_error(steps, threshold) is None else [None] * n


def consensus_category(steps: Sequence[Step], threshold: float = 0.0) -> str:
    """VL-PRM's trace categories: ``judge_correct_and_mc_agrees``, ``judge_correct_and_mc_disagrees``,
    ``judge_incorrect_and_mc_agrees`` (MC's first step <= threshold is the judge's first error),
    ``judge_incorrect_and_mc_disagrees``; ``no_judge`` / ``no_mc`` when a source is missing."""
    if not _judged(steps):
        return "no_judge"
    if not _has_mc(steps):
        return "no_mc"
    err = _first_judge_error(steps)
    mc_err = _first_mc_error(steps, threshold)
    if err is None:
        return "judge_correct_and_mc_agrees" if mc_err is None else "judge_correct_and_mc_disagrees"
    return "judge_incorrect_and_mc_agrees" if mc_err == err else "judge_incorrect_and_mc_disagrees"


# -- record / step-list wrappers ----------------------------------------------------------------------
def _apply(target: Record | Sequence[Step], labels_fn: Callable[..., list], rule: dict[str, Any], **kw):
    steps = target.steps if isinstance(target, Record) else list(target)
    for i, s in enumerate(steps):
        if not isinstance(s, Step):
            raise TypeError(f"steps[{i}] must be a Step, got {type(s).__name__}")
    labels = labels_fn(steps, **kw)
    new_steps = [dataclasses.replace(s, label=lab) for s, lab in zip(steps, labels)]
    if not isinstance(target, Record):
        return new_steps
    meta = dict(target.meta)
    meta["label_rule"] = rule
    return dataclasses.replace(target, steps=new_steps, meta=meta)


def mc_threshold(record, threshold: float = 0.0, *, neutral: str = "ignore", after_error: str = "keep"):
    """VisualPRM rule: ``+`` iff ``mc > threshold``. Returns a new Record (or list of Steps)."""
    rule = {"name": "mc", "threshold": float(_check_threshold(threshold)), "neutral": neutral,
            "after_error": after_error}
    return _apply(record, mc_threshold_labels, rule, threshold=threshold, neutral=neutral,
                  after_error=after_error)


def judge_first_incorrect(record, *, neutral: str = "ignore", after_error: str = "ignore"):
    """Judge rule: ``+`` before the judge's first incorrect step, ``-`` on it, then ``after_error``."""
    rule = {"name": "judge", "neutral": neutral, "after_error": after_error}
    return _apply(record, judge_first_incorrect_labels, rule, neutral=neutral, after_error=after_error)


def hybrid(
    record,
    threshold: float = 0.0,
    *,
    neutral: str = "ignore",
    after_error: str = "ignore",
    disagree: str = "neutral",
):
    """VL-PRM-style fusion: supervise where MC (``mc > threshold``) and the judge agree."""
    rule = {"name": "hybrid", "threshold": float(_check_threshold(threshold)), "neutral": neutral,
            "after_error": after_error, "disagree": disagree}
    return _apply(record, hybrid_labels, rule, threshold=threshold, neutral=neutral,
                  after_error=after_error, disagree=disagree)


def vlprm_v2(record, threshold: float = 0.0):
    """VL-PRM's trace-level consensus filtering: the judge's labels when it finds an error, all ``+``
    when it accepts the trace and MC agrees, the trace dropped (all None) otherwise."""
    rule = {"name": "vlprm_v2", "threshold": float(_check_threshold(threshold))}
    return _apply(record, vlprm_v2_labels, rule, threshold=threshold)


# -- the registry -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LabelRule:
    """One label rule: ``labels(steps, **kw)`` -> labels, ``apply(record_or_steps, **kw)`` -> new
    Record (labels and ``meta["label_rule"]``) or steps, and ``defaults``: the parameters label
    synthesis uses and records for the rule (``jaxprm.synth.fuse``)."""

    name: str
    labels: Callable[..., list]
    apply: Callable[..., Any]
    defaults: dict[str, Any]

    @property
    def doc(self) -> str:
        """The rule's one-line description (the first line of ``apply``'s docstring)."""
        return (self.apply.__doc__ or "").strip().splitlines()[0]


RULES: dict[str, LabelRule] = {
    r.name: r
    for r in (
        LabelRule("mc", mc_threshold_labels, mc_threshold, {"threshold": 0.0, "after_error": "keep"}),
        LabelRule("judge", judge_first_incorrect_labels, judge_first_incorrect, {"after_error": "ignore"}),
        LabelRule("hybrid", hybrid_labels, hybrid, {"threshold": 0.0, "after_error": "ignore", "disagree": "neutral"}),
        LabelRule("vlprm_v2", vlprm_v2_labels, vlprm_v2, {"threshold": 0.0}),
    )
}
RULE_NAMES: tuple[str, ...] = tuple(RULES)  # what configs may name (data.label_rule, synth labels.primary)
LABEL_RULES: dict[str, Callable[..., Any]] = {name: r.apply for name, r in RULES.items()}


def get_label_rule(name: str | Callable[..., Any]) -> Callable[..., Any]:
    """Look up a rule's ``apply`` by name (one of ``RULE_NAMES``, any case); callables pass through."""
    if callable(name):
        return name
    key = str(name).strip().lower()
    if key not in RULES:
        raise ValueError(f"unknown label rule {name!r}; known rules: {sorted(RULES)}")
    return RULES[key].apply


def apply_label_rule(record, name: str | Callable[..., Any], **kw):
    """``apply_label_rule(rec, "hybrid", threshold=0.0)`` -> new Record with labels and meta["label_rule"]."""
    return get_label_rule(name)(record, **kw)


__all__ = [
    "LABEL_RULES",
    "LabelRule",
    "RULES",
    "RULE_NAMES",
    "consensus_category",
    "vlprm_v2",
    "vlprm_v2_labels",
    "NEUTRAL_CHOICES",
    "AFTER_ERROR_CHOICES",
    "MC_AFTER_ERROR_CHOICES",
    "DISAGREE_CHOICES",
    "apply_label_rule",
    "get_label_rule",
    "mc_threshold",
    "mc_threshold_labels",
    "judge_first_incorrect",
    "judge_first_incorrect_labels",
    "hybrid",
    "hybrid_labels",
]
