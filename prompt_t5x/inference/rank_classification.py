"""Rank classification: score every label string under the model and predict the best one.

For a classification task with C label words (e.g. ``entailment`` / ``not_entailment``), each
example is paired with every label; the score of label c is the sum over its target tokens
(label + EOS) of log p(token | inputs, prompt, previous tokens), optionally divided by the number of
tokens. The prediction is the argmax. Unlike decoding + string match this can never produce an
invalid answer, and it is how few-shot / frozen-model classification is usually evaluated.

Shapes: inputs [B, L] -> B*C decoder rows [B*C, T] -> scores [B, C]. By default the encoder runs
once per example (with the method's prompt) and its output is repeated for the C labels; with
``share_encoder=False`` every (example, label) row goes through ``method.logits`` as an ordinary
batch (C times the encoder work, but only needs the generic ``Method`` interface).

Pure jax/numpy: no TensorFlow, so the core, the benchmark and eval loops can all use it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prompt_t5x.base.errors import InputError
from prompt_t5x.inference import decoding
from prompt_t5x.methods.interface import TASK_IDS
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.t5 import T5

PyTree = Any
EOS_ID = 1


@dataclasses.dataclass(frozen=True)
class LabelBatch:
    """Decoder-side arrays for C labels, each [C, T] (T5X conventions: BOS = pad id 0)."""
    decoder_target_tokens: np.ndarray   # label tokens + EOS, zero padded
    decoder_input_tokens: np.ndarray    # targets shifted right by one, starting with 0
    decoder_loss_weights: np.ndarray    # 1.0 on label tokens and EOS

    @property
    def num_labels(self) -> int:
        return self.decoder_target_tokens.shape[0]


def make_label_batch(label_token_ids: Sequence[Sequence[int]], targets_length: int) -> LabelBatch:
    """Label token id lists (without EOS) -> ``LabelBatch`` of length ``targets_length``."""
    if not label_token_ids:
        raise InputError("rank classification needs at least one label")
    num = len(label_token_ids)
    targets = np.zeros((num, targets_length), np.int32)
    for c, ids in enumerate(label_token_ids):
        ids = list(ids) + [EOS_ID]
        if len(ids) > targets_length:
            raise InputError(f"label {c} has {len(ids)} tokens with EOS but targets_length is "
                             f"{targets_length}; raise targets_length (--gin.TARGETS_LENGTH) to at least {len(ids)}.")
        if any(i <= 0 for i in ids[:-1]):
            raise InputError(f"label {c} token ids {ids[:-1]} contain pad/EOS ids")
        targets[c, :len(ids)] = ids
    inputs = np.zeros_like(targets)
    inputs[:, 1:] = targets[:, :-1]
    return LabelBatch(targets, inputs, (targets > 0).astype(np.float32))


def encode_labels(label_names: Sequence[str], encode: Callable[[str], Sequence[int]],
                  targets_length: int) -> LabelBatch:
    """``encode`` is a vocabulary's str -> token ids (e.g. ``seqio_vocab.encode``)."""
    return make_label_batch([list(encode(name)) for name in label_names], targets_length)


def _token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [N, T, V], targets [N, T] -> log p(target) [N, T] (float32)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def _tile_labels(labels: Dict[str, jax.Array], batch_size: int) -> Dict[str, jax.Array]:
    """[C, T] -> [B*C, T], row b*C + c = label c (for example b)."""
    return {k: jnp.tile(v, (batch_size, 1)) for k, v in labels.items()}


def label_scores(method, frozen: PyTree, trainable: PyTree, encoder_input_tokens: jax.Array,
                 labels: Dict[str, jax.Array], *, length_normalize: bool = False,
                 share_encoder: bool = True, task_ids: Optional[jax.Array] = None
                 ) -> jax.Array:
    """Scores [B, C]: (mean if ``length_normalize`` else sum) target log-prob of each label,
    or the method's own class scores (``Method.label_scores``, e.g. a classification head).
    ``task_ids`` [B] route a mixed-task batch (``Method.example_inputs``)."""
    batch_size = encoder_input_tokens.shape[0]
    num_labels = labels["decoder_target_tokens"].shape[0]
    own = method.label_scores(frozen, trainable, encoder_input_tokens, num_labels)
    if own is not None:
        return own
    tiled = _tile_labels(labels, batch_size)
    if share_encoder:
        variables = method.variables(frozen, trainable)
        encode_extra, decode_extra = decoding.split_model_inputs(method.example_inputs(
            frozen, trainable, decoding.example_features(encoder_input_tokens, task_ids)))
        encoded, mask = method.model.apply(variables, encoder_input_tokens, method=T5.encode,
                                           **encode_extra)
        encoded = jnp.repeat(encoded, num_labels, axis=0)     # [B*C, L+P, D]
        mask = jnp.repeat(mask, num_labels, axis=0)           # [B*C, L+P]
        decode_extra = prompt_inputs.repeat_examples(decode_extra, num_labels)
        logits = method.model.apply(variables, encoded, mask, tiled["decoder_input_tokens"],
                                    tiled["decoder_target_tokens"], method=T5.decode,
                                    **decode_extra)
    else:
        batch = dict(tiled)
        batch["encoder_input_tokens"] = jnp.repeat(encoder_input_tokens, num_labels, axis=0)
        if task_ids is not None:
            batch[TASK_IDS] = jnp.repeat(jnp.asarray(task_ids, jnp.int32), num_labels, axis=0)
        logits = method.logits(frozen, trainable, batch)
    token_lp = _token_log_probs(logits, tiled["decoder_target_tokens"])
    weights = tiled["decoder_loss_weights"]
    scores = jnp.sum(token_lp * weights, axis=-1)
    if length_normalize:
        scores = scores / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    return scores.reshape(batch_size, num_labels)


def rank_classifier_fn(method, label_batch: LabelBatch, *, length_normalize: bool = False,
                       share_encoder: bool = True):
    """Pure ``classify(frozen, trainable, encoder_input_tokens [B, L], task_ids [B] | None)
    -> (scores [B, C], predicted label index [B])``, to jit (or partition over a mesh). The
    labels stay numpy: constants of the traced program, never arrays committed to one device."""
    labels = {k: np.asarray(v) for k, v in dataclasses.asdict(label_batch).items()}

    def classify(frozen, trainable, encoder_input_tokens, task_ids=None):
        scores = label_scores(method, frozen, trainable, encoder_input_tokens, labels,
                              length_normalize=length_normalize, share_encoder=share_encoder,
                              task_ids=task_ids)
        return scores, jnp.argmax(scores, axis=-1)
    return classify


def make_rank_classifier(method, label_batch: LabelBatch, *, length_normalize: bool = False,
                         share_encoder: bool = True):
    """Jitted :func:`rank_classifier_fn`."""
    return jax.jit(rank_classifier_fn(method, label_batch, length_normalize=length_normalize,
                                      share_encoder=share_encoder))


def predicted_label_words(predictions: np.ndarray, label_names: Sequence[str],
                          example_mask: np.ndarray = None) -> list:
    """Label indices [B] -> label words for the real rows (``example_mask``), ready for the
    task's postprocessor and metrics exactly like decoded strings."""
    predictions = np.asarray(predictions)
    if example_mask is not None:
        predictions = predictions[np.asarray(example_mask, bool)]
    return [label_names[int(i)] for i in predictions]
