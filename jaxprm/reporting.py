"""Host-side numbers and tables for reports: F1 from confusion counts, plain-text tables.

Training counts its confusion matrix on device (``jaxprm.models.prm.step_loss``); evaluation
(``jaxprm.eval.step_f1``) and the synthesis report (``jaxprm.synth.report``) count on the host.
All of them turn counts into scores here, with scikit-learn's conventions (checked against
``sklearn.metrics`` in the tests): a score whose denominator is 0 is 0.0 (``zero_division=0``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def binary_f1(tp: float, fp: float, fn: float) -> float:
    """F1 = 2TP / (2TP + FP + FN); 0.0 when the denominator is 0."""
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2.0 * tp / denom


def precision_recall_f1(tp: float, fp: float, fn: float) -> dict[str, float]:
    """Precision, recall and F1 of one class, and its support (``tp + fn``)."""
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "f1": binary_f1(tp, fp, fn),
        "support": tp + fn,
    }


def two_class_f1(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    """Both F1 scores of a two-class confusion matrix and their macro mean.

    ``tp/fp/fn/tn`` count the class called positive here; ``"f1"`` is its F1, ``"f1_other"`` the
    F1 of the other class (whose hits are ``tn``, false alarms ``fn``, misses ``fp``),
    ``"macro_f1"`` their mean and ``"accuracy"`` ``(tp + tn) / total`` (0.0 without samples)."""
    f1, f1_other = binary_f1(tp, fp, fn), binary_f1(tn, fn, fp)
    n = tp + fp + fn + tn
    return {"f1": f1, "f1_other": f1_other, "macro_f1": (f1 + f1_other) / 2.0, "accuracy": (tp + tn) / n if n else 0.0}


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: a header line, a rule, one line per row. The first column is
    left-aligned (names), the others right-aligned (numbers); floats get 4 decimals, other cells
    are printed as they are (pass pre-formatted strings for other precisions)."""
    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in body)) if body else len(str(h)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    head = line([str(h) for h in headers])
    return "\n".join([head, "-" * len(head), *(line(r) for r in body)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as ``format_table`` in Markdown (GitHub pipes), for reports."""
    def cell(v):
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(str(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


__all__ = ["binary_f1", "format_table", "markdown_table", "precision_recall_f1", "two_class_f1"]
