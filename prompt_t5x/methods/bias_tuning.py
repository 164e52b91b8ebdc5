"""Bias tuning with null prompts (Logan IV et al., 2022, "Cutting Down on Prompts and Parameters:
Simple Few-Shot Learning with Language Models"), i.e. BitFit (Ben Zaken et al., 2022) on T5 1.1.

BitFit trains only a model's bias terms; Logan IV et al. pair it with *null prompts* (the task's
fields joined with no template words and no task name: the ``null_<task>`` SeqIO variants, see
``tasks/families.py``) and find the two together close to full fine-tuning in the few-shot regime
while training about 0.1% of the parameters.

Where our T5 version differs: T5 1.1 has no biases at all (and its RMSNorm has no shift), so
there is nothing to "unfreeze". This method *adds* zero-initialised biases to the chosen dense
outputs (``query``/``value``/``out`` of every attention, ``wi_0``/``wi_1``/``wo`` of every MLP;
``key`` on request only, see ``DEFAULT_BIASES``; the untied ``logits_dense`` is left alone)
and, optionally, trains every RMSNorm ``scale`` as a zero-initialised delta on the frozen one
(BitFit trains LayerNorm's *shift*, a bias; RMSNorm has no shift, so its scale is the nearest
per-feature term to train, and an option). At step 0 the model computes exactly the pretrained
function.

Trainable tree: the frozen tree's own paths, one leaf per chosen dense / norm, e.g.
``encoder/layers_0/attention/query/bias`` [heads*head_dim] or
``decoder/decoder_norm/scale_delta`` [embed]. ``variables`` overlays it onto the frozen tree as
a new dict structure that shares the frozen leaves (the frozen tree object is never modified);
``Kernel`` and ``RMSNorm`` add a ``bias`` / ``scale_delta`` only when one is present
(``prompt_t5x.model.layers``), so a plain T5 neither creates nor computes them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prompt_t5x.methods.interface import Method
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.model.t5 import T5

# The dense layers that can get a bias (T5X names of the projection modules).
BIAS_TARGETS = ("query", "key", "value", "out", "wi_0", "wi_1", "wo")
# The default leaves out ``key``: a key bias adds q.b to every logit of a query alike, which the
# softmax ignores, so it can never change the model (BitFit's BERT has one all the same).
DEFAULT_BIASES = ("query", "value", "out", "wi_0", "wi_1", "wo")
BIAS = "bias"
SCALE_DELTA = "scale_delta"


@functools.lru_cache(maxsize=8)
def _targets(config: t5_lib.T5Config) -> Tuple[Tuple[Tuple[str, ...], str, int, str], ...]:
    """Every (module path, 'kernel' | 'scale', output size, output logical axis) of the T5."""
    shapes = t5_lib.param_shapes(config)
    axes = t5_lib.logical_axes(config)
    found = []

    def walk(path, node, names):
        for key in sorted(node):
            if isinstance(node[key], Mapping):
                walk(path + (key,), node[key], names[key])
            elif key in ("kernel", "scale"):
                found.append((path, key, int(node[key].shape[-1]), names[key][-1]))
    walk((), shapes, axes)
    return tuple(found)


def _overlay(frozen: Mapping[str, Any], small: Mapping[str, Any]) -> Dict[str, Any]:
    """A new nested dict: ``frozen``'s leaves (shared, not copied) plus ``small``'s."""
    out = dict(frozen)
    for key, value in small.items():
        if isinstance(value, Mapping):
            out[key] = _overlay(frozen[key], value)
        elif key in out:
            raise ValueError(f"bias tuning would overwrite the frozen parameter {key!r}")
        else:
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class BiasTuning(Method):
    """Zero-initialised biases on the chosen dense outputs (+ RMSNorm scale deltas); T5 frozen."""

    kind: ClassVar[str] = "bias_tuning"
    model: T5
    biases: Tuple[str, ...] = DEFAULT_BIASES
    norm_scales: bool = True

    def __post_init__(self):
        object.__setattr__(self, "biases", tuple(self.biases))
        unknown = sorted(set(self.biases) - set(BIAS_TARGETS))
        if unknown:
            raise ValueError(f"bias_tuning: unknown biases {unknown}; choose from "
                             f"{', '.join(BIAS_TARGETS)}")
        if len(set(self.biases)) != len(self.biases):
            raise ValueError(f"bias_tuning: biases listed twice in {list(self.biases)}")
        if not self.biases and not self.norm_scales:
            raise ValueError("bias_tuning: nothing to train (no biases and norm_scales=False)")

    def _chosen(self):
        """(module path, trainable leaf name, size, logical axis) of every trainable leaf."""
        for path, param, size, axis in _targets(self.model.config):
            if param == "kernel" and path[-1] in self.biases:
                yield path, BIAS, size, axis
            elif param == "scale" and self.norm_scales:
                yield path, SCALE_DELTA, size, axis

    def _tree(self, leaf) -> Dict[str, Any]:
        tree: Dict[str, Any] = {}
        for path, name, size, axis in self._chosen():
            node = tree
            for part in path:
                node = node.setdefault(part, {})
            node[name] = leaf(size, axis)
        return tree

    def split(self, params):
        raise ValueError("bias tuning adds its parameters to the pretrained ones; "
                         "use init_trainable")

    def init_trainable(self, rng, frozen):
        # Zero: the tuned model starts as the pretrained one (BitFit starts from the pretrained
        # biases; ours do not exist, and zero is their no-op value).
        return self._tree(lambda size, axis: jnp.zeros((size,), jnp.float32))

    def variables(self, frozen, trainable):
        return {"params": _overlay(frozen, trainable)}

    def config(self):
        return {"biases": list(self.biases), "norm_scales": self.norm_scales}

    def logical_axes(self, trainable):
        # Named by the output axis of the kernel they follow ('joined_kv', 'mlp', 'embed').
        return self._tree(lambda size, axis: PartitionSpec(axis))


def trainable_share(config: t5_lib.T5Config, **settings) -> Tuple[int, float]:
    """(trainable numbers, percent of the T5's parameters) of ``BiasTuning(**settings)``."""
    method = BiasTuning(T5(config), **settings)
    shapes = jax.eval_shape(lambda: method.init_trainable(None, None))
    count = sum(int(x.size) for x in jax.tree_util.tree_leaves(shapes))
    return count, 100.0 * count / config.num_params
