"""The data bridge: SeqIO task/mixture -> host-local numpy batches of fixed shape.

Lengths. ``inputs_length`` (L) is the *token* budget of the task's inputs; SeqIO's
``EncDecFeatureConverter`` pads/trims ``encoder_input_tokens`` to exactly L. The prompt is added by
the model, not here: with a prompt of P vectors the encoder sees ``L + P`` positions
(``BatchSpec.encoder_length``). So to match a paper setting "encoder length 512 with a 100-token
prompt" pass ``inputs_length=412, prompt_length=100``; to feed every task token plus the prompt,
pass the task length and let the encoder grow.

Batches. A training batch is ``{'encoder_input_tokens': int32 [B, L], 'decoder_input_tokens':
int32 [B, T], 'decoder_target_tokens': int32 [B, T], 'decoder_loss_weights': float32 [B, T]}`` with
B the *host-local* batch (global batch / number of data shards of ``shard_info``; every reader
defaults to the whole split, :func:`whole_split`, and ``prompt-t5x train`` passes each host's
``distributed.data_shard(mesh)``, so hosts that share the mesh's 'data' rows read the same
shard). Pad id 0, EOS 1.

Order and position. Training data is a deterministic function of (task, split, seed, shard):
shuffling and every random preprocessing step are seeded. ``TrainBatches.position`` counts
batches produced; a checkpoint stores it and ``train_batches(..., position=n)`` resumes at the
same batch by deterministically replaying and skipping n batches (cheap next to a training step:
no model work, just tf.data).

Eval. ``eval_batches`` covers every example of a split exactly once: the last batch is padded
with all-zero rows and ``example_mask`` (bool [B]) marks the real ones; ``example_index``
(int32 [B], -1 on padding) gives each row's position in the split (in the shard, if one is
given), the order of ``eval_examples``, so predictions can be put back in order for
``compute_metrics``.

Mixtures and task ids. With ``task_names`` (the tasks of a method's task bank, in its order)
every batch also carries ``task_ids`` (int32 [B], ``interface.TASK_IDS``): each example's task's
index in ``task_names``, so the model picks each example's own prompt without a Python loop.
For a single task that is one constant. For a ``seqio.Mixture`` the training stream is built
here rather than by SeqIO: each sub-task is read, feature-converted and tagged with its id on
its own (the converter drops unknown features, so the id is added after it), then the sub-tasks
are sampled at the mixture's rates by a seeded ``sample_from_datasets``, so batch n is still a
deterministic function of (mixture, seed, shard, n) and ``position`` resumes exactly. (Without
``task_names`` a mixture trains on SeqIO's own mixed stream, as before.) Validation of a
mixture is every sub-task's split in turn (sub-tasks in the mixture's order, by name); each
example of ``eval_examples`` has a ``task`` field, and ``compute_metrics`` runs each sub-task's
own postprocessor and metric functions on its own examples (``<task>/<metric>``) and reports
each metric's mean over the tasks as ``<metric>`` (``prompt_t5x.data.seqio_metrics``).

Packing (several examples per row) is refused when a prompt is used: the prompt would be
prepended once per row, so all but the first packed example would see no prompt of their own.

Templates. ``BatchSpec.template`` (P-tuning, ``prompt_t5x.methods.templates``) swaps a task's
``inputs`` for its template over the raw fields (``tasks/templated.py``): the pseudo tokens are
placeholder ids inside the L input tokens, so ``prompt_length`` stays 0.

This module imports TensorFlow/SeqIO; the core never imports it.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from prompt_t5x.base.errors import InputError
from prompt_t5x.methods.interface import TASK_IDS

MODEL_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "decoder_loss_weights")


class DataError(InputError):
    """Bad task/split/configuration; the message says what and how to fix it. A UsageError: it
    may surface only when the training stream first reads a malformed or empty file, long after
    the command checked its flags, and is still the user's to fix."""


