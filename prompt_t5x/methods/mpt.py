"""MPT: multitask prompt tuning (Wang et al., 2023, "Multitask Prompt Tuning Enables
Parameter-Efficient Transfer Learning", ICLR).

One prompt shared by every task, adapted per task by a rank-r multiplicative update:

    P_k = P* ∘ (u_k v_kᵀ)       P* [P, D], u_k [P, r], v_k [D, r]   ->  P_k [P, D]

and each example of a mixed batch reads its task's P_k (``task_ids``, as in a task bank).

**Source stage** (``mpt_source``): P* and every source task's factors are trained on the source
mixture with the task loss plus distillation from per-task teacher prompts (plain prompt tuning,
one prompt per task: a ``multitask_prompts`` bank of ``prompt_tuning`` is exactly that):

    loss = CE(student) + kl_weight * τ² KL(softmax(teacher/τ) || softmax(student/τ))
                       + mse_weight * MSE(student encoder states, teacher encoder states)

The KL is summed over the target tokens like the CE (so both are per-token means after the train
step's division); the MSE is the mean squared difference of the last encoder layer's outputs over
the valid positions (prompt included), as the paper distils hidden states. The teachers' prompts
[T, P, D] are not trainable and not in the trainable tree: the command layer loads them (the
``teachers`` setting, a bank's run dir or exported file) and passes them when the method is built;
a method rebuilt without them (eval, infer, export) computes the plain task loss.

**Target stage** (``mpt_target``): P* from a source run (``source`` setting), new factors per
target task, P* frozen unless ``train_shared``. Same composition, plain task loss. A frozen P* is
not in the trainable tree (weight decay would move it): the command layer loads it from the
source run whenever the method is built (train, resume, eval), and ``export`` writes it into the
file, so an exported target stage stands alone.

Export (the default: the state itself) writes P* ('shared') and the factors ('u', 'v') with
the method's JSON config; ``task_prompts`` composes every task's prompt from them.

Initialisation: u = 1 and v = 1/r (plus noise of std ``init_noise`` so that the r columns differ),
so u vᵀ ≈ 1 and every task starts at P* itself. (PEFT's MultitaskPromptTuning draws u and v so
that the product starts near zero, which multiplies P* away at step 0.) P* starts as the teachers'
mean when teachers are given, else sampled vocabulary embeddings.

Where ours differs from the paper: the paper's source stage is followed by target adaptation on
single target tasks (and few-shot); we keep both stages mixture-ready (several target tasks at
once, routed by task id). Its distillation weights and temperature are settings here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from prompt_t5x.methods import prompt_init, token_loss
from prompt_t5x.methods.interface import TASK_IDS, Method
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.t5 import T5


def compose(shared: jax.Array, u: jax.Array, v: jax.Array) -> jax.Array:
    """P* [P, D] ∘ (u [T, P, r] v [T, D, r]ᵀ) -> per-task prompts [T, P, D]."""
    return shared[None] * jnp.einsum("tpr,tdr->tpd", u, v)


@dataclasses.dataclass(frozen=True, eq=False)
class MPTSource(Method):
    """Source stage: shared prompt + rank-r factors per task, distilled from teachers."""

    kind: ClassVar[str] = "mpt_source"
    model: T5
    tasks: Tuple[str, ...] = ()
    prompt_length: int = 100
    rank: int = 1
    kl_weight: float = 1.0
    mse_weight: float = 1.0
    temperature: float = 1.0
    prompt_mode: str = "prepend"
    init_noise: float = 1e-3
    teachers: Optional[str] = None              # where the teachers came from (recorded)
    teacher_prompts: Any = dataclasses.field(default=None, repr=False)   # [T, P, D], build only

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"{self.kind} needs distinct task names (tasks=[...]), got "
                             f"{list(self.tasks)}")
        if self.prompt_length < 1 or self.rank < 1:
            raise ValueError("prompt_length and rank must be >= 1")
        if self.kl_weight < 0 or self.mse_weight < 0 or not self.temperature > 0:
            raise ValueError("kl_weight and mse_weight must be >= 0 and temperature > 0")
        if self.prompt_mode not in prompt_inputs.COMBINE_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}; choose from "
                             f"{prompt_inputs.COMBINE_MODES}")
        if self.teacher_prompts is not None:
            want = (len(self.tasks), self.prompt_length, self.model.config.emb_dim)
            got = tuple(np.shape(self.teacher_prompts))
            if got != want:
                raise ValueError(f"teacher prompts of shape {got} do not fit {len(self.tasks)} "
                                 f"tasks of a {self.prompt_length}-vector prompt on d_model "
                                 f"{self.model.config.emb_dim} (want {want})")

    # -- what is trained ------------------------------------------------------------------
    def _factors(self, rng):
        t, p, d, r = len(self.tasks), self.prompt_length, self.model.config.emb_dim, self.rank
        k_u, k_v = jax.random.split(rng)
        return {"u": 1.0 + self.init_noise * jax.random.normal(k_u, (t, p, r)),
                "v": 1.0 / r + self.init_noise * jax.random.normal(k_v, (t, d, r))}

    def initial_shared(self, rng, frozen) -> jax.Array:
        if self.teacher_prompts is not None:
            return jnp.mean(jnp.asarray(self.teacher_prompts, jnp.float32), axis=0)
        return prompt_init.sampled_vocab(rng, frozen["token_embedder"]["embedding"],
                                         self.prompt_length)

    def init_trainable(self, rng, frozen):
        k_shared, k_factors = jax.random.split(rng)
        state = {"shared": self.initial_shared(k_shared, frozen), **self._factors(k_factors)}
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), state)

    def shared_prompt(self, trainable) -> jax.Array:
        return trainable["shared"]

    def task_prompts(self, trainable) -> jax.Array:
        """Every task's prompt [T, P, D]."""
        return compose(self.shared_prompt(trainable), trainable["u"], trainable["v"])

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        raise ValueError(f"{self.kind} routes every example to its task's prompt: its inputs "
                         f"need the batch's {TASK_IDS!r} (example_inputs)")

    def example_inputs(self, frozen, trainable, features):
        if TASK_IDS not in features:
            raise ValueError(f"{self.kind} needs {TASK_IDS!r} [B] in the batch")
        prompt = jnp.take(self.task_prompts(trainable), features[TASK_IDS], axis=0)
        return {"prompt": prompt, "prompt_mode": self.prompt_mode}

    @property
    def prompt_positions(self) -> int:
        return self.prompt_length

    def loss_sums(self, frozen, trainable, batch, *, enable_dropout=False, rng=None,
                  z_loss=0.0):
        distil = self.teacher_prompts is not None and (self.kl_weight or self.mse_weight)
        if not distil:
            return super().loss_sums(frozen, trainable, batch, enable_dropout=enable_dropout,
                                     rng=rng, z_loss=z_loss)
        rngs = {"dropout": rng} if (enable_dropout and rng is not None) else {}
        variables = {"params": frozen}

        def run(prompt, dropout):
            encoded, mask = self.model.apply(variables, batch["encoder_input_tokens"], prompt,
                                             self.prompt_mode, dropout, method=T5.encode,
                                             rngs=rngs if dropout else {})
            logits = self.model.apply(variables, encoded, mask, batch["decoder_input_tokens"],
                                      batch.get("decoder_target_tokens"), dropout,
                                      method=T5.decode, rngs=rngs if dropout else {})
            return encoded, mask, logits

        student_prompt = self.example_inputs(frozen, trainable, batch)["prompt"]
        encoded, mask, logits = run(student_prompt, enable_dropout)
        teacher = jnp.take(jnp.asarray(self.teacher_prompts, jnp.float32), batch[TASK_IDS],
                           axis=0)
        t_encoded, _, t_logits = jax.lax.stop_gradient(run(teacher, False))
        weights = token_loss.loss_weights(batch)
        ce, z, correct, weight = token_loss.cross_entropy_sums(
            logits, batch["decoder_target_tokens"], weights, z_loss)
        tau = self.temperature
        t_logp = jax.nn.log_softmax(t_logits.astype(jnp.float32) / tau, axis=-1)
        s_logp = jax.nn.log_softmax(logits.astype(jnp.float32) / tau, axis=-1)
        kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * tau ** 2     # [B, T]
        kl_sum = jnp.sum(jnp.where(weights > 0, kl * weights, 0.0))
        valid = mask.astype(jnp.float32)[..., None]
        sq = jnp.square(encoded.astype(jnp.float32) - t_encoded.astype(jnp.float32))
        mse = jnp.sum(sq * valid) / (jnp.maximum(jnp.sum(valid), 1.0) * encoded.shape[-1])
        # The train step divides by the token weight: the MSE (a mean) is scaled up by it.
        total = ce + self.kl_weight * kl_sum + self.mse_weight * mse * weight
        return total, z, correct, weight

    # -- how it describes itself ----------------------------------------------------------
    def config(self):
        return {"tasks": list(self.tasks), "prompt_length": self.prompt_length,
                "rank": self.rank, "kl_weight": self.kl_weight, "mse_weight": self.mse_weight,
                "temperature": self.temperature, "prompt_mode": self.prompt_mode,
                "teachers": self.teachers}

    @classmethod
    def from_config(cls, model, config, *, teacher_prompts=None, **unused_context):
        return cls(model, teacher_prompts=teacher_prompts, **dict(config))

    def logical_axes(self, trainable):
        return {"shared": PartitionSpec("prompt", "prompt_embed"),
                "u": PartitionSpec("tasks", "prompt", None),
                "v": PartitionSpec("tasks", "prompt_embed", None)}



