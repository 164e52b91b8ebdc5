"""Autoregressive decoding of a (prompted) frozen T5: greedy, temperature / top-k / top-p sampling
and beam search, all with the decoder's key/value cache and inside one ``lax.while_loop``.

The encoder runs once per batch, with the method's prompt (``Method.model_inputs``); the decoder
then takes one token ``[B, 1]`` per step and attends to its cache (``T5.decode(decode=True)``,
cache collection ``'cache'``). Decoding starts from token id 0 (T5's decoder start) and stops per
row at the end-of-sequence id (1); positions after EOS are padding (0).

Beam search follows T5X's semantics: each step keeps the ``2 * beams`` best extensions so that
finished (EOS) candidates never starve the live beam; a finished sequence of ``n`` tokens (EOS
included) scores ``log p / ((5 + n) / 6) ** alpha``; the search stops early once no live beam can
beat the worst kept finished one; a row with no finished candidate returns its live beams.

``inference.reference_decoding.greedy_decode_uncached`` re-runs the whole decoder every step; it
is the reference the cached decoders are tested against.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from prompt_t5x.methods.interface import TASK_IDS, Method
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.t5 import T5

PyTree = Any
Array = jax.Array
# "Effectively minus infinity" for scores, finite so that sums of it stay ordered (T5X: -1e7).
NEG_INF = -1.0e7
# Temperatures at or below this are greedy: dividing logits by ~0 would overflow (T5X: 1e-4).
MIN_TEMPERATURE = 1e-4
STRATEGIES = ("greedy", "sample", "beam")
# Method.model_inputs keys that only the encoder consumes; every other key (e.g. 'prefixes')
# is passed to the decoder too.
_ENCODER_ONLY_INPUTS = ("prompt", "prompt_mode", "deep_prompts", "prompt_token_id")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """How to decode. Strategy, length and beam size shape the compiled program; the other
    fields reach it as runtime values (``SearchParams``), so changing them does not recompile.

    strategy: 'greedy' | 'sample' | 'beam'. max_decode_len: output length T (EOS included).
    eos_id: stop token, or None to always decode T tokens. beam_size / alpha: beam search.
    temperature / top_k (0 = off) / top_p (0 or >= 1 = off): sampling; temperature <=
    MIN_TEMPERATURE samples greedily.
    """

    strategy: str = "greedy"
    max_decode_len: int = 8
    eos_id: Optional[int] = 1
    beam_size: int = 4
    alpha: float = 0.6
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"decoding strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.max_decode_len < 1:
            raise ValueError(f"max_decode_len must be >= 1, got {self.max_decode_len}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.alpha < 0:
            raise ValueError(f"length penalty alpha must be >= 0, got {self.alpha}")
        if self.temperature < 0 or self.top_k < 0 or self.top_p < 0:
            raise ValueError("temperature, top_k and top_p must be >= 0 "
                             f"(got {self.temperature}, {self.top_k}, {self.top_p})")


class DecodeOutput(NamedTuple):
    """tokens [B, T] best sequence per row; scores [B] its score (log-prob, or length-normalised
    log-prob for finished beams); beams [B, K, T] / beam_scores [B, K] every kept candidate, best
    first (K = 1 unless beam search). A beam slot scoring <= NEG_INF / 2 is empty (fewer than K
    sequences finished)."""

    tokens: Array
    scores: Array
    beams: Array
    beam_scores: Array


def brevity_penalty(alpha: float, length) -> Array:
    """T5X / GNMT length normaliser ``((5 + length) / 6) ** alpha``."""
    return jnp.power((5.0 + jnp.asarray(length, jnp.float32)) / 6.0, alpha)


# ----------------------------------------------------------------------------- model plumbing

def decoding_model(model: T5) -> T5:
    """The same T5 without rematerialisation (nothing is differentiated when decoding)."""
    if model.config.remat_policy == "none":
        return model
    return T5(model.config.replace(remat_policy="none"))


def split_model_inputs(inputs: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Method.model_inputs -> (kwargs of T5.encode, kwargs of T5.decode)."""
    decode_kwargs = {k: v for k, v in inputs.items() if k not in _ENCODER_ONLY_INPUTS}
    return dict(inputs), decode_kwargs


