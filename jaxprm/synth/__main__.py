"""``python -m jaxprm.synth --config configs/synth_tiny.py [--config.x=y ...] --out DIR [--shard i/n]``

Turns questions (image, question, answer) into step-labelled records (see ``jaxprm.synth.run``).
Rerunning the same command resumes: completed questions are skipped, a partially written
question is redone. ``--shard i/n`` processes the i-th of n disjoint parts of the questions (run
one process per host/shard into the same ``--out``; each shard has its own files).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from jaxprm.synth.config import apply_override, load_config, split_overrides
from jaxprm.synth.questions import parse_shard


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest, overrides = split_overrides(argv)
    ap = argparse.ArgumentParser(prog="python -m jaxprm.synth", description=__doc__.split("\n\n")[1],
                                 epilog="Override any config field with --config.<path>=<value>.")
    ap.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--shard", default="0/1", help="i/n: process shard i of n (default 0/1)")
    ap.add_argument("--overwrite", action="store_true", help="delete this shard's outputs first (no resume)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(rest)
    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        ap.error(str(e))
    cfg = load_config(args.config)
    for k, v in overrides:
        try:
            apply_override(cfg, k, v)
        except (KeyError, ValueError, TypeError) as e:
            ap.error(str(e.args[0]) if e.args else str(e))

    from jaxprm.synth.run import ShardStore, run

    if args.overwrite:
        st = ShardStore(args.out, *shard)
        for p in (st.records_path, st.done_path, st.stats_path, st.config_path):
            if os.path.exists(p):
                os.unlink(p)
    stats = run(cfg, args.out, shard, progress=False if args.no_progress else None)
    summary = {
        "questions_done": stats.get("questions_done", 0),
        "questions_in_shard": stats["questions_in_shard"],
        "records": stats.get("n_records", 0),
        "malformed": stats.get("rollouts", {}).get("malformed", {}),
        "cost": {k: round(v.get("cost", 0.0), 6) for k, v in stats.get("usage", {}).items()},
        "complete": stats["complete"],
    }
    print(json.dumps(summary, sort_keys=True))
    if "report" in stats:
        from jaxprm.synth.report import format_table

        print(format_table(stats["report"]))
    print(f"outputs in {args.out}", file=sys.stderr)
    return 0 if stats["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