def import_tensorflow():
    """Import TensorFlow for the data pipelines only, once, before SeqIO or ``tasks/`` do.

    TensorFlow prints its C++ start-up lines (oneDNN, missing CUDA drivers, then ``failed call
    to cuInit`` at the first device query) before its logging is initialised, so
    ``TF_CPP_MIN_LOG_LEVEL`` (which ``prompt-t5x`` sets unless ``--verbose``) does not reach
    them. Where that variable asks for less than INFO, those lines are captured here and shown
    only if the import fails. TensorFlow is also kept off the GPUs: it only reads and tokenises
    data (on the CPU); the accelerators belong to JAX.
    """
    import os
    import sys
    import tempfile
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        import tensorflow as tf
        tf.config.set_visible_devices([], "GPU")
        return tf
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.set_visible_devices([], "GPU")
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            os.write(2, captured.read())   # the lines may say why it failed
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    return tf


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    inputs_length: int        # L: encoder tokens from the task
    targets_length: int       # T: decoder tokens
    batch_size: int           # global batch size (all hosts)
    prompt_length: int = 0    # P: added by the model; the encoder sees L + P
    pack: bool = False
    # P-tuning: a ``methods.templates.InputTemplate`` rendered into the inputs (within L).
    template: Optional[Any] = None

    def __post_init__(self):
        for name in ("inputs_length", "targets_length", "batch_size"):
            if getattr(self, name) <= 0:
                raise DataError(f"{name} must be positive, got {getattr(self, name)}")
        if self.prompt_length < 0:
            raise DataError(f"prompt_length must be >= 0, got {self.prompt_length}")
        if self.pack and self.prompt_length > 0:
            raise DataError(
                "packing is not supported with a prompt: the prompt is prepended once per row, "
                "so every packed example after the first would be read without its prompt. "
                "Set pack=False (the default) for prompt tuning.")
        if self.pack and self.template is not None:
            raise DataError("packing is not supported with a P-tuning template: the j-th "
                            "placeholder of a row would be counted across packed examples.")

    @property
    def encoder_length(self) -> int:
        return self.inputs_length + self.prompt_length

    @property
    def task_feature_lengths(self) -> Dict[str, int]:
        return {"inputs": self.inputs_length, "targets": self.targets_length}


def _seqio():
    import seqio

    import tasks  # noqa: F401  (registers the built-in tasks)
    return seqio


def get_task_or_mixture(name: str):
    """The registered task/mixture ``name``; unknown names get the closest registered ones."""
    seqio = _seqio()
    known = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise DataError(f"unknown task or mixture {name!r}.{hint} "
                        "Run 'prompt-t5x tasks' to list them.")
    return seqio.get_mixture_or_task(name)


def check_split(provider, split: str) -> None:
    splits = list(provider.splits)
    if split not in splits:
        raise DataError(f"task {provider.name!r} has no split {split!r}; "
                        f"available: {', '.join(splits) or 'none'}.")


def whole_split():
    """``ShardInfo(0, 1)``: the whole split (or stream). The default of every reader here: a host
    reads a part only when told which (``prompt-t5x train`` passes its training data shard,
    ``distributed.data_shard(mesh)``; validation reads the whole split on every host)."""
    import seqio
    return seqio.ShardInfo(index=0, num_shards=1)


def host_batch_size(spec: BatchSpec, shard_info) -> int:
    if spec.batch_size % shard_info.num_shards:
        raise DataError(f"global batch size {spec.batch_size} is not divisible by the number "
                        f"of hosts {shard_info.num_shards}.")
    return spec.batch_size // shard_info.num_shards


def _task_dataset(provider, spec: BatchSpec, split: str, *, shuffle: bool, seed: Optional[int],
                  shard_info, num_epochs: Optional[int]):
    """The task's preprocessed, tokenized examples; bad input (unreadable vocabulary, missing
    or malformed local file, empty split) becomes one DataError."""
    from tasks import vocab
    check_split(provider, split)
    try:
        vocab.check_provider_vocab(provider)
        if spec.template is not None:   # P-tuning: the template replaces the task's inputs
            from tasks import templated
            provider = templated.templated_task(provider, spec.template, spec.inputs_length)
        # try_in_mem_cache=False: SeqIO's in-memory cache would pin a whole split in RAM per
        # process and bypasses tfds mocks in tests; sources here are streamed.
        return provider.get_dataset(spec.task_feature_lengths, split=split, shuffle=shuffle,
                                    seed=seed, shard_info=shard_info, num_epochs=num_epochs,
                                    use_cached=False, try_in_mem_cache=False)
    except DataError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from e


def check_split_readable(provider, spec: BatchSpec, split: str) -> None:
    """DataError now if ``split`` cannot be read (vocabulary, a missing, malformed or empty
    local file: ``tasks.local_files`` checks every record when the dataset is built). Building
    it unshuffled reads nothing from a TFDS source, so this is cheap; it lets ``train`` refuse
    bad data before it creates a model directory or starts checkpoint threads."""
    _task_dataset(provider, spec, split, shuffle=False, seed=None, shard_info=whole_split(),
                  num_epochs=1)


