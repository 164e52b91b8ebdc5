"""Initial key/value prefix tables of prefix-tuning: random, zero values, or a text's own keys.

Each initialiser returns, for every switched-on part (``'encoder'``, ``'decoder_self'``,
``'decoder_cross'``), a ``(key, value)`` pair of ``[layers, P, heads, head_dim]`` float32 tables;
``prefix_tuning`` either trains them as they are (direct) or makes them the starting output of
its MLP.

- ``random``: keys and values N(0, scale^2). Frozen T5 1.1 keys/values have entries of order 1
  (RMS-normed inputs times kernels of std 1/sqrt(emb)), so scale 1 starts in their range.
- ``zero``: random keys, zero values: the prefix starts by only taking attention mass away from
  the real keys (the outputs shrink), never by adding content.
- ``text``: the frozen model's own keys and values for a string (Li & Liang 2021, Sec. 7.4,
  "Initialization": activations of real words; their Fig. 5 finds it clearly better than
  random init in low-data settings). The text runs through the frozen T5 once as encoder input
  and, shifted right, as decoder input; each layer's key/value projections at those positions
  become the prefix (repeated cyclically when the text is shorter than P, cut when longer).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.model.layers import split_heads

PARTS = ("encoder", "decoder_self", "decoder_cross")
INITS = ("random", "zero", "text")
KeyValue = Tuple[jax.Array, jax.Array]

# part -> (stack, attention module name) in the T5X parameter tree.
_PART_MODULES = {"encoder": ("encoder", "attention"),
                 "decoder_self": ("decoder", "self_attention"),
                 "decoder_cross": ("decoder", "encoder_decoder_attention")}


def part_layers(config: t5_lib.T5Config, part: str) -> int:
    return config.num_encoder_layers if part == "encoder" else config.num_decoder_layers


def random_tables(rng: jax.Array, config: t5_lib.T5Config, parts: Sequence[str], length: int,
                  scale: float, zero_values: bool) -> Dict[str, KeyValue]:
    out = {}
    for part, part_rng in zip(parts, jax.random.split(rng, len(parts))):
        shape = (part_layers(config, part), length, config.num_heads, config.head_dim)
        key_rng, value_rng = jax.random.split(part_rng)
        key = scale * jax.random.normal(key_rng, shape, jnp.float32)
        value = jnp.zeros(shape, jnp.float32) if zero_values else \
            scale * jax.random.normal(value_rng, shape, jnp.float32)
        out[part] = (key, value)
    return out


def text_tables(model: t5_lib.T5, frozen: Any, parts: Sequence[str], length: int,
                token_ids: Sequence[int]) -> Dict[str, KeyValue]:
    """The frozen model's keys/values of ``token_ids`` (see the module docstring). Traceable:
    it runs inside ``create_train_state``'s jit (or ``eval_shape`` on abstract weights)."""
    if not token_ids:
        raise ValueError("prefix init 'text' needs a non-empty text")
    ids = np.asarray(token_ids, np.int32)
    positions = np.resize(np.arange(len(ids)), length)       # cyclic when the text is short
    tokens = ids[None, :]
    decoder_inputs = np.concatenate([[0], ids[:-1]])[None, :].astype(np.int32)
    # No remat/dropout: one deterministic forward pass whose projections we read.
    plain = t5_lib.T5(dataclasses.replace(model.config, remat_policy="none"))

    def is_projection(module, method_name):
        return method_name == "__call__" and module.name in ("key", "value")

    batch = {"encoder_input_tokens": tokens, "decoder_input_tokens": decoder_inputs,
             "decoder_target_tokens": np.ones_like(decoder_inputs)}
    _, state = plain.apply({"params": frozen}, batch, capture_intermediates=is_projection,
                           mutable=["intermediates"])
    captured = state["intermediates"]
    out = {}
    for part in parts:
        stack, attention = _PART_MODULES[part]
        keys, values = [], []
        for i in range(part_layers(model.config, part)):
            module = captured[stack][f"layers_{i}"][attention]
            for name, target in (("key", keys), ("value", values)):
                (projected,) = module[name]["__call__"]            # [1, n, H * Dh]
                heads = split_heads(projected, model.config)[0]    # [n, H, Dh]
                target.append(jnp.take(heads, positions, axis=0).astype(jnp.float32))
        out[part] = (jnp.stack(keys), jnp.stack(values))          # [layers, P, H, Dh]
    return out


def initial_tables(init: str, rng: jax.Array, model: t5_lib.T5, frozen: Any,
                   parts: Sequence[str], length: int, scale: float,
                   text_ids: Sequence[int] = ()) -> Dict[str, KeyValue]:
    if init == "random":
        return random_tables(rng, model.config, parts, length, scale, zero_values=False)
    if init == "zero":
        return random_tables(rng, model.config, parts, length, scale, zero_values=True)
    if init == "text":
        return text_tables(model, frozen, parts, length, text_ids)
    raise ValueError(f"prefix init {init!r}; choose from {INITS}")
