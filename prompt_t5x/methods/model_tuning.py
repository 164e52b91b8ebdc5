"""Model tuning: every T5 weight trainable (the prompt-tuning paper's baseline).

The frozen tree is empty; the trainable tree is the pretrained parameters themselves.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from prompt_t5x.methods.interface import Method
from prompt_t5x.model import t5 as t5_lib
from prompt_t5x.model.t5 import T5


@dataclasses.dataclass(frozen=True, eq=False)
class ModelTuning(Method):
    """Every T5 weight trainable (baseline). Frozen tree is empty; trainable = the params."""

    kind: ClassVar[str] = "model_tuning"
    model: T5

    def split(self, params):
        return {}, params

    def init_trainable(self, rng, frozen):
        raise ValueError("model tuning starts from pretrained params: use split(params)")

    def variables(self, frozen, trainable):
        return {"params": trainable}

    def logical_axes(self, trainable):
        return t5_lib.logical_axes(self.model.config)
