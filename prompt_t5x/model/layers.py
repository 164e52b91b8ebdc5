"""The layers of T5 1.1 (T5X names and logical axes): norm, projections, MLP, attention, blocks.

Every parameter is created through ``_param`` with its logical axis names, so the partitioning
rules (``prompt_t5x.parallel.sharding``) need no knowledge of the network. ``config`` is a
``prompt_t5x.model.t5.T5Config``.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from prompt_t5x.model import attention as attn_lib

Array = jax.Array
T5Config = Any  # prompt_t5x.model.t5.T5Config (not imported: t5 imports this module)


def dtype_of(name: str):
    return jnp.dtype(name)


def _param(module: nn.Module, name: str, init, shape, axes, param_dtype):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, param_dtype)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32.

    A ``scale_delta`` [embed] is added to the frozen ``scale`` only when the params handed to
    flax carry one (bias tuning overlays it; ``prompt_t5x.methods.bias_tuning``): init never
    creates it, so the T5X tree is unchanged and a model without it traces as before.
    """

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                       self.param_dtype)
        scale = scale.astype(jnp.float32)
        if self.has_variable("params", "scale_delta"):
            scale = scale + self.get_variable("params", "scale_delta").astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


class Kernel(nn.Module):
    """A bias-free projection whose single parameter is the 2-D ``kernel`` [in, out].

    T5 1.1 has no biases; a ``bias`` [out] is added only when the params handed to flax carry
    one (bias tuning overlays it): init never creates it, and without it nothing is traced.
    """

    features: int
    axes: Tuple[str, str]
    dtype: Any
    param_dtype: Any
    init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = _param(self, "kernel", self.init, (x.shape[-1], self.features), self.axes,
                        self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.has_variable("params", "bias"):
            y = y + self.get_variable("params", "bias").astype(self.dtype)
        return y


def split_heads(x: Array, config: T5Config) -> Array:
    """[B, L, heads * head_dim] projection -> [B, L, heads, head_dim], logically constrained."""
    x = x.reshape(x.shape[:-1] + (config.num_heads, config.head_dim))
    return nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))


