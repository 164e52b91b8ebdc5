"""A serve-ready predictor: raw examples of any tasks in, predictions out, one batch at a time.

    predictor = Predictor.load('/runs/mtpt', encode=vocab.encode, decode=vocab.decode,
                               inputs_length=256, targets_length=8)
    predictor.predict([{'inputs': 'a b c', 'task': 'synthetic_first'},
                       {'inputs': 'p o n', 'task': 'synthetic_contains'}])
    -> ['yes', 'no']

Examples of different tasks share a batch: a method with per-task state (a task bank, MPT, SPT
with task prompts: it has ``tasks``) gets every example's task id (``interface.TASK_IDS``) and
routes it to its task's state inside the one compiled program; a method without per-task state
ignores ``task``. Inputs are tokenised with the given vocabulary, EOS appended and padded to
``inputs_length``; batches are padded to ``batch_size`` rows so every call reuses one compiled
program (``decoding.decode_jit`` / the rank classifier). Bad input (an unknown task, an input
longer than ``inputs_length``, a missing field) is one ``UsageError`` before anything runs.

Predictions are decoded text (greedy by default, any ``decoding.DecodeSpec``), or, with
``labels`` (per task or shared), rank classification over the label words.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from prompt_t5x.base.errors import UsageError
from prompt_t5x.inference import decoding, ensemble, prompted_model
from prompt_t5x.inference import rank_classification as rank_lib
from prompt_t5x.methods import task_bank

EOS_ID = 1
Labels = Union[Sequence[str], Mapping[str, Sequence[str]]]


class Predictor:
    """See the module docstring. ``loaded``: ``prompted_model.Loaded`` of one trained state."""

    def __init__(self, loaded: prompted_model.Loaded, *, encode: Callable[[str], Sequence[int]],
                 decode: Callable[[Sequence[int]], str], inputs_length: int,
                 targets_length: int, batch_size: int = 32,
                 spec: Optional[decoding.DecodeSpec] = None):
        if loaded.prompts is not None and loaded.prompts.shape[0] != 1:
            raise UsageError("Predictor serves one trained state, not a prompt ensemble")
        self.loaded, self.encode, self.decode = loaded, encode, decode
        self.inputs_length, self.targets_length = inputs_length, targets_length
        self.batch_size = batch_size
        self.spec = spec or decoding.DecodeSpec("greedy", max_decode_len=targets_length)
        self.trainable = (loaded.trainable if loaded.prompts is None
                          else {"prompt": np.asarray(loaded.prompts[0])})
        self.tasks = tuple(getattr(loaded.method, "tasks", None) or ())

    @classmethod
    def load(cls, source: str, *, checkpoint: Optional[str] = None, step: Optional[int] = None,
             **settings) -> "Predictor":
        """A run dir or exported file (``prompted_model.load``) -> its predictor."""
        return cls(prompted_model.load([source], checkpoint=checkpoint, step=step), **settings)

    # ------------------------------------------------------------------------ the inputs
    def _tokens(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
        tokens = np.zeros((len(examples), self.inputs_length), np.int32)
        for i, example in enumerate(examples):
            if "inputs" not in example:
                raise UsageError(f"example {i} has no 'inputs' field")
            ids = list(self.encode(str(example["inputs"]))) + [EOS_ID]
            if len(ids) > self.inputs_length:
                raise UsageError(f"example {i} has {len(ids)} input tokens (with EOS), more than "
                                 f"inputs_length={self.inputs_length}; raise it or shorten "
                                 "the input")
            tokens[i, :len(ids)] = ids
        return tokens

    def task_ids(self, examples: Sequence[Mapping[str, Any]]) -> Optional[np.ndarray]:
        """[E] ids of the examples' tasks in the method's ``tasks``; None without per-task
        state. UsageError for a missing or unknown task."""
        if not self.tasks:
            return None
        missing = [i for i, e in enumerate(examples) if "task" not in e]
        if missing:
            raise UsageError(f"examples {missing[:5]} have no 'task': this method keeps a state "
                             f"per task {list(self.tasks)}")
        try:
            return np.asarray(task_bank.task_index(self.tasks, [str(e["task"]) for e in examples],
                                                   "the examples"), np.int32)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def _batches(self, examples):
        """(tokens [batch_size, L], task ids [batch_size] | None, real rows) per batch."""
        tokens, ids = self._tokens(examples), self.task_ids(examples)
        for start in range(0, len(examples), self.batch_size):
            rows = min(self.batch_size, len(examples) - start)
            pad = self.batch_size - rows
            chunk = np.pad(tokens[start:start + rows], ((0, pad), (0, 0)))
            chunk_ids = None if ids is None else np.pad(ids[start:start + rows], (0, pad))
            yield chunk, chunk_ids, rows

    # ------------------------------------------------------------------------ predicting
    def predict(self, examples: Sequence[Mapping[str, Any]], labels: Optional[Labels] = None
                ) -> List[str]:
        """One prediction per example (module docstring). ``labels``: label words shared by
        every example, or {task: label words}, for rank classification; None: decoding."""
        examples = list(examples)
        if not examples:
            return []
        if labels is None:
            return self._decode(examples)
        return self._rank(examples, labels)

    def _decode(self, examples) -> List[str]:
        out: List[str] = []
        method, frozen = self.loaded.method, self.loaded.frozen
        for tokens, ids, rows in self._batches(examples):
            decoded = ensemble.method_decode(method, frozen, self.trainable, tokens, self.spec,
                                             task_ids=ids)
            out += [self.decode(row.tolist()) for row in np.asarray(decoded.tokens)[0, :rows]]
        return out

    def _rank(self, examples, labels: Labels) -> List[str]:
        if isinstance(labels, Mapping):
            groups: Dict[tuple, List[int]] = {}
            for i, e in enumerate(examples):
                if e.get("task") not in labels:
                    raise UsageError(f"example {i}: no labels for task {e.get('task')!r}; "
                                     f"labels are given for {sorted(labels)}")
                groups.setdefault(tuple(labels[e["task"]]), []).append(i)
        else:
            groups = {tuple(labels): list(range(len(examples)))}
        out: List[Optional[str]] = [None] * len(examples)
        for words, rows in groups.items():   # one rank classifier per label set
            try:
                label_batch = rank_lib.encode_labels(list(words), self.encode,
                                                     self.targets_length)
            except ValueError as e:
                raise UsageError(str(e)) from None
            chosen = [examples[i] for i in rows]
            answers: List[str] = []
            for tokens, ids, real in self._batches(chosen):
                scores = ensemble.method_label_scores(self.loaded.method, self.loaded.frozen,
                                                      self.trainable, tokens, label_batch,
                                                      task_ids=ids)
                best = np.asarray(scores)[0, :real].argmax(-1)
                answers += [words[int(c)] for c in best]
            for i, answer in zip(rows, answers):
                out[i] = answer
        return out
