"""``prompt-t5x train``: a gin-configured prompt-tuning (or model-tuning) run.

  prompt-t5x train --gin_file=models/base.gin --gin_file=runs/prompt_tuning.gin \\
      --gin.MODEL_DIR="'/tmp/pt_rte'" --gin.TASK="'super_glue_rte_v102'"

Everything is a binding of the ``train`` configurable (see ``gin/runs/prompt_tuning.gin`` for the
full table). The order of work is chosen so that bad input fails *before* anything is written:
the gin configuration, the checkpoint path, the vocabulary and the task are all checked first,
and a model directory created by a run that then fails before its first checkpoint is removed.

Frozen weights come from ``train.checkpoint`` (``frozen_sources``): a T5X checkpoint (legacy or
Orbax; a model dir picks its latest step), a Hugging Face T5 directory, or ``None`` for random
weights (tiny tests).

Partitioning: ``train.mesh = 'DATAxMODEL'`` (e.g. '4x2'; 'auto' = the backend's default,
``sharding.default_mesh_config``) runs the step on a ('data', 'model') device mesh with T5X's
logical-axis rules (``train.parameter_partitioning_dims`` / ``activation_partitioning_dims``):
the frozen weights are created or read straight into their shards, the trainable state is
replicated and the batch is split over 'data'. ``train.mesh = None`` (default) trains on one
device as before in a single-process run, and uses the 'auto' mesh in a multi-process run.
Multi-host: ``--coordinator_address/--num_processes/--process_id`` (or the environment; TPU pods
need nothing) join the JAX cluster before anything touches a device. Each host then reads its
data shard of every batch (``run_data.train_stream``), validation runs partitioned on the mesh
(``validation.make_evaluator`` / ``make_decode_predict`` with the mesh) so every host computes
the same metrics, and process 0 writes the files (see ``training_loop``). An error on any host
ends that process at once (``distributed.exit_at_once_on_error``), so the others stop at their
next collective instead of waiting for it; the job exits non-zero.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from typing import Any, List, Mapping, Optional, Sequence

import gin
import jax

from prompt_t5x.base.errors import UsageError
from prompt_t5x.checkpoints import frozen_sources, run_lock, write_errors
from prompt_t5x.commands import configurables, gin_cli, gin_help
from prompt_t5x.data import metrics as metrics_lib
from prompt_t5x.data import run_data, task_registry
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.parallel import distributed
from prompt_t5x.parallel import sharding as sharding_lib
from prompt_t5x.training import preemption
from prompt_t5x.training.training_loop import (
    LoopConfig,
    LoopResult,
    NonFiniteError,
    ResumeError,
    run_loop,
)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run, as bound in gin (``train.*``)."""

    model_dir: str
    task: str
    model: t5_lib.T5Config
    method: configurables.MethodSpec
    optimizer: Any                          # optax.GradientTransformation
    loop: LoopConfig
    checkpoint: Optional[str] = None        # T5X checkpoint / HF dir / None = random weights
    vocabulary: Optional[str] = None        # SentencePiece model; None = $PROMPT_T5X_VOCAB / T5's
    data_dir: Optional[str] = None          # local-file tasks (tasks.local_files)
    task_modules: Sequence[str] = ()        # user modules that register more SeqIO tasks
    batch_size: int = 32
    inputs_length: int = 512
    targets_length: int = 8
    train_split: str = "train"
    eval_split: str = "validation"
    max_eval_examples: Optional[int] = None
    rank_classification: bool = True
    seed: int = 0
    mesh: Optional[str] = None              # 'DATAxMODEL' | 'auto' | None (see module doc)
    parameter_partitioning_dims: int = 1
    activation_partitioning_dims: int = 1

    def replace(self, **kw) -> "RunConfig":
        return dataclasses.replace(self, **kw)


