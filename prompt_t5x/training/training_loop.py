"""The training loop around the jitted train step: logging, evaluation, checkpoints, resume.

What one call of ``run_loop`` does, step by step:

1. Resume: restore the newest intact training checkpoint under ``model_dir`` (trainable state,
   optimizer state, step, rng) and the data position saved with it; continue from there. The best
   validation result so far and the early-stopping count come from that checkpoint's manifest
   (``best_state``), never from a ``best.json`` written after it.
2. Train: ``train.train_step_fn`` (gradient accumulation over ``num_microbatches``), jitted
   together with two small on-device accumulators (``guarded_step``), so the host never waits
   for the device between steps: the running sums of the logged metrics, and a *non-finite
   guard* that records the first step whose loss, gradient norm or updated parameters are
   NaN/Inf.
3. Every ``log_every`` steps (the only per-step-interval host sync): fetch the sums, write train
   scalars (TensorBoard + ``metrics.jsonl``), update the progress bar with steps/s and examples/s,
   and stop with ``NonFiniteError`` if the guard tripped (no checkpoint is written after that
   point, so the last checkpoint on disk is the last good one).
4. Every ``eval_every`` steps and at the end: ``evaluate(trainable) -> {metric: value}``,
   validation scalars, best-by-metric bookkeeping (``best.json``, ``prompts/best.npy``, the
   checkpointer keeps that step) and optional early stopping after ``early_stopping_patience``
   evaluations without improvement.
5. Every ``checkpoint_every`` steps and at the end: a training checkpoint with the data position.

Every run is partitioned over a mesh (``mesh``; default: the 1x1 mesh of the first device, so
one device is not a second code path): the frozen weights stay in the shardings they arrive in
(the caller creates them there, see ``run_train``), the train state is replicated, the guarded
step is jitted with those in/out shardings (``guarded_step.make_guarded_step``; state and
accumulators donated) and runs under the mesh and the logical-axis rules.
``make_batches`` yields *this host's* rows: those of its data shard
``distributed.data_shard(mesh)`` (hosts that share 'data' rows get the same rows); the loop
checks their count against the global batch size and assembles the global ``jax.Array`` split
over 'data' (``sharding.shard_batch``); it never slices.
The data state saved with each checkpoint records the stream (task, split, seed, global batch
size, shard count); a resume that would read another stream is refused before the stream is
built (another shard count only where the stream's global batches depend on it).
``evaluate`` must itself be partitioned (``validation.make_evaluator`` with the mesh): every
host gets the same metrics. Orbax checkpoint saves and restores are collective (every process
calls them; orbax writes replicated arrays once) and process 0 picks the step every host
resumes from (``TrainCheckpointer.restore_latest_good``); metrics, ``best.json`` and
``prompts/*.npy`` are written by process 0, the files between barriers.

This module imports no TensorFlow: data arrives as an iterator of numpy batches from a factory
``make_batches(position)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import jax
import numpy as np
import optax

from prompt_t5x.checkpoints import train_checkpoints
from prompt_t5x.data import metrics as metrics_lib
from prompt_t5x.methods.interface import Method
from prompt_t5x.parallel import distributed, partitioning
from prompt_t5x.parallel import sharding as sharding_lib
from prompt_t5x.training import best_state, preemption, sharded_run
from prompt_t5x.training.guarded_step import (
    AVERAGED,
    fresh_accumulators,
    make_guarded_step,
)
from prompt_t5x.training.metrics_writer import MetricsWriter, drop_records_after

PyTree = Any
Batch = Mapping[str, np.ndarray]


class NonFiniteError(RuntimeError):
    """The loss, the gradients or the trainable parameters became NaN/Inf."""


class ResumeError(ValueError):
    """A checkpoint cannot be resumed by this run as configured (e.g. another data sharding)."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    train_steps: int = 30000
    log_every: int = 100
    eval_every: int = 1000             # 0: evaluate only at the end
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3          # latest N training checkpoints (the best one is kept too)
    metric: str = "accuracy"           # validation metric for the best checkpoint / early stop
    metric_mode: str = "max"           # 'max' or 'min'
    early_stopping_patience: Optional[int] = None  # evaluations without improvement
    num_microbatches: int = 1          # gradient accumulation
    z_loss: float = 1e-4
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        if self.train_steps < 1:
            raise ValueError(f"train_steps must be >= 1, got {self.train_steps}")
        for name in ("log_every", "checkpoint_every", "num_microbatches", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        if self.metric_mode not in ("max", "min"):
            raise ValueError(f"metric_mode must be 'max' or 'min', got {self.metric_mode!r}")


@dataclasses.dataclass
class LoopResult:
    last_step: int
    best_step: Optional[int]
    best_value: Optional[float]
    best_metrics: Dict[str, float]
    stopped_early: bool
    evaluations: List[Dict[str, float]]
    resumed_from: Optional[int]
    # The shardings of the frozen tree the step ran with.
    frozen_shardings: Optional[PyTree] = None
    # Set when a signal stopped the run after checkpointing ``last_step`` (preemption.py).
    stopped: Optional[preemption.Stopped] = None


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a core dependency
        return None
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, leave=True)


