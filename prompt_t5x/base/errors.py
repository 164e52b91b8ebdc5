"""The one distinction every command makes: a user's mistake or a bug.

``UsageError`` is bad user input (flags, gin, data files, vocabularies, prompts, checkpoints,
paths): the command line prints it as one message and exits with status 2, no traceback. Any other
exception is a bug and keeps its traceback (exit status 1). Two more outcomes are not errors:
a run stopped by SIGTERM or Ctrl-C after saving (``StoppedCleanly``, status 75) and one stopped
by a second Ctrl-C without saving (status 130). Every wing raises this one type, and
:func:`run_command` is the one place that turns it into an exit status (the ``prompt-t5x`` entry
point and the modules run as ``python -m`` children: bench and its peer).
"""

import logging
import sys
from typing import Callable, List


class UsageError(Exception):
    """Bad user input: printed as one message and exit status 2 (no traceback)."""


# A run stopped on request (SIGTERM, the first Ctrl-C) after saving its work; rerunning the
# same command resumes it. 75 is sysexits.h's EX_TEMPFAIL ("temporary failure, retry"): a
# scheduler can requeue on it, and it is not 143 (128+SIGTERM), what a run killed *without*
# saving reports. See training/preemption.py.
EXIT_STOPPED = 75


class StoppedCleanly(Exception):
    """A command stopped on request after saving: its message is one line, status 75."""


class InputError(UsageError, ValueError):
    """Bad input found by a library function deep in the work (a malformed data file, a prompt
    .npy of the wrong shape, labels longer than the targets): a UsageError for the command line,
    and still a ValueError for library callers that catch that."""


def keep_first_error(close: Callable[[], None], what: str) -> None:
    """``close()``, for a ``finally`` block: if an exception is already on its way out, an error
    of ``close`` (a second ENOSPC while flushing, say) is logged and dropped, so the first
    error is the one reported; otherwise it is raised as usual."""
    failing = sys.exc_info()[1]
    try:
        close()
    except Exception as e:  # noqa: BLE001 - only ever dropped in favour of an earlier error
        if failing is None:
            raise
        logging.getLogger(__name__).debug("closing %s after %r also failed: %r", what,
                                          failing, e)


def run_command(name: str, func: Callable[[List[str]], int], argv: List[str]) -> int:
    """``func(argv)`` as command ``name``: a UsageError is one message on stderr and status 2."""
    try:
        return int(func(argv) or 0)
    except UsageError as e:
        print(f"prompt-t5x {name}: error: {e}", file=sys.stderr)
        return 2
    except StoppedCleanly as e:
        print(f"prompt-t5x {name}: {e}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        # Commands that can stop cleanly (train: preemption.py) take the first Ctrl-C
        # themselves; reaching here means "stop now": one line, 128 + SIGINT, no traceback.
        print(f"prompt-t5x {name}: interrupted; stopped without saving (the last checkpoint, "
              "if any, is kept).", file=sys.stderr)
        return 130