@gin.configurable("train")
def train_config(model_dir: str = gin.REQUIRED, task: str = gin.REQUIRED,
                 model: t5_lib.T5Config = gin.REQUIRED, checkpoint: Optional[str] = None,
                 vocabulary: Optional[str] = None, data_dir: Optional[str] = None,
                 task_modules: Sequence[str] = (),
                 method: Optional[configurables.MethodSpec] = None, optimizer: Any = None,
                 train_steps: int = 30000, batch_size: int = 32,
                 feature_lengths: Mapping[str, int] = None, num_microbatches: int = 1,
                 log_every: int = 100, eval_every: int = 1000, checkpoint_every: int = 1000,
                 keep_checkpoints: int = 3, metric: str = "accuracy", metric_mode: str = "max",
                 early_stopping_patience: Optional[int] = None, train_split: str = "train",
                 eval_split: str = "validation", max_eval_examples: Optional[int] = None,
                 rank_classification: bool = True, z_loss: float = 1e-4,
                 tensorboard: bool = True, progress_bar: bool = True, seed: int = 0,
                 mesh: Optional[str] = None, parameter_partitioning_dims: int = 1,
                 activation_partitioning_dims: int = 1) -> RunConfig:
    """The ``train`` gin configurable: every knob of a run (defaults: the paper's recipe)."""
    from prompt_t5x.training import optim
    lengths = dict(feature_lengths or {"inputs": 512, "targets": 8})
    unknown = set(lengths) - {"inputs", "targets"}
    if unknown or len(lengths) != 2:
        raise UsageError(f"train.feature_lengths must be {{'inputs': L, 'targets': T}}, got "
                         f"{lengths}")
    try:
        loop = LoopConfig(train_steps=train_steps, log_every=log_every, eval_every=eval_every,
                          checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                          metric=metric, metric_mode=metric_mode,
                          early_stopping_patience=early_stopping_patience,
                          num_microbatches=num_microbatches, z_loss=z_loss,
                          tensorboard=tensorboard, progress_bar=progress_bar)
    except ValueError as e:
        raise UsageError(f"train: {e}") from None
    if batch_size % num_microbatches:
        raise UsageError(f"train.batch_size={batch_size} is not divisible by "
                         f"train.num_microbatches={num_microbatches}")
    if mesh is not None:
        _mesh_config(str(mesh), parameter_partitioning_dims, activation_partitioning_dims)
    for name, dims in (("parameter_partitioning_dims", parameter_partitioning_dims),
                       ("activation_partitioning_dims", activation_partitioning_dims)):
        if dims not in (1, 2):
            raise UsageError(f"train.{name}={dims!r} must be 1 or 2 (T5X's switches: 2 also "
                             "splits 'embed' over the other mesh axis).")
    return RunConfig(model_dir=os.path.expanduser(str(model_dir)), task=task, model=model,
                     method=method or configurables.prompt_tuning(),
                     optimizer=optimizer or optim.adafactor(), loop=loop,
                     checkpoint=checkpoint, vocabulary=vocabulary, data_dir=data_dir,
                     task_modules=tuple(task_modules), batch_size=batch_size,
                     inputs_length=int(lengths["inputs"]), targets_length=int(lengths["targets"]),
                     train_split=train_split, eval_split=eval_split,
                     max_eval_examples=max_eval_examples,
                     rank_classification=rank_classification, seed=seed,
                     mesh=None if mesh is None else str(mesh),
                     parameter_partitioning_dims=parameter_partitioning_dims,
                     activation_partitioning_dims=activation_partitioning_dims)


configurables.register("train", train_config)


# ------------------------------------------------------------------------- input checks ----
# ----------------------------------------------------------------------------- the mesh ----
def _mesh_config(text: str, parameter_dims: int = 1,
                 activation_dims: int = 1) -> sharding_lib.MeshConfig:
    switches = dict(parameter_partitioning_dims=parameter_dims,
                    activation_partitioning_dims=activation_dims)
    if text.strip().lower() == "auto":
        default = sharding_lib.default_mesh_config(jax.default_backend(),
                                                   jax.local_device_count())
        return dataclasses.replace(default, **switches)
    try:
        return sharding_lib.MeshConfig.parse(text, **switches)
    except ValueError as e:
        raise UsageError(f"train.mesh: {e}") from None


