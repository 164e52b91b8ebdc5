"""The ``Method`` interface: which parameters are trainable and how they enter the frozen T5.

A method splits the model's parameters into a *frozen* tree (never differentiated, never in the
optimizer) and a *trainable* tree, and knows how to run the model with both. The train step,
checkpoints, evaluation, decoding and sharding only talk to this interface, so prefix-tuning,
P-tuning v2, instance-wise prompts etc. are new modules of this wing, not new train steps.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import jax

from prompt_t5x.model.t5 import T5

PyTree = Any


class Method:
    """Interface; see the module docstring."""

    model: T5

    def split(self, params: PyTree) -> Tuple[PyTree, PyTree]:
        """Pretrained params -> (frozen, initial trainable) without random init."""
        raise NotImplementedError

    def init_trainable(self, rng: jax.Array, frozen: PyTree) -> PyTree:
        raise NotImplementedError

    def variables(self, frozen: PyTree, trainable: PyTree) -> Dict[str, PyTree]:
        raise NotImplementedError

    def model_inputs(self, trainable: PyTree) -> Dict[str, Any]:
        """Extra keyword inputs of ``T5.__call__`` / ``T5.encode`` (e.g. the prompt)."""
        return {}

    def logits(self, frozen: PyTree, trainable: PyTree, batch: Mapping[str, jax.Array], *,
               enable_dropout: bool = False, rng: Optional[jax.Array] = None) -> jax.Array:
        """Teacher-forced logits float32 [B, T, V]."""
        rngs = {"dropout": rng} if (enable_dropout and rng is not None) else {}
        return self.model.apply(self.variables(frozen, trainable), batch,
                                enable_dropout=enable_dropout, rngs=rngs,
                                **self.model_inputs(trainable))
