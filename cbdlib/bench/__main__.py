"""``python -m cbdlib.bench``: starts the command (``cbdlib/commands/bench.py``); the library is ``__init__``."""
import sys

from ..commands.bench import main

if __name__ == "__main__":
    sys.exit(main())
