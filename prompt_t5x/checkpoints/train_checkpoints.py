"""Training checkpoints (orbax): only what training changes, plus a manifest to resume exactly.

Layout under ``model_dir``::

    checkpoints/<step>/train_state/   TrainState (step, trainable params, optimizer state, rng)
    checkpoints/<step>/manifest/      JSON: model config, frozen checkpoint path, gin config text,
                                      metrics, data-iterator position, checksum of the state
    prompts/step_<step>.npy           the prompt [P, D] (prompt tuning), written by process 0

The frozen T5 is never saved (it is re-read from ``frozen_checkpoint``). Orbax writes each step
into a temporary directory and renames it when complete, so a crash mid-save leaves no step that
looks finished (stray temporaries are deleted when the manager opens). Keeps the last N steps and,
optionally, the best step by an evaluation metric. The manifest holds a SHA-256 of the saved
state so silent corruption is detected on restore; :meth:`restore_latest_good` then falls back to
the newest intact step.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from prompt_t5x.base import storage
from prompt_t5x.base.errors import keep_first_error

STATE_ITEM = "train_state"
MANIFEST_ITEM = "manifest"
CHECKPOINTS_SUBDIR = "checkpoints"
PROMPTS_SUBDIR = "prompts"
MANIFEST_FORMAT = "prompt_t5x training checkpoint"

log = logging.getLogger(__name__)


class _WorkerTracebackFilter(logging.Filter):
    """Drops orbax's "_SignalingThread.run() raised an exception" records (each with a full
    traceback, one per writer thread) during a save: the same error reaches ``save``'s caller,
    which reports it once (``write_errors``: one line for a full disk)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "raised an exception" not in record.getMessage()