def build_mesh(run: RunConfig):
    """(mesh, rules) for ``run``: its ``train.mesh``, or the 1x1 mesh of the first device (one
    device is a mesh like any other: there is no unpartitioned path).

    UsageError (before anything is written or loaded) when the mesh does not fit the devices,
    the hosts (``distributed.data_shard``), the batch or the model's dimensions.
    """
    text = run.mesh
    if text is None:
        # One process: one device, as a 1x1 mesh. Several processes must share one mesh.
        text = "1x1" if jax.process_count() == 1 else "auto"
    mesh_config = _mesh_config(text, run.parameter_partitioning_dims,
                               run.activation_partitioning_dims)
    devices = jax.devices()
    wanted = mesh_config.data * mesh_config.model
    if (mesh_config.data > 0 and mesh_config.model > 0 and wanted < len(devices)
            and len(devices) % wanted == 0 and jax.process_count() == 1):
        # One process may train on a sub-mesh (e.g. '1x1' on a multi-device host); several
        # processes must cover every device, since each feeds its own.
        devices = devices[:wanted]
    try:
        data, model = mesh_config.shape(len(devices))
    except ValueError as e:
        raise UsageError(f"train.mesh={text!r}: {e} (the mesh must use all {len(devices)} "
                         "devices, or a divisor of them in a one-process run)") from None
    per_microbatch = run.batch_size // run.loop.num_microbatches
    if per_microbatch % data:
        raise UsageError(f"train.mesh={text!r}: the batch of {per_microbatch} examples (per "
                         f"microbatch) is not divisible by the mesh's 'data' size {data}; change "
                         "train.batch_size or the mesh.")
    mesh = sharding_lib.make_mesh(mesh_config, devices)
    try:
        distributed.data_shard(mesh)   # hosts must own whole, contiguous 'data' rows
    except ValueError as e:
        raise UsageError(f"train.mesh={text!r} ({data}x{model}): {e}") from None
    rules = mesh_config.rules()
    from prompt_t5x.parallel import partitioning
    try:
        partitioning.abstract_frozen(run.model, mesh, rules)
    except ValueError as e:
        raise UsageError(f"train.mesh={text!r} ({data}x{model}) does not fit the model: {e}") \
            from None
    return mesh, rules


# ----------------------------------------------------------------------------- the run ----
def execute(run: RunConfig, *, gin_config: str = "") -> LoopResult:
    """Check every input, then train. Removes ``model_dir`` if this call created it and failed
    before writing anything worth keeping."""
    kind = frozen_sources.checkpoint_kind(run.checkpoint)
    task_registry.check_vocabulary(run.vocabulary)
    prompt_length = run.method.prompt_length   # encoder positions the method adds
    source = run_data.open_data(run, prompt_length)
    if source.vocab_size is not None and source.vocab_size > run.model.vocab_size:
        raise UsageError(f"task {run.task!r} has a vocabulary of {source.vocab_size} ids but "
                         f"the model's vocab_size is {run.model.vocab_size}: pick a model gin "
                         "file / t5.get_config.vocab_size that matches the task's vocabulary.")
    # The method is built (its settings checked) before any weight is loaded or file written.
    method = run.method.build(t5_lib.T5(run.model), source.label_words, source.encode,
                              **build_context(run.method))
    mesh, rules = build_mesh(run)
    created = not os.path.exists(run.model_dir)
    # One writer per model dir (run_lock.py): refused here, before anything is loaded.
    lock = run_lock.RunLock(run.model_dir).acquire() if distributed.is_primary() else None
    try:
        if lock is not None:
            write_errors.preflight(run.model_dir)   # killed writers' leftovers; a full disk
        return _train(run, kind, source, method, gin_config, mesh, rules)
    except ResumeError as e:
        raise UsageError(str(e)) from None
    except BaseException as error:
        full = write_errors.as_usage_error(error, run.model_dir)
        if lock is not None:
            lock.release()   # first: its heartbeat must not re-create a dir removed below
        ckpt_dir = os.path.join(run.model_dir, "checkpoints")
        if created and distributed.is_primary() and not (os.path.isdir(ckpt_dir) and any(
                n.isdigit() for n in os.listdir(ckpt_dir))):
            shutil.rmtree(run.model_dir, ignore_errors=True)
        if full is not None:   # one line with the last good step, not a storage traceback
            raise full from None
        raise
    finally:
        if lock is not None:
            lock.release()


def build_context(spec: configurables.MethodSpec) -> dict:
    """What a new run's method needs besides its settings, loaded from the runs it names
    (``prompted_model.method_build_context``: MPT's teachers, a target stage's source). Bad
    paths or states are UsageErrors."""
    from prompt_t5x.inference import prompted_model
    return prompted_model.method_build_context({"kind": spec.kind, **dict(spec.settings)})


