"""P-tuning (Liu et al., 2021, "GPT Understands, Too", arXiv:2103.10385).

A *prompt encoder* turns P trainable input vectors ``h_0..h_{P-1}`` into the virtual token
embeddings, and a *template* places them among the task's own text
(``"[P*3] premise: {premise} [P*3] hypothesis: {hypothesis} ? [P*3]"``, see
``prompt_t5x.methods.templates``). The paper's encoder (Section 2.2, "Optimization") is a
bidirectional LSTM followed by a two-layer ReLU MLP, so that the pseudo tokens depend on each
other; PEFT's ``PromptEncoderConfig`` also offers an MLP-only encoder.

Here:
- trainable ``{'embedding': [P, D], 'encoder': {...}}``; the whole T5 stays frozen;
- ``encoder='lstm'``: 2-layer bidirectional LSTM, ``encoder_hidden // 2`` units per direction
  (``encoder_hidden`` = D by default, so the two directions together give D), then
  Dense(2 * units) -> ReLU -> Dense(D): PEFT's LSTM encoder with ``encoder_hidden_size`` =
  units (tests/test_p_tuning.py checks the two give the same vectors from the same weights); ``'mlp'``: Dense(H) -> ReLU ->
  Dense(H) -> ReLU -> Dense(D) (PEFT's MLP encoder); ``'none'``: the embedding *is* the prompt
  (the exported inference form: the encoder is run once and dropped);
- the data renders every pseudo token as one placeholder id (``pseudo_token_id``; default the
  last embedding row, which neither T5's SentencePiece nor the generated tasks' words produce),
  and the model puts prompt row j at the j-th placeholder (``prompt_mode='template'``), so the
  method adds no encoder positions (``prompt_positions == 0``): the template's pseudo tokens
  are counted in the inputs length, and the fields are truncated to make room.

Where we differ from the paper: T5 1.1 is an encoder-decoder, so the template shapes only the
encoder input and the answer is the decoder's target text (the paper fills a [MASK] or the next
token of GPT/BERT); the input vectors start as sampled vocabulary embeddings (as the prompt
tuning paper's "sampled vocab" init) rather than random ones; each template piece is tokenised
on its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from prompt_t5x.methods import templates
from prompt_t5x.methods.interface import Method, flatten_tables
from prompt_t5x.methods.prompt_init import sampled_vocab_init
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.t5 import T5

ENCODERS = ("lstm", "mlp", "none")


class PromptEncoder(nn.Module):
    """[P, D] input vectors -> [P, D] virtual token embeddings (see the module docstring)."""

    kind: str
    dim: int
    hidden: int

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        if self.kind == "lstm":
            units = self.hidden // 2                               # per direction
            h = inputs[None]                                       # [1, P, D]: one sequence
            for layer in range(2):
                h = nn.Bidirectional(
                    nn.RNN(nn.OptimizedLSTMCell(units, name=f"lstm_{layer}_forward")),
                    nn.RNN(nn.OptimizedLSTMCell(units, name=f"lstm_{layer}_backward")))(h)
            h = nn.relu(nn.Dense(2 * units, name="mlp_0")(h[0]))   # [P, 2 * units]
            return nn.Dense(self.dim, name="mlp_1")(h)             # [P, D]
        if self.kind == "mlp":
            h = nn.relu(nn.Dense(self.hidden, name="mlp_0")(inputs))
            h = nn.relu(nn.Dense(self.hidden, name="mlp_1")(h))
            return nn.Dense(self.dim, name="mlp_2")(h)
        raise ValueError(f"unknown prompt encoder {self.kind!r}; choose from {ENCODERS}")


@dataclasses.dataclass(frozen=True, eq=False)
class PTuning(Method):
    """P-tuning: a prompt encoder's virtual tokens, placed by a template."""

    kind: ClassVar[str] = "p_tuning"
    inputs_only: ClassVar[bool] = True
    model: T5
    template: Union[str, Mapping[str, str]] = "[P*3] {inputs} [P*3]"
    pseudo_token_id: Optional[int] = None      # None: the last embedding row
    encoder: str = "lstm"
    encoder_hidden: Optional[int] = None       # None: the model's D
    population: int = 5000                     # input vectors sampled from the first N ids

    def __post_init__(self):
        if isinstance(self.template, Mapping):
            object.__setattr__(self, "template", dict(self.template))
        templates.all_templates(self.template)          # TemplateError if malformed
        vocab = self.model.config.vocab_size
        if self.pseudo_token_id is None:
            object.__setattr__(self, "pseudo_token_id", templates.default_placeholder_id(vocab))
        if not 0 < int(self.pseudo_token_id) < vocab:
            raise ValueError(f"pseudo_token_id={self.pseudo_token_id} is not a row of the "
                             f"model's {vocab}-row embedding")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder={self.encoder!r}; choose from {ENCODERS}")
        if self.encoder_hidden is None:
            object.__setattr__(self, "encoder_hidden", self.model.config.emb_dim)
        if int(self.encoder_hidden) < 2:
            raise ValueError(f"encoder_hidden must be >= 2, got {self.encoder_hidden}")

    @property
    def num_virtual_tokens(self) -> int:
        """P: the most pseudo tokens of any of the run's templates."""
        return templates.num_pseudo_tokens(self.template)

    def _encoder(self) -> PromptEncoder:
        return PromptEncoder(self.encoder, self.model.config.emb_dim, int(self.encoder_hidden))

    def split(self, params):
        raise ValueError("P-tuning has no trainable part inside the pretrained params; "
                         "use init_trainable")

    def init_trainable(self, rng, frozen):
        embed_rng, encoder_rng = jax.random.split(rng)
        embedding = jnp.asarray(sampled_vocab_init(self.population)(
            embed_rng, frozen, self.num_virtual_tokens, self.model.config.emb_dim), jnp.float32)
        trainable: Dict[str, Any] = {"embedding": embedding}
        if self.encoder != "none":
            trainable["encoder"] = self._encoder().init(encoder_rng, embedding)["params"]
        return trainable

    def prompt(self, trainable) -> jax.Array:
        """The virtual token embeddings [P, D]."""
        if self.encoder == "none":
            return trainable["embedding"]
        return self._encoder().apply({"params": trainable["encoder"]}, trainable["embedding"])

    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        return {"prompt": self.prompt(trainable), "prompt_mode": prompt_inputs.TEMPLATE_MODE,
                "prompt_token_id": int(self.pseudo_token_id)}

    @property
    def prompt_positions(self) -> int:
        return 0   # the pseudo tokens are placeholders inside the inputs

    def config(self):
        return {"template": self.template, "pseudo_token_id": int(self.pseudo_token_id),
                "encoder": self.encoder, "encoder_hidden": int(self.encoder_hidden)}

    @classmethod
    def from_config(cls, model, config, **build_context):
        # ``population`` is init-only (it does not change what a trained state computes).
        return cls(model, **dict(config))

    def export(self, trainable):
        """The encoder run once: ``{'embedding': [P, D]}`` (the final virtual tokens) and the
        config of the same template with ``encoder='none'``."""
        table = {"embedding": self.prompt(trainable)}
        return flatten_tables(table), {**self.method_config(), "encoder": "none"}
