"""Label accuracy of the fusion rules against ground truth (the embedded puzzle task).

For every record with ``meta["ground_truth"]`` (written by the pipeline for puzzle questions
solved by the scripted policy: 1 before the first error, 0 at it and after it) and for each rule
in ``meta["labels_by_rule"]`` (``mc``, ``judge``, ``hybrid``, ``vlprm_v2``):

* ``coverage``   -- supervised steps (label not None) / all steps;
* ``accuracy``   -- correct labels / supervised steps;
* ``neg``        -- precision, recall and F1 of the "-" class over supervised steps (the
  VisualProcessBench-style step F1 for erroneous steps), ``recall_neg_all`` -- "-" found / all
  erroneous steps (unsupervised erroneous steps count as missed);
* ``by_kind``    -- accuracy on perception and on reasoning steps;
* ``first_error_match`` -- fraction of traces with at least one label whose first "-" (None if
  none) is the true first error.

``hybrid`` (with its default ``disagree="neutral"``) labels a subset of the steps ``judge``
labels, with the judge's label; it can only drop judge mistakes, never add any, so its number of
wrong labels is at most the judge's (``wrong``), and it beats judge-only accuracy whenever MC
disagrees more often with the judge's mistakes than with its correct labels.

    python -m jaxprm.synth.report --records OUT_DIR [--json report.json]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Iterable, Sequence

from jaxprm.data.labels import RULE_NAMES as RULES
from jaxprm.data.schema import NEGATIVE, PERCEPTION, Record
from jaxprm.reporting import format_table as _table
from jaxprm.reporting import precision_recall_f1


def _ground_truth(rec: Record) -> list[int] | None:
    gt = rec.meta.get("ground_truth")
    if isinstance(gt, dict) and isinstance(gt.get("labels"), list) and len(gt["labels"]) == len(rec.steps):
        return list(gt["labels"])
    return None


def _rule_labels(rec: Record, rule: str) -> list[int | None] | None:
    by = rec.meta.get("labels_by_rule")
    if isinstance(by, dict) and rule in by and len(by[rule]) == len(rec.steps):
        return list(by[rule])
    from jaxprm.synth.fuse import merged_rule_kw, rule_labels

    return rule_labels(rec.steps, rule, **merged_rule_kw()[rule])


def evaluate(records: Iterable[Record], rules: Sequence[str] = RULES) -> dict[str, Any]:
    acc: dict[str, dict[str, Any]] = {
        r: {"steps": 0, "labelled": 0, "correct": 0, "tp": 0, "fp": 0, "fn": 0, "tn": 0,
            "kind": {PERCEPTION: [0, 0], "reasoning": [0, 0]}, "traces": 0, "first_match": 0}
        for r in rules
    }
    n_rec = n_gt = n_steps = n_neg = n_err_traces = 0
    for rec in records:
        n_rec += 1
        gt = _ground_truth(rec)
        if gt is None:
            continue
        n_gt += 1
        n_steps += len(gt)
        n_neg += sum(1 for g in gt if g == NEGATIVE)
        gt_first = next((i for i, g in enumerate(gt) if g == NEGATIVE), None)
        n_err_traces += gt_first is not None
        for r in rules:
            labs = _rule_labels(rec, r)
            a = acc[r]
            a["steps"] += len(gt)
            any_label = False
            for s, g, lab in zip(rec.steps, gt, labs):
                if lab is None:
                    continue
                any_label = True
                a["labelled"] += 1
                ok = lab == g
                a["correct"] += ok
                k = a["kind"][PERCEPTION if s.kind == PERCEPTION else "reasoning"]
                k[0] += ok
                k[1] += 1
                if lab == NEGATIVE and g == NEGATIVE:
                    a["tp"] += 1
                elif lab == NEGATIVE:
                    a["fp"] += 1
                elif g == NEGATIVE:
                    a["fn"] += 1
                else:
                    a["tn"] += 1
            if any_label:
                a["traces"] += 1
                first = next((i for i, lab in enumerate(labs) if lab == NEGATIVE), None)
                a["first_match"] += first == gt_first
    out: dict[str, Any] = {
        "records": n_rec,
        "records_with_ground_truth": n_gt,
        "steps": n_steps,
        "negative_steps": n_neg,
        "traces_with_error": n_err_traces,
        "rules": {},
    }
    for r in rules:
        a = acc[r]
        lab = a["labelled"]
        out["rules"][r] = {
            "labelled": lab,
            "coverage": lab / a["steps"] if a["steps"] else 0.0,
            "accuracy": a["correct"] / lab if lab else 0.0,
            "correct": a["correct"],
            "wrong": lab - a["correct"],
            "neg": precision_recall_f1(a["tp"], a["fp"], a["fn"]),
            "recall_neg_all": a["tp"] / n_neg if n_neg else 0.0,
            "by_kind": {k: (v[0] / v[1] if v[1] else None) for k, v in a["kind"].items()},
            "first_error_match": a["first_match"] / a["traces"] if a["traces"] else 0.0,
            "traces_labelled": a["traces"],
        }
    return out


def format_table(rep: dict[str, Any]) -> str:
    head = (f"records {rep['records']} (with ground truth {rep['records_with_ground_truth']}), steps {rep['steps']}, "
            f"erroneous steps {rep['negative_steps']}, traces with an error {rep['traces_with_error']}")
    cols = ("rule", "coverage", "accuracy", "wrong", "F1(-)", "P(-)", "R(-)", "R(-)all", "acc perc", "acc reas",
            "1st-err")
    rows = []
    for r, m in rep["rules"].items():
        bk = m["by_kind"]
        rows.append((
            r, f"{m['coverage']:.3f}", f"{m['accuracy']:.3f}", str(m["wrong"]), f"{m['neg']['f1']:.3f}",
            f"{m['neg']['precision']:.3f}", f"{m['neg']['recall']:.3f}", f"{m['recall_neg_all']:.3f}",
            "-" if bk["perception"] is None else f"{bk['perception']:.3f}",
            "-" if bk["reasoning"] is None else f"{bk['reasoning']:.3f}",
            f"{m['first_error_match']:.3f}",
        ))
    return head + "\n" + _table(cols, rows)


def read_records_dir(paths: Sequence[str]) -> list[Record]:
    files: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(glob.glob(os.path.join(p, "records-*.jsonl")))
        else:
            files.append(p)
    if not files:
        raise FileNotFoundError(f"no records-*.jsonl files under {list(paths)}")
    out = []
    for fn in files:
        with open(fn, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.endswith("\n") or not line.strip():
                    continue  # a partial last line from a killed run
                out.append(Record.from_dict(json.loads(line), where=f"{fn}:{i}"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxprm.synth.report",
                                 description="Label accuracy of mc / judge / hybrid against puzzle ground truth.")
    ap.add_argument("--records", nargs="+", required=True, help="output dir(s) of jaxprm.synth or records files")
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    rep = evaluate(read_records_dir(args.records))
    if rep["records_with_ground_truth"] == 0:
        print("no records with ground truth (meta['ground_truth']); nothing to report", file=sys.stderr)
        return 1
    print(format_table(rep))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rep, f, indent=2, sort_keys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
