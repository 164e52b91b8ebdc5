"""Where a ``train`` run gets its data: SeqIO tasks (``prompt_t5x.data.seqio_bridge``) or generated
tasks.

Both backends give the training loop the same things: a resumable iterator of fixed-shape numpy
batches (``train_batches(position, shard)``), every validation example once in fixed-shape
batches (``eval_batches``: padding rows all-zero, ``example_mask`` / ``example_index``), the
preprocessed validation examples with ``compute_metrics`` for the task's metrics, and the label
words + vocabulary ``encode`` for class-label prompt init and rank classification.

Hosts. ``shard`` (``distributed.DataShard``: index, count) is this host's slice of every global
training batch: ``distributed.data_shard(mesh)``, so hosts that hold the same 'data' rows of the
mesh (model parallelism across hosts) get the same rows. A stream yields only those
``batch_size / count`` rows and records the shard in its ``state()``. Validation is not split:
every host reads the whole split and the evaluator shards each batch over the mesh, so every
host computes the same metrics.

Generated tasks (``prompt_t5x.data.synthetic``, no files, no TensorFlow, word vocabulary of
``synthetic.VOCAB_SIZE`` ids) are named ``synthetic_<skill>`` (skill marker removed: the
quickstart's downstream task) and ``synthetic_marked`` (all skills, each marked: the
"pretraining" mixture the quickstart model was trained on), and ``synthetic_skills`` (the
unmarked tasks mixed, each example keeping its task). Batch ``n`` of a stream is a pure function
of (task, seed, n), so resuming at a position needs no replay.

Mixed-task batches. A method with a task bank (its settings name ``tasks``: a task bank, MPT,
SPT with task prompts) gets ``task_ids`` int32 [B] in every batch: each example's task's index
in that list (``interface.TASK_IDS``), built here from the task each example comes from, so the
model routes examples without a Python loop. A task of the data that the bank lacks is a
UsageError; so is, for training, a bank task that the data never shows (it would never train).
Validation metrics then come per task too (``<task>/accuracy``). A SeqIO mixture does the same
(``SeqioData(task_names=...)``): its sub-tasks are sampled at the mixture's rates, each example
tagged with its task's id (``seqio_bridge``), and validated task by task.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from prompt_t5x.base.errors import UsageError
from prompt_t5x.data import metrics as metrics_lib
from prompt_t5x.data import synthetic
from prompt_t5x.methods import templates
from prompt_t5x.methods.interface import TASK_IDS
from prompt_t5x.parallel import distributed

WHOLE = distributed.DataShard(0, 1)   # one process: the whole global batch

SYNTHETIC_EVAL_EXAMPLES = 512


def pad_eval_batches(batches: Sequence[Dict[str, np.ndarray]], batch_size: int
                     ) -> List[Dict[str, np.ndarray]]:
    """Full examples -> fixed-size batches with all-zero padding rows and the eval masks
    (``seqio_bridge.pad_eval_batch``, which SeqIO's eval batches use too)."""
    from prompt_t5x.data.seqio_bridge import pad_eval_batch  # numpy only: imports no TensorFlow
    out, start = [], 0
    for batch in batches:
        out.append(pad_eval_batch(batch, batch_size, start))
        start += batch["encoder_input_tokens"].shape[0]
    return out


def limit_examples(batches: Sequence[Dict[str, np.ndarray]], max_examples: Optional[int]
                   ) -> List[Dict[str, np.ndarray]]:
    """The first ``max_examples`` real examples: later rows are masked, later batches dropped."""
    if max_examples is None:
        return list(batches)
    out, seen = [], 0
    for batch in batches:
        if seen >= max_examples:
            break
        mask = np.asarray(batch["example_mask"], bool).copy()
        keep = np.cumsum(mask) + seen <= max_examples
        mask &= keep
        seen += int(mask.sum())
        batch = dict(batch)
        batch["example_mask"] = mask
        # Masked rows must not contribute to the teacher-forced loss either.
        batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * mask[:, None]
        out.append(batch)
    return out


class _PositionedStream:
    """Endless stream of this host's rows of ``batch_fn(position)`` (a global batch) that knows
    (and saves) its position and shard."""

    # Global batch n is the same however it is split: a run may resume on another mesh or
    # host count (training_loop checks this before resuming).
    resumes_with_any_shard_count = True

    def __init__(self, name: str, seed: int, position: int, batch_fn,
                 shard: distributed.DataShard):
        self.name, self.seed, self.position, self._batch_fn = name, seed, position, batch_fn
        self.shard = shard

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._batch_fn(self.position)
        rows = self.shard.rows(len(next(iter(batch.values()))))
        self.position += 1
        return {k: v[rows] for k, v in batch.items()}

    def state(self) -> Dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "position": self.position,
                "shard_index": self.shard.index, "num_shards": self.shard.count}


