"""Prompt ensembling (Lester et al. 2021, section 6): N prompts, one frozen model, one batch.

Because the model is frozen, N prompts tuned on one task share every weight; only the [P, D]
prompts differ. An ensemble therefore runs as *one* forward pass over ``N * B`` rows: the batch
is replicated once per prompt (row ``n * B + b`` is example ``b`` read with prompt ``n``) and each
row gets its own prompt (``[N * B, P, D]``, the model's per-example prompt input). Predictions
are combined by

- ``majority_vote``: the most frequent decoded answer (the paper's rule); ties go to the tied
  answer with the highest summed score when scores are given, else to the earliest prompt's.
- ``sum_scores``: for rank classification, sum each label's log-likelihood over the prompts
  (a product of experts) and take the argmax.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Dict, Hashable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prompt_t5x.inference import decoding, rank_classification
from prompt_t5x.methods import prompt_init
from prompt_t5x.methods.interface import Method

PyTree = Any
Array = jax.Array


# ----------------------------------------------------------------------------- batch layout

def replicate_rows(x: Array, num_prompts: int) -> Array:
    """[B, ...] -> [N * B, ...] with row n * B + b = x[b] (prompt-major)."""
    return jnp.tile(x, (num_prompts,) + (1,) * (x.ndim - 1))


def per_row_prompts(prompts: Array, batch_size: int) -> Array:
    """[N, P, D] -> [N * B, P, D] with row n * B + b = prompts[n] (matches ``replicate_rows``)."""
    return jnp.repeat(prompts, batch_size, axis=0)


def ensemble_trainable(prompts: Array, batch_size: int) -> Dict[str, Array]:
    """The trainable tree a prompt-tuning method reads, with one prompt per replicated row."""
    return {"prompt": per_row_prompts(jnp.asarray(prompts, jnp.float32), batch_size)}


def _check(method: Method, prompts) -> None:
    if not hasattr(method, "prompt_length"):
        raise ValueError(f"prompt ensembling needs a prompt-tuning method, got "
                         f"{type(method).__name__}")
    if np.ndim(prompts) != 3:
        raise ValueError(f"ensemble prompts must be [N, P, D], got shape {np.shape(prompts)}")
    if np.shape(prompts)[2] != method.model.config.emb_dim:
        raise ValueError(f"ensemble prompts have width {np.shape(prompts)[2]} but the model's "
                         f"d_model is {method.model.config.emb_dim}")


def load_prompts(paths: Sequence[str]) -> np.ndarray:
    """Stack .npy prompts into [N, P, D]; all must have one shape."""
    if not paths:
        raise ValueError("an ensemble needs at least one prompt file")
    loaded = [prompt_init.from_npy(os.fspath(p)) for p in paths]
    shapes = {tuple(p.shape) for p in loaded}
    if len(shapes) != 1:
        detail = ", ".join(f"{p}: {tuple(x.shape)}" for p, x in zip(paths, loaded))
        raise ValueError(f"ensemble prompts must all have one shape [P, D]; got {detail}")
    return np.stack(loaded)


# ----------------------------------------------------------------------------- one batched pass

def _decode(method, frozen, prompts, encoder_input_tokens, spec, rng, params):
    num, batch = prompts.shape[0], encoder_input_tokens.shape[0]
    out = decoding.decode(method, frozen, ensemble_trainable(prompts, batch),
                          replicate_rows(jnp.asarray(encoder_input_tokens, jnp.int32), num),
                          spec, rng, params)
    return jax.tree_util.tree_map(lambda x: x.reshape((num, batch) + x.shape[1:]), out)


_decode_jit = jax.jit(_decode, static_argnames=("method", "spec"))


def ensemble_decode(method: Method, frozen: PyTree, prompts, encoder_input_tokens,
                    spec: decoding.DecodeSpec = decoding.DecodeSpec(),
                    rng: Optional[Array] = None) -> decoding.DecodeOutput:
    """Decode a batch [B, L] with each of N prompts [N, P, D] in one pass.

    Returns a DecodeOutput whose arrays have a leading prompt axis: tokens [N, B, T],
    scores [N, B], beams [N, B, K, T], beam_scores [N, B, K].
    """
    _check(method, prompts)
    return _decode_jit(method, frozen, jnp.asarray(prompts, jnp.float32),
                       jnp.asarray(encoder_input_tokens, jnp.int32),
                       decoding.static_part(spec), rng, decoding.search_params(spec))


def _label_scores(method, frozen, prompts, encoder_input_tokens, labels, length_normalize):
    num, batch = prompts.shape[0], encoder_input_tokens.shape[0]
    scores = rank_classification.label_scores(
        method, frozen, ensemble_trainable(prompts, batch),
        replicate_rows(encoder_input_tokens, num), labels, length_normalize=length_normalize)
    return scores.reshape(num, batch, -1)


_label_scores_jit = jax.jit(_label_scores, static_argnames=("method", "length_normalize"))


def ensemble_label_scores(method: Method, frozen: PyTree, prompts, encoder_input_tokens,
                          label_batch: rank_classification.LabelBatch, *,
                          length_normalize: bool = False) -> Array:
    """Rank-classification scores [N, B, C] (label log-likelihoods) of each prompt, one pass."""
    _check(method, prompts)
    labels = {"decoder_target_tokens": jnp.asarray(label_batch.decoder_target_tokens),
              "decoder_input_tokens": jnp.asarray(label_batch.decoder_input_tokens),
              "decoder_loss_weights": jnp.asarray(label_batch.decoder_loss_weights)}
    return _label_scores_jit(method, frozen, jnp.asarray(prompts, jnp.float32),
                             jnp.asarray(encoder_input_tokens, jnp.int32), labels,
                             length_normalize)


# ------------------------------------------------------- one trained state of any method

def method_decode(method: Method, frozen: PyTree, trainable: PyTree, encoder_input_tokens,
                  spec: decoding.DecodeSpec = decoding.DecodeSpec(),
                  rng: Optional[Array] = None, task_ids=None) -> decoding.DecodeOutput:
    """``decoding.decode_jit`` with the prompt axis of the ensemble outputs (N = 1), so a method
    other than prompt tuning goes through the same evaluation code. ``task_ids`` [B] route a
    mixed-task batch (a task bank's examples to their tasks' states)."""
    out = decoding.decode_jit(method, frozen, trainable,
                              jnp.asarray(encoder_input_tokens, jnp.int32), spec, rng, task_ids)
    return jax.tree_util.tree_map(lambda x: x[None], out)


def _method_label_scores(method, frozen, trainable, encoder_input_tokens, labels,
                         length_normalize, task_ids=None):
    return rank_classification.label_scores(method, frozen, trainable, encoder_input_tokens,
                                            labels, length_normalize=length_normalize,
                                            task_ids=task_ids)[None]


_method_label_scores_jit = jax.jit(_method_label_scores,
                                   static_argnames=("method", "length_normalize"))


def method_label_scores(method: Method, frozen: PyTree, trainable: PyTree, encoder_input_tokens,
                        label_batch: rank_classification.LabelBatch, *,
                        length_normalize: bool = False, task_ids=None) -> Array:
    """Rank-classification scores [1, B, C] of one trained state of any method (``task_ids``
    [B]: see ``method_decode``)."""
    labels = {"decoder_target_tokens": jnp.asarray(label_batch.decoder_target_tokens),
              "decoder_input_tokens": jnp.asarray(label_batch.decoder_input_tokens),
              "decoder_loss_weights": jnp.asarray(label_batch.decoder_loss_weights)}
    return _method_label_scores_jit(method, frozen, trainable,
                                    jnp.asarray(encoder_input_tokens, jnp.int32), labels,
                                    length_normalize, task_ids)


# ----------------------------------------------------------------------------- combining

def majority_vote(predictions: Sequence[Sequence[Hashable]],
                  scores: Optional[Any] = None) -> List[Hashable]:
    """Per example, the answer most prompts gave.

    Args:
      predictions: [N][B] answers (decoded strings, label ids...), one list per prompt.
      scores: optional [N, B] confidence of each answer (e.g. its log-probability); breaks
        ties by the tied answers' summed score. Without scores, or if those tie too, the answer
        of the earliest prompt wins.
    Returns:
      [B] voted answers.
    """
    if not len(predictions):
        raise ValueError("majority_vote needs predictions from at least one prompt")
    num, batch = len(predictions), len(predictions[0])
    if any(len(p) != batch for p in predictions):
        raise ValueError(f"every prompt must predict the same number of examples; got "
                         f"{[len(p) for p in predictions]}")
    if scores is not None:
        scores = np.asarray(scores, np.float64)
        if scores.shape != (num, batch):
            raise ValueError(f"scores must be [N, B] = {(num, batch)}, got {scores.shape}")
    voted = []
    for b in range(batch):
        counts = collections.Counter(predictions[n][b] for n in range(num))
        summed = collections.defaultdict(float)
        first = {}
        for n in range(num):
            answer = predictions[n][b]
            first.setdefault(answer, n)
            if scores is not None:
                summed[answer] += scores[n, b]
        voted.append(max(counts, key=lambda a: (counts[a], summed[a], -first[a])))
    return voted


def sum_scores(label_scores) -> np.ndarray:
    """Label scores [N, B, C] -> predicted label [B]: argmax of the scores summed over prompts."""
    label_scores = np.asarray(label_scores)
    if label_scores.ndim != 3:
        raise ValueError(f"label scores must be [N, B, C], got shape {label_scores.shape}")
    return np.argmax(label_scores.sum(axis=0), axis=-1)


def vote_labels(label_scores) -> np.ndarray:
    """Label scores [N, B, C] -> [B]: majority vote of each prompt's argmax label (ties: summed
    score of the tied labels)."""
    label_scores = np.asarray(label_scores)
    per_prompt = np.argmax(label_scores, axis=-1)                          # [N, B]
    best = np.take_along_axis(label_scores, per_prompt[..., None], -1)[..., 0]
    return np.asarray(majority_vote(per_prompt.tolist(), best), np.int64)
