"""Tuning methods: which parameters are trainable and how they enter the frozen T5.

A method splits the model's parameters into a *frozen* tree (never differentiated, never in the
optimizer) and a *trainable* tree, and knows how to run the model with both. The train step,
evaluation and decoding only talk to this interface, so prefix-tuning, P-tuning v2, instance-wise
prompts etc. are new classes here, not new train steps.

- ``PromptTuning``: trainable ``{'prompt': [P, D]}``, passed to ``T5`` as its ``prompt`` input.
- ``ModelTuning``: every T5 weight trainable (the paper's model-tuning baseline); frozen is ``{}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax

from prompt_t5x import prompts as prompts_lib
from prompt_t5x.t5 import T5

PyTree = Any
# (rng, frozen params, prompt length, d_model) -> prompt [P, D]
PromptInit = Callable[[jax.Array, PyTree, int, int], jax.Array]


def sampled_vocab_init(population: int = 5000) -> PromptInit:
    def init(rng, frozen, length, dim):
        return prompts_lib.sampled_vocab(rng, frozen["token_embedder"]["embedding"], length,
                                         population)
    return init


def random_uniform_init(scale: float = 0.5, symmetric: bool = False) -> PromptInit:
    def init(rng, frozen, length, dim):
        return prompts_lib.random_uniform(rng, length, dim, scale, symmetric)
    return init


def class_labels_init(labels, encode, population: int = 5000) -> PromptInit:
    def init(rng, frozen, length, dim):
        return prompts_lib.class_labels(rng, frozen["token_embedder"]["embedding"], length,
                                        labels, encode, population)
    return init


def npy_init(path: str) -> PromptInit:
    def init(rng, frozen, length, dim):
        return prompts_lib.from_npy(path, (length, dim))
    return init


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


@dataclasses.dataclass(frozen=True, eq=False)
class PromptTuning(Method):
    """Prompt tuning (Lester et al., 2021): a [P, D] soft prompt; the whole T5 frozen."""

    model: T5
    prompt_length: int = 100
    prompt_mode: str = "prepend"
    prompt_init: PromptInit = dataclasses.field(default_factory=sampled_vocab_init)

    def __post_init__(self):
        if self.prompt_mode not in prompts_lib.COMBINE_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}; choose from "
                             f"{prompts_lib.COMBINE_MODES}")
        if self.prompt_length < 1:
            raise ValueError(f"prompt_length must be >= 1, got {self.prompt_length}")

    def split(self, params):
        raise ValueError("prompt tuning has no trainable part inside the pretrained params; "
                         "use init_trainable")

    def init_trainable(self, rng, frozen):
        prompt = self.prompt_init(rng, frozen, self.prompt_length, self.model.config.emb_dim)
        if prompt.shape != (self.prompt_length, self.model.config.emb_dim):
            raise ValueError(f"prompt initializer returned shape {prompt.shape}, expected "
                             f"{(self.prompt_length, self.model.config.emb_dim)}")
        return {"prompt": jax.numpy.asarray(prompt, jax.numpy.float32)}

    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        return {"prompt": trainable["prompt"], "prompt_mode": self.prompt_mode}


@dataclasses.dataclass(frozen=True, eq=False)
class ModelTuning(Method):
    """Every T5 weight trainable (baseline). Frozen tree is empty; trainable = the params."""

    model: T5

    def split(self, params):
        return {}, params

    def init_trainable(self, rng, frozen):
        raise ValueError("model tuning starts from pretrained params: use split(params)")

    def variables(self, frozen, trainable):
        return {"params": trainable}