def is_mixture(provider) -> bool:
    """Whether ``provider`` is a ``seqio.Mixture`` (several tasks) rather than one task."""
    seqio = _seqio()
    return isinstance(provider, seqio.Mixture)


def sub_tasks(provider) -> List[Any]:
    """The tasks whose examples ``provider`` yields: a mixture's (SeqIO's order, by name, nested
    mixtures flattened), else ``[provider]``."""
    return list(provider.tasks) if is_mixture(provider) else [provider]


def task_id(task_name: str, task_names: Sequence[str]) -> int:
    """The index of ``task_name`` in ``task_names`` (a method's task bank); DataError if absent
    (``run_data`` checks the bank earlier and says so as a UsageError)."""
    if task_name not in task_names:
        raise DataError(f"task {task_name!r} is not in the method's task bank "
                        f"{list(task_names)}")
    return list(task_names).index(task_name)


def _converted(task, spec: BatchSpec, split: str, *, shuffle: bool, seed: Optional[int],
               shard_info, num_epochs: Optional[int], task_names: Optional[Sequence[str]]):
    """One task or mixture, feature-converted (single examples, no batching); with
    ``task_names`` a constant ``task_ids`` int32 [] feature (the task's index there) is added
    after the converter, which would drop it."""
    import tensorflow as tf
    seqio = _seqio()
    ds = _task_dataset(task, spec, split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                       num_epochs=num_epochs)
    ds = seqio.EncDecFeatureConverter(pack=spec.pack)(ds, spec.task_feature_lengths)
    if task_names is not None:
        index = tf.constant(task_id(task.name, task_names), tf.int32)
        ds = ds.map(lambda ex: {**ex, TASK_IDS: index})
    return ds


def mixture_rates(provider) -> List[float]:
    """The sampling weight of each of ``sub_tasks(provider)`` (the mixture's rates)."""
    try:
        rates = [float(provider.get_rate(task)) for task in provider.tasks]
    except (ValueError, TypeError) as e:
        raise DataError(f"mixture {provider.name!r}: {e}") from e
    if not all(r >= 0 for r in rates) or sum(rates) <= 0:
        raise DataError(f"mixture {provider.name!r} has no positive rate: {rates}")
    return rates


def _model_features(provider, spec: BatchSpec, split: str, *, shuffle: bool, seed: Optional[int],
                    shard_info, num_epochs: Optional[int],
                    task_names: Optional[Sequence[str]] = None):
    """Feature-converted tf.data.Dataset of single examples (no batching); with ``task_names``
    each example also has ``task_ids`` int32 [] (see module doc). A mixture with
    ``task_names`` is sampled here, sub-task by sub-task, at its rates with seed ``seed``."""
    import tensorflow as tf
    if task_names is not None and is_mixture(provider):
        parts = [_converted(task, spec, split, shuffle=shuffle, seed=seed,
                            shard_info=shard_info, num_epochs=num_epochs, task_names=task_names)
                 for task in provider.tasks]
        # A fixed seed even when unseeded: the mix, like every other random step, replays.
        ds = tf.data.Dataset.sample_from_datasets(parts, weights=mixture_rates(provider),
                                                  seed=42 if seed is None else seed)
    else:
        ds = _converted(provider, spec, split, shuffle=shuffle, seed=seed, shard_info=shard_info,
                        num_epochs=num_epochs, task_names=task_names)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options)


