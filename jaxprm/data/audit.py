"""Label audit: check what a dataset's step labels would be before spending a pod-day on it.

    python -m jaxprm.data.audit --format vlprm300k --records VL_PRM300K_V2.parquet \\
        [--image-root data/] [--out audit.json]

Reads ``--records`` with ``jaxprm.data.formats.read_records`` in skip mode and prints

- how many rows were read, imported and skipped, and the skip reasons (grouped, with the count of
  each; the ``file:row`` lines are in the JSON and in the log);
- per label rule how many steps are ``+``, ``-`` and unsupervised: ``given`` is the labels the
  format's default import gives (the authors' labels; for ``jsonl`` the stored ones), then every
  rule of ``jaxprm.data.labels.RULES`` with the defaults it records there;
- how the rules disagree: for each pair of rules, the number of steps to which they give different
  labels (``+``/``-``/unsupervised all count as labels);
- empty steps the importer dropped (``meta["empty_steps_dropped"]``).

``--out`` writes the same numbers as JSON (atomically). The exit status is 0 whenever the file
could be read (skipped rows are what the audit is for); 2 for a bad command line or missing file.
"""
from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from typing import Any, Sequence

from jaxprm.atomic import atomic_open
from jaxprm.data import labels as _labels
from jaxprm.data.formats import FORMATS, ImportStats, read_records
from jaxprm.reporting import format_table

GIVEN = "given"
_WHERE = re.compile(r"^.*?:(?:row )?\d+: ")
_RECORD = re.compile(r"^record '[^']*': ")


def skip_reason(message: str) -> str:
    """A skip message without its ``file:row: record '...': `` prefix, so equal reasons group."""
    return _RECORD.sub("", _WHERE.sub("", message, count=1), count=1)


def _rule_labels(rec, name: str) -> list:
    rule = _labels.RULES[name]
    return [s.label for s in rule.apply(rec, **rule.defaults).steps]


def audit(path, format: str = "jsonl", image_root=None, *, max_examples: int = 5) -> dict[str, Any]:
    """The audit of one file or directory as a JSON-able dict (see the module docstring)."""
    stats = ImportStats()
    rules = (GIVEN, *_labels.RULE_NAMES)
    counts = {r: {"+": 0, "-": 0, "unsupervised": 0} for r in rules}
    rule_errors: dict[str, list[str]] = {r: [] for r in rules}
    disagree = {(a, b): 0 for i, a in enumerate(rules) for b in rules[i + 1:]}
    steps = empty_dropped = rows_with_empty = 0
    for rec in read_records(path, format=format, image_root=image_root, on_error="skip", stats=stats):
        per_rule = {GIVEN: [s.label for s in rec.steps]}
        for name in _labels.RULE_NAMES:
            try:
                per_rule[name] = _rule_labels(rec, name)
            except (ValueError, TypeError) as e:  # counted, never fatal: the audit must finish
                rule_errors[name].append(f"record '{rec.id}': {type(e).__name__}: {e}")
                per_rule[name] = [None] * len(rec.steps)
        steps += len(rec.steps)
        dropped = rec.meta.get("empty_steps_dropped") or []
        empty_dropped += len(dropped)
        rows_with_empty += bool(dropped)
        for name, labs in per_rule.items():
            for lab in labs:
                counts[name]["+" if lab == 1 else "-" if lab == 0 else "unsupervised"] += 1
        for a, b in disagree:
            disagree[(a, b)] += sum(x != y for x, y in zip(per_rule[a], per_rule[b]))
    reasons = collections.Counter(skip_reason(m) for m in stats.errors)
    return {
        "records_path": str(path),
        "format": format,
        "rows": stats.rows,
        "records": stats.records,
        "skipped": stats.skipped,
        "skip_reasons": dict(reasons.most_common()),
        "skip_messages": list(stats.errors),
        "skip_messages_truncated": stats.skipped > len(stats.errors),
        "steps": steps,
        "empty_steps_dropped": empty_dropped,
        "rows_with_empty_steps": rows_with_empty,
        "rules": {r: {"defaults": {} if r == GIVEN else dict(_labels.RULES[r].defaults), **counts[r],
                      "errors": len(rule_errors[r]), "error_examples": rule_errors[r][:max_examples]}
                  for r in rules},
        "disagreements": [{"a": a, "b": b, "steps": n} for (a, b), n in disagree.items()],
    }


def render(result: dict[str, Any]) -> str:
    """The audit as plain-text tables."""
    out = [f"{result['records_path']} ({result['format']}): {result['rows']} rows, "
           f"{result['records']} records, {result['skipped']} skipped, {result['steps']} steps, "
           f"{result['empty_steps_dropped']} empty steps dropped "
           f"(in {result['rows_with_empty_steps']} rows)", ""]
    if result["skip_reasons"]:
        out += [format_table(["skip reason", "rows"], list(result["skip_reasons"].items())), ""]
        if result["skip_messages_truncated"]:
            out += [f"(reasons of the first {len(result['skip_messages'])} skips only)", ""]
    rules = list(result["rules"])
    out.append(format_table(["rule", "+", "-", "unsupervised", "rule errors"],
                            [[r, v["+"], v["-"], v["unsupervised"], v["errors"]]
                             for r, v in result["rules"].items()]))
    pair = {(d["a"], d["b"]): d["steps"] for d in result["disagreements"]}
    pair.update({(b, a): n for (a, b), n in list(pair.items())})
    out += ["", "steps labelled differently by two rules:",
            format_table(["rule", *rules], [[a, *("-" if a == b else pair[(a, b)] for b in rules)]
                                            for a in rules])]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jaxprm.data.audit", description=__doc__.splitlines()[0])
    p.add_argument("--format", required=True, help=f"record format, one of {sorted(FORMATS)}")
    p.add_argument("--records", required=True, help="a file or a directory of .jsonl/.parquet files")
    p.add_argument("--image-root", default=None, help="join relative image paths onto DIR and check them")
    p.add_argument("--out", default=None, help="also write the audit as JSON to FILE.json")
    args = p.parse_args(argv)
    try:
        result = audit(args.records, args.format, args.image_root)
    except (FileNotFoundError, ValueError) as e:  # unknown format, missing file, bad arguments
        p.error(str(e))
    print(render(result))
    if args.out:
        with atomic_open(args.out, "w") as f:
            f.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
