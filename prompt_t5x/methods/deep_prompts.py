"""Replacement deep prompts: fresh trainable rows at the prompt positions of every encoder layer.

Visual Prompt Tuning's "VPT-deep" (Jia et al., 2022, "Visual Prompt Tuning", section 3.2) and the
deep-prompt form of P-tuning v2 (Liu et al., 2022, "P-Tuning v2", section 3) both go beyond the
input prompt: before encoder layer i the hidden states at the P prompt positions are *thrown
away* and replaced by layer i's own trainable [P, D] rows, so every layer reads prompt vectors
chosen for it rather than whatever the layers below made of the input prompt.

Trainable tree (L = ``num_encoder_layers``, D = ``emb_dim``)::

    {'prompt':       [P, D]        # layer 0's input prompt, inserted like prompt tuning's
     'deep_prompts': [L - 1, P, D]}  # row j replaces the prompt positions before layer j + 1

The deep table has L - 1 rows, not L: the model reads ``deep_prompts[i]`` only for i >= 1
(layer 0 sees the input prompt), so an L-th row would be a parameter that never trains.
``model_inputs`` stacks ``[prompt, *deep_prompts]`` into the model's [L, P, D] input, whose row 0
the model ignores. One encoder layer leaves nothing to replace: that is plain prompt tuning, and
is refused here.

Where our T5 version differs from the papers:
- encoder only (P-tuning v2 and VPT have no decoder); the decoder reads the last layer's states
  at the prompt positions through cross-attention, exactly like prompt tuning's;
- the rows are the hidden state *entering* a T5 pre-norm layer (the residual stream), not the
  post-norm output of a BERT/ViT layer;
- initialisation: VPT draws deep prompts uniformly at random (Xavier); here every layer's rows
  come from the method's prompt initialiser (sampled vocabulary by default, the prompt-tuning
  recipe), drawn independently per layer, so they start at the scale of token embeddings;
- the prompt's place in the sequence follows ``prompt_mode`` (``model.prompt_inputs``) at every
  layer, not only at the front.

The inference form is the method itself (export = the two tables).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prompt_t5x.methods.prompt_tuning import PromptTuning
from prompt_t5x.model.t5 import T5


@dataclasses.dataclass(frozen=True, eq=False)
class DeepPrompts(PromptTuning):
    """VPT-deep / P-tuning v2 deep prompts on the frozen T5 encoder (see module docstring)."""

    kind: ClassVar[str] = "deep_prompts"
    inputs_only: ClassVar[bool] = True

    def __post_init__(self):
        super().__post_init__()
        if self.model.config.num_encoder_layers < 2:
            raise ValueError("deep_prompts need >= 2 encoder layers (with one layer there is "
                             "nothing to replace: use prompt_tuning)")

    @property
    def deep_layers(self) -> int:
        """Rows of the deep table: every encoder layer after the first."""
        return self.model.config.num_encoder_layers - 1

    def init_trainable(self, rng, frozen):
        rngs = jax.random.split(rng, self.deep_layers + 1)
        # Row 0 of the split is the input prompt's key, so 'prompt' equals what prompt tuning
        # with the same key would start from.
        tables = [super(DeepPrompts, self).init_trainable(key, frozen)["prompt"] for key in rngs]
        return {"prompt": tables[0], "deep_prompts": jnp.stack(tables[1:])}

    def model_inputs(self, trainable):
        # [L, P, D]: row 0 (the input prompt) is never read by the model; stacking it keeps the
        # model's layer index equal to the row index.
        layers = jnp.concatenate([trainable["prompt"][None], trainable["deep_prompts"]], axis=0)
        return {"prompt": trainable["prompt"], "prompt_mode": self.prompt_mode,
                "deep_prompts": layers}

    def logical_axes(self, trainable):
        # Replicated like prompt tuning's prompt: a few rows per layer, never worth splitting.
        # 'layers' first: Adafactor factors each layer's [P, D] on its own (factor_rules).
        return {"prompt": PartitionSpec("prompt", "prompt_embed"),
                "deep_prompts": PartitionSpec("layers", "prompt", "prompt_embed")}

    @classmethod
    def from_config(cls, model: T5, config: Mapping[str, Any], *,
                    label_words: Optional[Sequence[str]] = None, encode=None,
                    **unused_context) -> "DeepPrompts":
        """``config`` may carry a gin ``prompt_init`` spec (``commands.configurables``, first
        build only): it is bound here to the task's label words and vocabulary."""
        config = dict(config)
        init = config.pop("prompt_init", None)
        if init is not None:
            config["prompt_init"] = init.build(label_words, encode) if hasattr(init, "build") \
                else init
        return cls(model, **config)
