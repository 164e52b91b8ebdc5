"""IDPG: instance-dependent prompt generation (Wu et al., 2022, "IDPG: An Instance-Dependent
Prompt Generation Method", NAACL).

A small generator turns a sentence representation of each input into that input's own prompt:

    h = M(x)                                   [B, D]   frozen T5, no prompt, no gradient
    z = tanh(h W_down + b_down)                [B, m]   (m = ``bottleneck``, the paper's 256)
    P(x) = reshape(z W_up + b_up, [t, D])      [B, t, D]

and the frozen T5 runs a second time with P(x) in front of x (``prompt_mode``). M(x) is the
frozen encoder's mean-pooled output of x without any prompt (``representation='encoder'``: the
"first pass", which the paper makes with a frozen RoBERTa and we make with the frozen T5 encoder
itself) or the mean of x's input embeddings (``'embedding'``: no extra pass). Either way it is
under ``stop_gradient`` and depends on frozen weights only, so the train step never computes a
backward pass through it (``tests/test_idpg.py`` counts the traced encoder matmuls).

``generator``: ``'dense'`` (W_up is [m, t*D]) or ``'phm'`` (the paper's parameterised
hypercomplex multiplication layer: W_up = sum_i A_i kron S_i with A_i [n, n] and S_i
[m/n, t*D/n], n = ``phm_n``: n^3 + m*t*D/n numbers instead of m*t*D).

S-IDPG (``layers='input'``) generates the input prompt. M-IDPG (``layers='all'``) also gives every
later encoder layer a prompt from the same generator plus a trainable per-layer offset [L-1, t, D]
(fed as deep prompts: the rows replace the prompt positions entering each layer,
``methods.deep_prompts``); the paper generates a prompt per layer of RoBERTa from a shared
generator with per-layer inputs, and our offset is the cheapest per-layer part with that effect.

Initialisation: b_up holds t sampled vocabulary embeddings (prompt tuning's recipe) and W_up is
small (std ``init_scale``), so P(x) starts as a token-embedding-scale prompt that varies only
slightly with x; the per-layer offsets start at zero. The nonlinearity (tanh) is ours: the paper
specifies a two-layer bottleneck, not its activation.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prompt_t5x.methods import prompt_init, sentence_repr
from prompt_t5x.methods.interface import Method
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.t5 import T5

GENERATORS = ("dense", "phm")
LAYERS = ("input", "all")


def phm_matrix(rules: jax.Array, factors: jax.Array) -> jax.Array:
    """sum_i kron(rules[i], factors[i]): rules [n, n, n], factors [n, a, b] -> [n*a, n*b]."""
    return jnp.einsum("ipq,iab->paqb", rules, factors).reshape(
        rules.shape[1] * factors.shape[1], rules.shape[2] * factors.shape[2])


@dataclasses.dataclass(frozen=True, eq=False)
class IDPG(Method):
    """Instance-dependent prompts from a bottleneck generator (module docstring)."""

    kind: ClassVar[str] = "idpg"
    model: T5
    prompt_length: int = 5
    bottleneck: int = 256
    representation: str = "encoder"
    generator: str = "dense"
    phm_n: int = 4
    layers: str = "input"
    prompt_mode: str = "prepend"
    init_scale: float = 1e-3

    def __post_init__(self):
        cfg = self.model.config
        if self.prompt_length < 1 or self.bottleneck < 1:
            raise ValueError("prompt_length and bottleneck must be >= 1")
        if self.representation not in sentence_repr.REPRESENTATIONS:
            raise ValueError(f"representation={self.representation!r}; choose from "
                             f"{sentence_repr.REPRESENTATIONS}")
        if self.generator not in GENERATORS:
            raise ValueError(f"generator={self.generator!r}; choose from {GENERATORS}")
        if self.layers not in LAYERS:
            raise ValueError(f"layers={self.layers!r}; choose from {LAYERS}")
        if self.prompt_mode not in prompt_inputs.COMBINE_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}; choose from "
                             f"{prompt_inputs.COMBINE_MODES}")
        if self.layers == "all" and cfg.num_encoder_layers < 2:
            raise ValueError("layers='all' (M-IDPG) needs >= 2 encoder layers")
        if self.generator == "phm":
            n, out = self.phm_n, self.prompt_length * cfg.emb_dim
            if n < 2 or self.bottleneck % n or out % n:
                raise ValueError(f"generator='phm' needs phm_n >= 2 dividing bottleneck "
                                 f"{self.bottleneck} and prompt_length * emb_dim {out}")

    # -- what is trained ------------------------------------------------------------------
    def init_trainable(self, rng, frozen):
        d, m, t = self.model.config.emb_dim, self.bottleneck, self.prompt_length
        k_down, k_up, k_rules, k_bias = jax.random.split(rng, 4)
        start = prompt_init.sampled_vocab(k_bias, frozen["token_embedder"]["embedding"], t)
        state = {"down": {"kernel": jax.random.normal(k_down, (d, m)) / jnp.sqrt(d),
                          "bias": jnp.zeros((m,))},
                 "up": {"bias": jnp.reshape(start, (t * d,))}}
        if self.generator == "dense":
            state["up"]["kernel"] = self.init_scale * jax.random.normal(k_up, (m, t * d))
        else:
            n = self.phm_n
            # A_i start as scaled identities plus noise: every S_i reaches the output.
            rules = jnp.eye(n)[None] + 0.1 * jax.random.normal(k_rules, (n, n, n))
            state["up"]["rules"] = rules
            state["up"]["factors"] = self.init_scale * jax.random.normal(
                k_up, (n, m // n, t * d // n))
        if self.layers == "all":
            state["layer_offsets"] = jnp.zeros((self.model.config.num_encoder_layers - 1, t, d))
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), state)

    def up_kernel(self, trainable) -> jax.Array:
        """W_up [m, t*D] (the PHM sum of Kronecker products when ``generator='phm'``)."""
        up = trainable["up"]
        return up["kernel"] if self.generator == "dense" else phm_matrix(up["rules"],
                                                                          up["factors"])

    def generate(self, trainable, representation: jax.Array) -> jax.Array:
        """M(x) [B, D] -> prompts [B, t, D]."""
        down = trainable["down"]
        z = jnp.tanh(representation @ down["kernel"] + down["bias"])
        flat = z @ self.up_kernel(trainable) + trainable["up"]["bias"]
        return flat.reshape(flat.shape[0], self.prompt_length, self.model.config.emb_dim)

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        raise ValueError("idpg generates each example's prompt from its input: use "
                         "example_inputs (the batch's encoder_input_tokens)")

    def example_inputs(self, frozen, trainable, features):
        rep = sentence_repr.sentence_representation(self.model, frozen,
                                                    features["encoder_input_tokens"],
                                                    self.representation)
        prompt = self.generate(trainable, rep)                       # [B, t, D]
        inputs = {"prompt": prompt, "prompt_mode": self.prompt_mode}
        if self.layers == "all":
            # [L, B, t, D]: row 0 is the input prompt (never read: layer 0 sees the input).
            deep = prompt[None] + trainable["layer_offsets"][:, None]
            inputs["deep_prompts"] = jnp.concatenate([prompt[None], deep], axis=0)
        return inputs

    @property
    def prompt_positions(self) -> int:
        return self.prompt_length

    # -- how it describes itself ----------------------------------------------------------
    def config(self):
        return {"prompt_length": self.prompt_length, "bottleneck": self.bottleneck,
                "representation": self.representation, "generator": self.generator,
                "phm_n": self.phm_n, "layers": self.layers, "prompt_mode": self.prompt_mode}

    def logical_axes(self, trainable):
        axes = jax.tree_util.tree_map(lambda x: PartitionSpec(*([None] * x.ndim)), trainable)
        if "layer_offsets" in trainable:
            axes["layer_offsets"] = PartitionSpec("layers", "prompt", "prompt_embed")
        return axes
