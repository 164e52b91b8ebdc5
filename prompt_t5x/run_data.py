"""Where a ``train`` run gets its data: SeqIO tasks (``prompt_t5x.data``) or generated tasks.

Both backends give the training loop the same things: a resumable iterator of fixed-shape numpy
batches (``train_batches(position)``), every validation example once in fixed-shape batches
(``eval_batches``: padding rows all-zero, ``example_mask`` / ``example_index``), the
preprocessed validation examples with ``compute_metrics`` for the task's metrics, and the label
words + vocabulary ``encode`` for class-label prompt init and rank classification.

Generated tasks (``prompt_t5x.synthetic``, no files, no TensorFlow, word vocabulary of
``synthetic.VOCAB_SIZE`` ids) are named ``synthetic_<skill>`` (skill marker removed: the
quickstart's downstream task) and ``synthetic_marked`` (all skills, each marked: the
"pretraining" mixture the quickstart model was trained on). Batch ``n`` of a stream is a pure
function of (task, seed, n), so resuming at a position needs no replay.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from prompt_t5x import metrics as metrics_lib
from prompt_t5x import synthetic
from prompt_t5x.cli import UsageError

SYNTHETIC_MARKED = "synthetic_marked"
SYNTHETIC_TASKS = tuple(f"synthetic_{s}" for s in synthetic.SKILLS) + (SYNTHETIC_MARKED,)
SYNTHETIC_EVAL_EXAMPLES = 512


def pad_eval_batches(batches: Sequence[Dict[str, np.ndarray]], batch_size: int
                     ) -> List[Dict[str, np.ndarray]]:
    """Full examples -> fixed-size batches with all-zero padding rows and the eval masks."""
    out, start = [], 0
    for batch in batches:
        real = batch["encoder_input_tokens"].shape[0]
        padded = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)])
                  for k, v in batch.items()}
        padded["example_mask"] = np.arange(batch_size) < real
        padded["example_index"] = np.where(padded["example_mask"],
                                           start + np.arange(batch_size), -1).astype(np.int32)
        start += real
        out.append(padded)
    return out


class _PositionedStream:
    """Endless ``batch_fn(position)`` stream that knows (and saves) its position."""

    def __init__(self, name: str, seed: int, position: int, batch_fn):
        self.name, self.seed, self.position, self._batch_fn = name, seed, position, batch_fn

    def __iter__(self):
        return self

    def __next__(self):
        batch = self._batch_fn(self.position)
        self.position += 1
        return batch

    def state(self) -> Dict[str, Any]:
        return {"name": self.name, "seed": self.seed, "position": self.position}


class SyntheticData:
    """A generated task of ``prompt_t5x.synthetic`` (see the module docstring)."""

    def __init__(self, name: str, inputs_length: int, targets_length: int, batch_size: int,
                 seed: int = 0, eval_examples: int = SYNTHETIC_EVAL_EXAMPLES):
        if name not in SYNTHETIC_TASKS:
            raise UsageError(f"unknown generated task {name!r}; choose from "
                             f"{', '.join(SYNTHETIC_TASKS)}")
        need_inputs = max(synthetic.LENGTHS) + 2   # marker + symbols + EOS
        if inputs_length < need_inputs or targets_length < 2:
            raise UsageError(f"task {name!r} needs inputs length >= {need_inputs} and targets "
                             f"length >= 2; got {inputs_length} / {targets_length}")
        self.name, self.seed, self.batch_size = name, seed, batch_size
        self.lengths = (inputs_length, targets_length)
        self.marked = name == SYNTHETIC_MARKED
        self.skills = synthetic.SKILLS if self.marked else (name[len("synthetic_"):],)
        self.label_words = list(synthetic.LABELS)
        self.encode = synthetic.encode
        self.vocab_size = synthetic.VOCAB_SIZE
        self.vocabulary = None
        self.decode_for_metrics = False   # label words: rank classification covers it
        per_skill = -(-eval_examples // len(self.skills))
        self._eval_records = [r for k, s in enumerate(self.skills)
                              for r in synthetic.examples(s, per_skill, 1_000_003 + k,
                                                          self.marked)]

    def _records(self, position: int) -> List[Dict[str, str]]:
        # A distinct seed per (stream seed, position, skill): batch n never depends on n-1.
        records = []
        for k, skill in enumerate(self.skills):
            records += synthetic.examples(skill, self.batch_size, (self.seed * 7_919 + position)
                                          * 16 + k, self.marked)
        order = np.random.RandomState([self.seed, position]).permutation(len(records))
        return [records[i] for i in order[:self.batch_size]]

    def train_batches(self, position: int = 0) -> _PositionedStream:
        return _PositionedStream(self.name, self.seed, position,
                                 lambda n: synthetic.to_batch(self._records(n), *self.lengths))

    def eval_batches(self) -> List[Dict[str, np.ndarray]]:
        recs = self._eval_records
        full = [synthetic.to_batch(recs[i:i + self.batch_size], *self.lengths)
                for i in range(0, len(recs), self.batch_size)]
        return pad_eval_batches(full, self.batch_size)

    def eval_examples(self) -> List[Dict[str, str]]:
        return list(self._eval_records)

    @staticmethod
    def compute_metrics(examples: Sequence[Mapping[str, Any]], predictions: Sequence[str]
                        ) -> Dict[str, float]:
        return metrics_lib.accuracy([e["targets"] for e in examples], list(predictions))


class SeqioData:
    """A registered SeqIO task or mixture through ``prompt_t5x.data`` (imports TensorFlow)."""

    def __init__(self, name: str, inputs_length: int, targets_length: int, batch_size: int,
                 prompt_length: int, seed: int = 0, train_split: str = "train",
                 eval_split: str = "validation", vocabulary: Optional[str] = None,
                 data_dir: Optional[str] = None, task_modules: Sequence[str] = ()):
        from prompt_t5x import data
        self._data = data
        try:
            import tasks
            if vocabulary or data_dir:
                tasks.register_all(vocab_path=vocabulary, data_dir=data_dir)
            for module in task_modules:
                tasks.load_task_module(module)
            self.provider = data.get_task_or_mixture(name)
            for split in (train_split, eval_split):
                data.check_split(self.provider, split)
            self.spec = data.BatchSpec(inputs_length, targets_length, batch_size,
                                       prompt_length=prompt_length)
        except (ValueError, FileNotFoundError) as e:
            if name.startswith("synthetic"):
                e = f"{e} Generated tasks: {', '.join(SYNTHETIC_TASKS)}."
            raise UsageError(str(e)) from None
        self.name, self.seed = name, seed
        self.train_split, self.eval_split = train_split, eval_split
        self.label_words = data.label_names(name)
        feature = (getattr(self.provider, "output_features", None) or {}).get("targets")
        self.vocabulary = None if feature is None else feature.vocabulary
        self.encode = None if feature is None else feature.vocabulary.encode
        self.vocab_size = None if feature is None else feature.vocabulary.vocab_size
        # Tasks with metrics can be scored on greedy decodes; run_train uses that only when
        # there are no label words (classification tasks use rank classification).
        self.decode_for_metrics = bool(getattr(self.provider, "metric_fns", None))

    def train_batches(self, position: int = 0) -> Iterator[Dict[str, np.ndarray]]:
        return self._data.train_batches(self.name, self.spec, split=self.train_split,
                                        seed=self.seed, position=position)

    def eval_batches(self) -> List[Dict[str, np.ndarray]]:
        try:
            return list(self._data.eval_batches(self.name, self.spec, split=self.eval_split))
        except self._data.DataError as e:
            raise UsageError(str(e)) from None

    def eval_examples(self) -> List[Dict[str, Any]]:
        return self._data.eval_examples(self.name, self.spec, split=self.eval_split)

    def compute_metrics(self, examples, predictions) -> Dict[str, float]:
        return self._data.compute_metrics(self.name, examples, predictions)


def open_data(run, prompt_length: int):
    """The data backend for ``run`` (a ``run_train.RunConfig``); UsageError on bad names."""
    if run.task in SYNTHETIC_TASKS:
        return SyntheticData(run.task, run.inputs_length, run.targets_length, run.batch_size,
                             seed=run.seed)
    return SeqioData(run.task, run.inputs_length, run.targets_length, run.batch_size,
                     prompt_length, seed=run.seed, train_split=run.train_split,
                     eval_split=run.eval_split, vocabulary=run.vocabulary,
                     data_dir=run.data_dir, task_modules=run.task_modules)
