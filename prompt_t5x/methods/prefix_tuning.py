"""Prefix-tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation") and, as its direct-table preset, P-tuning v2's deep key/value prompts (Liu et al.,
2022, "P-Tuning v2: Prompt Tuning Can Be Comparable to Fine-tuning Universally Across Scales and
Tasks").

Every layer of each switched-on attention part gets ``P`` trainable keys and values that are
prepended to that layer's own keys/values (``T5(prefixes=...)``, see ``model/layers.Attention``):

- ``'encoder'``: encoder self-attention;
- ``'decoder_self'``: decoder self-attention (when decoding with the cache, the prefix sits
  before the cached steps: ``T5.decode`` adds it after the cache update);
- ``'decoder_cross'``: encoder-decoder attention (prefix keys before the encoder's).

Parameterisations (``reparameterization``):

- ``'direct'``: ``{part: {'key', 'value'}}`` tables ``[layers, P, heads, head_dim]``
  (P-tuning v2's default: it found the MLP's benefit task-dependent, Sec. 3.3);
- ``'mlp'``: Li & Liang's reparameterisation (Sec. 4.3): per part an embedding ``[P, emb]`` ->
  dense ``emb -> hidden`` -> tanh -> dense ``hidden -> layers * 2 * heads * head_dim``, one MLP
  per part as in their seq2seq (BART) code. The last kernel is initialised by least squares so
  that the MLP's output is the chosen initial table (exact while hidden >= P): both
  parameterisations start from the same prefix. ``export`` collapses the MLP to the direct
  table (whose method config is ``'direct'``).

Prefix dropout (``prefix_dropout``, training only, the rng given to ``logits``) drops entries of
the key/value tables, as in the reference code. Inits: ``prefix_init`` (random, zero values, the
frozen model's own keys/values of a text).

Where this differs from the papers (GPT-2/BART with learned absolute positions):

- T5 has relative position biases. By default (``prefix_bias='zero'``) prefix keys take **no**
  position bias: a prefix is content, not a position. ``prefix_bias='leading'`` gives them the
  bias of P tokens placed before the sequence (real positions shift by P), which is what
  Hugging Face T5 does with PEFT's prefix given as past key/values (the PEFT-parity setting,
  ``checkpoints/peft_prefix``). Cross-attention has no position bias either way.
- Li & Liang prefix every layer's activations of both stacks; here each part is switchable.
- ``peft_layout=True`` trains only what a Hugging Face PEFT prefix adapter can hold (decoder
  self-attention, layers j and j + L/2 sharing one table when L is even), so the run exports with
  ``prompt-t5x export RUN --format peft``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from prompt_t5x.methods import prefix_init
from prompt_t5x.methods.interface import Method, flatten_tables
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.model.t5 import T5

PARTS = prefix_init.PARTS
REPARAMETERIZATIONS = ("direct", "mlp")
# 'layers' first: Adafactor factors each layer's [P, heads*head_dim] on its own
# (training/factor_rules.py DEFAULT_FACTOR_RULES), as T5X would a per-layer matrix.
_DIRECT_AXES = PartitionSpec("layers", "prefix", "heads", "kv")
_MLP_AXES = {"embedding": PartitionSpec("prefix", "prefix_embed"),
             "hidden": {"kernel": PartitionSpec("prefix_embed", "prefix_mlp"),
                        "bias": PartitionSpec("prefix_mlp")},
             "out": {"kernel": PartitionSpec("prefix_mlp", "prefix_out"),
                     "bias": PartitionSpec("prefix_out")}}


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixTuning(Method):
    """Key/value prefixes ``[layers, P, heads, head_dim]`` per switched-on attention part."""

    kind: ClassVar[str] = "prefix_tuning"
    inputs_only: ClassVar[bool] = True
    model: T5
    prefix_length: int = 10
    parts: Tuple[str, ...] = PARTS
    reparameterization: str = "mlp"
    mlp_hidden: int = 512
    prefix_dropout: float = 0.0
    init: str = "random"
    init_scale: float = 1.0
    init_text_ids: Optional[Tuple[int, ...]] = None
    prefix_bias: str = "zero"
    peft_layout: bool = False

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        if self.init_text_ids is not None:
            object.__setattr__(self, "init_text_ids", tuple(int(i) for i in self.init_text_ids))
        if self.prefix_length < 1:
            raise ValueError(f"prefix_length must be >= 1, got {self.prefix_length}")
        if not self.parts or any(p not in PARTS for p in self.parts) or \
                len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts={list(self.parts)}: a non-empty subset of {list(PARTS)}")
        if self.reparameterization not in REPARAMETERIZATIONS:
            raise ValueError(f"reparameterization={self.reparameterization!r}; choose from "
                             f"{REPARAMETERIZATIONS}")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1, got {self.mlp_hidden}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout}")
        if self.init not in prefix_init.INITS:
            raise ValueError(f"init={self.init!r}; choose from {prefix_init.INITS}")
        if self.init == "text" and not self.init_text_ids:
            raise ValueError("prefix init 'text' needs init_text (a string)")
        if self.prefix_bias not in t5_lib.PREFIX_BIAS:
            raise ValueError(f"prefix_bias={self.prefix_bias!r}; choose from "
                             f"{t5_lib.PREFIX_BIAS}")
        if self.peft_layout and (self.parts != ("decoder_self",) or self.prefix_bias != "leading"
                                 or self.reparameterization != "direct"):
            raise ValueError("peft_layout needs parts=['decoder_self'], prefix_bias='leading' "
                             "and reparameterization='direct' (what PEFT computes)")

    def _shared_rows(self):
        """peft_layout: decoder layer j trains the table of the first layer PEFT gives the
        same key row (``checkpoints/peft_prefix.py``: j and j + L/2 for even L); -> index [L]."""
        layers = self.model.config.num_decoder_layers
        first: Dict[int, int] = {}
        rows = [first.setdefault((4 * j) % (2 * layers), len(first)) for j in range(layers)]
        return np.asarray(rows, np.int32), len(first)

    # -- what is trained ------------------------------------------------------------------
    def split(self, params):
        raise ValueError("prefix-tuning has no trainable part inside the pretrained params; "
                         "use init_trainable")

    def _out_features(self, part: str) -> int:
        cfg = self.model.config
        return prefix_init.part_layers(cfg, part) * 2 * cfg.num_heads * cfg.head_dim

    def init_trainable(self, rng, frozen):
        table_rng, mlp_rng = jax.random.split(rng)
        tables = prefix_init.initial_tables(self.init, table_rng, self.model, frozen, self.parts,
                                            self.prefix_length, self.init_scale,
                                            self.init_text_ids or ())
        if self.peft_layout:
            index, count = self._shared_rows()
            first = np.asarray([list(index).index(i) for i in range(count)])
            return {"decoder_self": {name: table[first] for name, table in
                                     zip(("key", "value"), tables["decoder_self"])}}
        if self.reparameterization == "direct":
            return {part: {"key": k, "value": v} for part, (k, v) in tables.items()}
        emb = self.model.config.emb_dim
        out = {}
        for part, part_rng in zip(self.parts, jax.random.split(mlp_rng, len(self.parts))):
            emb_rng, hidden_rng = jax.random.split(part_rng)
            embedding = jax.random.normal(emb_rng, (self.prefix_length, emb), jnp.float32)
            hidden_kernel = jax.nn.initializers.lecun_normal()(
                hidden_rng, (emb, self.mlp_hidden), jnp.float32)
            hidden = jnp.tanh(embedding @ hidden_kernel)                    # [P, hidden]
            # The last layer solves hidden @ kernel = initial table (least squares, exact when
            # hidden >= P), so the MLP starts at the chosen init like the direct table does.
            target = _to_columns(*tables[part])                            # [P, out]
            out[part] = {
                "embedding": embedding,
                "hidden": {"kernel": hidden_kernel,
                           "bias": jnp.zeros((self.mlp_hidden,), jnp.float32)},
                "out": {"kernel": jnp.linalg.pinv(hidden) @ target,
                        "bias": jnp.zeros((self._out_features(part),), jnp.float32)}}
        return out

    def prefix_tables(self, trainable) -> Dict[str, Tuple[jax.Array, jax.Array]]:
        """The model's ``prefixes`` input: {part: (key, value)} each [layers, P, H, Dh]."""
        if self.peft_layout:
            index, _ = self._shared_rows()
            table = trainable["decoder_self"]
            return {"decoder_self": (table["key"][index], table["value"][index])}
        if self.reparameterization == "direct":
            return {part: (trainable[part]["key"], trainable[part]["value"])
                    for part in self.parts}
        out = {}
        for part in self.parts:
            mlp = trainable[part]
            hidden = jnp.tanh(mlp["embedding"] @ mlp["hidden"]["kernel"] + mlp["hidden"]["bias"])
            columns = hidden @ mlp["out"]["kernel"] + mlp["out"]["bias"]  # [P, layers*2*H*Dh]
            out[part] = _from_columns(columns, prefix_init.part_layers(self.model.config, part),
                                      self.model.config)
        return out

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        return {"prefixes": self.prefix_tables(trainable), "prefix_bias": self.prefix_bias}

    def logits(self, frozen, trainable, batch, *, enable_dropout=False, rng=None):
        inputs = self.example_inputs(frozen, trainable, batch)
        rngs = {}
        if enable_dropout and rng is not None:
            model_rng, prefix_rng = jax.random.split(rng)
            rngs = {"dropout": model_rng}
            if self.prefix_dropout > 0:
                inputs["prefixes"] = _dropout(inputs["prefixes"], self.prefix_dropout, prefix_rng)
        return self.model.apply(self.variables(frozen, trainable), batch,
                                enable_dropout=enable_dropout, rngs=rngs, **inputs)

    # -- how it describes itself ----------------------------------------------------------
    def config(self):
        return {"prefix_length": self.prefix_length, "parts": list(self.parts),
                "reparameterization": self.reparameterization, "mlp_hidden": self.mlp_hidden,
                "prefix_dropout": self.prefix_dropout, "init": self.init,
                "init_scale": self.init_scale,
                "init_text_ids": None if self.init_text_ids is None else list(self.init_text_ids),
                "prefix_bias": self.prefix_bias, "peft_layout": self.peft_layout}

    @classmethod
    def from_config(cls, model: T5, config: Mapping[str, Any], *, encode=None,
                    label_words=None, **_):
        """``init_text`` (a string, first build only) becomes ``init_text_ids`` with the
        run's vocabulary (``encode``), so the config rebuilds without it."""
        config = dict(config)
        text = config.pop("init_text", None)
        if text is not None:
            if encode is None:
                raise ValueError("prefix init_text needs the run's vocabulary to encode it")
            config["init_text_ids"] = [int(i) for i in encode(text)]
            config.setdefault("init", "text")
        return cls(model, **config)

    def logical_axes(self, trainable):
        """Direct tables [layers, P, heads, head_dim] name their axes as the optimizer's factor
        rules expect; the MLP's have own names. The train state keeps prefixes replicated."""
        if self.reparameterization == "direct":
            return {part: {"key": _DIRECT_AXES, "value": _DIRECT_AXES} for part in self.parts}
        return {part: _MLP_AXES for part in self.parts}

    def export(self, trainable):
        """The direct table (the MLP collapsed), run by the 'direct' method."""
        tables = self.prefix_tables(trainable)
        direct = {part: {"key": k, "value": v} for part, (k, v) in tables.items()}
        config = {**self.method_config(), "reparameterization": "direct", "prefix_dropout": 0.0,
                  "peft_layout": False}
        return flatten_tables(direct), config


