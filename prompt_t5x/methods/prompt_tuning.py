"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

Trainable ``{'prompt': [P, D]}``, passed to ``T5`` as its ``prompt`` input (prepended, after BOS or
before EOS: ``prompt_t5x.model.prompt_inputs``); the whole T5 stays frozen.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
from jax.sharding import PartitionSpec

from prompt_t5x.methods.interface import Method
from prompt_t5x.methods.prompt_init import PromptInit, sampled_vocab_init
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.t5 import T5


@dataclasses.dataclass(frozen=True, eq=False)
class PromptTuning(Method):
    """Prompt tuning (Lester et al., 2021): a [P, D] soft prompt; the whole T5 frozen."""

    kind: ClassVar[str] = "prompt_tuning"
    inputs_only: ClassVar[bool] = True
    model: T5
    prompt_length: int = 100
    prompt_mode: str = "prepend"
    prompt_init: PromptInit = dataclasses.field(default_factory=sampled_vocab_init)

    def __post_init__(self):
        if self.prompt_mode not in prompt_inputs.COMBINE_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}; choose from "
                             f"{prompt_inputs.COMBINE_MODES}")
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

    @property
    def prompt_positions(self) -> int:
        return self.prompt_length

    def config(self):
        return {"prompt_length": self.prompt_length, "prompt_mode": self.prompt_mode}

    def logical_axes(self, trainable):
        return {"prompt": PartitionSpec("prompt", "prompt_embed")}
