"""``python -m cbdlib``: the workbook's commands (see ``cbdlib/commands/main.py``)."""
import sys

from .commands.main import main

if __name__ == "__main__":
    sys.exit(main())
