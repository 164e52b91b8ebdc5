"""One writer per run directory: ``<model_dir>/.prompt_t5x.lock``.

Why: two ``train`` commands pointed at one ``MODEL_DIR`` (a re-submitted job, a copy-pasted
command) both resume from the same step, save the same step numbers, prune each other's
checkpoints and rewrite each other's ``best.json``; orbax then fails at the first save, and
cleanup of the loser has deleted the winner's files. The lock turns that into one clear refusal
before anything is loaded or written.

The lock is a small JSON file created with ``O_CREAT | O_EXCL`` (atomic on local disks and on
NFS v3+): who holds it (host, PID, the PID's start time, the command) and since when, plus a
heartbeat that a daemon thread rewrites every ``HEARTBEAT_SECONDS``. Another process finds it:

* held by a live process on this host (same PID *and* same start time, so a recycled PID does
  not count) -> refused: UsageError naming the holder, exit 2;
* held by a dead process on this host -> stale: taken over, with a one-line notice;
* held from another host (a shared filesystem) -> live while its heartbeat is younger than
  ``STALE_AFTER_SECONDS``; an older heartbeat (the holder was killed, its machine lost) is stale.

A takeover first renames the lock file to a name unique to the taker and checks that what it
moved is the stale lock it judged: a racer that was faster has already put its own fresh lock
there, which is then put back and the takeover abandoned. In a multi-host run only process 0
takes the lock: the hosts of one job are one writer. URLs (``gs://``...) have no exclusive create, so they are not locked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from typing import Any, Dict, Optional

from prompt_t5x.base import storage
from prompt_t5x.base.errors import UsageError

LOCK_NAME = ".prompt_t5x.lock"
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0   # ten missed heartbeats: the holder is gone, not just slow


def _start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux ``/proc``), to tell a live holder from a new
    process that was given a dead holder's PID; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # exists, owned by someone else
    now = _start_time(pid)
    return started is None or now is None or now == started


class RunLock:
    """Hold ``<model_dir>/.prompt_t5x.lock`` while training; ``release()`` (or the context
    manager) gives it back. ``notice`` receives the one-line takeover message."""

    def __init__(self, model_dir: str, command: str = "train", *,
                 heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_after_seconds: float = STALE_AFTER_SECONDS, notice=None):
        self.model_dir = str(model_dir)
        self.path = os.path.join(self.model_dir, LOCK_NAME)
        self.command = command
        self.heartbeat_seconds, self.stale_after = heartbeat_seconds, stale_after_seconds
        self._notice = notice or (lambda text: print(f"prompt-t5x {command}: {text}",
                                                     file=sys.stderr, flush=True))
        self._record: Optional[Dict[str, Any]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- taking it -------------------------------------------------------------------------------
    def acquire(self) -> "RunLock":
        if storage.is_remote(self.model_dir):
            return self
        os.makedirs(self.model_dir, exist_ok=True)
        now = time.time()
        self._record = {"host": socket.gethostname(), "pid": os.getpid(),
                        "pid_started": _start_time(os.getpid()), "command": self.command,
                        "argv": sys.argv[1:], "since": now, "heartbeat": now}
        for _ in range(3):   # create; else judge the holder and maybe take over; then retry
            if self._create():
                break
            holder = self._read()
            if holder is None:
                continue   # released (or half-written) between our create and our read
            reason = self._stale_reason(holder)
            if reason is None:
                raise UsageError(self._refusal(holder))
            if self._take_over(holder):
                self._notice(f"took over the stale lock of {self._who(holder)} on "
                             f"{self.model_dir} ({reason}).")
                break
        else:
            holder = self._read() or {}
            raise UsageError(self._refusal(holder))
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat",
                                        daemon=True)
        self._thread.start()
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(self._record, f)
        return True

    def _read(self) -> Optional[Dict[str, Any]]:
        return storage.read_json(self.path)

    def _stale_reason(self, holder: Dict[str, Any]) -> Optional[str]:
        """Why ``holder``'s lock no longer counts, or None while it does."""
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if pid > 0 and _alive(pid, holder.get("pid_started")):
                return None
            return f"process {pid} is no longer running"
        age = time.time() - float(holder.get("heartbeat", 0))
        if age <= self.stale_after:
            return None
        return f"no heartbeat for {age:.0f} s"

    def _take_over(self, stale: Dict[str, Any]) -> bool:
        """Replace the lock judged stale (``stale``) by ours; False if another process got there
        first. The rename moves whatever lock is there *now*: a racer may already have replaced
        the stale one by its own fresh lock, so the moved file is checked to be the one judged,
        and put back untouched when it is not."""
        aside = f"{self.path}.stale-{socket.gethostname()}-{os.getpid()}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        moved = storage.read_json(aside) or {}
        if any(moved.get(k) != stale.get(k) for k in ("host", "pid", "since")):
            os.rename(aside, self.path)   # a live racer's lock: give it back
            return False
        os.remove(aside)
        return self._create()

    def _who(self, holder: Dict[str, Any]) -> str:
        return (f"'{holder.get('command', '?')}' (PID {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')})")

    def _refusal(self, holder: Dict[str, Any]) -> str:
        since = holder.get("since")
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(since)))
                if since else "an unknown time")
        return (f"MODEL_DIR {self.model_dir} is in use by {self._who(holder)} since {when}: "
                "one run writes a model dir at a time. Wait for it to finish, stop it (it "
                "saves and exits on SIGTERM or Ctrl-C), or choose another MODEL_DIR.")

    # -- keeping and releasing it ------------------------------------------------------------------
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            if not self._is_ours():
                return   # taken from us (we looked dead); never write over the new holder
            self._record["heartbeat"] = time.time()
            try:
                storage.write_bytes_atomic(self.path, json.dumps(self._record).encode())
            except OSError:
                pass   # a full disk: the next beat retries; the run reports its own errors

    def _is_ours(self) -> bool:
        holder = self._read() or {}
        return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._record is not None and self._is_ours():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self._record = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
