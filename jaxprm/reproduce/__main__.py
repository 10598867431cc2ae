"""``python -m jaxprm.reproduce --config configs/reproduce_tiny.py --out DIR``: see ``jaxprm.reproduce``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxprm.reproduce",
                                 description="The VL-PRM recipe end to end in miniature on the embedded puzzles.")
    ap.add_argument("--config", required=True, help="config file, e.g. configs/reproduce_tiny.py (or ...py:smoke)")
    ap.add_argument("--out", required=True, help="output folder; rerunning continues from the last finished stage")
    args = ap.parse_args(argv)
    from jaxprm.config import load_config
    from jaxprm.reproduce import reproduce

    try:
        cfg = load_config(args.config)
        reproduce(cfg, args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
