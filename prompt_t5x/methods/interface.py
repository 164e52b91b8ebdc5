"""The ``Method`` interface: which parameters are trainable and how they enter the frozen T5.

A method splits the model's parameters into a *frozen* tree (never differentiated, never in the
optimizer) and a *trainable* tree, and knows how to run the model with both. The train step,
checkpoints, evaluation, decoding and sharding only talk to this interface, so prefix-tuning,
P-tuning v2, instance-wise prompts etc. are new modules of this wing, not new train steps.

Besides running the model, a method describes itself so that a run directory or an exported file
is enough to rebuild it (``prompt_t5x.methods.registry``):

- ``kind`` names it (the registry key and the gin configurable ``methods.<kind>``);
- ``config()`` is the JSON of its settings and ``from_config(model, config)`` rebuilds it
  (init-only settings such as a prompt initialiser are not part of it: they do not change what
  the trained state computes);
- ``export(trainable)`` gives the inference form: flat named tables plus the config of the method
  that runs them (e.g. prefix-tuning's MLP collapses to the direct key/value table);
- ``logical_axes(trainable)`` names every trainable axis (the rules keep them replicated); the
  names also choose Adafactor's factoring (``prompt_t5x.training.factor_rules``: a leading
  ``'layers'`` axis is factored per layer);
- ``prompt_positions`` is how many positions the method adds to every encoder input, which the
  data pipeline subtracts from the input length.

Per-example inputs. ``example_inputs(frozen, trainable, features)`` is what every caller (the
train step through ``logits``, validation, rank classification, decoding) passes to the model for
one batch. ``features`` holds the batch's ``encoder_input_tokens`` [B, L] and, in a mixed-task
batch, ``task_ids`` [B] (``TASK_IDS``: built by the data bridge from each example's task, never a
Python loop). The default ignores them (``model_inputs(trainable)``: one prompt for the whole
batch); a task bank gathers each example's task state, and instance-wise methods (IDPG, IPT,
SPT) compute each example's prompt from its own tokens. Per-example inputs carry the batch axis
(prompt [B, P, D], deep prompts [layers, B, P, D], prefixes [layers, B, P, H, Dh]); callers that
replicate rows (beams, rank classification's labels) repeat them with
``prompt_inputs.repeat_examples``.

Two hooks let a method change what is optimised and how classes are predicted without a new
train step (every method goes through them; the defaults are the language model's):

- ``loss_sums`` is the train step's and validation's loss: by default the teacher-forced
  cross entropy of ``logits`` (``methods.token_loss``);
- ``label_scores`` scores a task's C labels itself (e.g. a classification head); by default it
  returns None and rank classification scores each label word's likelihood under the LM.
"""

from __future__ import annotations

from typing import Any, ClassVar, Dict, Mapping, Optional, Tuple

import jax
import numpy as np
from jax.sharding import PartitionSpec

from prompt_t5x.methods import token_loss
from prompt_t5x.model.t5 import T5

PyTree = Any
# The batch feature that routes every example to its task's state: int32 [B].
TASK_IDS = "task_ids"
# Separator of the flat table names of ``export`` ('prefixes/encoder/key').
TABLE_SEP = "/"