@dataclasses.dataclass(frozen=True, eq=False)
class MPTTarget(MPTSource):
    """Target stage: P* from a source run; new factors per target task (module docstring)."""

    kind: ClassVar[str] = "mpt_target"
    source: Optional[str] = None                 # where P* came from (recorded)
    train_shared: bool = False
    shared_init: Any = dataclasses.field(default=None, repr=False)   # P* [P, D], build only

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_prompts is not None or self.teachers:
            raise ValueError("mpt_target has no teachers (distillation is the source stage's)")
        if self.shared_init is not None and tuple(np.shape(self.shared_init)) != (
                self.prompt_length, self.model.config.emb_dim):
            raise ValueError(f"the source's shared prompt has shape {np.shape(self.shared_init)}"
                             f"; this target stage wants ({self.prompt_length}, "
                             f"{self.model.config.emb_dim}): use the source's prompt length")

    def initial_shared(self, rng, frozen):
        if self.shared_init is not None:
            return jnp.asarray(self.shared_init, jnp.float32)
        return super().initial_shared(rng, frozen)

    def init_trainable(self, rng, frozen):
        state = super().init_trainable(rng, frozen)
        if not self.train_shared:
            # P* is not trained: it stays out of the state (an optimizer's weight decay would
            # move it) and comes from the source run whenever the method is built.
            state = {k: v for k, v in state.items() if k != "shared"}
        return state

    def _fixed_shared(self) -> jax.Array:
        if self.shared_init is None:
            raise ValueError("mpt_target without train_shared needs the source's shared prompt "
                             "(the 'source' run, loaded when the method is built)")
        return jnp.asarray(self.shared_init, jnp.float32)

    def shared_prompt(self, trainable):
        return trainable["shared"] if self.train_shared else self._fixed_shared()

    def export(self, trainable):
        """Self-contained: P* in the tables (the config then says train_shared, which computes
        the same prompts), so the exported file needs no source run."""
        tables = {k: np.asarray(v, np.float32) for k, v in trainable.items()}
        tables["shared"] = np.asarray(self.shared_prompt(trainable), np.float32)
        return tables, {**self.method_config(), "train_shared": True}

    def logical_axes(self, trainable):
        axes = super().logical_axes(trainable)
        return {k: v for k, v in axes.items() if k in trainable}

    def config(self):
        config = super().config()
        config.pop("teachers")
        for name in ("kl_weight", "mse_weight", "temperature"):
            config.pop(name)
        return {**config, "source": self.source, "train_shared": self.train_shared}

    @classmethod
    def from_config(cls, model, config, *, shared_init=None, **unused_context):
        return cls(model, shared_init=shared_init, **dict(config))