def _train(run: RunConfig, kind: str, source, method, gin_config: str, mesh=None,
           rules=None) -> LoopResult:
    from prompt_t5x.training import validation
    params = frozen_sources.load_sharded_frozen_params(run.checkpoint, run.model, run.seed, kind,
                                                       mesh, rules)
    initial_trainable = None
    frozen = params
    if run.method.kind == "model_tuning":
        frozen, initial_trainable = method.split(params)
    if distributed.is_primary():
        print(trainable_summary(method, run.model), flush=True)
    eval_list = run_data.limit_examples(source.eval_batches(), run.max_eval_examples)
    use_rank = run.rank_classification and bool(source.label_words)
    predict = None
    if not use_rank and source.decode_for_metrics and source.vocabulary is not None:
        from prompt_t5x.inference import decoding
        predict = validation.make_decode_predict(
            method, frozen, source.vocabulary,
            decoding.DecodeSpec("greedy", max_decode_len=run.targets_length), mesh, rules)
    evaluate = validation.make_evaluator(
        method, frozen, eval_list,
        examples=source.eval_examples() if (use_rank or predict) else None,
        label_words=source.label_words if use_rank else None, encode=source.encode,
        compute_metrics=source.compute_metrics, predict=predict, z_loss=run.loop.z_loss,
        mesh=mesh, rules=rules)
    return run_loop(method=method, optimizer=run.optimizer, frozen=frozen,
                    make_batches=run_data.train_stream(source, mesh), model_dir=run.model_dir,
                    config=run.loop, evaluate=evaluate, rng=jax.random.PRNGKey(run.seed),
                    initial_trainable=initial_trainable, batch_size=run.batch_size,
                    model_config=run.model, frozen_checkpoint=run.checkpoint,
                    gin_config=gin_config, mesh=mesh, rules=rules,
                    run_info={"seed": run.seed, "method": run.method.kind,
                              **({"prompt_length": run.method.prompt_length,
                                  "prompt_mode": run.method.prompt_mode}
                                 if run.method.kind == "prompt_tuning" else {})})


def trainable_summary(method, config: t5_lib.T5Config) -> str:
    """One line: the method, how many numbers it trains and their share of the frozen T5."""
    shapes = jax.eval_shape(method.init_trainable, jax.random.PRNGKey(0),
                            t5_lib.param_shapes(config)) if method.kind != "model_tuning" \
        else t5_lib.param_shapes(config)
    count = method.num_trainable(shapes)
    return (f"{method.kind}: {count:,} trainable parameters "
            f"({100.0 * count / config.num_params:.4g}% of the {config.num_params:,} of the T5)")


def parse_run(argv: Sequence[str], prog: str = "prompt-t5x train") -> "tuple[RunConfig, str]":
    """Command line -> (RunConfig, operative gin text). UsageError on any bad input."""
    gin_args = gin_cli.split_argv(argv)
    parser = gin_help.gin_parser("train")
    distributed.add_flags(parser)
    args = parser.parse_args(gin_args.rest)
    try:
        # Joins the cluster before gin builds anything that could touch a device.
        distributed.initialize_from_args(args)
    except ValueError as e:
        raise UsageError(f"multi-host setup: {e}") from None
    gin_cli.parse(gin_args)
    run = gin_cli.call(train_config)
    return run, gin_cli.operative_config()


def _summary(run: RunConfig, result: LoopResult) -> str:
    best = ("no evaluation" if result.best_value is None else
            f"best validation {metrics_lib.format_metrics({run.loop.metric: result.best_value})}"
            f" at step {result.best_step}")
    return (f"trained {run.method.kind} on {run.task} to step {result.last_step}"
            + (f" (resumed from {result.resumed_from})" if result.resumed_from else "")
            + (", stopped early" if result.stopped_early else "")
            + f"; {best}. Outputs in {run.model_dir}")


def main(argv: List[str]) -> int:
    # Once the cluster is joined, an error on one host ends that process at once and the others
    # at their next collective, instead of all waiting for each other; one process raises.
    with distributed.exit_at_once_on_error("prompt-t5x train"):
        run, gin_text = parse_run(argv)
        try:
            result = execute(run, gin_config=gin_text)
        except NonFiniteError as e:
            # Divergence follows from the configuration (learning rate, data): the user's to
            # fix, so one line and status 2 like every other such stop.
            print(f"prompt-t5x train: error: {e}", file=sys.stderr)
            return 2
        if result.stopped is not None:
            print(f"prompt-t5x train: {result.stopped.message(run.model_dir)}", file=sys.stderr)
            return preemption.EXIT_STOPPED
        print(_summary(run, result))
        return 0