def init_cache(model: T5, variables: PyTree, encoded: Array, encoder_mask: Array,
               max_decode_len: int, decode_kwargs: Dict[str, Any]) -> PyTree:
    """An empty decoder cache for ``encoded.shape[0]`` rows and ``max_decode_len`` steps.

    Only the shapes of the cache-creating call are traced (``jax.eval_shape``); every cache
    variable starts at zero (keys/values, the per-layer write index and the decoder position).
    """
    dummy = jnp.zeros((encoded.shape[0], max_decode_len), jnp.int32)

    def create(variables, encoded, encoder_mask):
        _, mutated = model.apply(variables, encoded, encoder_mask, dummy, method=T5.decode,
                                 decode=True, mutable=["cache"], **decode_kwargs)
        return mutated["cache"]

    shapes = jax.eval_shape(create, variables, encoded, encoder_mask)
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


StepFn = Callable[[Array, PyTree], Tuple[Array, PyTree]]


def make_step_fn(model: T5, variables: PyTree, encoded: Array, encoder_mask: Array,
                 decode_kwargs: Dict[str, Any]) -> StepFn:
    """(tokens [B, 1], cache) -> (next-token logits float32 [B, V], updated cache)."""
    def step(tokens, cache):
        logits, mutated = model.apply({**variables, "cache": cache}, encoded, encoder_mask,
                                      tokens, method=T5.decode, decode=True, mutable=["cache"],
                                      **decode_kwargs)
        return logits[:, 0].astype(jnp.float32), mutated["cache"]
    return step


def _gather_rows(tree: PyTree, rows: Array) -> PyTree:
    """Reorder the batch axis of every cache array (scalars, e.g. step counters, are shared)."""
    return jax.tree_util.tree_map(lambda x: jnp.take(x, rows, axis=0) if x.ndim else x, tree)


# ----------------------------------------------------------------------------- sampling

def filter_logits(logits: Array, top_k=0, top_p=0.0) -> Array:
    """Set logits [B, V] outside the top-k / the top-p nucleus to NEG_INF.

    ``top_k`` = 0 and ``top_p`` = 0 or >= 1 switch a filter off; both may be traced values (one
    compiled sampler serves every setting). The nucleus is the smallest set of most likely tokens
    (within the top k) whose probability reaches ``top_p``; the most likely token is always kept.
    """
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)                         # token ids, best first
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    top_k = jnp.asarray(top_k, jnp.int32)
    keep_sorted = (top_k <= 0) | (rank < top_k)
    probs = jax.nn.softmax(jnp.where(keep_sorted, sorted_logits, NEG_INF), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs              # mass of strictly better tokens
    top_p = jnp.asarray(top_p, jnp.float32)
    nucleus_on = (top_p > 0.0) & (top_p < 1.0)
    keep_sorted = keep_sorted & (~nucleus_on | (mass_before < top_p))
    keep = jnp.take_along_axis(keep_sorted, jnp.argsort(order, axis=-1), axis=-1)
    return jnp.where(keep, logits, NEG_INF)


class SearchParams(NamedTuple):
    """The numeric decoding settings, passed as (traced) arrays so that changing them does not
    recompile: temperature, top_k, top_p, alpha (float32 / int32 scalars), eos_id (-1: none)."""

    temperature: Array
    top_k: Array
    top_p: Array
    alpha: Array
    eos_id: Array


def search_params(spec: DecodeSpec) -> SearchParams:
    return SearchParams(jnp.float32(spec.temperature), jnp.int32(spec.top_k),
                        jnp.float32(spec.top_p), jnp.float32(spec.alpha),
                        jnp.int32(-1 if spec.eos_id is None else spec.eos_id))


def static_part(spec: DecodeSpec) -> DecodeSpec:
    """``spec`` without the numbers that ``SearchParams`` carries (the jit cache key)."""
    return dataclasses.replace(spec, temperature=1.0, top_k=0, top_p=0.0, alpha=0.0, eos_id=1)


def sample_loop(step: StepFn, cache: PyTree, batch_size: int, spec: DecodeSpec,
                params: SearchParams, rng: Optional[Array] = None) -> Tuple[Array, Array]:
    """Greedy (strategy 'greedy', or temperature <= MIN_TEMPERATURE) or sampled decoding.

    Returns (tokens int32 [B, T], log-prob sums float32 [B]). Log-probs are those of the model's
    unmodified distribution (no temperature / filtering), EOS included, padding excluded.
    """
    length = spec.max_decode_len
    greedy = spec.strategy == "greedy"
    if rng is None:
        rng = jax.random.PRNGKey(0)

    def cond(state):
        i, _, _, ended, _, _, _ = state
        return (i < length) & ~jnp.all(ended)

    def body(state):
        i, seqs, cur, ended, log_prob, cache, rng = state
        logits, cache = step(cur, cache)
        rng, sample_rng = jax.random.split(rng)
        nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if not greedy:
            scaled = logits / jnp.maximum(params.temperature, MIN_TEMPERATURE)
            # Filtering sorts the vocabulary twice per step: skip it (at run time) when it is off.
            filtering = (params.top_k > 0) | ((params.top_p > 0.0) & (params.top_p < 1.0))
            scaled = jax.lax.cond(filtering,
                                  lambda x: filter_logits(x, params.top_k, params.top_p),
                                  lambda x: x, scaled)
            sampled = jax.random.categorical(sample_rng, scaled, axis=-1).astype(jnp.int32)
            nxt = jnp.where(params.temperature <= MIN_TEMPERATURE, nxt, sampled)
        token_log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), nxt[:, None], -1)[:, 0]
        nxt = jnp.where(ended, 0, nxt)
        log_prob = log_prob + jnp.where(ended, 0.0, token_log_prob)
        seqs = jax.lax.dynamic_update_slice(seqs, nxt[:, None], (0, i))
        ended = ended | (nxt == params.eos_id)
        return i + 1, seqs, nxt[:, None], ended, log_prob, cache, rng

    state = (jnp.array(0, jnp.int32), jnp.zeros((batch_size, length), jnp.int32),
             jnp.zeros((batch_size, 1), jnp.int32), jnp.zeros((batch_size,), bool),
             jnp.zeros((batch_size,), jnp.float32), cache, rng)
    _, seqs, _, _, log_prob, _, _ = jax.lax.while_loop(cond, body, state)
    return seqs, log_prob