class MlpBlock(nn.Module):
    """Gated-GELU feed-forward: (gelu_tanh(x W0) * (x W1)) Wo."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        # Named so a remat policy can keep (or recompute) the wide [B, L, mlp] activations.
        wi_0 = checkpoint_name(Kernel(cfg.mlp_dim, ("embed", "mlp"), dt, pdt, name="wi_0")(x),
                               "mlp_wi_0")
        wi_1 = checkpoint_name(Kernel(cfg.mlp_dim, ("embed", "mlp"), dt, pdt, name="wi_1")(x),
                               "mlp_wi_1")
        h = nn.gelu(wi_0, approximate=True) * wi_1
        h = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(h, deterministic=deterministic)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        out = Kernel(cfg.emb_dim, ("mlp", "embed"), dt, pdt, name="wo")(h)
        return checkpoint_name(out, "mlp_out")


class RelativePositionBias(nn.Module):
    """T5 relative position bias: one [heads, buckets] table per stack, shared by its layers."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """Bias [1, heads, q_len, k_len] for integer positions [q_len] and [k_len]."""
        cfg = self.config
        table = _param(self, "rel_embedding",
                       nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                       (cfg.num_heads, cfg.relpos_buckets), ("heads", "relpos_buckets"),
                       dtype_of(cfg.param_dtype))
        xp = np if isinstance(query_positions, np.ndarray) and isinstance(
            key_positions, np.ndarray) else jnp
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = attn_lib.relative_position_bucket(
            rel, self.bidirectional, cfg.relpos_buckets, cfg.relpos_max_distance, xp=xp)
        bias = jnp.take(table, jnp.asarray(buckets), axis=1)  # [heads, q_len, k_len]
        return bias[None].astype(jnp.float32)


class Attention(nn.Module):
    """Multi-head attention with T5's conventions: no 1/sqrt(d_kv) scaling, no biases.

    Optional per-layer ``prefix`` = (key, value) each [batch or 1, prefix_len, heads, head_dim]
    is prepended to the keys/values (visible to every query, zero position bias).
    """

    config: T5Config
    decode_cache: bool = False  # decoder self-attention: keep a key/value cache when decoding

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Optional[Array],
                 mask: Optional[attn_lib.Mask], deterministic: bool, decode: bool = False,
                 prefix: Optional[Tuple[Array, Array]] = None,
                 kv: Optional[Tuple[Array, Array]] = None) -> Array:
        """inputs_q [B, Q, D], inputs_kv [B, K, D], position bias [1, H, Q, K] float32 or None."""
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        hk = cfg.num_heads * cfg.head_dim
        # T5X initialises the query kernel 1/sqrt(d_kv) smaller instead of scaling the logits.
        q_init = nn.initializers.variance_scaling(1.0 / cfg.head_dim, "fan_in", "truncated_normal")
        proj = functools.partial(Kernel, hk, ("embed", "joined_kv"), dt, pdt)

        q = checkpoint_name(split_heads(proj(init=q_init, name="query")(inputs_q), cfg), "query")
        if kv is not None:
            # Precomputed keys/values [B, K, H, Dh] (cross-attention while decoding: the
            # encoder output does not change between steps, so project it once).
            k, v = (x.astype(dt) for x in kv)
        else:
            k = checkpoint_name(split_heads(proj(name="key")(inputs_kv), cfg), "key")
            v = checkpoint_name(split_heads(proj(name="value")(inputs_kv), cfg), "value")

        if decode and self.decode_cache:
            k, v = self._update_cache(k, v)

        if prefix is not None:
            pk, pv = prefix
            batch = q.shape[0]
            pk = jnp.broadcast_to(pk.astype(dt), (batch,) + pk.shape[1:])
            pv = jnp.broadcast_to(pv.astype(dt), (batch,) + pv.shape[1:])
            k = jnp.concatenate([pk, k], axis=1)
            v = jnp.concatenate([pv, v], axis=1)
            mask = (mask or attn_lib.Mask()).with_prefix(pk.shape[1])

        dropout_rng = None
        if not deterministic and cfg.dropout_rate > 0:
            dropout_rng = self.make_rng("dropout")
        out = attn_lib.attend(q, k, v, bias, mask, impl=cfg.attention_impl,
                              dropout_rate=cfg.dropout_rate, dropout_rng=dropout_rng, dtype=dt)
        out = out.reshape(out.shape[:2] + (hk,))
        out = Kernel(cfg.emb_dim, ("joined_kv", "embed"), dt, pdt, name="out")(out)
        return checkpoint_name(out, "attention_out")

    def _update_cache(self, k: Array, v: Array):
        """Write this step's key/value [B, 1, H, Dh] into the cache; attend to all cached steps.

        On the initialising call (shapes only) the cache is created with the full target length.
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return k, v
        if k.shape[1] != 1:
            raise ValueError(f"cached decoding takes one token per step, got {k.shape[1]}")
        i = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k, (0, i, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v, (0, i, 0, 0))
        index.value = i + 1
        return cached_k.value, cached_v.value


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, prefix, deterministic):
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        h = RMSNorm(cfg.layer_norm_eps, dt, pdt, name="pre_attention_layer_norm")(x)
        h = Attention(cfg, name="attention")(h, h, bias, mask, deterministic, prefix=prefix)
        x = x + drop(h, deterministic=deterministic)
        h = RMSNorm(cfg.layer_norm_eps, dt, pdt, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, deterministic)
        x = x + drop(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, encoded, self_bias, self_mask, cross_mask, prefixes, deterministic,
                 decode=False, cross_kv=None):
        cfg = self.config
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self_prefix, cross_prefix = prefixes
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        h = RMSNorm(cfg.layer_norm_eps, dt, pdt, name="pre_self_attention_layer_norm")(x)
        h = Attention(cfg, decode_cache=True, name="self_attention")(
            h, h, self_bias, self_mask, deterministic, decode=decode, prefix=self_prefix)
        x = x + drop(h, deterministic=deterministic)
        h = RMSNorm(cfg.layer_norm_eps, dt, pdt, name="pre_cross_attention_layer_norm")(x)
        h = Attention(cfg, name="encoder_decoder_attention")(
            h, encoded, None, cross_mask, deterministic, prefix=cross_prefix, kv=cross_kv)
        x = x + drop(h, deterministic=deterministic)
        h = RMSNorm(cfg.layer_norm_eps, dt, pdt, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, deterministic)
        x = x + drop(h, deterministic=deterministic)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Embed(nn.Module):
    """Shared token embedding [vocab, embed] (T5X: ``token_embedder/embedding``)."""

    config: T5Config

    @nn.compact
    def __call__(self, ids: Array) -> Array:
        cfg = self.config
        table = _param(self, "embedding", nn.initializers.normal(stddev=1.0),
                       (cfg.vocab_size, cfg.emb_dim), ("vocab", "embed"), dtype_of(cfg.param_dtype))
        return jnp.take(table, ids, axis=0).astype(dtype_of(cfg.dtype))
