"""python3 -m polysketch_eval {perplexity,passkey} ... (see cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
