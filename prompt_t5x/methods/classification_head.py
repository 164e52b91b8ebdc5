"""A linear classification head on the prompted encoder, instead of a verbalizer.

P-tuning v2 (Liu et al., 2022, "P-Tuning v2", section 3, "Classification Head") trains a
randomly initialised linear head on top of the prompted model rather than predicting label
words with the language-model head. This wrapper adds such a head around any prompt-type
method (``prompt_tuning``, ``deep_prompts``, ...): the inner method's parameters and the head
train together; the T5 stays frozen.

    encoded [B, L+P, D], mask [B, L+P]   (T5.encode with the inner method's inputs)
    pooled  [B, D]  = mean of encoded over the mask's valid positions
    logits  [B, C]  = pooled @ kernel [D, C] + bias [C]

Where our T5 version differs from the paper: a T5 encoder has no [CLS] token, so the head reads
the *mean* over valid positions; the prompt positions are valid in the encoder mask and are
included (they are the states the method trains, and T5 has no other pooled summary). Only the
encoder runs: the decoder is not used at all.

Training (``loss_sums``): cross entropy over the C classes (plus the z-loss on the class softmax).
An example's class is the label whose tokens (+ EOS) equal its ``decoder_target_tokens``; the
task's labels are encoded once, at the first build, with the run's vocabulary, and kept in the
config so a rebuilt method needs no vocabulary. An example whose target is no label gets weight 0.
The train step's ``token_accuracy`` is then the accuracy over examples.

Prediction: ``label_scores`` (log-softmax of the class logits, in label order) is what rank
classification, validation and ``eval``/``infer`` use, so argmax = the predicted label. Decoding
text is refused with a one-line ``UsageError`` (``model_inputs``): the LM head was never trained
to say anything; eval/infer pick rank mode for tasks with label words. Keep
``train.rank_classification`` on (the default) when training a head: with it off, validation
would decode and the run would stop at its first validation with that one line.

``logits`` (the contract's teacher-forced [B, T, V]) are the inner method's LM logits: the head
leaves the LM untouched. The inference form is the head around the inner method's inference form.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from prompt_t5x.base.errors import UsageError
from prompt_t5x.methods import registry, token_loss
from prompt_t5x.methods.interface import TABLE_SEP, Method, flatten_tables
from prompt_t5x.model.t5 import T5

EOS_ID = 1
# Inner-method inputs that T5.encode takes (a decoder-only input would not reach the head).
_ENCODE_ARGS = frozenset(inspect.signature(T5.encode).parameters) - {"self"}


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationHead(Method):
    """Mean-pool + linear head around ``inner`` (see module docstring)."""

    kind: ClassVar[str] = "classification_head"
    inner: Method
    labels: Tuple[str, ...]
    label_tokens: Tuple[Tuple[int, ...], ...]   # each label's token ids, without EOS

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(str(w) for w in self.labels))
        object.__setattr__(self, "label_tokens",
                           tuple(tuple(int(i) for i in ids) for ids in self.label_tokens))
        if len(self.labels) < 2 or len(self.labels) != len(self.label_tokens):
            raise UsageError(f"classification_head needs >= 2 labels with one token list each; "
                             f"got labels {list(self.labels)}")
        if len(set(self.label_tokens)) != len(self.label_tokens):
            raise UsageError(f"classification_head: labels {list(self.labels)} do not encode to "
                             "distinct token sequences")
        if self.inner.kind in ("model_tuning", self.kind):
            raise UsageError(f"classification_head wraps a prompt-type method, not "
                             f"{self.inner.kind!r}")
        parts = getattr(self.inner, "parts", None)
        if parts is not None and "encoder" not in parts:
            # The head reads the encoder only: decoder-side prefixes would never be trained.
            raise UsageError(f"classification_head reads the encoder, but the inner "
                             f"{self.inner.kind} has no encoder part (parts={list(parts)})")

    @property
    def model(self) -> T5:
        return self.inner.model

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    # -- what is trained ------------------------------------------------------------------
    def init_trainable(self, rng, frozen):
        inner_rng, head_rng = jax.random.split(rng)
        dim = self.model.config.emb_dim
        # Unit-variance class logits for unit-scale pooled features (T5's final RMS norm).
        kernel = jax.random.normal(head_rng, (dim, self.num_classes), jnp.float32) / np.sqrt(dim)
        return {"inner": self.inner.init_trainable(inner_rng, frozen),
                "head": {"kernel": kernel, "bias": jnp.zeros((self.num_classes,), jnp.float32)}}

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen, trainable):
        return self.inner.variables(frozen, trainable["inner"])

    def model_inputs(self, trainable):
        raise UsageError("classification_head predicts a label with its head, not by decoding "
                         "text: use rank mode (mode='rank', the default for labelled tasks)")

    def logits(self, frozen, trainable, batch, *, enable_dropout=False, rng=None):
        return self.inner.logits(frozen, trainable["inner"], batch,
                                 enable_dropout=enable_dropout, rng=rng)

    def pooled(self, frozen, trainable, encoder_input_tokens, *, enable_dropout=False,
               rng=None) -> jax.Array:
        """Mean of the prompted encoder output over valid positions: [B, L] -> [B, D]."""
        inputs = self.inner.example_inputs(frozen, trainable["inner"],
                                           {"encoder_input_tokens": encoder_input_tokens})
        unknown = set(inputs) - _ENCODE_ARGS
        if unknown:
            raise ValueError(f"classification_head: inner inputs {sorted(unknown)} do not "
                             "reach T5.encode")
        rngs = {"dropout": rng} if (enable_dropout and rng is not None) else {}
        encoded, mask = self.model.apply(self.variables(frozen, trainable), encoder_input_tokens,
                                         method=T5.encode, enable_dropout=enable_dropout,
                                         rngs=rngs, **inputs)
        mask = mask.astype(jnp.float32)[..., None]
        total = jnp.sum(encoded.astype(jnp.float32) * mask, axis=1)
        return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)

    def class_logits(self, frozen, trainable, encoder_input_tokens, *, enable_dropout=False,
                     rng=None) -> jax.Array:
        """[B, L] -> class logits [B, C] (float32)."""
        pooled = self.pooled(frozen, trainable, encoder_input_tokens,
                             enable_dropout=enable_dropout, rng=rng)
        head = trainable["head"]
        return pooled @ head["kernel"].astype(jnp.float32) + head["bias"].astype(jnp.float32)

    def label_table(self, targets_length: int) -> np.ndarray:
        """[C, T] int32: each label's tokens + EOS, zero padded; -1 rows for labels longer than
        ``T`` (no target of that length can equal them)."""
        table = np.zeros((self.num_classes, targets_length), np.int32)
        for c, ids in enumerate(self.label_tokens):
            ids = list(ids) + [EOS_ID]
            if len(ids) > targets_length:
                table[c] = -1
            else:
                table[c, :len(ids)] = ids
        return table

    def class_targets(self, batch) -> Tuple[jax.Array, jax.Array]:
        """(class index [B] int32, weight [B] float32: 1 where the target is one of the labels
        and the row carries loss weight)."""
        targets = batch["decoder_target_tokens"]
        table = self.label_table(targets.shape[1])
        match = jnp.all(targets[:, None, :] == table[None], axis=-1)           # [B, C]
        live = jnp.any(token_loss.loss_weights(batch) > 0, axis=-1)
        weight = (jnp.any(match, axis=-1) & live).astype(jnp.float32)
        return jnp.argmax(match, axis=-1).astype(jnp.int32), weight

    def loss_sums(self, frozen, trainable, batch, *, enable_dropout=False, rng=None,
                  z_loss=0.0):
        logits = self.class_logits(frozen, trainable, batch["encoder_input_tokens"],
                                   enable_dropout=enable_dropout, rng=rng)
        classes, weight = self.class_targets(batch)
        # One "token" per example: the LM loss's own sums over [B, 1, C].
        return token_loss.cross_entropy_sums(logits[:, None], classes[:, None], weight[:, None],
                                             z_loss)

    def label_scores(self, frozen, trainable, encoder_input_tokens, num_labels):
        if num_labels != self.num_classes:
            raise UsageError(f"the classification head was trained on {self.num_classes} labels "
                             f"{list(self.labels)}; this task has {num_labels}")
        return jax.nn.log_softmax(self.class_logits(frozen, trainable, encoder_input_tokens))

    @property
    def prompt_positions(self) -> int:
        return self.inner.prompt_positions

    # -- how it describes itself ----------------------------------------------------------
    def config(self):
        return {"inner": self.inner.method_config(), "labels": list(self.labels),
                "label_tokens": [list(ids) for ids in self.label_tokens]}

    @classmethod
    def from_config(cls, model: T5, config: Mapping[str, Any], *,
                    label_words: Optional[Sequence[str]] = None, encode=None,
                    **unused_context) -> "ClassificationHead":
        """``inner``: a method config, or (first build, from gin) a ``MethodSpec`` to build;
        ``labels`` default to the task's label words, ``label_tokens`` to their encoding."""
        config = dict(config)
        inner = config.pop("inner")
        labels = config.pop("labels", None) or label_words
        label_tokens = config.pop("label_tokens", None)
        if config:
            raise TypeError(f"unknown settings {sorted(config)}")
        if hasattr(inner, "build"):       # a gin MethodSpec (commands.configurables)
            inner = inner.build(model, label_words, encode)
        else:
            inner = registry.build(model, inner, label_words=label_words, encode=encode)
        if not labels:
            raise UsageError("classification_head needs a classification task (one with label "
                             "words) or methods.classification_head.labels")
        if label_tokens is None:
            if encode is None:
                raise UsageError("classification_head: no vocabulary to encode the labels with")
            label_tokens = [list(encode(str(w))) for w in labels]
        return cls(inner, tuple(labels), tuple(tuple(ids) for ids in label_tokens))

    def logical_axes(self, trainable):
        return {"inner": self.inner.logical_axes(trainable["inner"]),
                "head": {"kernel": PartitionSpec(None, None), "bias": PartitionSpec(None)}}

    def export(self, trainable):
        inner_tables, inner_config = self.inner.export(trainable["inner"])
        tables = {f"inner{TABLE_SEP}{k}": v for k, v in inner_tables.items()}
        tables.update(flatten_tables({"head": trainable["head"]}))
        return tables, {"kind": self.kind, **self.config(), "inner": inner_config}

    def split(self, params):
        raise ValueError("classification_head has no trainable part inside the pretrained "
                         "params; use init_trainable")