def _to_columns(key: jax.Array, value: jax.Array) -> jax.Array:
    """key, value [layers, P, H, Dh] -> [P, layers * 2 * H * Dh] in the MLP's output order
    (layer, key|value, head, head_dim); the inverse of :func:`_from_columns`."""
    stacked = jnp.stack([key, value])                          # [2, layers, P, H, Dh]
    return jnp.transpose(stacked, (2, 1, 0, 3, 4)).reshape(key.shape[1], -1)


def _from_columns(columns: jax.Array, layers: int, cfg) -> Tuple[jax.Array, jax.Array]:
    """[P, layers * 2 * H * Dh] -> key, value each [layers, P, H, Dh]."""
    split = columns.reshape(columns.shape[0], layers, 2, cfg.num_heads, cfg.head_dim)
    split = jnp.transpose(split, (2, 1, 0, 3, 4))              # [2, layers, P, H, Dh]
    return split[0], split[1]


def _dropout(prefixes: Dict[str, Sequence[jax.Array]], rate: float, rng: jax.Array):
    out = {}
    for part, part_rng in zip(sorted(prefixes), jax.random.split(rng, len(prefixes))):
        kept = []
        for table, table_rng in zip(prefixes[part], jax.random.split(part_rng, 2)):
            keep = jax.random.bernoulli(table_rng, 1.0 - rate, table.shape)
            kept.append(jnp.where(keep, table / (1.0 - rate), 0.0))
        out[part] = tuple(kept)
    return out
