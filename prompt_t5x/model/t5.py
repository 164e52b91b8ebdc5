"""T5 1.1 encoder-decoder in flax.linen with the parameter tree of a T5X checkpoint.

Parameter paths, shapes and logical axis names are those of a T5X T5 1.1 checkpoint's ``target``
tree, so a T5X checkpoint loads with no renaming. The soft prompt is an *input* (``prompt=``), never
a parameter: the frozen tree is exactly the pretrained model, and whatever is trained lives in a
separate tree (see ``prompt_t5x.methods``).

Per-layer inputs for the methods beyond prompt tuning are part of the call signature already:
``prefixes`` (trainable key/value prefixes for every attention layer: prefix-tuning, P-tuning v2)
and ``deep_prompts`` (replace the prompt positions at the input of every encoder layer).
``prefix_bias`` says which relative-position bias prefix keys take in self-attention: 'zero'
(none; the default) or 'leading' (that of ``P`` tokens placed before the sequence, whose own
positions shift by ``P``: what Hugging Face T5 computes for a prefix given as past key/values).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from prompt_t5x.model import attention as attn_lib
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.layers import (
    DecoderLayer,
    Embed,
    EncoderLayer,
    Kernel,
    RelativePositionBias,
    RMSNorm,
    dtype_of,
    split_heads,
)

Array = jax.Array
PyTree = Any


# Rematerialisation policies for each transformer layer (what the backward pass may keep).
REMAT_POLICIES = {
    "none": None,                                        # no remat: keep everything
    "full": jax.checkpoint_policies.nothing_saveable,    # recompute the whole layer
    "dots": jax.checkpoint_policies.checkpoint_dots,     # keep every matmul output
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # keep the named cheap-to-keep activations (attention output, MLP output), recompute the
    # wide MLP hidden activations [batch, length, mlp]
    "save_attention_and_mlp_out": jax.checkpoint_policies.save_only_these_names(
        "attention_out", "mlp_out"),
    # Like dots_no_batch but without the MLP output (the frozen-weight backward never needs it).
    "qkv_mlp_in": jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "attention_out", "mlp_wi_0", "mlp_wi_1"),
    # Keep the attention projections only; recompute the wide MLP activations (fits larger
    # models at ~20% more matmul work).
    "qkv_only": jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "attention_out"),
}



@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 1.1 model (names as in T5X's ``T5Config``)."""

    vocab_size: int = 32128
    emb_dim: int = 768
    num_heads: int = 12
    head_dim: int = 64
    mlp_dim: int = 2048
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    dropout_rate: float = 0.1
    relpos_buckets: int = 32
    relpos_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    dtype: str = "bfloat16"        # activations
    param_dtype: str = "float32"   # storage of the weights (frozen weights may be bf16)
    remat_policy: str = "none"     # see REMAT_POLICIES
    attention_impl: str = "einsum"  # see attention.IMPLEMENTATIONS

    def replace(self, **kw) -> "T5Config":
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "T5Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown T5Config fields {unknown}; known: {sorted(names)}")
        return cls(**d)

    def __post_init__(self):
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
        if self.attention_impl not in attn_lib.IMPLEMENTATIONS:
            raise ValueError(f"attention_impl={self.attention_impl!r}; choose from "
                             f"{attn_lib.IMPLEMENTATIONS}")

    @property
    def num_params(self) -> int:
        d, v, f, hk = self.emb_dim, self.vocab_size, self.mlp_dim, self.num_heads * self.head_dim
        enc_layer = 4 * d * hk + 3 * d * f + 2 * d
        dec_layer = 8 * d * hk + 3 * d * f + 3 * d
        relpos = 2 * self.num_heads * self.relpos_buckets
        return (2 * v * d + self.num_encoder_layers * enc_layer + self.num_decoder_layers * dec_layer
                + 2 * d + relpos)


# T5 1.1 sizes (google-research/text-to-text-transfer-transformer, "T5 1.1" checkpoints).
_T5_1_1 = dict(
    small=dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024,
               num_encoder_layers=8, num_decoder_layers=8),
    base=dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048,
              num_encoder_layers=12, num_decoder_layers=12),
    large=dict(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816,
               num_encoder_layers=24, num_decoder_layers=24),
    xl=dict(emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120,
            num_encoder_layers=24, num_decoder_layers=24),
    xxl=dict(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240,
             num_encoder_layers=24, num_decoder_layers=24),
)
SIZES: Dict[str, T5Config] = {name: T5Config(**kw) for name, kw in _T5_1_1.items()}
# Test sizes: every dimension distinct (so a transposed weight cannot pass unnoticed) and
# heads * head_dim != emb_dim.
SIZES["tiny"] = T5Config(vocab_size=32128, emb_dim=64, num_heads=4, head_dim=24, mlp_dim=96,
                         num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                         dtype="float32")