# ----------------------------------------------------------------------------- beam search

def beam_search_loop(step: StepFn, cache: PyTree, batch_size: int, spec: DecodeSpec,
                     params: SearchParams) -> Tuple[Array, Array]:
    """Beam search over a cache laid out [B * K, ...] (row b * K + k is beam k of example b).

    Returns (sequences int32 [B, K, T], scores float32 [B, K]), best first.
    """
    b, k, length = batch_size, spec.beam_size, spec.max_decode_len
    eos, alpha = params.eos_id, params.alpha
    max_penalty = brevity_penalty(alpha, length)  # no live beam can be normalised by more

    def cond(state):
        i, live_lp, _, fin_scores, _, fin_flags, _ = state
        best_possible = live_lp[:, :1] / max_penalty
        worst_finished = jnp.where(fin_flags, fin_scores, NEG_INF).min(axis=1, keepdims=True)
        done = jnp.all(fin_flags) & jnp.all(worst_finished > best_possible)
        return (i < length) & ~done

    def body(state):
        i, live_lp, live_seqs, fin_scores, fin_seqs, fin_flags, cache = state
        # live_seqs [B, K, T+1]: column 0 is the start token 0, column i the last token.
        cur = jax.lax.dynamic_slice_in_dim(live_seqs, i, 1, axis=2).reshape(b * k, 1)
        logits, cache = step(cur, cache)
        vocab = logits.shape[-1]
        cand_lp = jax.nn.log_softmax(logits).reshape(b, k, vocab) + live_lp[:, :, None]
        # 2K best extensions: even if K of them end in EOS, K live ones remain.
        top_lp, top_idx = jax.lax.top_k(cand_lp.reshape(b, k * vocab), 2 * k)
        origin, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = jnp.take_along_axis(live_seqs, origin[:, :, None], axis=1)
        top_seqs = jax.lax.dynamic_update_slice_in_dim(top_seqs, token[:, :, None], i + 1, axis=2)
        # Candidates grown from the -inf filler beams of the first step are never real.
        real = top_lp > NEG_INF / 2
        finished = (token == eos) & real

        alive_lp = jnp.where(finished, NEG_INF, top_lp)
        alive_lp, pick = jax.lax.top_k(alive_lp, k)
        live_seqs = jnp.take_along_axis(top_seqs, pick[:, :, None], axis=1)
        parent = jnp.take_along_axis(origin, pick, axis=1)                    # [B, K]
        cache = _gather_rows(cache, (jnp.arange(b)[:, None] * k + parent).reshape(-1))

        new_scores = jnp.where(finished, top_lp / brevity_penalty(alpha, i + 1), NEG_INF)
        all_scores = jnp.concatenate([fin_scores, new_scores], axis=1)       # [B, 3K]
        all_seqs = jnp.concatenate([fin_seqs, top_seqs], axis=1)
        all_flags = jnp.concatenate([fin_flags, finished], axis=1)
        fin_scores, keep = jax.lax.top_k(all_scores, k)
        fin_seqs = jnp.take_along_axis(all_seqs, keep[:, :, None], axis=1)
        fin_flags = jnp.take_along_axis(all_flags, keep, axis=1)
        return i + 1, alive_lp, live_seqs, fin_scores, fin_seqs, fin_flags, cache

    live_lp0 = jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
    seqs0 = jnp.zeros((b, k, length + 1), jnp.int32)
    state = (jnp.array(0, jnp.int32), live_lp0, seqs0, jnp.full((b, k), NEG_INF, jnp.float32),
             seqs0, jnp.zeros((b, k), bool), cache)
    _, live_lp, live_seqs, fin_scores, fin_seqs, fin_flags, _ = jax.lax.while_loop(
        cond, body, state)
    any_finished = jnp.any(fin_flags, axis=1)
    seqs = jnp.where(any_finished[:, None, None], fin_seqs, live_seqs)[:, :, 1:]
    scores = jnp.where(any_finished[:, None], fin_scores, live_lp)
    return seqs, scores


