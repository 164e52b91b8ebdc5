"""M(x): a fixed-size representation of an input from the frozen T5, for instance-wise prompts.

Instance-dependent prompt generation (IDPG, Wu et al., 2022) and semi-parametric prompt tuning
(SPT, Bari et al., 2022) both condition the prompt on a sentence vector of the input computed by
the frozen model *without* the prompt. Two modes:

- ``'encoder'``: the frozen T5 encoder's output over x (no prompt), mean-pooled over the valid
  (non-padding) positions. A forward pass of the whole encoder: the "first pass" the IDPG paper
  pays for (its M is a frozen RoBERTa; on T5 the frozen encoder itself is the natural choice);
- ``'embedding'``: the mean of x's frozen input embeddings: no encoder pass (cheap mode).

Both are wrapped in ``jax.lax.stop_gradient``: M(x) depends only on frozen weights, so the train
step's gradient (with respect to the trainable tree only) never differentiates it; the stop makes
that explicit for any caller that differentiates with respect to the frozen tree as well.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prompt_t5x.model.t5 import T5

REPRESENTATIONS = ("encoder", "embedding")
PyTree = Any


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """x [B, L, D], mask [B, L] (bool) -> mean over the valid positions [B, D] (float32)."""
    weights = mask.astype(jnp.float32)[..., None]
    return jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.maximum(
        jnp.sum(weights, axis=1), 1.0)


def sentence_representation(model: T5, frozen: PyTree, encoder_input_tokens: jax.Array,
                            mode: str = "encoder") -> jax.Array:
    """M(x) float32 [B, D] of tokens [B, L] (module docstring); no gradient flows through it."""
    if mode not in REPRESENTATIONS:
        raise ValueError(f"sentence representation {mode!r}; choose from {REPRESENTATIONS}")
    tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    mask = tokens > 0
    if mode == "embedding":
        embedding = frozen["token_embedder"]["embedding"]
        x = jnp.take(embedding, tokens, axis=0)
    else:
        x, mask = model.apply({"params": frozen}, tokens, method=T5.encode)
    return jax.lax.stop_gradient(masked_mean(x, mask))
