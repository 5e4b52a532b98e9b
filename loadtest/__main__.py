"""`python -m loadtest`: a load test against a running server, gated (loadtest/run.py)."""

import sys

from loadtest.run import main

if __name__ == "__main__":
    sys.exit(main())
