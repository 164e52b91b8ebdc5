"""Instance encoders of IPT (``methods.ipt``): an input's frozen token embeddings -> its instance
features.

Jiang et al. (2022, "Instance-wise Prompt Tuning for Pretrained Language Models",
arXiv:2206.01958) derive the instance part of the prompt either token by token from a trainable
look-up table, or from the whole input through a small trainable encoder. Both read only the
*frozen* input embeddings of the instance (``jax.lax.stop_gradient``: the frozen table is never
differentiated), so the instance part costs no pass through the T5 stack.

- :func:`lookup_prompt`: rows of a trainable table ``[N, D]`` indexed by the instance's first
  ``P_inst`` token ids modulo N (why modulo: see ``methods.ipt``'s docstring);
- :class:`InstanceEncoder`: ``'mlp'`` (masked mean-pool, then Dense -> tanh), ``'bilstm'`` (a
  bidirectional LSTM over the valid tokens, ``hidden // 2`` units per direction, then masked
  mean-pool), ``'cnn'`` (a width-3 convolution with ReLU, then masked max-pool); each summary
  ``[B, hidden]`` goes through one linear output head per requested output (the instance prompt
  ``[B, P_inst * D]``, or a prefix part's layer-0 keys/values).
"""

from __future__ import annotations

from typing import Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_t5x.methods.sentence_repr import masked_mean

ENCODERS = ("mlp", "bilstm", "cnn")
CNN_WIDTH = 3


def frozen_token_embeddings(frozen, tokens: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """tokens int32 [B, L] -> (their frozen input embeddings float32 [B, L, D], valid mask
    bool [B, L]); no gradient reaches the frozen table."""
    tokens = jnp.asarray(tokens, jnp.int32)
    table = jax.lax.stop_gradient(frozen["token_embedder"]["embedding"])
    return jnp.take(table, tokens, axis=0).astype(jnp.float32), tokens > 0


def leading_ids(tokens: jax.Array, length: int) -> jax.Array:
    """The first ``length`` ids of every row [B, length] (right-padded with 0 when L < length:
    a short input's missing tokens read the padding id like its own padding does)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[1] < length:
        tokens = jnp.pad(tokens, ((0, 0), (0, length - tokens.shape[1])))
    return tokens[:, :length]


def lookup_prompt(table: jax.Array, tokens: jax.Array, length: int) -> jax.Array:
    """Instance prompt [B, length, D]: row j of example b is ``table[tokens[b, j] % N]``."""
    ids = leading_ids(tokens, length) % table.shape[0]
    return jnp.take(table, ids, axis=0)


class InstanceEncoder(nn.Module):
    """Frozen embeddings [B, L, D] and mask [B, L] -> {name: [B, features]} (module docstring).

    ``outputs``: (name, features) pairs, one linear head each on the shared summary."""

    kind: str
    hidden: int
    outputs: Tuple[Tuple[str, int], ...]

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> Dict[str, jax.Array]:
        x = x * mask[..., None].astype(x.dtype)        # padding contributes nothing
        if self.kind == "mlp":
            summary = jnp.tanh(nn.Dense(self.hidden, name="hidden")(masked_mean(x, mask)))
        elif self.kind == "bilstm":
            units = self.hidden // 2                     # per direction
            lengths = jnp.sum(mask.astype(jnp.int32), axis=1)
            # seq_lengths: the backward direction starts at each row's last valid token, so
            # right padding does not change a row's features.
            h = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(units, name="forward")),
                                 nn.RNN(nn.OptimizedLSTMCell(units, name="backward")),
                                 name="lstm")(x, seq_lengths=lengths)   # [B, L, 2 * units]
            summary = masked_mean(h, mask)
        elif self.kind == "cnn":
            # 'SAME' zero padding at the ends equals the zeroed padding positions, so the
            # valid positions' outputs do not depend on how much padding follows.
            h = nn.relu(nn.Conv(self.hidden, (CNN_WIDTH,), padding="SAME", name="conv")(x))
            h = jnp.where(mask[..., None], h, -jnp.inf)
            summary = jnp.where(jnp.any(mask, axis=1)[:, None], jnp.max(h, axis=1), 0.0)
        else:
            raise ValueError(f"unknown instance encoder {self.kind!r}; choose from {ENCODERS}")
        return {name: nn.Dense(features, name=f"out_{name}")(summary)
                for name, features in self.outputs}
