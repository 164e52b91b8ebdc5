"""Full disks and other write errors of a run directory: one line, the last good step.

Why: a save that hits a full disk fails in several places at once (orbax's writer threads log
their own tracebacks, TensorStore reports ``RESOURCE_EXHAUSTED``, the metrics file fails on its
next flush), and the exception that finally reached the user was whichever came last, with no
word of what survived. The user needs one thing: *the disk is full, step N is safe, free space
and rerun*. So:

* :func:`write_error_reason` recognises a write error anywhere in an exception's chain (an
  ``OSError`` with a storage errno, or TensorStore's text for one);
* :func:`as_usage_error` turns it into one :class:`RunDirWriteError` (a ``UsageError``: exit 2)
  naming the directory, the reason, the free space and the last good checkpoint step;
* :func:`preflight` runs before a run resumes (under the run lock, so no live writer owns
  them): it deletes what a failed or killed writer left, the temporary checkpoint directories
  of orbax (``<step>.orbax-checkpoint-tmp*``) and the ``*.tmp-<pid>`` files of
  ``storage.write_bytes_atomic``, and then refuses in one line to start on a disk that cannot
  hold one more checkpoint of this run.

The first error is kept: ``base.errors.keep_first_error`` stops a failing close from replacing
it on the way out.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Optional

from prompt_t5x.base.errors import UsageError

# errno -> what the user is told.
WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system",
}
# TensorStore (orbax's array writer) reports the OS error as text inside its own status.
# (RESOURCE_EXHAUSTED alone is also a device out of memory: only a failed write counts.)
_TEXT_REASONS = [(re.compile(r"No space left on device|RESOURCE_EXHAUSTED.*(?:Error|Failed) "
                             r"writing", re.S), WRITE_ERRNOS[errno.ENOSPC]),
                 (re.compile(r"Disk quota exceeded"), WRITE_ERRNOS[errno.EDQUOT]),
                 (re.compile(r"Read-only file system"), WRITE_ERRNOS[errno.EROFS])]
_TMP_FILE = re.compile(r"\.tmp-(\d+)$")
_MIN_HEADROOM = 1 << 20   # metrics, best.json, prompts/*.npy besides the checkpoint itself


class RunDirWriteError(UsageError):
    """The run directory cannot be written (full disk, quota, read-only, permissions)."""


def write_error_reason(error: BaseException) -> Optional[str]:
    """What kind of write error ``error`` (or any exception it was raised from) is; None if
    it is none (a bug or another failure keeps its own report)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return WRITE_ERRNOS[error.errno]
        for pattern, reason in _TEXT_REASONS:
            if pattern.search(str(error)):
                return reason
        error = error.__cause__ or error.__context__
    return None


def last_good_step(model_dir: str) -> Optional[int]:
    """The newest finished checkpoint step under ``model_dir`` (orbax renames a step's
    temporary directory to the bare number only once it is complete)."""
    directory = os.path.join(model_dir, "checkpoints")
    steps = [int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else [])
             if n.isdigit()]
    return max(steps) if steps else None


def _free_bytes(path: str) -> Optional[int]:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


def _size(n: Optional[int]) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def as_usage_error(error: BaseException, model_dir: str, doing: str = "write"
                   ) -> Optional[RunDirWriteError]:
    """The one-line error for a write error while training in ``model_dir``; None if
    ``error`` is not a write error."""
    reason = write_error_reason(error)
    if reason is None:
        return None
    good = last_good_step(model_dir)
    kept = (f"the last good checkpoint is step {good} (kept); free space (or set a new "
            "MODEL_DIR) and run the same command again to resume from it" if good is not None
            else "no checkpoint was written yet; free space (or set another MODEL_DIR) and "
                 "start the run again")
    return RunDirWriteError(f"cannot {doing} in {model_dir}: {reason} "
                            f"({_size(_free_bytes(model_dir))} free); {kept}.")


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def remove_stale_temporaries(model_dir: str) -> int:
    """Delete ``*.tmp-<pid>`` files of processes that no longer run (a writer killed between
    writing and renaming); returns how many. A live writer's temporaries are left alone."""
    removed = 0
    for root, _, files in os.walk(model_dir):
        for name in files:
            match = _TMP_FILE.search(name)
            if match is None or _pid_alive(int(match.group(1))):
                continue
            try:
                os.remove(os.path.join(root, name))
                removed += 1
            except OSError:
                pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def preflight(model_dir: str) -> None:
    """Before a run (re)starts in ``model_dir``: clean killed writers' temporaries, and refuse
    in one line when the disk cannot hold another checkpoint as large as the newest one."""
    if not os.path.isdir(model_dir):
        return
    remove_stale_temporaries(model_dir)
    checkpoints = os.path.join(model_dir, "checkpoints")
    for name in (os.listdir(checkpoints) if os.path.isdir(checkpoints) else []):
        if ".orbax-checkpoint-tmp" in name:   # a save that never finished: never a step
            shutil.rmtree(os.path.join(checkpoints, name), ignore_errors=True)
    good = last_good_step(model_dir)
    if good is None:
        return
    need = _dir_bytes(os.path.join(model_dir, "checkpoints", str(good))) + _MIN_HEADROOM
    free = _free_bytes(model_dir)
    if free is not None and free < need:
        raise RunDirWriteError(
            f"cannot resume in {model_dir}: the disk is still full ({_size(free)} free, a "
            f"checkpoint of this run needs about {_size(need)}); the last good checkpoint is "
            f"step {good} (kept). Free space, then run the same command again.")
