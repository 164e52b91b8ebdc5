"""``python -m prompt_t5x`` is the same as the ``prompt-t5x`` console script."""

import sys

from prompt_t5x.commands.cli import main

if __name__ == "__main__":
    sys.exit(main())
