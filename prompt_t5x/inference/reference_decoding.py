"""The reference decoder: greedy decoding that re-runs the whole model at every step, no cache.

Slow on purpose: the cached decoders of ``prompt_t5x.inference.decoding`` (greedy, sampling, beam
search) are tested against it, for every method (``tests/method_contract.py``). Per-example inputs
(``task_ids``, instance-wise prompts) go through ``Method.example_inputs`` as in ``decode``.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from prompt_t5x.inference.decoding import (
    Array,
    PyTree,
    decoding_model,
    example_features,
    split_model_inputs,
)
from prompt_t5x.methods.interface import Method
from prompt_t5x.model.t5 import T5


@functools.partial(jax.jit, static_argnames=("method",))
def _uncached_logits(method: Method, frozen: PyTree, trainable: PyTree,
                     encoder_input_tokens: Array, decoder_input_tokens: Array,
                     task_ids: Optional[Array] = None) -> Array:
    """Encoder + full decoder without cache -> logits [B, T, V]; causal, so position t only
    depends on decoder inputs <= t (no target-padding mask: every position is real)."""
    model = decoding_model(method.model)
    variables = method.variables(frozen, trainable)
    encode_kwargs, decode_kwargs = split_model_inputs(method.example_inputs(
        frozen, trainable, example_features(encoder_input_tokens, task_ids)))
    encoded, mask = model.apply(variables, encoder_input_tokens, method=T5.encode,
                                **encode_kwargs)
    return model.apply(variables, encoded, mask, decoder_input_tokens, method=T5.decode,
                       **decode_kwargs)


def greedy_decode_uncached(method: Method, frozen: PyTree, trainable: PyTree,
                           encoder_input_tokens: Array, max_decode_len: int,
                           eos_id: Optional[int] = 1, task_ids: Optional[Array] = None
                           ) -> Tuple[np.ndarray, np.ndarray]:
    """Reference greedy decoder: the whole model over all T positions at every step, no cache.

    Returns (tokens int32 [B, T], log-prob sums float32 [B]) like ``sample_loop``.
    """
    encoder_input_tokens = jnp.asarray(encoder_input_tokens, jnp.int32)
    batch = encoder_input_tokens.shape[0]
    tokens = np.zeros((batch, max_decode_len), np.int32)
    log_prob = np.zeros((batch,), np.float32)
    ended = np.zeros((batch,), bool)
    for t in range(max_decode_len):
        if ended.all():
            break
        inputs = np.concatenate([np.zeros((batch, 1), np.int32), tokens[:, :-1]], axis=1)
        logits = _uncached_logits(method, frozen, trainable, encoder_input_tokens,
                                  jnp.asarray(inputs), task_ids)[:, t]
        nxt = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
        lp = np.asarray(jax.nn.log_softmax(logits))[np.arange(batch), nxt]
        nxt = np.where(ended, 0, nxt)
        log_prob += np.where(ended, 0.0, lp)
        tokens[:, t] = nxt
        ended |= nxt == (-1 if eos_id is None else eos_id)
    return tokens, log_prob