SIZES["test"] = T5Config(vocab_size=101, emb_dim=32, num_heads=4, head_dim=10, mlp_dim=48,
                         num_encoder_layers=2, num_decoder_layers=3, dropout_rate=0.0,
                         dtype="float32")
# Not a row of SIZES: the size that means "the config of the checkpoint's own weights"
# (models/from_checkpoint.gin; resolved by checkpoints.frozen_sources.checkpoint_config).
FROM_CHECKPOINT = "from_checkpoint"


def get_config(size: str, **overrides) -> T5Config:
    """The T5 1.1 config called ``size`` ('small' ... 'xxl', 'tiny', 'test') with overrides."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {sorted(SIZES)}")
    return SIZES[size].replace(**overrides)


# The layers are a Python loop, not a scan: prevent_cse=True stops XLA from merging the
# recomputation with the forward pass (which silently undoes part of the remat). Measured with
# `prompt-t5x plan` on base, full remat, while this flag was still False (docs/scaling.md):
# compiled matmul FLOPs 1.18e12 without remat, 1.37e12 with False, 1.57e12 with True.
def _remat_encoder_layer(cfg):
    if cfg.remat_policy == "none":
        return EncoderLayer
    return nn.remat(EncoderLayer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=True,
                    static_argnums=(5,))


def _remat_decoder_layer(cfg):
    if cfg.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=True,
                    static_argnums=(7, 8))


PREFIX_BIAS = ("zero", "leading")


def _self_bias(relpos, query_positions, key_count: int, prefixes, key: str, prefix_bias: str):
    """Self-attention bias ``[1, H, Q, K]``, or ``[1, H, Q, P + K]`` when the ``key`` prefix of
    length P takes 'leading' positions (queries and keys shift by P, prefix keys sit at 0..P-1;
    ``attention.attend`` pads a bias without prefix columns with zeros)."""
    if prefix_bias not in PREFIX_BIAS:
        raise ValueError(f"prefix_bias={prefix_bias!r}; choose from {PREFIX_BIAS}")
    if prefix_bias == "leading" and prefixes and prefixes.get(key) is not None:
        length = prefixes[key][0].shape[-3]          # k: [layers, (B,) P, H, Dh]
        return relpos(query_positions + length, np.arange(length + key_count))
    return relpos(query_positions, np.arange(key_count))


def _prefix_for(prefixes: Optional[Mapping[str, Tuple[Array, Array]]], key: str, layer: int):
    if not prefixes or prefixes.get(key) is None:
        return None
    k, v = prefixes[key]
    if k.ndim == 4:   # shared by the batch: [layers, P, H, Dh] -> this layer's [1, P, H, Dh]
        return k[layer][None], v[layer][None]
    return k[layer], v[layer]


class Encoder(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, mask: Array, deterministic: bool,
                 prefixes=None, deep_prompts: Optional[Array] = None,
                 prompt_positions: Optional[Array] = None, prefix_bias: str = "zero") -> Array:
        """x [B, L, D] embedded inputs (prompt included), mask [B, L] -> encoded [B, L, D].

        ``deep_prompts`` [layers, P, D] or [layers, B, P, D] replace the hidden states at the
        prompt positions (``prompt_positions`` [B, L] int, -1 where not a prompt) before every
        layer after the first (layer 0 sees the input prompt).
        """
        cfg = self.config
        length = x.shape[1]
        positions = np.arange(length)
        # [1, H, L, L]: shared by the batch; padding stays a separate key mask. (T5X masks
        # padded queries too; that changes only the outputs at padded positions, which every
        # consumer masks, and HF T5, the parity reference, masks keys only.)
        bias = _self_bias(RelativePositionBias(cfg, bidirectional=True, name="relpos_bias"),
                          positions, length, prefixes, "encoder", prefix_bias)
        key_mask = attn_lib.Mask(key_valid=mask)
        x = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
        layer_cls = _remat_encoder_layer(cfg)
        for i in range(cfg.num_encoder_layers):
            if deep_prompts is not None and i > 0:
                x = prompt_inputs.replace_prompt_positions(x, deep_prompts[i], prompt_positions)
            x = layer_cls(cfg, name=f"layers_{i}")(
                x, bias, key_mask, _prefix_for(prefixes, "encoder", i), deterministic)
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        x = RMSNorm(cfg.layer_norm_eps, dt, pdt, name="encoder_norm")(x)
        return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, y: Array, encoded: Array, decoder_valid: Optional[Array],
                 encoder_mask: Array, deterministic: bool, decode: bool = False, prefixes=None,
                 cross_kv: Optional[Tuple[Array, Array]] = None,
                 prefix_bias: str = "zero") -> Array:
        """y [B, T, D] embedded decoder inputs -> logits float32 [B, T, vocab].

        decoder_valid [B, T] (None: all valid) masks padded decoder positions as queries and keys;
        encoder_mask [B, L] the padded encoder positions. When decoding with the cache, T == 1.
        """
        cfg = self.config
        relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
        if decode and self.has_variable("cache", "position"):
            # One cached step: the query sits at `step`; keys are the whole cache, of which
            # positions <= step are filled.
            position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            step = position.value
            position.value = step + 1
            cache_len = self.variables["cache"]["layers_0"]["self_attention"]["cached_key"].shape[1]
            keys = jnp.arange(cache_len)
            self_bias = _self_bias(relpos, jnp.reshape(step, (1,)), cache_len, prefixes,
                                   "decoder_self", prefix_bias)
            self_mask = attn_lib.Mask(key_valid=(keys <= step)[None, :])
        else:
            if decode:  # the initialising call creates the step counter
                self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            positions = np.arange(y.shape[1])
            self_bias = _self_bias(relpos, positions, y.shape[1], prefixes, "decoder_self",
                                   prefix_bias)
            self_mask = attn_lib.Mask(query_valid=decoder_valid, key_valid=decoder_valid,
                                      causal=True)
        cross_mask = attn_lib.Mask(query_valid=decoder_valid, key_valid=encoder_mask)
        y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
        layer_cls = _remat_decoder_layer(cfg)
        for i in range(cfg.num_decoder_layers):
            layer_prefixes = (_prefix_for(prefixes, "decoder_self", i),
                              _prefix_for(prefixes, "decoder_cross", i))
            layer_kv = None if cross_kv is None else (cross_kv[0][i], cross_kv[1][i])
            y = layer_cls(cfg, name=f"layers_{i}")(
                y, encoded, self_bias, self_mask, cross_mask, layer_prefixes, deterministic,
                decode, layer_kv)
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        y = RMSNorm(cfg.layer_norm_eps, dt, pdt, name="decoder_norm")(y)
        y = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(y, deterministic=deterministic)
        # Untied output projection, computed in float32 as T5X does.
        logits = Kernel(cfg.vocab_size, ("embed", "vocab"), jnp.float32, pdt,
                        name="logits_dense")(y)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


class T5(nn.Module):
    """T5 1.1 encoder-decoder; the soft prompt is an input combined after the token embedding."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg, name="token_embedder")
        self.encoder = Encoder(cfg, name="encoder")
        self.decoder = Decoder(cfg, name="decoder")

    def encode(self, encoder_input_tokens: Array, prompt: Optional[Array] = None,
               prompt_mode: str = "prepend", enable_dropout: bool = False,
               prefixes=None, deep_prompts: Optional[Array] = None,
               prompt_token_id: Optional[int] = None,
               prefix_bias: str = "zero") -> Tuple[Array, Array]:
        """Tokens [B, L] (+ prompt [P, D] or [B, P, D]) -> (encoded [B, L+P, D], mask [B, L+P]).

        ``prompt_mode='template'`` (P-tuning) adds no positions: prompt row j replaces the j-th
        ``prompt_token_id`` among the tokens (``prompt_inputs.place_at_placeholders``)."""
        mask = encoder_input_tokens > 0
        x = self.token_embedder(encoder_input_tokens)
        prompt_positions = None
        if prompt is not None and prompt_mode == prompt_inputs.TEMPLATE_MODE:
            if prompt_token_id is None:
                raise ValueError("prompt_mode='template' needs the placeholder prompt_token_id")
            x, prompt_positions = prompt_inputs.place_at_placeholders(
                x, encoder_input_tokens, prompt.astype(x.dtype), prompt_token_id)
        elif prompt is not None:
            x, mask, prompt_positions = prompt_inputs.combine_prompt(
                x, mask, prompt.astype(x.dtype), prompt_mode)
        elif deep_prompts is not None:
            raise ValueError("deep_prompts need a prompt (the positions they replace)")
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        encoded = self.encoder(x, mask, not enable_dropout, prefixes=prefixes,
                               deep_prompts=deep_prompts, prompt_positions=prompt_positions,
                               prefix_bias=prefix_bias)
        return encoded, mask

    def decode(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, enable_dropout: bool = False,
               decode: bool = False, prefixes=None,
               cross_kv: Optional[Tuple[Array, Array]] = None, prefix_bias: str = "zero") -> Array:
        """encoded [B, L, D], encoder_mask [B, L], decoder_input_tokens [B, T] -> logits [B, T, V].

        Masks follow T5X: decoder keys and queries where the *target* is padding are masked (the
        decoder's first input is id 0, so input tokens cannot tell padding). With ``decode=True``
        (mutable 'cache'): the first call, over the full target length, creates the cache; each
        later call takes one token [B, 1] and attends to every cached step so far. ``cross_kv``
        (from ``cross_attention_kv``) spares re-projecting ``encoded`` at every decoding step.
        """
        y = self.token_embedder(decoder_input_tokens)
        valid = None
        if not decode and decoder_target_tokens is not None:
            valid = decoder_target_tokens > 0
        return self.decoder(y, encoded, valid, encoder_mask, not enable_dropout,
                            decode=decode, prefixes=prefixes, cross_kv=cross_kv,
                            prefix_bias=prefix_bias)

    def cross_attention_kv(self, encoded: Array) -> Tuple[Array, Array]:
        """Every decoder layer's cross-attention keys and values, each [layers, B, L, H, Dh].

        The layers' own projections (``Kernel`` + ``split_heads``) applied to their own kernels,
        once per decoded batch instead of at every step.
        """
        cfg = self.config
        decoder = nn.meta.unbox(self.variables["params"]["decoder"])
        # parent=None: a detached module, applied to each layer's kernel below.
        proj = Kernel(cfg.num_heads * cfg.head_dim, ("embed", "joined_kv"), dtype_of(cfg.dtype),
                      dtype_of(cfg.param_dtype), parent=None)
        keys, values = [], []
        for i in range(cfg.num_decoder_layers):
            attn = decoder[f"layers_{i}"]["encoder_decoder_attention"]
            keys.append(split_heads(proj.apply({"params": attn["key"]}, encoded), cfg))
            values.append(split_heads(proj.apply({"params": attn["value"]}, encoded), cfg))
        return jnp.stack(keys), jnp.stack(values)

    def __call__(self, batch: Mapping[str, Array], prompt: Optional[Array] = None,
                 prompt_mode: str = "prepend", enable_dropout: bool = False,
                 prefixes=None, deep_prompts: Optional[Array] = None,
                 prompt_token_id: Optional[int] = None,
                 prefix_bias: str = "zero") -> Array:
        """Teacher-forced logits float32 [B, T, vocab] for a SeqIO encoder-decoder batch."""
        encoded, mask = self.encode(batch["encoder_input_tokens"], prompt, prompt_mode,
                                    enable_dropout, prefixes=prefixes, deep_prompts=deep_prompts,
                                    prompt_token_id=prompt_token_id, prefix_bias=prefix_bias)
        return self.decode(encoded, mask, batch["decoder_input_tokens"],
                           batch.get("decoder_target_tokens"), enable_dropout, prefixes=prefixes,
                           prefix_bias=prefix_bias)


def dummy_batch(batch_size: int = 1, input_len: int = 4, target_len: int = 2) -> Dict[str, Array]:
    ones = lambda n: jnp.ones((batch_size, n), jnp.int32)  # noqa: E731
    return {"encoder_input_tokens": ones(input_len), "decoder_input_tokens": ones(target_len),
            "decoder_target_tokens": ones(target_len),
            "decoder_loss_weights": jnp.ones((batch_size, target_len), jnp.float32)}


def _boxed_init(config: T5Config, rng: Array) -> PyTree:
    return T5(config).init(rng, dummy_batch())["params"]


def init_params(config: T5Config, rng: Array) -> PyTree:
    """Random T5X-style initial weights (plain arrays) for ``config``."""
    return nn.meta.unbox(jax.jit(_boxed_init, static_argnums=0)(config, rng))


def param_shapes(config: T5Config) -> PyTree:
    """ShapeDtypeStruct per parameter, computed abstractly (nothing is allocated)."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(_boxed_init, config), jax.random.PRNGKey(0)))


def logical_axes(config: T5Config) -> PyTree:
    """PartitionSpec of *logical* axis names per parameter (``('embed', 'mlp')`` ...)."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, config), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)
