"""``python -m jaxprm.synth --config configs/synth_tiny.py [--config.x=y ...] --out DIR [--shard i/n]``

Turns questions (image, question, answer) into step-labelled records (see ``jaxprm.synth.run``).
Rerunning the same command resumes: completed questions are skipped, a partially written
question is redone. ``--shard i/n`` processes the i-th of n disjoint parts of the questions (run
one process per host/shard into the same ``--out``; each shard has its own files).

Flags: --config FILE (path.py or path.py:arg) and --config.<field>=<value> overrides (as for
``python -m jaxprm.train``, see ``jaxprm.synth.config``), --out DIR, --shard i/n (default 0/1),
--overwrite (delete this shard's outputs first: no resume), --no-progress (no progress bar).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from jaxprm.config import ConfigError, parse_flags, usage_error
from jaxprm.synth.config import validate_synth_config
from jaxprm.synth.questions import parse_shard

PROG = "python -m jaxprm.synth"
_HELP = ("-h", "--help", "--helpshort", "--helpfull")


def _flag_values(argv: Sequence[str]):
    """This command's flags, in their own ``FlagValues`` (``main`` can run many times in one process)."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file (path.py or path.py:arg), e.g. configs/synth_tiny.py",
                                    flag_values=fv, lock_config=True, sys_argv=list(argv))
    flags.DEFINE_string("out", None, "output directory", flag_values=fv)
    flags.DEFINE_string("shard", "0/1", "i/n: process shard i of n", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "delete this shard's outputs first (no resume)", flag_values=fv)
    flags.DEFINE_boolean("no-progress", False, "no progress bar", flag_values=fv)
    return fv


def parse_args(argv: Sequence[str]):
    """``(config, out_dir, (i, n), flag_values)`` from the command line (without the program name);
    a command line that gives no valid config exits with a usage message and status 2."""
    argv = [PROG, *argv]
    fv = _flag_values(argv)
    if any(a in _HELP for a in argv[1:]):
        print(__doc__ + "\n" + fv.get_help())
        sys.exit(0)
    rest = parse_flags(argv, fv, prog=PROG)
    if len(rest) > 1:
        usage_error(PROG, f"unexpected arguments: {' '.join(rest[1:])}")
    if fv.config is None:
        usage_error(PROG, "--config is required, e.g. --config configs/synth_tiny.py")
    if not fv.out:
        usage_error(PROG, "--out is required (the output directory)")
    try:
        shard = parse_shard(fv.shard)
    except ValueError as e:
        usage_error(PROG, str(e))
    try:
        validate_synth_config(fv.config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    return fv.config, fv.out, shard, fv


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out, shard, fv = parse_args(sys.argv[1:] if argv is None else argv)

    from jaxprm.synth.run import ShardStore, run

    if fv.overwrite:
        st = ShardStore(out, *shard)
        for p in (st.records_path, st.done_path, st.stats_path, st.config_path):
            if os.path.exists(p):
                os.unlink(p)
    stats = run(cfg, out, shard, progress=False if fv["no-progress"].value else None)
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
    print(f"outputs in {out}", file=sys.stderr)
    return 0 if stats["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
