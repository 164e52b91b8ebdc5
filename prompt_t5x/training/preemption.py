"""Preemption-safe stops: a signal ends training at a step boundary, after a checkpoint.

Why: TPU VM preemption, SLURM (``scancel``, time limits) and Kubernetes send SIGTERM and wait a
grace period before SIGKILL; a user presses Ctrl-C. Python's defaults die at once on SIGTERM
(status 143, nothing saved, up to a checkpoint period of work lost) and turn SIGINT into a
``KeyboardInterrupt`` traceback from wherever the step happened to be. Instead:

* SIGTERM and the first SIGINT only *request* a stop. The training loop asks
  :meth:`StopWatch.should_stop` after every step; once it says yes the loop finishes that step
  (the NaN guard included), writes a checkpoint (atomic, like every save) and returns
  :class:`Stopped`; the ``train`` command prints one line naming the step and how to resume and
  exits with :data:`EXIT_STOPPED`.
* A second SIGINT aborts at once (``KeyboardInterrupt``, reported by ``run_command`` as one line
  and status 130): the escape hatch when the save itself hangs. The last checkpoint on disk is
  untouched; an interrupted save leaves only a temporary directory that the next start deletes.

The exit status is 75 (``EX_TEMPFAIL`` of ``sysexits.h``: "a temporary failure; the user is
invited to retry"): a scheduler or wrapper can requeue on it, and it cannot be mistaken for
128+15 = 143, which is what a process killed by SIGTERM *without* saving reports.

Several processes (multi-host): every host must stop at the same step, or the hosts would save
different steps and then wait forever in each other's collectives. JAX's preemption service
(``jax.distributed.initialize`` starts it; its notifier owns SIGTERM on every host) agrees on a
sync step, and ``multihost_utils.reached_preemption_sync_point(step)`` says yes on every host at
that same step; so in a multi-process run this module installs no SIGTERM handler of its own and
asks JAX. Ctrl-C cannot be agreed on that way (it reaches one host), so there SIGINT keeps its
default. On one process ``reached_preemption_sync_point`` is always False (no distributed client),
and the local handlers decide.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Dict, Optional

import jax

from prompt_t5x.base import errors

EXIT_STOPPED = errors.EXIT_STOPPED   # 75, sysexits.h EX_TEMPFAIL: stopped after a checkpoint
EXIT_ABORTED = 130           # 128 + SIGINT: a second Ctrl-C, stopped without saving


class Stopped:
    """Why a run stopped early on request: the signal and the step saved."""

    def __init__(self, signal_name: str, step: int):
        self.signal_name, self.step = signal_name, step

    def message(self, checkpoint_dir: str) -> str:
        return (f"stopped by {self.signal_name} after step {self.step}; the checkpoint of "
                f"step {self.step} is saved in {checkpoint_dir}. Run the same command again "
                "to resume from it.")


class StopWatch:
    """Signal handlers for one training loop, and the per-step question "stop here?".

    ``install()`` / ``uninstall()`` bracket the loop (handlers can only be set from the main
    thread; elsewhere they are left alone, and only JAX's preemption sync point can stop the
    run). Handlers set before are restored by ``uninstall``.
    """

    def __init__(self, announce=None):
        self.requested: Optional[str] = None     # name of the first stop signal received
        self._previous: Dict[int, object] = {}
        self._multi_process = jax.process_count() > 1
        self._sync_available = True
        self._announce = announce if announce is not None else _print_to_stderr

    # -- handlers ------------------------------------------------------------------------------
    def install(self) -> "StopWatch":
        if threading.current_thread() is not threading.main_thread():
            return self
        wanted = [] if self._multi_process else [signal.SIGINT, signal.SIGTERM]
        for signum in wanted:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            if signum == signal.SIGINT:
                # The second Ctrl-C: the user wants out now, saved or not.
                raise KeyboardInterrupt
            return   # a repeated SIGTERM changes nothing: the stop is already under way
        self.requested = name
        if signum == signal.SIGINT:
            # The step and the save may take a while; say that the key press was heard.
            self._announce("interrupt received: finishing this step and saving a checkpoint "
                           "(press Ctrl-C again to abort without saving)")

    # -- the loop's question ---------------------------------------------------------------------
    def should_stop(self, step: int) -> bool:
        """True when the run should checkpoint ``step`` and stop. Every process must call this
        after every step (the multi-host sync point counts steps)."""
        if self._sync_point(step):
            # Only a multi-process run gets here: JAX saw a preemption notice on some host
            # and every host reaches this at the same step.
            self.requested = self.requested or "SIGTERM"
            return True
        return self.requested is not None and not self._multi_process

    def _sync_point(self, step: int) -> bool:
        # One process: there is no preemption service to ask (JAX would answer False), so the
        # per-step question costs nothing there.
        if not self._multi_process or not self._sync_available:
            return False
        from jax.experimental import multihost_utils
        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:
            # The cluster was joined with the preemption service disabled
            # (jax_enable_preemption_service=False): SIGTERM keeps its default there.
            self._sync_available = False
            return False

    def stopped(self, step: int) -> Stopped:
        return Stopped(self.requested or "SIGTERM", step)


def _print_to_stderr(text: str) -> None:
    print(f"prompt-t5x: {text}", file=sys.stderr, flush=True)