def _data_state(batches, fallback_position: int,
                batch_size: Optional[int] = None) -> Dict[str, Any]:
    state = (dict(batches.state()) if hasattr(batches, "state")
             else {"position": getattr(batches, "position", fallback_position)})
    if batch_size is not None:
        state["batch_size"] = batch_size   # global: the position counts batches of this size
    return state


# What identifies a training stream (recorded in each checkpoint's data state), as named in
# the error when a resume would read another stream.
STREAM_KEYS = {"name": "task", "split": "split", "seed": "seed",
               "batch_size": "global batch size",
               "num_shards": "data shards (hosts along the mesh's 'data' axis)"}


def _check_resumable(saved: Mapping[str, Any], source, batch_size: Optional[int],
                     where: str) -> None:
    """The saved data position counts global batches of one stream: same task, split, seed
    and batch size, split into the same ``num_shards`` host shards (SeqIO shards its files or
    examples by the count) unless the stream's global batches do not depend on it
    (``resumes_with_any_shard_count``, the generated tasks). ``source`` is a stream factory
    with an ``identity`` dict or a stream with ``state()``. Keys a checkpoint did not record
    (older runs) are not compared. One ResumeError naming every difference."""
    found = getattr(source, "identity", None)
    now = dict(_data_state(source, 0) if found is None else found)
    if batch_size is not None:
        now["batch_size"] = batch_size
    any_shard_count = bool(getattr(source, "resumes_with_any_shard_count", False))
    differ = [f"{words}: {saved[key]!r} in the checkpoint, {now[key]!r} now"
              for key, words in STREAM_KEYS.items()
              if key in saved and key in now and saved[key] != now[key]
              and not (key == "num_shards" and any_shard_count)]
    if differ:
        raise ResumeError(f"cannot resume {where}: this run would read another data stream ("
                          + "; ".join(differ) + "). Resume with the settings (and mesh and "
                          "host count) the checkpoint was saved with, or start a new model_dir.")


def _place_host_batch(batch: Batch, *, mesh, batch_size: Optional[int],
                      shard: distributed.DataShard) -> dict:
    """This host's rows (its data shard of the global batch) -> the global batch on ``mesh``."""
    rows = int(np.shape(next(iter(batch.values())))[0])
    if batch_size is not None and rows * shard.count != batch_size:
        raise ValueError(
            f"the data gave this host {rows} rows but its share of the global batch of "
            f"{batch_size} is {batch_size // shard.count} (data shard {shard.index} of "
            f"{shard.count}): make_batches must yield this host's rows only.")
    return sharding_lib.shard_batch(batch, mesh)


