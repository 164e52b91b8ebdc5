"""IPT: instance-wise prompt tuning (Jiang et al., 2022, "Instance-wise Prompt Tuning for
Pretrained Language Models", arXiv:2206.01958).

Prompt tuning gives every example of a task the same prompt; IPT adds an *instance* part computed
from the example's own input, so the frozen model is queried with task knowledge plus knowledge of
this very input. The paper proposes several strategies that trade quality for cost; here
(setting ``instance``), all on a frozen T5 1.1:

- ``'lookup'``: instance prompt row j is a trainable table's row for the input's j-th token id;
- ``'mlp'``, ``'bilstm'``, ``'cnn'``: an encoder of the input's frozen token embeddings
  generates the whole instance prompt (:class:`InstanceEncoder`): ``'mlp'`` mean-pools the
  valid tokens, then Dense(hidden) -> tanh; ``'bilstm'`` runs a bidirectional LSTM
  (``hidden // 2`` units per direction) over the valid tokens and mean-pools it; ``'cnn'`` a
  width-3 convolution with ReLU, max-pooled over the valid tokens. A linear head maps the
  summary [B, hidden] to the instance prompt [B, P_inst * D];
- ``'prefix'``: the deep (prefix) form: trainable key/value prefixes ``[layers, P, H, Dh]`` in
  the attention parts ``parts``, and an MLP instance embedding of the input, times
  ``instance_scale``, added to layer 0's keys and values only (per-example prefixes
  ``[layers, B, P, H, Dh]``; the other layers' rows are the plain tables).

The prompt variants pass ``prompt`` [B, P_task + P_inst, D] to the model: the task prompt
``[P_task, D]`` (sampled-vocabulary init, as prompt tuning) followed by the instance prompt
``[B, P_inst, D]``, placed by ``prompt_mode``. Every caller goes through ``example_inputs``
(training, validation, rank classification, decoding; beams and labels repeat the rows), so
``model_inputs`` alone refuses.

The look-up table. A trainable copy of the whole vocabulary's embedding (32128 x 768 = 24.7M
numbers on T5 1.1 base, 10% of the model) would break the paper's parameter claim. The table has
``lookup_rows`` = N rows, initialised from the frozen embedding's first N rows, and token id t
reads row ``t mod N``. T5's SentencePiece ids are ordered roughly by frequency, so the common
tokens (ids < N) start as their own embedding and train their own row; rarer ids share a row
with a frequent one (a deterministic hash bucket). Parameters: N * D.

Where we differ from the paper: its experiments are not on T5; here the prompt enters the T5
encoder and the answer is the decoder's text. The instance encoders read the frozen *input
embeddings* under ``stop_gradient`` (never the T5 stack: no second encoder pass, and the frozen
table is never differentiated); the instance part's sizes (``hidden``, ``lookup_rows``), the
hashed table and the pooling choices are ours. The prefix variant
generates its layer-0 addition with the MLP encoder, one linear head per prefix part.

Trainable parameters as a share of the frozen model (``tests/test_ipt.py`` recomputes every
cell with ``jax.eval_shape``). T5 1.1 base at the defaults (task_length 10, instance_length 4,
hidden 128, lookup_rows 2048, prefix parts ['encoder']); the 'test' T5 at the test file's
settings (task_length 3, instance_length 2, hidden 12, lookup_rows 64):

========  =======================  ===========================
instance  'test' T5 (71,200)       T5 1.1 base (247,577,856)
========  =======================  ===========================
lookup    2,144 (3.01%)            1,580,544 (0.638%)
mlp       1,324 (1.86%)            502,400 (0.203%)
bilstm    2,800 (3.93%)            830,464 (0.335%)
cnn       2,092 (2.94%)            699,008 (0.282%)
prefix    3,996 (5.61%)            2,264,192 (0.915%)
========  =======================  ===========================

The paper reports 0.5%-1.5% on its (encoder-only) models. The encoders' output head
(hidden * P_inst * D) dominates their count: ``hidden=512`` puts 'mlp' on base at about 0.8%.
The 'test' T5 is tiny, so any fixed-size part is a large share of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prompt_t5x.methods import prefix_init
from prompt_t5x.methods.interface import Method
from prompt_t5x.methods.prompt_init import sampled_vocab_init
from prompt_t5x.methods.sentence_repr import masked_mean
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.model.t5 import T5

INSTANCES = ("lookup", "mlp", "bilstm", "cnn", "prefix")
ENCODERS = ("mlp", "bilstm", "cnn")   # the instance encoders (InstanceEncoder)
# Adafactor factors each prefix layer's [P, H * Dh] on its own (as prefix_tuning's tables).
_PREFIX_AXES = PartitionSpec("layers", "prefix", "heads", "kv")


# ------------------------------------------------------------------- the instance part ----
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

@dataclasses.dataclass(frozen=True, eq=False)
class IPT(Method):
    """Task prompt plus an instance part per example (module docstring)."""

    kind: ClassVar[str] = "ipt"
    model: T5
    instance: str = "mlp"
    task_length: int = 10           # P_task (the prefix length for instance='prefix')
    instance_length: int = 4        # P_inst (prompt variants)
    hidden: int = 128               # the instance encoders' summary width
    lookup_rows: int = 2048         # N of the look-up table
    prompt_mode: str = "prepend"
    parts: Tuple[str, ...] = ("encoder",)   # instance='prefix': the prefixed attentions
    instance_scale: float = 0.1     # instance='prefix': weight of the layer-0 addition
    prefix_bias: str = "zero"
    population: int = 5000          # init only: task prompt rows sampled from the first N ids

    def __post_init__(self):
        object.__setattr__(self, "parts", tuple(self.parts))
        if self.instance not in INSTANCES:
            raise ValueError(f"instance={self.instance!r}; choose from {INSTANCES}")
        for name in ("task_length", "instance_length", "population"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden < 2 or (self.instance == "bilstm" and self.hidden % 2):
            raise ValueError(f"hidden must be >= 2 (and even for 'bilstm': two directions), "
                             f"got {self.hidden}")
        vocab = self.model.config.vocab_size
        if self.instance == "lookup" and not 1 <= self.lookup_rows <= vocab:
            raise ValueError(f"lookup_rows={self.lookup_rows}: between 1 and the model's "
                             f"{vocab} vocabulary rows (they initialise the table)")
        if self.prompt_mode not in prompt_inputs.COMBINE_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}; choose from "
                             f"{prompt_inputs.COMBINE_MODES}")
        if not self.parts or any(p not in prefix_init.PARTS for p in self.parts) or \
                len(set(self.parts)) != len(self.parts):
            raise ValueError(f"parts={list(self.parts)}: a non-empty subset of "
                             f"{list(prefix_init.PARTS)}")
        if not self.instance_scale > 0:
            raise ValueError(f"instance_scale must be > 0, got {self.instance_scale}")
        if self.prefix_bias not in t5_lib.PREFIX_BIAS:
            raise ValueError(f"prefix_bias={self.prefix_bias!r}; choose from "
                             f"{t5_lib.PREFIX_BIAS}")

    # -- shapes ---------------------------------------------------------------------------
    def _kv_features(self) -> int:
        """One prefix position's key and value: 2 * H * Dh."""
        return 2 * self.model.config.num_heads * self.model.config.head_dim

    def _encoder(self) -> InstanceEncoder:
        if self.instance == "prefix":
            outputs = tuple((part, self.task_length * self._kv_features()) for part in self.parts)
            return InstanceEncoder("mlp", self.hidden, outputs)
        outputs = (("prompt", self.instance_length * self.model.config.emb_dim),)
        return InstanceEncoder(self.instance, self.hidden, outputs)

    # -- what is trained ------------------------------------------------------------------
    def split(self, params):
        raise ValueError("IPT has no trainable part inside the pretrained params; "
                         "use init_trainable")

    def init_trainable(self, rng, frozen):
        task_rng, encoder_rng = jax.random.split(rng)
        dim = self.model.config.emb_dim
        out: Dict[str, Any] = {}
        if self.instance == "prefix":
            tables = prefix_init.random_tables(task_rng, self.model.config, self.parts,
                                               self.task_length, 1.0, zero_values=False)
            out["prefixes"] = {part: {"key": k, "value": v} for part, (k, v) in tables.items()}
        else:
            out["task_prompt"] = jnp.asarray(sampled_vocab_init(self.population)(
                task_rng, frozen, self.task_length, dim), jnp.float32)
        if self.instance == "lookup":
            # The frozen embedding's first N rows: ids < N start as their own embedding.
            embedding = frozen["token_embedder"]["embedding"]
            out["lookup"] = jnp.asarray(embedding[:self.lookup_rows], jnp.float32)
        else:
            x = jnp.zeros((1, 2, dim), jnp.float32)
            out["encoder"] = self._encoder().init(encoder_rng, x, jnp.ones((1, 2), bool))["params"]
        return out

    # -- the instance part ----------------------------------------------------------------
    def instance_features(self, frozen, trainable, tokens: jax.Array):
        """Prompt variants: the instance prompt float32 [B, P_inst, D]. 'prefix': {part:
        (key, value)} layer-0 additions, each [B, P, H, Dh] (already times instance_scale)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        batch = tokens.shape[0]
        if self.instance == "lookup":
            return lookup_prompt(trainable["lookup"], tokens, self.instance_length)
        x, mask = frozen_token_embeddings(frozen, tokens)
        heads = self._encoder().apply({"params": trainable["encoder"]}, x, mask)
        if self.instance != "prefix":
            return heads["prompt"].reshape(batch, self.instance_length, -1)
        cfg = self.model.config
        out = {}
        for part in self.parts:
            kv = self.instance_scale * heads[part].reshape(
                batch, self.task_length, 2, cfg.num_heads, cfg.head_dim)
            out[part] = (kv[:, :, 0], kv[:, :, 1])
        return out

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        raise ValueError("IPT computes every example's prompt from its own tokens: its inputs "
                         "need the batch's encoder_input_tokens (example_inputs), which this "
                         "call lacks")

    def example_inputs(self, frozen, trainable, features: Mapping[str, jax.Array]
                       ) -> Dict[str, Any]:
        tokens = jnp.asarray(features["encoder_input_tokens"], jnp.int32)
        batch = tokens.shape[0]
        instance = self.instance_features(frozen, trainable, tokens)
        if self.instance != "prefix":
            task = jnp.broadcast_to(trainable["task_prompt"],
                                    (batch,) + trainable["task_prompt"].shape)
            return {"prompt": jnp.concatenate([task, instance.astype(task.dtype)], axis=1),
                    "prompt_mode": self.prompt_mode}
        prefixes = {}
        for part in self.parts:
            pair = []
            for table, add in zip((trainable["prefixes"][part]["key"],
                                   trainable["prefixes"][part]["value"]), instance[part]):
                layers = jnp.broadcast_to(table[:, None], (table.shape[0], batch)
                                          + table.shape[1:])          # [layers, B, P, H, Dh]
                pair.append(layers.at[0].add(add.astype(layers.dtype)))
            prefixes[part] = tuple(pair)
        return {"prefixes": prefixes, "prefix_bias": self.prefix_bias}

    @property
    def prompt_positions(self) -> int:
        return 0 if self.instance == "prefix" else self.task_length + self.instance_length

    # -- how it describes itself ----------------------------------------------------------
    def config(self):
        return {"instance": self.instance, "task_length": self.task_length,
                "instance_length": self.instance_length, "hidden": self.hidden,
                "lookup_rows": self.lookup_rows, "prompt_mode": self.prompt_mode,
                "parts": list(self.parts), "instance_scale": self.instance_scale,
                "prefix_bias": self.prefix_bias}

    def logical_axes(self, trainable):
        axes = jax.tree_util.tree_map(lambda x: PartitionSpec(*([None] * x.ndim)), trainable)
        if "task_prompt" in trainable:
            axes["task_prompt"] = PartitionSpec("prompt", "prompt_embed")
        if "lookup" in trainable:
            axes["lookup"] = PartitionSpec(None, "prompt_embed")
        if "prefixes" in trainable:
            axes["prefixes"] = {part: {"key": _PREFIX_AXES, "value": _PREFIX_AXES}
                                for part in trainable["prefixes"]}
        return axes
