"""``python -m jaxprm.eval {bon,vpb,synthetic} ...`` (see ``jaxprm.eval.run``)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
