"""``python -m lorafed``: the command line."""

import sys

from lorafed.cli import main

if __name__ == "__main__":
    sys.exit(main())