def run_loop(*, method: Method, optimizer: optax.GradientTransformation, frozen: PyTree,
             make_batches: Callable[[int], Iterator[Batch]], model_dir: str, config: LoopConfig,
             evaluate: Optional[Callable[[PyTree], Dict[str, float]]] = None,
             rng: Optional[jax.Array] = None, initial_trainable: Optional[PyTree] = None,
             batch_size: Optional[int] = None, model_config: Any = None,
             frozen_checkpoint: Optional[str] = None, gin_config: str = "",
             run_info: Optional[Dict[str, Any]] = None,
             mesh=None, rules: Optional[sharding_lib.Rules] = None) -> LoopResult:
    """Train ``method`` on the batches until ``config.train_steps``; see the module docstring.

    ``make_batches(position)`` returns an iterator of numpy batches starting at batch
    ``position`` (0 for a new run, the saved position when resuming): the global batch on one
    process, this host's data shard of it on several. ``batch_size`` is the global batch size.
    ``evaluate`` maps the trainable tree to validation metrics; it must contain
    ``config.metric`` for best-checkpoint tracking and early stopping to work.

    ``mesh`` (a ``jax.sharding.Mesh`` with 'data'/'model' axes) and ``rules`` (logical-axis
    rules) partition the run; ``frozen`` should already be sharded on ``mesh`` (leaves that are
    not are replicated onto it). Without a mesh the run is partitioned over the 1x1 mesh of the
    first device, which a multi-process run cannot do.
    """
    if mesh is None:
        if jax.process_count() > 1:
            raise ValueError(f"a run over {jax.process_count()} processes needs a mesh spanning "
                             "their devices (run_loop(mesh=...)).")
        mesh = sharding_lib.single_device_mesh()
    rng = jax.random.PRNGKey(0) if rng is None else rng
    # What eval/infer/export rebuild the method from (methods.registry).
    run_info = {**(run_info or {}), "method_config": method.method_config()}
    if distributed.is_primary():
        os.makedirs(model_dir, exist_ok=True)
    rules = sharding_lib.rules_or_default(rules)
    frozen, frozen_shardings = partitioning.place_on_mesh(frozen, mesh)
    state = sharded_run.create_train_state(method, optimizer, frozen, rng, mesh, rules,
                                           trainable=initial_trainable)
    checkpointer = train_checkpoints.TrainCheckpointer(
        model_dir, keep_last=config.keep_checkpoints,
        best_metric=f"validation/{config.metric}" if evaluate else None,
        best_mode=config.metric_mode)
    restored, manifest = checkpointer.restore_latest_good(state)
    resumed_from, position = None, 0
    if restored is not None:
        restored = jax.device_put(restored, sharding_lib.replicated(mesh))
        state, resumed_from = restored, int(manifest["step"])
        position = int(manifest.get("data_state", {}).get("position", resumed_from))
    # Best and early-stopping state come from the checkpoint resumed (best_state.py).
    best = best_state.BestTracker(model_dir, config.metric, config.metric_mode,
                                  resumed=manifest if restored is not None else None,
                                  write=distributed.is_primary())
    start = int(jax.device_get(state.step))
    result = LoopResult(start, best.step, best.value, best.metrics, False, [], resumed_from,
                        frozen_shardings)
    if start >= config.train_steps:
        checkpointer.close()
        return result

    def save(step_state, metrics=None):
        # Collective: orbax coordinates the processes itself (process 0 writes replicated
        # arrays and the manifest); the barrier keeps hosts in step around it.
        saved = checkpointer.save(step_state,
                                  data_state=_data_state(batches, position, batch_size),
                                  metrics=metrics, model_config=model_config,
                                  frozen_checkpoint=frozen_checkpoint, gin_config=gin_config,
                                  run=run_info, best=best.state())
        distributed.barrier(f"checkpoint_{saved}")

    # Committed to the mesh like the step's outputs: the jit cache keys on commitment, and
    # uncommitted accumulators would trace and compile the whole step a second time.
    new_acc = lambda: jax.device_put(fresh_accumulators(),  # noqa: E731
                                     sharding_lib.replicated(mesh))
    step_fn = make_guarded_step(method, optimizer, mesh, rules, frozen_shardings,
                                config.num_microbatches, config.z_loss)
    place_batch = functools.partial(_place_host_batch, mesh=mesh, batch_size=batch_size,
                                    shard=distributed.data_shard(mesh))
    # A factory that declares its ``identity`` (run_data.train_stream) is checked before it
    # builds the stream (SeqIO replays to the position, which takes a while); of a plain
    # factory only the stream it builds can say what it reads.
    declared = hasattr(make_batches, "identity")
    saved_data = manifest.get("data_state", {}) if restored is not None else None
    where = f"step {resumed_from} of {model_dir}"
    if saved_data is not None and declared:
        _check_resumable(saved_data, make_batches, batch_size, where)
    batches = make_batches(position)
    if saved_data is not None and not declared:
        _check_resumable(saved_data, batches, batch_size, where)
    primary = distributed.is_primary()   # one host writes the metrics of a multi-host run
    if primary and resumed_from is not None:
        drop_records_after(model_dir, resumed_from)   # a killed run's records past its checkpoint
    train_writer = MetricsWriter(model_dir, "train", config.tensorboard, enabled=primary)
    eval_writer = MetricsWriter(model_dir, "validation", config.tensorboard, enabled=primary)
    bar = _progress(config.train_steps, start, config.progress_bar and primary)
    acc = new_acc()
    window_start, window_steps = time.perf_counter(), 0
    step = start
    watch = preemption.StopWatch().install()   # SIGTERM / Ctrl-C: save, then stop
    try:
        while step < config.train_steps:
            batch = next(batches)
            examples = int(next(iter(batch.values())).shape[0]) if batch_size is None \
                else batch_size
            state, acc, last = step_fn(state, frozen, place_batch(batch), acc)
            step += 1
            window_steps += 1
            is_last = step == config.train_steps
            do_eval = evaluate is not None and (is_last or (config.eval_every
                                                            and step % config.eval_every == 0))
            stop_here = not is_last and watch.should_stop(step)
            do_ckpt = is_last or do_eval or stop_here or step % config.checkpoint_every == 0
            if step % config.log_every == 0 or do_ckpt:
                # The one host sync of a logging window; also the NaN guard's check, which
                # must run before any checkpoint of this state is written.
                (sums, guard), last = jax.device_get((acc, last))
                if guard[0] >= 0:
                    good = checkpointer.latest_step()
                    # Only offer a resume when there is a checkpoint to resume from.
                    where = (f"the last good checkpoint is step {good} in "
                             f"{checkpointer.directory}. Lower the learning rate, check the "
                             "data, or resume from that checkpoint" if good is not None else
                             "no checkpoint was written before it. Lower the learning rate or "
                             "check the data, and start the run again")
                    raise NonFiniteError(
                        f"non-finite values at training step {int(guard[0])}: loss={guard[1]:g}, "
                        f"grad_norm={guard[2]:g}, param_norm={guard[3]:g}. Training stopped; "
                        f"{where}.")
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                n = max(float(sums["steps"]), 1.0)
                scalars = {k: float(sums[k]) / n for k in AVERAGED}
                scalars.update({k: float(v) for k, v in last.items()})
                scalars["steps_per_second"] = window_steps / elapsed
                scalars["examples_per_second"] = window_steps * examples / elapsed
                train_writer.write(step, scalars)
                if bar is not None:
                    bar.set_postfix(loss=f"{scalars['loss']:.4f}",
                                    steps_s=f"{scalars['steps_per_second']:.2f}",
                                    ex_s=f"{scalars['examples_per_second']:.1f}", refresh=False)
                    bar.update(step - bar.n)
                acc = new_acc()
                window_start, window_steps = time.perf_counter(), 0
            metrics = None
            pause_start = time.perf_counter()
            if do_eval:
                values = {k: float(v) for k, v in evaluate(state.params).items()}
                eval_writer.write(step, values)
                with distributed.primary_writes(f"best_{step}") as primary:
                    improved = best.update(step, values, state.params, write=primary)
                result.evaluations.append({"step": step, **values})
                metrics = {f"validation/{k}": v for k, v in values.items()}
                if bar is not None:
                    bar.write(f"step {step}: " + metrics_lib.format_metrics(values)
                              + (" (best)" if improved else ""))
                if (config.early_stopping_patience is not None
                        and best.evals_since >= config.early_stopping_patience):
                    result.stopped_early = True
            if do_ckpt or result.stopped_early:
                save(state, metrics)
            # steps/s measures training steps: the window's clock skips evaluation and
            # checkpoint writes (moving its start forward by their duration).
            window_start += time.perf_counter() - pause_start
            if stop_here and not result.stopped_early:
                result.stopped = watch.stopped(step)
            if result.stopped_early or result.stopped:
                break
    finally:
        watch.uninstall()
        if bar is not None:
            bar.close()
        train_writer.close()
        eval_writer.close()
        checkpointer.close()
    result.last_step = step
    result.best_step, result.best_value, result.best_metrics = best.step, best.value, best.metrics
    return result
