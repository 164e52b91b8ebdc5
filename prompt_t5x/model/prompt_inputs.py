"""How a soft prompt enters the embedded input: combining modes and per-layer replacement.

A prompt is a ``[P, D]`` array (or ``[B, P, D]`` for instance-wise prompts). Combining inserts it
into the embedded sequence at a per-row position ``k_b``:

- ``prepend``     k_b = 0 (the paper's default),
- ``after_bos``   k_b = 1 (keep a leading BOS/task token first),
- ``before_eos``  k_b = n_b - 1 where n_b is the row's number of non-padding tokens, i.e. the prompt
  sits between the text and its EOS; rows have different lengths, so this is a per-row gather.

The encoder length grows from L to L + P; prompt positions are always visible in the mask. How a
prompt is *initialised* is a method's business (``prompt_t5x.methods.prompt_init``).

A fourth mode, ``template`` (P-tuning, ``prompt_t5x.methods.p_tuning``), inserts nothing: the
inputs already hold one placeholder token id per pseudo token (``methods.templates``), and
``place_at_placeholders`` overwrites the j-th placeholder of each row with prompt row j, so the
length stays L.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
COMBINE_MODES = ("prepend", "after_bos", "before_eos")
TEMPLATE_MODE = "template"   # placeholders in the tokens (place_at_placeholders), not inserted



def insertion_points(mask: Array, mode: str) -> Array:
    """Per-row index [B] at which the prompt is inserted, for a token mask [B, L]."""
    batch = mask.shape[0]
    if mode == "prepend":
        return jnp.zeros((batch,), jnp.int32)
    if mode == "after_bos":
        return jnp.ones((batch,), jnp.int32)
    if mode == "before_eos":
        lengths = jnp.sum(mask.astype(jnp.int32), axis=-1)
        return jnp.maximum(lengths - 1, 0)
    raise ValueError(f"unknown prompt combine mode {mode!r}; choose from {COMBINE_MODES}")


def combine_prompt(embedded: Array, mask: Array, prompt: Array, mode: str = "prepend"
                   ) -> Tuple[Array, Array, Array]:
    """Insert ``prompt`` into the embedded tokens.

    Args:
      embedded: [B, L, D] embedded input tokens.
      mask: [B, L] bool, True for real (non-padding) tokens.
      prompt: [P, D] shared prompt or [B, P, D] per-example prompts.
      mode: one of COMBINE_MODES.
    Returns:
      (combined [B, L+P, D], mask [B, L+P] bool, prompt_index [B, L+P] int32 with the prompt
      position 0..P-1 where a prompt vector sits and -1 elsewhere).
    """
    batch, length, dim = embedded.shape
    if prompt.ndim == 2:
        prompt = jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
    if prompt.ndim != 3 or prompt.shape[0] != batch or prompt.shape[2] != dim:
        raise ValueError(f"prompt shape {prompt.shape} does not fit embedded inputs {embedded.shape}"
                         " (expected [P, D] or [B, P, D] with the model's D)")
    plen = prompt.shape[1]
    prompt = prompt.astype(embedded.dtype)
    if mode == "prepend":  # the common case: a plain concatenation
        combined = jnp.concatenate([prompt, embedded], axis=1)
        new_mask = jnp.concatenate([jnp.ones((batch, plen), bool), mask], axis=1)
        index = jnp.concatenate([jnp.arange(plen, dtype=jnp.int32),
                                 jnp.full((length,), -1, jnp.int32)])
        return combined, new_mask, jnp.broadcast_to(index, (batch, plen + length))
    k = insertion_points(mask, mode)[:, None]                     # [B, 1]
    j = jnp.arange(length + plen, dtype=jnp.int32)[None, :]       # [1, L+P]
    is_prompt = (j >= k) & (j < k + plen)                         # [B, L+P]
    token_src = jnp.clip(jnp.where(j < k, j, j - plen), 0, length - 1)
    prompt_src = jnp.clip(j - k, 0, plen - 1)
    tokens = jnp.take_along_axis(embedded, token_src[..., None], axis=1)
    prompt_rows = jnp.take_along_axis(prompt, prompt_src[..., None], axis=1)
    combined = jnp.where(is_prompt[..., None], prompt_rows, tokens)
    new_mask = jnp.where(is_prompt, True, jnp.take_along_axis(mask, token_src, axis=1))
    index = jnp.where(is_prompt, prompt_src, -1)
    return combined, new_mask, index


def place_at_placeholders(embedded: Array, tokens: Array, prompt: Array, placeholder_id: int
                          ) -> Tuple[Array, Array]:
    """The ``template`` mode: prompt row j replaces the j-th ``placeholder_id`` token of a row.

    Args:
      embedded: [B, L, D] embedded input tokens.
      tokens: [B, L] int token ids (the placeholders among them).
      prompt: [P, D] shared or [B, P, D] per-example prompt rows.
    Returns:
      (embedded [B, L, D] with the placeholders replaced, prompt_index [B, L] int32: the row
      0..P-1 at a placeholder, -1 elsewhere). A row with more than P placeholders reuses the
      last prompt row for the extra ones (the data renders at most P).
    """
    batch, _, dim = embedded.shape
    if prompt.ndim == 2:
        prompt = jnp.broadcast_to(prompt[None], (batch,) + prompt.shape)
    if prompt.ndim != 3 or prompt.shape[0] != batch or prompt.shape[2] != dim:
        raise ValueError(f"prompt shape {prompt.shape} does not fit embedded inputs {embedded.shape}"
                         " (expected [P, D] or [B, P, D] with the model's D)")
    is_placeholder = tokens == placeholder_id                                    # [B, L]
    row = jnp.clip(jnp.cumsum(is_placeholder.astype(jnp.int32), axis=1) - 1, 0,
                   prompt.shape[1] - 1)
    rows = jnp.take_along_axis(prompt.astype(embedded.dtype), row[..., None], axis=1)
    combined = jnp.where(is_placeholder[..., None], rows, embedded)
    return combined, jnp.where(is_placeholder, row, -1).astype(jnp.int32)


def replace_prompt_positions(hidden: Array, layer_prompt: Array, prompt_index: Array) -> Array:
    """Overwrite the prompt positions of ``hidden`` [B, L, D] with ``layer_prompt``.

    ``layer_prompt`` is [P, D] or [B, P, D]; ``prompt_index`` [B, L] from ``combine_prompt``.
    Used by deep prompts (P-tuning v2 style), which feed new vectors at every layer.
    """
    if layer_prompt.ndim == 2:
        layer_prompt = jnp.broadcast_to(layer_prompt[None], (hidden.shape[0],) + layer_prompt.shape)
    rows = jnp.take_along_axis(layer_prompt.astype(hidden.dtype),
                               jnp.maximum(prompt_index, 0)[..., None], axis=1)
    return jnp.where((prompt_index >= 0)[..., None], rows, hidden)


def repeat_examples(inputs: Mapping[str, Any], times: int) -> Dict[str, Any]:
    """Model inputs of B examples -> of B * ``times`` rows, row b * times + j = example b.

    For callers that replicate each example's rows (beam search, rank classification's labels)
    after encoding. Only per-example inputs change: a prompt [B, P, D], deep prompts
    [layers, B, P, D] and prefixes whose key/value are [layers, B, P, H, Dh]; inputs shared by
    the batch (prompt [P, D], prefixes [layers, P, H, Dh], settings) pass unchanged.
    """
    out = dict(inputs)
    prompt = out.get("prompt")
    if prompt is not None and prompt.ndim == 3:
        out["prompt"] = jnp.repeat(prompt, times, axis=0)
    deep = out.get("deep_prompts")
    if deep is not None and deep.ndim == 4:
        out["deep_prompts"] = jnp.repeat(deep, times, axis=1)
    prefixes = out.get("prefixes")
    if prefixes:
        out["prefixes"] = {
            part: (None if kv is None else tuple(
                jnp.repeat(x, times, axis=1) if x.ndim == 5 else x for x in kv))
            for part, kv in prefixes.items()}
    return out