# ----------------------------------------------------------------------------- entry points

def example_features(encoder_input_tokens: Array, task_ids: Optional[Array] = None
                     ) -> Dict[str, Array]:
    """The ``features`` of ``Method.example_inputs``: tokens [B, L] (+ task ids [B])."""
    features = {"encoder_input_tokens": jnp.asarray(encoder_input_tokens, jnp.int32)}
    if task_ids is not None:
        features[TASK_IDS] = jnp.asarray(task_ids, jnp.int32)
    return features


def decode(method: Method, frozen: PyTree, trainable: PyTree, encoder_input_tokens: Array,
           spec: DecodeSpec = DecodeSpec(), rng: Optional[Array] = None,
           params: Optional[SearchParams] = None, task_ids: Optional[Array] = None
           ) -> DecodeOutput:
    """Decode a batch of encoder inputs [B, L] with the method's (prompted) model.

    Traceable with ``method`` and ``spec`` static; ``params`` (default: from ``spec``) carries
    the numeric settings, which override spec's. ``task_ids`` [B] route a mixed-task batch's
    examples to their tasks' states (``Method.example_inputs``). ``decode_jit`` is the jitted
    entry point.
    """
    if params is None:
        params = search_params(spec)
    model = decoding_model(method.model)
    variables = method.variables(frozen, trainable)
    features = example_features(encoder_input_tokens, task_ids)
    encoder_input_tokens = features["encoder_input_tokens"]
    encode_kwargs, decode_kwargs = split_model_inputs(
        method.example_inputs(frozen, trainable, features))
    encoded, mask = model.apply(variables, encoder_input_tokens, method=T5.encode,
                                **encode_kwargs)
    batch = encoded.shape[0]
    # Cross-attention keys/values depend on the encoding only: project them once, not per step
    # (and before the rows are replicated per beam). Each is [layers, B, L, H, Dh].
    cross_kv = model.apply(variables, encoded, method=T5.cross_attention_kv)
    if spec.strategy == "beam":
        # Every beam of an example shares its encoding: rows b*K .. b*K + K-1.
        encoded = jnp.repeat(encoded, spec.beam_size, axis=0)
        mask = jnp.repeat(mask, spec.beam_size, axis=0)
        cross_kv = tuple(jnp.repeat(x, spec.beam_size, axis=1) for x in cross_kv)
        decode_kwargs = prompt_inputs.repeat_examples(decode_kwargs, spec.beam_size)
    decode_kwargs = {**decode_kwargs, "cross_kv": cross_kv}
    cache = init_cache(model, variables, encoded, mask, spec.max_decode_len, decode_kwargs)
    step = make_step_fn(model, variables, encoded, mask, decode_kwargs)
    if spec.strategy == "beam":
        beams, beam_scores = beam_search_loop(step, cache, batch, spec, params)
    else:
        tokens, scores = sample_loop(step, cache, batch, spec, params, rng)
        beams, beam_scores = tokens[:, None], scores[:, None]
    return DecodeOutput(beams[:, 0], beam_scores[:, 0], beams, beam_scores)


_decode_jitted = jax.jit(decode, static_argnames=("method", "spec"))


def decode_jit(method: Method, frozen: PyTree, trainable: PyTree, encoder_input_tokens: Array,
               spec: DecodeSpec = DecodeSpec(), rng: Optional[Array] = None,
               task_ids: Optional[Array] = None) -> DecodeOutput:
    """Jitted ``decode``: compiled once per (method, strategy, length, beam size, shapes); the
    temperature, top-k/top-p, alpha and EOS id are runtime values."""
    return _decode_jitted(method, frozen, trainable, encoder_input_tokens, static_part(spec),
                          rng, search_params(spec), task_ids)
