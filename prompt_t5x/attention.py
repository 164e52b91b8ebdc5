"""Attention arithmetic shared by every T5 attention layer: position buckets, masks, kernels.

T5 attention has no 1/sqrt(d_kv) logit scaling (it is folded into the query kernel's init) and
adds a relative-position bias; masks are folded into that bias. Implementations:

- ``einsum``: explicit einsum -> float32 softmax -> einsum. Supports attention-probability dropout.
- ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention`` with the bias and ``scale=1.0``; the cuDNN
  one is a fused kernel on NVIDIA GPUs. Neither takes a dropout rng, so a training step with
  attention dropout > 0 uses the einsum path (same numbers, by construction).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
# Large negative logit for masked keys (T5X uses -1e10 as well); finite so a fully masked row
# gives a uniform softmax instead of NaN.
MASKED_LOGIT = -1e10


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int, xp=np):
    """Bucket index for ``key_position - query_position`` as in T5.

    Half the buckets (or all, causal) hold exact distances below ``num_buckets // 2`` (halved for
    bidirectional); the rest are logarithmically spaced up to ``max_distance``; larger distances
    share the last bucket. In bidirectional mode keys *after* the query use the upper half.
    The log is taken in float32 with no epsilon, matching mesh-tensorflow (which trained the
    released T5 1.1 checkpoints) and HF transformers.
    """
    n = -relative_position
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret = (n < 0).astype(np.int32) * num_buckets
        n = xp.abs(n)
    else:
        n = xp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    safe_n = xp.maximum(n, 1).astype(np.float32)
    large = max_exact + (xp.log(safe_n / np.float32(max_exact))
                         / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int32)
    large = xp.minimum(large, num_buckets - 1)
    return ret + xp.where(is_small, n, large)


def mask_to_bias(mask) -> jax.Array:
    """Boolean mask (True = may attend) -> additive float32 bias (0 or MASKED_LOGIT)."""
    return jnp.where(mask, 0.0, MASKED_LOGIT).astype(jnp.float32)


def attend(q, k, v, bias, *, impl: str = "einsum", dropout_rate: float = 0.0,
           dropout_rng: Optional[jax.Array] = None, dtype=jnp.float32) -> jax.Array:
    """q [B, Q, H, Dh], k/v [B, K, H, Dh], bias [B|1, H|1, Q, K] float32 -> [B, Q, H, Dh]."""
    use_dropout = dropout_rng is not None and dropout_rate > 0
    if impl in ("xla", "cudnn") and not use_dropout:
        bias = jnp.broadcast_to(bias, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
        return jax.nn.dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), bias=bias.astype(dtype),
            scale=1.0, implementation=impl)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits + bias, axis=-1)
    if use_dropout:
        # One mask per (batch, head, key), shared by all queries (T5X's broadcast dropout).
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                    weights.shape[:2] + (1,) + weights.shape[3:])
        weights = weights * keep.astype(weights.dtype) / (1.0 - dropout_rate)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v.astype(dtype))