def count_parameters(tree: PyTree) -> int:
    """How many numbers a tree of arrays (or ShapeDtypeStructs) holds."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def flatten_tables(tree: PyTree) -> Dict[str, np.ndarray]:
    """Nested dict of arrays -> {'a/b/c': float32 numpy array} (the export's table names)."""
    out: Dict[str, np.ndarray] = {}

    def walk(prefix, node):
        if isinstance(node, Mapping):
            for key in sorted(node):
                walk(f"{prefix}{TABLE_SEP}{key}" if prefix else str(key), node[key])
        else:
            out[prefix] = np.asarray(jax.device_get(node), np.float32)
    walk("", tree)
    return out


def unflatten_tables(tables: Mapping[str, Any]) -> Dict[str, Any]:
    """Inverse of :func:`flatten_tables`."""
    out: Dict[str, Any] = {}
    for name, value in tables.items():
        node = out
        *parents, leaf = name.split(TABLE_SEP)
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


class Method:
    """Interface; see the module docstring."""

    kind: ClassVar[str] = ""
    # True when the trainable state enters the model only through ``model_inputs`` (the frozen
    # variables are the T5's own): such a method's state can be stacked per task and gathered
    # per example (``methods.task_bank``).
    inputs_only: ClassVar[bool] = False
    model: T5

    # -- what is trained ------------------------------------------------------------------
    def split(self, params: PyTree) -> Tuple[PyTree, PyTree]:
        """Pretrained params -> (frozen, initial trainable) without random init."""
        raise NotImplementedError

    def init_trainable(self, rng: jax.Array, frozen: PyTree) -> PyTree:
        raise NotImplementedError

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen: PyTree, trainable: PyTree) -> Dict[str, PyTree]:
        raise NotImplementedError

    def model_inputs(self, trainable: PyTree) -> Dict[str, Any]:
        """Extra keyword inputs of ``T5.__call__`` / ``T5.encode`` (e.g. the prompt)."""
        return {}

    def example_inputs(self, frozen: PyTree, trainable: PyTree,
                       features: Mapping[str, jax.Array]) -> Dict[str, Any]:
        """Model inputs for one batch (module docstring): ``features`` has
        ``encoder_input_tokens`` int32 [B, L] and, for a mixed-task batch, ``task_ids`` int32
        [B]. Default: ``model_inputs(trainable)``, the same for every example."""
        return self.model_inputs(trainable)

    def logits(self, frozen: PyTree, trainable: PyTree, batch: Mapping[str, jax.Array], *,
               enable_dropout: bool = False, rng: Optional[jax.Array] = None) -> jax.Array:
        """Teacher-forced logits float32 [B, T, V]."""
        rngs = {"dropout": rng} if (enable_dropout and rng is not None) else {}
        return self.model.apply(self.variables(frozen, trainable), batch,
                                enable_dropout=enable_dropout, rngs=rngs,
                                **self.example_inputs(frozen, trainable, batch))

    def loss_sums(self, frozen: PyTree, trainable: PyTree, batch: Mapping[str, jax.Array], *,
                  enable_dropout: bool = False, rng: Optional[jax.Array] = None,
                  z_loss: float = 0.0) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(loss sum, z-loss sum, correct count, weight) of a batch; the train step optimises
        ``(loss + z) / weight``. Default: the LM cross entropy over the target tokens."""
        logits = self.logits(frozen, trainable, batch, enable_dropout=enable_dropout, rng=rng)
        return token_loss.cross_entropy_sums(logits, batch["decoder_target_tokens"],
                                             token_loss.loss_weights(batch), z_loss)

    def label_scores(self, frozen: PyTree, trainable: PyTree, encoder_input_tokens: jax.Array,
                     num_labels: int) -> Optional[jax.Array]:
        """Scores [B, C] of the task's labels (in its label order) when the method classifies
        by itself; None (the default): rank classification scores the label words under the
        LM (``inference.rank_classification``)."""
        return None

    @property
    def prompt_positions(self) -> int:
        """Positions added to every encoder input (the data cuts inputs by this many)."""
        return 0

    # -- how it describes itself ----------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """JSON settings that ``from_config`` rebuilds this method from (without ``kind``)."""
        return {}

    def method_config(self) -> Dict[str, Any]:
        """``{'kind': ..., **config()}``: what a manifest or an exported file records."""
        return {"kind": self.kind, **self.config()}

    @classmethod
    def from_config(cls, model: T5, config: Mapping[str, Any], **build_context) -> "Method":
        """Rebuild from ``config()``. ``build_context`` (e.g. ``encode``, ``label_words``) is
        what some initialisers need when a *new* run builds the method; rebuilding a trained
        one never needs it."""
        return cls(model, **dict(config))

    def logical_axes(self, trainable: PyTree) -> PyTree:
        """Logical axis names (``PartitionSpec``) of every trainable leaf; unnamed by default."""
        return jax.tree_util.tree_map(lambda x: PartitionSpec(*([None] * np.ndim(x))), trainable)

    def export(self, trainable: PyTree) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
        """(flat tables of the inference form, its ``method_config``); by default the trainable
        tree itself, run by this very method."""
        return flatten_tables(trainable), self.method_config()

    def num_trainable(self, trainable: PyTree) -> int:
        return count_parameters(trainable)