def _to_numpy_batch(batch: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    out = {k: np.asarray(batch[k], np.int32) for k in MODEL_FEATURES[:3]}
    out["decoder_loss_weights"] = np.asarray(batch["decoder_loss_weights"], np.float32)
    if TASK_IDS in batch:
        out[TASK_IDS] = np.asarray(batch[TASK_IDS], np.int32)
    return out


class TrainBatches:
    """Endless iterator of host-local training batches that knows its position; with
    ``task_names`` each batch has ``task_ids`` int32 [B] (see module doc)."""

    def __init__(self, name: str, spec: BatchSpec, *, split: str = "train", seed: int = 0,
                 shard_info=None, position: int = 0, shuffle: bool = True,
                 task_names: Optional[Sequence[str]] = None):
        if position < 0:
            raise DataError(f"position must be >= 0, got {position}")
        self.name, self.spec, self.split, self.seed = name, spec, split, seed
        self.shard_info = shard_info or whole_split()
        self.batch_size = host_batch_size(spec, self.shard_info)
        provider = get_task_or_mixture(name)
        if task_names is not None:
            for task in sub_tasks(provider):   # every sub-task is sampled: each needs the split
                check_split(task, split)
        ds = _model_features(provider, spec, split, shuffle=shuffle, seed=seed,
                             shard_info=self.shard_info, num_epochs=None, task_names=task_names)
        ds = ds.batch(self.batch_size, drop_remainder=True).skip(position)
        self._iterator = ds.prefetch(2).as_numpy_iterator()
        self.position = position

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        try:
            batch = next(self._iterator)
        except StopIteration:
            raise DataError(f"task {self.name!r} split {self.split!r} produced no full batch of "
                            f"{self.batch_size} examples (is the split empty?).") from None
        self.position += 1
        return _to_numpy_batch(batch)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint stores to resume this stream exactly."""
        return {"name": self.name, "split": self.split, "seed": self.seed,
                "position": self.position, "shard_index": self.shard_info.index,
                "num_shards": self.shard_info.num_shards}


def train_batches(name: str, spec: BatchSpec, *, split: str = "train", seed: int = 0,
                  shard_info=None, position: int = 0, shuffle: bool = True,
                  task_names: Optional[Sequence[str]] = None) -> TrainBatches:
    return TrainBatches(name, spec, split=split, seed=seed, shard_info=shard_info,
                        position=position, shuffle=shuffle, task_names=task_names)


def pad_eval_batch(batch: Mapping[str, np.ndarray], size: int, start: int
                   ) -> Dict[str, np.ndarray]:
    """``real <= size`` examples -> a batch of ``size`` rows (all-zero padding rows) with
    ``example_mask`` [size] and ``example_index`` [size] (``start + row``, -1 for padding)."""
    real = batch["encoder_input_tokens"].shape[0]
    out = {k: np.concatenate([v, np.zeros((size - real,) + v.shape[1:], v.dtype)])
           for k, v in batch.items()}
    out["example_mask"] = np.arange(size) < real
    out["example_index"] = np.where(out["example_mask"], start + np.arange(size), -1
                                    ).astype(np.int32)
    return out


def eval_batches(name: str, spec: BatchSpec, *, split: str = "validation",
                 shard_info=None, task_names: Optional[Sequence[str]] = None
                 ) -> Iterator[Dict[str, np.ndarray]]:
    """Every example of ``split`` (or of its ``shard_info`` shard) once, in order, in
    fixed-shape batches (see module doc); a mixture's sub-tasks one after another. With
    ``task_names`` each batch has ``task_ids`` int32 [B] (0 on padding rows)."""
    import functools
    provider = get_task_or_mixture(name)
    shard_info = shard_info or whole_split()
    size = host_batch_size(spec, shard_info)
    parts = [_model_features(task, spec, split, shuffle=False, seed=None, shard_info=shard_info,
                             num_epochs=1, task_names=task_names)
             for task in sub_tasks(provider)]
    ds = functools.reduce(lambda a, b: a.concatenate(b), parts)
    ds = ds.batch(size, drop_remainder=False)
    start = 0
    for batch in ds.as_numpy_iterator():
        out = pad_eval_batch(_to_numpy_batch(batch), size, start)
        start += int(out["example_mask"].sum())
        yield out
    if start == 0:
        raise DataError(f"task {name!r} split {split!r} is empty: nothing to evaluate.")


def eval_examples(name: str, spec: BatchSpec, *, split: str = "validation",
                  shard_info=None) -> List[Dict[str, Any]]:
    """The preprocessed examples of ``split`` (strings and fields the postprocessors need), in
    the same order as ``eval_batches``'s ``example_index``. A mixture's examples each have a
    ``task`` field (their sub-task's name), which routes them to the task's prompt and metrics."""
    provider = get_task_or_mixture(name)
    mixed = is_mixture(provider)
    out: List[Dict[str, Any]] = []
    for task in sub_tasks(provider):
        ds = _task_dataset(task, spec, split, shuffle=False, seed=None,
                           shard_info=shard_info or whole_split(), num_epochs=1)
        out += [dict(ex, task=task.name) if mixed else ex for ex in ds.as_numpy_iterator()]
    return out
