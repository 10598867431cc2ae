"""``python -m jaxprm.serve --prm DIR [--host 127.0.0.1] [--port 8000]``."""
import sys

from jaxprm.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