@contextlib.contextmanager
def _quiet_worker_tracebacks():
    quiet = _WorkerTracebackFilter()
    loggers = [logging.getLogger("absl"), logging.getLogger("orbax")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class TrainCheckpointError(RuntimeError):
    """A training checkpoint is missing, truncated or corrupted."""


def state_checksum(state: Any) -> Optional[str]:
    """SHA-256 over every leaf (shape, dtype, bytes) in tree order; None if not on this host.

    Replicated leaves of a multi-host run (the whole trainable state) are read from this host's
    copy, so every host computes the same checksum."""
    digest = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(state):
        if (isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
                and not leaf.is_fully_replicated):
            return None  # multi-host sharded: no single host sees the whole state
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype,
                                                                 jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        arr = np.asarray(leaf)
        digest.update(f"{arr.shape}{arr.dtype}".encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def write_prompt_npy(model_dir: str, step: int, prompt: Any) -> Optional[str]:
    """``<model_dir>/prompts/step_<step>.npy`` (process 0 only; temporary file + rename)."""
    if jax.process_index() != 0:
        return None
    path = os.path.join(model_dir, PROMPTS_SUBDIR, f"step_{step}.npy")
    storage.write_npy_atomic(path, np.asarray(jax.device_get(prompt), dtype=np.float32))
    return path


class TrainCheckpointer:
    """Save/restore the trainable TrainState of one run under ``model_dir``.

    ``read_only=True`` opens an existing run for inspection/export without touching it.
    """

    def __init__(self, model_dir: str, *, keep_last: int = 3, best_metric: Optional[str] = None,
                 best_mode: str = "max", read_only: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.model_dir = os.path.abspath(os.fspath(model_dir))
        self.directory = os.path.join(self.model_dir, CHECKPOINTS_SUBDIR)
        self.best_metric = best_metric
        policies = [ocm.LatestN(n=keep_last)]
        if best_metric is not None:
            policies.append(ocm.BestN(get_metric_fn=lambda m: float(m[best_metric]),
                                      reverse=best_mode == "min", n=1,
                                      keep_checkpoints_without_metrics=False))
        # Reading is not Orbax's read_only mode: that mode logs "Given directory is read only"
        # (and rewrites options with more warnings) on every open, which an eval or export
        # user reads as an error about their run. A manager that creates nothing and cleans
        # nothing writes nothing until save(), and save() refuses when read_only.
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=not read_only, enable_async_checkpointing=False,
            create=not read_only)
        self._manager = ocp.CheckpointManager(self.directory, item_names=(STATE_ITEM,
                                                                          MANIFEST_ITEM),
                                              options=options)

    # -- queries -------------------------------------------------------------------------------

    def all_steps(self) -> list:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # -- saving --------------------------------------------------------------------------------

    def save(self, state: Any, *, data_state: Optional[Mapping[str, Any]] = None,
             metrics: Optional[Mapping[str, float]] = None, model_config: Any = None,
             frozen_checkpoint: Optional[str] = None, gin_config: str = "",
             run: Optional[Mapping[str, Any]] = None,
             best: Optional[Mapping[str, Any]] = None) -> int:
        """Save ``state`` (a ``train.TrainState``) at its own step; returns the step.

        ``data_state`` is the data-iterator position (JSON), ``metrics`` drive keep-best (the
        ``best_metric`` must be among them for the step to compete). ``run`` (JSON) records what
        evaluating the run needs besides its weights: the seed of random frozen weights and the
        method (kind, prompt length, prompt mode). ``best`` (JSON) is the best-metric and
        early-stopping state at this step, so a resume decides exactly as an uninterrupted run.
        """
        if self.read_only:
            raise ValueError(f"{self.directory} was opened read-only; it cannot be saved to")
        step = int(jax.device_get(state.step))
        config_dict = model_config.to_dict() if hasattr(model_config, "to_dict") else model_config
        metrics = {k: float(v) for k, v in (metrics or {}).items()}
        manifest = {"format": MANIFEST_FORMAT, "step": step, "model_config": config_dict,
                    "frozen_checkpoint": frozen_checkpoint, "gin_config": gin_config,
                    "run": dict(run or {}),
                    "metrics": metrics, "data_state": dict(data_state or {}),
                    "checksum": state_checksum(state), "saved_at": time.time()}
        if best is not None:
            manifest["best"] = dict(best)
        ranked = metrics if self.best_metric in metrics else None
        with _quiet_worker_tracebacks():
            self._manager.save(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardSave(state),
                MANIFEST_ITEM: ocp.args.JsonSave(manifest)}), metrics=ranked, force=True)
            self._manager.wait_until_finished()
        params = state.params
        if isinstance(params, Mapping) and "prompt" in params:
            write_prompt_npy(self.model_dir, step, params["prompt"])
        return step

    # -- restoring -----------------------------------------------------------------------------

    def read_manifest(self, step: Optional[int] = None) -> Dict[str, Any]:
        step = self._resolve_step(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                MANIFEST_ITEM: ocp.args.JsonRestore()}))
            manifest = dict(restored[MANIFEST_ITEM])
        except Exception as e:
            raise TrainCheckpointError(
                f"manifest of the training checkpoint {self.step_dir(step)} is unreadable "
                f"({type(e).__name__}: {e})") from e
        if manifest.get("format") != MANIFEST_FORMAT:
            raise TrainCheckpointError(f"{self.step_dir(step)} is not a {MANIFEST_FORMAT}")
        return manifest

    def restore(self, template: Any, step: Optional[int] = None):
        """Restore the state saved at ``step`` (default: latest) into ``template``'s structure
        and shardings. Returns ``(state, manifest)``; raises TrainCheckpointError naming the
        path when the checkpoint is damaged."""
        step = self._resolve_step(step)
        manifest = self.read_manifest(step)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, template)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                STATE_ITEM: ocp.args.StandardRestore(abstract)}))
            state = restored[STATE_ITEM]
        except Exception as e:
            raise TrainCheckpointError(
                f"training checkpoint {self.step_dir(step)} is truncated or corrupted "
                f"({type(e).__name__}: {e}). Earlier steps: {self._earlier(step)}; use "
                "restore_latest_good() to fall back, or delete the damaged directory.") from e
        expected = manifest.get("checksum")
        actual = state_checksum(state)
        if expected is not None and actual is not None and expected != actual:
            raise TrainCheckpointError(
                f"training checkpoint {self.step_dir(step)} is corrupted: its data does not match "
                f"the checksum in its manifest. Earlier steps: {self._earlier(step)}; use "
                "restore_latest_good() to fall back, or delete the damaged directory.")
        return state, manifest

    def restore_latest_good(self, template: Any, *, quarantine: bool = True):
        """Restore the newest intact step, warning about (and by default moving aside) damaged
        newer ones so that the resumed run can save those steps again. Returns
        ``(state, manifest)``, or ``(None, None)`` when there is no checkpoint at all.

        Several processes choose together (every one must call this): process 0's listing and
        verdicts decide. Each candidate step is process 0's next newest one; every process
        restores it (orbax restores are collective) and takes it if process 0's restore and
        checksum succeeded, else all move on to the next. A process that cannot restore the
        step process 0 took raises TrainCheckpointError: continuing would resume the hosts from
        different states. Process 0 alone moves the damaged steps aside, between barriers that
        every process enters.
        """
        from prompt_t5x.parallel import distributed
        errors, newer_than = [], None
        while True:
            below = [s for s in self.all_steps() if newer_than is None or s < newer_than]
            step = distributed.broadcast_from_primary(below[-1] if below else -1)
            if step < 0:
                break
            newer_than = step
            try:
                result, error = self.restore(template, step), None
            except TrainCheckpointError as e:
                result, error = None, e
            if not distributed.broadcast_from_primary(error is None):
                log.warning("skipping damaged checkpoint: %s", error or
                            f"process 0 could not restore step {step}")
                errors.append((step, error))
                continue
            if error is not None:
                raise TrainCheckpointError(
                    f"process {distributed.process_index()} cannot restore training checkpoint "
                    f"step {step}, which process 0 restored; are the model dirs of all hosts "
                    f"one shared directory? {error}") from error
            if quarantine and not self.read_only:
                for bad_step, _ in errors:
                    self._quarantine(bad_step)
            return result
        if not errors:
            return None, None
        raise TrainCheckpointError(
            f"every training checkpoint under {self.directory} is damaged: "
            + "; ".join(f"step {s}: {e or 'damaged on process 0'}" for s, e in errors))

    def _quarantine(self, step: int) -> None:
        from prompt_t5x.parallel import distributed
        src = self.step_dir(step)
        # Every process calls this for the same steps (restore_latest_good follows process 0's
        # verdicts); process 0 moves the step, and all reload the listing after the barrier.
        with distributed.primary_writes(f"quarantine_{step}") as primary:
            if primary:
                dst_dir = os.path.join(self.model_dir, "checkpoints_damaged")
                os.makedirs(dst_dir, exist_ok=True)
                dst = os.path.join(dst_dir, f"{step}-{int(time.time())}")
                os.replace(src, dst)
                log.warning("moved damaged checkpoint %s to %s", src, dst)
        self._manager.reload()

    def _resolve_step(self, step: Optional[int]) -> int:
        steps = self.all_steps()
        if not steps:
            raise TrainCheckpointError(f"no training checkpoints under {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise TrainCheckpointError(f"no training checkpoint for step {step} under "
                                       f"{self.directory}; available: {steps}")
        return step

    def _earlier(self, step: int) -> list:
        return [s for s in self.all_steps() if s < step]

    def close(self) -> None:
        # On the way out of a failed save, closing can fail too; the save's error is the one.
        keep_first_error(self._manager.close, f"the checkpoint manager of {self.directory}")


def find_model_dir(path: str) -> Optional[str]:
    """The ``model_dir`` of a training checkpoint given it, its checkpoints dir or a step dir."""
    path = os.path.abspath(os.fspath(path))
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        ckpts = os.path.join(candidate, CHECKPOINTS_SUBDIR)
        if os.path.isdir(ckpts) and any(
                os.path.isdir(os.path.join(ckpts, d, MANIFEST_ITEM)) for d in os.listdir(ckpts)):
            return candidate
    return None


def read_trainable(model_dir: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], int]:
    """(saved trainable params as a numpy nested dict, step), without a template (export)."""
    ckpt = TrainCheckpointer(model_dir, read_only=True)
    step = ckpt._resolve_step(step)
    try:
        restored = ckpt._manager.restore(step, args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.StandardRestore()}))
    except Exception as e:
        raise TrainCheckpointError(f"training checkpoint {ckpt.step_dir(step)} is unreadable "
                                   f"({type(e).__name__}: {e})") from e
    state = restored[STATE_ITEM]
    params = state["params"] if isinstance(state, Mapping) else state.params
    return jax.tree_util.tree_map(np.asarray, params), step
