"""Step-level F1 as VisualProcessBench defines it.

VisualProcessBench (VisualPRM, arXiv 2503.10291, Sec. 3.3; data card of the HF dataset
``OpenGVLab/VisualProcessBench``) annotates every step of a solution with
``process_correctness`` in {1: correct, 0: neutral, -1: incorrect}; each jsonl row also carries
``image`` (list of paths), ``question``, ``answer``, ``response: {steps, process_correctness}``,
``policy_model`` and ``data_source`` (MMMU, MathVision, MathVerse, DynaMath, WeMath).

Metric (paper, "Metrics"): "we use macro F1 scores ... we first compute the F1 scores separately
for correct and incorrect steps and then take their average". Here:

- a step is predicted correct when its PRM score ``>= threshold`` (0.5 by default);
- neutral (0) steps are excluded: they "do not involve any reasoning process or provide no
  additional information" and have no correctness to predict (``neutral="exclude"``, as the
  public re-implementations of the benchmark's evaluation do; ``"correct"`` / ``"incorrect"``
  count them as that class instead);
- F1 of the correct class treats "correct" as positive; F1 of the incorrect class treats
  "incorrect" as positive; ``macro_f1`` is their mean. An F1 whose denominator
  ``2 TP + FP + FN`` is 0 (class absent from both gold and prediction) is 0.

``step_f1(records)`` returns the pooled metric over all steps (``overall``), the same metric per
``data_source`` (``per_source``), and two summaries over sources: the unweighted mean of the
per-source macro-F1 and its mean weighted by each source's number of scored steps. The paper's
table reports per-source columns and an "Overall" column; its text describes the pooled
computation, which is ``overall["macro_f1"]`` here.

Label conventions: VisualProcessBench rows use 1 / 0 / -1 as above. For a
``jaxprm.data.schema.Record`` the benchmark's labels are read from ``meta["process_correctness"]``
and the source from ``meta["data_source"]`` when present (what the VisualProcessBench importer in
``jaxprm.data.formats`` keeps); otherwise its steps' ``label`` (1 = correct, 0 = incorrect,
None = unsupervised) is mapped 1 -> 1, 0 -> -1, None -> 0 and ``Record.source`` is the source.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Sequence

import numpy as np
from jaxprm.data.formats.visualprocessbench import read_visualprocessbench_rows
from jaxprm.reporting import binary_f1, two_class_f1

__all__ = [
    "CORRECT",
    "INCORRECT",
    "NEUTRAL",
    "binary_f1",
    "load_visualprocessbench",
    "plot_step_f1",
    "step_f1",
    "visualprocessbench_f1",
]

CORRECT, NEUTRAL, INCORRECT = 1, 0, -1
_NEUTRAL_MODES = ("exclude", "correct", "incorrect")
_SCORE_KEYS = ("pred_scores", "prm_scores", "step_scores", "scores")


def _flatten(x: Any, what: str) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x.reshape(-1)
    x = list(x)
    if x and all(isinstance(e, (list, tuple, np.ndarray)) for e in x):
        parts = [np.asarray(e, dtype=np.float64).reshape(-1) for e in x]
        return np.concatenate(parts) if parts else np.zeros(0)
    try:
        return np.asarray(x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected numbers, got {x[:5]!r}...: {e}") from None


def _gold_array(gold: Any) -> np.ndarray:
    out = []
    for g in _flatten_objects(gold):
        if g is None:
            out.append(NEUTRAL)
        elif isinstance(g, (bool, np.bool_)):
            out.append(CORRECT if g else INCORRECT)
        else:
            v = int(g)
            if v not in (CORRECT, NEUTRAL, INCORRECT) or v != g:
                raise ValueError(f"gold correctness must be 1 (correct), 0 (neutral) or -1 (incorrect), got {g!r}")
            out.append(v)
    return np.asarray(out, dtype=np.int64)


def _flatten_objects(x: Any) -> list:
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    out = []
    for e in x:
        if isinstance(e, (list, tuple, np.ndarray)):
            out.extend(_flatten_objects(e))
        else:
            out.append(e)
    return out


def visualprocessbench_f1(
    pred_scores: Any,
    gold_correctness: Any,
    threshold: float = 0.5,
    neutral: str = "exclude",
) -> dict:
    """Per-class F1 and macro-F1 over steps.

    Args:
      pred_scores: per-step probabilities that the step is correct (flat, or a list of
        per-solution lists that is flattened in order).
      gold_correctness: matching labels 1 / 0 / -1 (or True / False / None), same layout.
      threshold: a step is predicted correct when its score is ``>= threshold``.
      neutral: how gold-neutral steps count: "exclude" (default), "correct", "incorrect".

    Returns a dict with ``f1_correct``, ``f1_incorrect``, ``macro_f1``, ``accuracy``,
    ``n_steps`` (scored steps), ``n_correct`` / ``n_incorrect`` (gold), ``n_neutral`` (gold
    neutral steps seen) and ``confusion`` (``tp``/``fp``/``fn``/``tn`` with "correct" positive).
    """
    if neutral not in _NEUTRAL_MODES:
        raise ValueError(f"neutral must be one of {_NEUTRAL_MODES}, got {neutral!r}")
    scores = _flatten(pred_scores, "pred_scores")
    gold = _gold_array(gold_correctness)
    if scores.shape[0] != gold.shape[0]:
        raise ValueError(f"got {scores.shape[0]} step scores but {gold.shape[0]} gold labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError("pred_scores contains NaN or infinite values")
    n_neutral = int(np.sum(gold == NEUTRAL))
    if neutral == "exclude":
        keep = gold != NEUTRAL
        scores, gold = scores[keep], gold[keep]
    else:
        gold = np.where(gold == NEUTRAL, CORRECT if neutral == "correct" else INCORRECT, gold)
    pred_correct = scores >= threshold
    gold_correct = gold == CORRECT
    tp = int(np.sum(pred_correct & gold_correct))
    fp = int(np.sum(pred_correct & ~gold_correct))
    fn = int(np.sum(~pred_correct & gold_correct))
    tn = int(np.sum(~pred_correct & ~gold_correct))
    f1 = two_class_f1(tp, fp, fn, tn)  # "correct" is the counted class; "incorrect" the other
    n = int(gold.shape[0])
    return {
        "f1_correct": f1["f1"],
        "f1_incorrect": f1["f1_other"],
        "macro_f1": f1["macro_f1"],
        "accuracy": f1["accuracy"],
        "n_steps": n,
        "n_correct": int(np.sum(gold_correct)),
        "n_incorrect": int(n - np.sum(gold_correct)),
        "n_neutral": n_neutral,
        "threshold": float(threshold),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


# ----------------------------------------------------------------------------- records


def _record_parts(rec: Any, i: int, score_key: str | None) -> tuple[str, list, Any]:
    """(source, gold labels in 1/0/-1, scores or None) from a VisualProcessBench-style dict or a
    ``jaxprm.data.schema.Record``."""
    if isinstance(rec, dict):
        source = rec.get("data_source", rec.get("source")) or "unknown"
        resp = rec.get("response")
        if isinstance(resp, dict) and "process_correctness" in resp:
            gold = resp["process_correctness"]
        elif "process_correctness" in rec:
            gold = rec["process_correctness"]
        elif "labels" in rec:
            gold = rec["labels"]
        else:
            raise ValueError(f"record {i}: no 'response.process_correctness' (or 'process_correctness' / 'labels')")
        keys = (score_key,) if score_key else _SCORE_KEYS
        scores = next((rec[k] for k in keys if k in rec and rec[k] is not None), None)
        if scores is not None and len(scores) == 1 and isinstance(scores[0], (list, tuple)):
            scores = scores[0]  # InternVL writes prm_scores as [[...]] (one list per solution)
        return str(source), list(gold), scores
    steps = getattr(rec, "steps", None)
    if steps is None:
        raise ValueError(f"record {i}: expected a dict or a jaxprm Record, got {type(rec).__name__}")
    meta = getattr(rec, "meta", {}) or {}
    if meta.get("process_correctness") is not None:  # the benchmark's own 1/0/-1 labels, kept by the importer
        gold = list(meta["process_correctness"])
    else:
        gold = []
        for s in steps:
            lab = getattr(s, "label", None)
            gold.append(NEUTRAL if lab is None else (CORRECT if int(lab) == 1 else INCORRECT))
    source = meta.get("data_source") or getattr(rec, "source", "") or "unknown"
    key = score_key or next((k for k in _SCORE_KEYS if k in meta), None)
    return str(source), gold, (meta.get(key) if key else None)


def step_f1(
    records: Iterable,
    scores: Sequence | None = None,
    threshold: float = 0.5,
    neutral: str = "exclude",
    score_key: str | None = None,
) -> dict:
    """VisualProcessBench metrics over solutions, pooled and per ``data_source``.

    ``records``: VisualProcessBench rows (dicts with ``response.process_correctness`` and
    ``data_source``) or ``jaxprm.data.schema.Record`` objects. ``scores``: one array of step
    scores per record; when omitted each record's own ``pred_scores`` / ``prm_scores`` /
    ``step_scores`` / ``scores`` field (or ``score_key``) is used (for a Record: its ``meta``).

    Returns ``{"overall": {...}, "per_source": {source: {...}}, "macro_f1_source_mean": float,
    "macro_f1_source_weighted": float, "n_records": int}`` with the dicts of
    ``visualprocessbench_f1``.
    """
    records = list(records)
    if scores is not None and len(scores) != len(records):
        raise ValueError(f"got {len(records)} records but {len(scores)} score arrays")
    all_scores: list[np.ndarray] = []
    all_gold: list[np.ndarray] = []
    by_source: "OrderedDict[str, tuple[list, list]]" = OrderedDict()
    for i, rec in enumerate(records):
        source, gold, own = _record_parts(rec, i, score_key)
        sc = scores[i] if scores is not None else own
        if sc is None:
            raise ValueError(f"record {i}: no step scores (pass scores= or add a 'pred_scores' field)")
        sc = np.asarray(sc, dtype=np.float64).reshape(-1)
        g = _gold_array(gold)
        if sc.shape[0] != g.shape[0]:
            raise ValueError(f"record {i}: {sc.shape[0]} step scores for {g.shape[0]} labelled steps")
        all_scores.append(sc)
        all_gold.append(g)
        src = by_source.setdefault(source, ([], []))
        src[0].append(sc)
        src[1].append(g)

    def cat(xs):
        return np.concatenate(xs) if xs else np.zeros(0)

    overall = visualprocessbench_f1(cat(all_scores), cat(all_gold), threshold, neutral)
    per_source = {
        s: visualprocessbench_f1(cat(sc), cat(g), threshold, neutral) for s, (sc, g) in sorted(by_source.items())
    }
    scored = [(m["macro_f1"], m["n_steps"]) for m in per_source.values() if m["n_steps"] > 0]
    mean = float(np.mean([f for f, _ in scored])) if scored else 0.0
    total = sum(n for _, n in scored)
    weighted = float(sum(f * n for f, n in scored) / total) if total else 0.0
    return {
        "overall": overall,
        "per_source": per_source,
        "macro_f1_source_mean": mean,
        "macro_f1_source_weighted": weighted,
        "n_records": len(records),
    }


def load_visualprocessbench(path: str) -> list[dict]:
    """Read VisualProcessBench's ``test.jsonl`` (or a copy with prediction fields added).

    Each row is returned as read (a JSON-string ``response`` decoded), after the checks of the
    benchmark's reader (``jaxprm.data.formats.visualprocessbench.read_visualprocessbench_rows``):
    ``response.steps`` non-empty strings and ``response.process_correctness`` as many values in
    {1, 0, -1}. Errors (``RecordError``, a ``ValueError``) name ``file:line``, the record and the
    field. Blank lines are skipped."""
    return read_visualprocessbench_rows(path)


def plot_step_f1(groups: dict, scores: Sequence, gold: Sequence, path: str, title: str | None = None,
                 threshold: float = 0.5, dpi: int = 120) -> str:
    """Save a PNG at ``path``: F1 of each class and macro-F1 per group (``{name: visualprocessbench_f1
    result}``, e.g. per step kind or per data source) as bars, and the histogram of step scores for
    correct and incorrect gold steps (neutral steps left out), with the threshold marked."""
    import os

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    names = list(groups)
    x = np.arange(len(names))
    for j, (key, label) in enumerate((("f1_correct", "F1 correct"), ("f1_incorrect", "F1 incorrect"),
                                      ("macro_f1", "macro-F1"))):
        ax.bar(x + (j - 1) * 0.27, [groups[n][key] for n in names], width=0.27, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels([f"{n}\n({groups[n]['n_steps']} steps)" for n in names], fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax = fig.add_subplot(1, 2, 2)
    sc = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores]) if len(scores) else np.zeros(0)
    g = np.concatenate([_gold_array(x) for x in gold]) if len(gold) else np.zeros(0)
    bins = np.linspace(0, 1, 21)
    for cls, label in ((CORRECT, "correct steps"), (INCORRECT, "incorrect steps")):
        ax.hist(sc[(g == cls) & np.isfinite(sc)], bins=bins, alpha=0.6, label=f"{label} ({int((g == cls).sum())})")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("PRM score P(correct)")
    ax.set_ylabel("steps")
    ax.legend(loc="upper center", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path
