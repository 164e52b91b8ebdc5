"""Attention arithmetic shared by every T5 attention layer: position buckets, masks, kernels.

T5 attention has no 1/sqrt(d_kv) logit scaling (it is folded into the query kernel's init) and
adds a relative-position bias. The bias ``[1, H, Q, K]`` and the boolean :class:`Mask` travel
separately, so no ``[B, H, Q, K]`` tensor is built outside the kernel: the mask stays factored
(valid queries, valid keys, causal) until a kernel needs it. Implementations:

- ``einsum``: explicit einsum -> float32 softmax -> einsum. Supports attention-probability dropout.
- ``xla``: ``jax.nn.dot_product_attention`` with the bias, a broadcastable ``[B|1, 1, Q, K]``
  mask and ``scale=1.0``.
- ``cudnn``: the same call as a fused cuDNN kernel on NVIDIA GPUs. Padding is given as sequence
  lengths (and causality as ``is_causal``), so the kernel masks in place and its bias gradient
  (which cuDNN always computes) stays ``[1, H, Q, K]``; this reads valid positions as a prefix
  of each row (right padding, which SeqIO's ``trim_and_pad`` produces and the combine modes of
  ``prompts.py`` keep; the exception, ``after_bos`` on an all-padding filler row, only changes
  outputs nobody reads). Causal self-attention with per-layer prefixes falls back to a dense
  mask (the prefix sits outside the causal triangle, which lengths cannot say).

``xla``/``cudnn`` take no dropout rng, so a training step with attention dropout > 0 uses the
einsum path (same numbers, by construction).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import flax.struct
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


@flax.struct.dataclass
class Mask:
    """Which keys each query may see, kept factored: ``query_valid`` [B, Q] and ``key_valid``
    [B|1, K] booleans (None = all valid) and ``causal`` (key k visible to query q iff k <= q).

    ``prefix`` leading keys (per-layer prefix key/values, see ``layers.Attention``) are visible to
    every query; ``key_valid`` and the causal triangle describe the keys after them. ``causal``
    and ``prefix`` are static (pytree metadata), so a Mask can cross jit/remat boundaries.
    A fully masked query row (a padded decoder position) attends uniformly in the einsum and xla
    paths, as in T5X; cuDNN returns zeros there instead. Nothing downstream reads it (its loss
    weight is 0).
    """

    query_valid: Optional[jax.Array] = None
    key_valid: Optional[jax.Array] = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    prefix: int = flax.struct.field(pytree_node=False, default=0)

    def with_prefix(self, length: int) -> "Mask":
        return self.replace(prefix=self.prefix + length)

    def dense(self, q_len: int, k_len: int) -> Optional[jax.Array]:
        """Boolean ``[B|1, 1, Q, K]`` (True = may attend), or None when nothing is masked."""
        p = self.prefix
        out = None

        def both(a, b):
            return b if a is None else a & b

        if self.causal:
            tri = np.arange(k_len - p)[None, :] <= np.arange(q_len)[:, None]
            out = jnp.asarray(np.concatenate([np.ones((q_len, p), bool), tri], axis=1)[None, None])
        if self.key_valid is not None:
            keys = jnp.pad(self.key_valid, ((0, 0), (p, 0)), constant_values=True)
            out = both(out, keys[:, None, None, :])
        if self.query_valid is not None:
            out = both(out, self.query_valid[:, None, :, None])
        return out


def cudnn_arguments(q: jax.Array, k: jax.Array, bias: Optional[jax.Array],
                    mask: Optional[Mask], dtype) -> Dict[str, Any]:
    """Keyword arguments of ``jax.nn.dot_product_attention`` for the cuDNN path.

    Padding becomes ``query_seq_lengths``/``key_value_seq_lengths`` [B] int32 (the count of valid
    positions: right padding; prefix keys lead, so they add to the key count), causality
    ``is_causal``; the bias stays ``[1, H, Q, K]``. Lengths are at least 1: cuDNN before 9.25
    returns NaN for a row of length 0 (an all-padding filler row), the other paths a uniform
    average, and a filler row's output is never read.
    """
    kwargs: Dict[str, Any] = {"scale": 1.0}
    if bias is not None:
        kwargs["bias"] = bias.astype(dtype)
    if mask is None:
        return kwargs
    if mask.prefix and mask.causal:
        # Prefix keys sit outside the causal triangle, and the API's causal mask is aligned at
        # key 0: the mask goes in dense and cuDNN folds it into the bias.
        kwargs["mask"] = mask.dense(q.shape[1], k.shape[1])
        return kwargs
    batch = q.shape[0]
    kwargs["is_causal"] = mask.causal
    if mask.query_valid is not None:
        kwargs["query_seq_lengths"] = jnp.maximum(
            jnp.sum(mask.query_valid, axis=-1, dtype=jnp.int32), 1)
    if mask.key_valid is not None:
        lengths = mask.prefix + jnp.sum(mask.key_valid, axis=-1, dtype=jnp.int32)
        kwargs["key_value_seq_lengths"] = jnp.broadcast_to(jnp.maximum(lengths, 1), (batch,))
    return kwargs


def attend(q, k, v, bias: Optional[jax.Array] = None, mask: Optional[Mask] = None, *,
           impl: str = "einsum", dropout_rate: float = 0.0,
           dropout_rng: Optional[jax.Array] = None, dtype=jnp.float32) -> jax.Array:
    """q [B, Q, H, Dh], k/v [B, K, H, Dh], bias [1, H, Q, K - prefix] (or [1, H, Q, K])
    float32 -> [B, Q, H, Dh]."""
    use_dropout = dropout_rng is not None and dropout_rate > 0
    if bias is not None and mask is not None and mask.prefix and bias.shape[-1] != k.shape[1]:
        # Prefix keys get no position bias (unless the bias has their columns already:
        # t5 prefix_bias='leading').
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (mask.prefix, 0)))
    if impl == "cudnn" and not use_dropout:
        return jax.nn.dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation="cudnn",
            **cudnn_arguments(q, k, bias, mask, dtype))
    dense = None if mask is None else mask.dense(q.shape[1], k.shape[1])
    if impl == "xla" and not use_dropout:
        return jax.nn.dot_product_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype),
            bias=None if bias is None else bias.astype(dtype), mask=dense, scale=1.0,
            implementation="xla")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        logits = logits + bias
    if dense is not None:
        logits = jnp.where(dense, logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1)
    if use_dropout:
        # One mask per (batch, head, key), shared by all queries (T5X's broadcast dropout).
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate,
                                    weights.shape[:2] + (1,) + weights.shape[3:])
        weights = weights * keep.astype(weights.dtype) / (1.0 - dropout_rate)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v.astype(dtype))