class SyntheticData:
    """A generated task of ``prompt_t5x.data.synthetic`` (see the module docstring)."""

    resumes_with_any_shard_count = _PositionedStream.resumes_with_any_shard_count
    splits = ("train", "validation")

    def __init__(self, name: str, inputs_length: int, targets_length: int, batch_size: int,
                 seed: int = 0, eval_examples: int = SYNTHETIC_EVAL_EXAMPLES,
                 template: Optional[templates.InputTemplate] = None,
                 model_vocab_size: Optional[int] = None,
                 task_names: Optional[Sequence[str]] = None, training: bool = True):
        if name not in synthetic.TASKS:
            raise UsageError(f"unknown generated task {name!r}; choose from "
                             f"{', '.join(synthetic.TASKS)}")
        need_inputs = max(synthetic.LENGTHS) + 2   # marker + symbols + EOS
        if inputs_length < need_inputs or targets_length < 2:
            raise UsageError(f"task {name!r} needs inputs length >= {need_inputs} and targets "
                             f"length >= 2; got {inputs_length} / {targets_length}")
        self.name, self.seed, self.batch_size = name, seed, batch_size
        self.lengths = (inputs_length, targets_length)
        self.marked = name == synthetic.MARKED_TASK
        if self.marked or name == synthetic.MIXTURE_TASK:
            self.skills = synthetic.SKILLS
        else:
            self.skills = synthetic.HELD_OUT_MIXTURES.get(name, (name[len("synthetic_"):],))
        # The task each skill's examples belong to (the marked mixture is one task).
        self.skill_tasks = {s: (name if self.marked else f"synthetic_{s}") for s in self.skills}
        self.task_names = None if task_names is None else tuple(task_names)
        if self.task_names is not None:
            _check_bank(name, sorted(set(self.skill_tasks.values())), self.task_names, training)
        self.label_words = list(synthetic.LABELS)
        self.encode = synthetic.encode
        self.vocab_size = synthetic.VOCAB_SIZE
        self.vocabulary = None
        self.decode_for_metrics = False   # label words: rank classification covers it
        # P-tuning: the template over the one field, 'inputs' (the symbols), within L - 1 + EOS.
        self._encode_inputs = None
        if template is not None:
            render = template.renderer(name, ["inputs"], synthetic.encode, len(synthetic.WORDS),
                                       model_vocab_size)
            render.check_fits(inputs_length - 1)
            self._encode_inputs = lambda record: render(record, inputs_length - 1)
        per_skill = -(-eval_examples // len(self.skills))
        per_task = [[dict(r, task=self.skill_tasks[s])
                     for r in synthetic.examples(s, per_skill, 1_000_003 + k, self.marked)]
                    for k, s in enumerate(self.skills)]
        if len(self.skills) > 1 and not self.marked:   # interleaved: any first n mix the tasks
            self._eval_records = [r for group in zip(*per_task) for r in group]
        else:
            self._eval_records = [r for records in per_task for r in records]

    def _records(self, position: int) -> List[Dict[str, str]]:
        # A distinct seed per (stream seed, position, skill): batch n never depends on n-1.
        records = []
        for k, skill in enumerate(self.skills):
            records += [dict(r, task=self.skill_tasks[skill]) for r in synthetic.examples(
                skill, self.batch_size, (self.seed * 7_919 + position) * 16 + k, self.marked)]
        order = np.random.RandomState([self.seed, position]).permutation(len(records))
        return [records[i] for i in order[:self.batch_size]]

    def _batch(self, records) -> Dict[str, np.ndarray]:
        batch = synthetic.to_batch(records, *self.lengths, encode_inputs=self._encode_inputs)
        if self.task_names is not None:
            batch[TASK_IDS] = np.asarray(
                [self.task_names.index(r["task"]) for r in records], np.int32)
        return batch

    def train_examples(self, position: int = 0) -> List[Dict[str, str]]:
        """The records of global training batch ``position`` ({'inputs', 'targets'} text)."""
        return self._records(position)

    def train_batches(self, position: int = 0, shard: distributed.DataShard = WHOLE
                      ) -> _PositionedStream:
        """Global batch ``n`` is a pure function of (task, seed, n); each host keeps its
        ``shard`` of it, so N hosts together train on exactly one process's batches."""
        return _PositionedStream(self.name, self.seed, position,
                                 lambda n: self._batch(self._records(n)),
                                 shard)

    def eval_batches(self) -> List[Dict[str, np.ndarray]]:
        recs = self._eval_records
        full = [self._batch(recs[i:i + self.batch_size])
                for i in range(0, len(recs), self.batch_size)]
        return pad_eval_batches(full, self.batch_size)

    def eval_examples(self) -> List[Dict[str, str]]:
        return list(self._eval_records)

    @staticmethod
    def compute_metrics(examples: Sequence[Mapping[str, Any]], predictions: Sequence[str]
                        ) -> Dict[str, float]:
        """Accuracy; with examples of several tasks also each task's (``<task>/accuracy``)."""
        return per_task_metrics(examples, predictions, lambda exs, preds: metrics_lib.accuracy(
            [e["targets"] for e in exs], list(preds)))


def per_task_metrics(examples: Sequence[Mapping[str, Any]], predictions: Sequence[str],
                     compute: Callable[[Sequence, Sequence[str]], Dict[str, float]]
                     ) -> Dict[str, float]:
    """``compute`` over all examples and, when they come from several tasks (their ``task``
    field), over each task's: ``{metric: all, '<task>/<metric>': that task's}``."""
    results = dict(compute(examples, predictions))
    tasks = sorted({e["task"] for e in examples if "task" in e})
    if len(tasks) > 1:
        for task in tasks:
            rows = [i for i, e in enumerate(examples) if e.get("task") == task]
            own = compute([examples[i] for i in rows], [predictions[i] for i in rows])
            results.update({f"{task}/{k}": v for k, v in own.items()})
    return results


def _check_bank(name: str, data_tasks: Sequence[str], bank: Sequence[str], training: bool):
    """UsageError unless every task of the data is in the method's task bank (and, to train,
    every bank task is in the data)."""
    unknown = [t for t in data_tasks if t not in bank]
    if unknown:
        raise UsageError(f"task {name!r} has examples of {unknown}, which the method's task "
                         f"bank {list(bank)} does not know; add them to the method's tasks or "
                         "pick a task of the bank")
    unseen = [t for t in bank if t not in data_tasks]
    if training and unseen:
        raise UsageError(f"the method's task bank has {len(bank)} tasks {list(bank)} but "
                         f"{name!r} has {len(data_tasks)}: {unseen} would never train; make "
                         "the method's tasks the mixture's tasks")


class SeqioData:
    """A registered SeqIO task or mixture through ``prompt_t5x.data.seqio_bridge`` (imports
    TensorFlow).

    ``task_names`` (a task bank's tasks, see the module doc): every training and validation
    batch carries ``task_ids`` int32 [B]; a mixture's training stream samples its sub-tasks at
    the mixture's rates, each example tagged with its own task's id. Checked here, as one
    UsageError: a task of the data the bank lacks and, when ``training``, a bank task the data
    lacks. A mixture's validation is each sub-task's split in turn, scored per task
    (``<task>/<metric>``, mean over tasks as ``<metric>``) with or without ``task_names``.
    """

    def __init__(self, name: str, inputs_length: int, targets_length: int, batch_size: int,
                 prompt_length: int, seed: int = 0, train_split: str = "train",
                 eval_split: str = "validation", vocabulary: Optional[str] = None,
                 data_dir: Optional[str] = None, task_modules: Sequence[str] = (),
                 template: Optional[templates.InputTemplate] = None,
                 task_names: Optional[Sequence[str]] = None, training: bool = True):
        # SeqIO: only for SeqIO tasks
        from prompt_t5x.data import seqio_bridge, seqio_metrics, task_registry
        self._data = seqio_bridge
        self.provider = task_registry.open_task(name, (train_split, eval_split),
                                                vocabulary=vocabulary, data_dir=data_dir,
                                                task_modules=task_modules)
        try:
            self.spec = seqio_bridge.BatchSpec(inputs_length, targets_length, batch_size,
                                       prompt_length=prompt_length, template=template)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.name, self.seed = name, seed
        self.train_split, self.eval_split = train_split, eval_split
        self.sub_tasks = seqio_bridge.sub_tasks(self.provider)
        self.task_names = None if task_names is None else tuple(task_names)
        if self.task_names is not None:
            _check_bank(name, [t.name for t in self.sub_tasks], self.task_names, training)
        for split in dict.fromkeys((train_split, eval_split)):
            seqio_bridge.check_split_readable(self.provider, self.spec, split)
        self.label_words = seqio_metrics.label_names(name)
        feature = (getattr(self.provider, "output_features", None) or {}).get("targets")
        self.vocabulary = None if feature is None else feature.vocabulary
        self.encode = None if feature is None else feature.vocabulary.encode
        self.vocab_size = None if feature is None else feature.vocabulary.vocab_size
        # Tasks with metrics can be scored on greedy decodes; run_train uses that only when
        # there are no label words (classification tasks use rank classification). A mixture
        # is scored per sub-task: any sub-task with metrics will do.
        self.decode_for_metrics = any(getattr(t, "metric_fns", None) for t in self.sub_tasks)

    def train_batches(self, position: int = 0, shard: distributed.DataShard = WHOLE
                      ) -> Iterator[Dict[str, np.ndarray]]:
        """SeqIO reads shard ``shard.index`` of ``shard.count`` of the split (its own files or
        examples, shuffled with the seed), ``batch_size / count`` examples per batch."""
        import seqio
        try:
            return self._data.train_batches(self.name, self.spec, split=self.train_split,
                                            seed=self.seed, position=position,
                                            shard_info=seqio.ShardInfo(shard.index, shard.count),
                                            task_names=self.task_names)
        except self._data.DataError as e:
            raise UsageError(str(e)) from None

    def eval_batches(self) -> List[Dict[str, np.ndarray]]:
        try:
            return list(self._data.eval_batches(self.name, self.spec, split=self.eval_split,
                                                shard_info=self._data.whole_split(),
                                                task_names=self.task_names))
        except self._data.DataError as e:
            raise UsageError(str(e)) from None

    def eval_examples(self) -> List[Dict[str, Any]]:
        return self._data.eval_examples(self.name, self.spec, split=self.eval_split,
                                        shard_info=self._data.whole_split())

    def compute_metrics(self, examples, predictions) -> Dict[str, float]:
        from prompt_t5x.data import seqio_metrics
        return seqio_metrics.compute_metrics(self.name, examples, predictions)


class TrainStream:
    """``make_batches(position)`` for the training loop: this host's data shard of every global
    batch of ``source``. ``identity`` says which stream that is (the keys a stream's ``state()``
    records besides its position), so a resume is checked before the stream is built."""

    def __init__(self, source, shard: distributed.DataShard):
        self.source, self.shard = source, shard
        self.identity = {"name": source.name, "seed": source.seed, "num_shards": shard.count}
        if getattr(source, "train_split", None) is not None:
            self.identity["split"] = source.train_split
        self.resumes_with_any_shard_count = bool(
            getattr(source, "resumes_with_any_shard_count", False))

    def __call__(self, position: int):
        return self.source.train_batches(position, shard=self.shard)


def train_stream(source, mesh=None) -> TrainStream:
    """The training stream of ``source`` for this host: its data shard of every global batch
    (``distributed.data_shard(mesh)``; the whole batch without a mesh)."""
    return TrainStream(source, WHOLE if mesh is None else distributed.data_shard(mesh))


def bank_tasks(settings: Mapping[str, Any]) -> Optional[Sequence[str]]:
    """The task names of a method whose state is per task (its ``tasks`` setting), else None."""
    tasks = settings.get("tasks")
    return None if not tasks else tuple(tasks)


def open_data(run, prompt_length: int):
    """The data backend for ``run`` (a ``run_train.RunConfig``); UsageError on bad names. A
    method with a ``template`` setting (P-tuning) has its template rendered into the inputs."""
    settings = dict(run.method.settings)
    template = templates.input_template(settings, run.model.vocab_size)
    task_names = bank_tasks(settings)
    if run.task in synthetic.TASKS:
        return SyntheticData(run.task, run.inputs_length, run.targets_length, run.batch_size,
                             seed=run.seed, template=template,
                             model_vocab_size=run.model.vocab_size, task_names=task_names)
    return SeqioData(run.task, run.inputs_length, run.targets_length, run.batch_size,
                     prompt_length, seed=run.seed, train_split=run.train_split,
                     eval_split=run.eval_split, vocabulary=run.vocabulary,
                     data_dir=run.data_dir, task_modules=run.task_modules, template=template,
                     task_names=task_names)
