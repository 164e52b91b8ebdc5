"""Validation during training: teacher-forced loss/accuracy plus the task's own metrics.

``make_evaluator`` returns ``evaluate(trainable) -> {name: value}`` over a fixed, cached list of
eval batches (``data.eval_batches``: every example once, padding rows all-zero and masked):

- ``loss`` / ``token_accuracy`` (percent): teacher-forced, summed over target tokens of real rows
  (``train.make_eval_step``), so padding never counts;
- for classification tasks (label words known): rank classification (score each label string,
  predict the best; ``prompt_t5x.inference.rank_classification``), and the task's metric functions
  on the
  predicted label words (``compute_metrics``, e.g. ``accuracy``, ``f1``, ``mcc``);
- otherwise, if a ``predict`` function is given (greedy decoding), the task's metrics on the
  decoded strings.

Everything runs partitioned over a mesh (default: the 1x1 mesh of the first device, the same
path as any other mesh): every host holds every validation batch; the teacher-forced sums, the
rank classifier and the decoder run as partitioned computations (frozen weights in their
shardings, trainable replicated, each batch split over 'data' with
``sharding.shard_global_batch``) whose outputs are replicated, so every host computes the same
metrics (process 0 writes them).

Pure jax/numpy; the data-facing pieces (batches, examples, ``compute_metrics``) are passed in.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from prompt_t5x.inference import decoding
from prompt_t5x.inference import rank_classification as rank_lib
from prompt_t5x.methods.interface import TASK_IDS, Method
from prompt_t5x.parallel import partitioning
from prompt_t5x.parallel import sharding as sharding_lib
from prompt_t5x.training import train as train_lib

PyTree = Any
Batch = Mapping[str, np.ndarray]
MODEL_KEYS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
              "decoder_loss_weights")


def make_evaluator(method: Method, frozen: PyTree, batches: Sequence[Batch], *,
                   examples: Optional[Sequence[Mapping[str, Any]]] = None,
                   label_words: Optional[Sequence[str]] = None,
                   encode: Optional[Callable[[str], Sequence[int]]] = None,
                   compute_metrics: Optional[Callable[[Sequence, Sequence[str]],
                                                      Dict[str, float]]] = None,
                   predict: Optional[Callable[[PyTree, Batch], Sequence[str]]] = None,
                   z_loss: float = 1e-4, mesh=None, rules=None
                   ) -> Callable[[PyTree], Dict[str, float]]:
    """See the module docstring. ``examples`` are the split's preprocessed examples in
    ``example_index`` order (needed for ``compute_metrics``). ``mesh`` / ``rules`` partition
    the evaluation (``frozen`` lives on ``mesh``; leaves that do not are replicated; default:
    the 1x1 mesh of the first device)."""
    batches = list(batches)
    if not batches:
        raise ValueError("no validation batches: the validation split is empty")
    eval_fn = train_lib.eval_sums_fn(method, z_loss=z_loss)
    classify_fn = None
    if label_words and encode is not None and compute_metrics is not None:
        targets_length = batches[0]["decoder_target_tokens"].shape[1]
        classify_fn = rank_lib.rank_classifier_fn(
            method, rank_lib.encode_labels(list(label_words), encode, targets_length))
    mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
    rules = sharding_lib.rules_or_default(rules)
    frozen, frozen_shardings = partitioning.place_on_mesh(frozen, mesh)
    rep, rows = sharding_lib.replicated(mesh), sharding_lib.batch_sharding(mesh)
    eval_step = partitioning.partition(eval_fn, mesh, rules, (rep, frozen_shardings, rows), rep)
    classify = None if classify_fn is None else partitioning.partition(
        classify_fn, mesh, rules, (frozen_shardings, rep, rows, rows), rep)
    place = functools.partial(sharding_lib.shard_global_batch, mesh=mesh)
    fetch = sharding_lib.to_host

    def evaluate(trainable: PyTree) -> Dict[str, float]:
        loss_sum = correct = tokens = 0.0
        predictions: List[str] = []
        indices: List[int] = []
        for batch in batches:
            model_batch = place({k: batch[k] for k in MODEL_KEYS + (TASK_IDS,) if k in batch})
            sums = eval_step(trainable, frozen, model_batch)
            mask = np.asarray(batch["example_mask"], bool)
            if classify is not None:
                _, predicted = classify(frozen, trainable, model_batch["encoder_input_tokens"],
                                        model_batch.get(TASK_IDS))
                predictions += rank_lib.predicted_label_words(fetch(predicted),
                                                              list(label_words), mask)
            elif predict is not None and compute_metrics is not None:
                decoded = list(predict(trainable, batch))
                predictions += [d for d, m in zip(decoded, mask) if m]
            indices += [int(i) for i in np.asarray(batch["example_index"])[mask]]
            sums = fetch(sums)
            loss_sum += float(sums["loss_sum"])
            correct += float(sums["correct"])
            tokens += float(sums["tokens"])
        results = {"loss": loss_sum / max(tokens, 1.0),
                   # percent, like the task metrics beside it (data.metrics)
                   "token_accuracy": 100.0 * correct / max(tokens, 1.0)}
        if predictions and compute_metrics is not None and examples is not None:
            ordered = [examples[i] for i in indices]
            results.update({k: float(v) for k, v in compute_metrics(ordered, predictions).items()})
        return results

    return evaluate


def make_decode_predict(method: Method, frozen: PyTree, vocabulary, spec, mesh=None, rules=None
                        ) -> Callable[[PyTree, Batch], List[str]]:
    """``predict(trainable, batch) -> [B] decoded strings`` (``decoding.DecodeSpec`` ``spec``)
    for :func:`make_evaluator` on free-text tasks. The decoder runs partitioned over ``mesh``
    (default: the 1x1 mesh of the first device; every host holds the whole batch, split over
    'data') and the tokens are gathered to every host."""
    mesh = sharding_lib.single_device_mesh() if mesh is None else mesh
    rules = sharding_lib.rules_or_default(rules)
    frozen, _ = partitioning.place_on_mesh(frozen, mesh)

    def predict(trainable, batch):
        features = sharding_lib.shard_global_batch(
            {k: batch[k] for k in ("encoder_input_tokens", TASK_IDS) if k in batch}, mesh)
        with partitioning.partitioning_context(mesh, rules):
            out = decoding.decode_jit(method, frozen, trainable,
                                      features["encoder_input_tokens"], spec,
                                      task_ids=features.get(TASK_IDS))
        return [vocabulary.decode(row.tolist()) for row in sharding_lib.to_host(out.tokens)]
    return predict
