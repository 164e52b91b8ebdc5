"""The language-model loss of a teacher-forced batch: the default ``Method.loss_sums``.

Moved here from ``training/train.py`` (which re-exports it) so that a method can override the
loss (e.g. a classification head's loss over C classes) while the one train step keeps calling
``method.loss_sums`` for every method.
"""

from __future__ import annotations

from typing import Mapping, Tuple

import jax
import jax.numpy as jnp


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                       z_loss: float) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Weighted sums over [B, T]: (cross-entropy, z-loss term, correct tokens, weight).

    logits [B, T, V] float32, targets [B, T] int, weights [B, T]. The z-loss ``z * log(Z)^2``
    (T5X/PaLM) keeps the softmax normaliser near 1 and is part of the optimised loss.
    """
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    ce = log_z - target_logit
    z_term = z_loss * jnp.square(log_z)
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    # Selected, not multiplied: a non-finite value at a weight-0 position (a filler row that a
    # kernel leaves undefined) must not turn the sums into NaN.
    live = weights > 0

    def weighted_sum(x):
        return jnp.sum(jnp.where(live, x * weights, 0.0))

    return weighted_sum(ce), weighted_sum(z_term), weighted_sum(correct), jnp.sum(weights)


def loss_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    """[B, T] weights of the target tokens: the batch's own, else every non-pad target."""
    if "decoder_loss_weights" in batch:
        return batch["decoder_loss_weights"]
    return (batch["decoder_target_tokens"] > 0).astype(jnp.float32)
