"""SPT: semi-parametric prompt tuning (Bari et al., 2022, "SPT: Semi-Parametric Prompt Tuning for
Multitask Prompted Learning").

A memory of N soft prompts, each with a key, shared by every task; each example retrieves the
prompts whose keys are nearest to its representation and reads their combination:

    h = M(x)                                    [B, D]   frozen T5, no prompt, no gradient
    s = sim(h, keys) / temperature              [B, N]   cosine (default) or dot product
    top-k of s: indices I [B, k], scores v [B, k];  w = softmax(v)     [B, k]
    weighted: P(x) = sum_j w_j memory[I_j]      [B, P, D]
    concat:   P(x) = [k w_1 memory[I_1]; ...]   [B, k*P, D]

M(x) is IDPG's (``methods.sentence_repr``: the frozen encoder's mean-pooled output, or the mean
input embedding). The memory and the keys train: the selected prompts through the model, the
selected keys through the softmax weights (``concat`` scales each prompt by k w_j, so uniform
weights keep the scale and the keys still get a gradient). With ``task_prompt_length`` > 0 each
example also reads its task's own prompt [T, P_t, D] (routed by the batch's ``task_ids``, like a
task bank) in front of the retrieved one.

Where ours differs from the paper: the paper retrieves from a memory of prompts for a T5 trained
on a multitask mixture of prompted datasets (and studies memory sizes and k); the retrieval
representation is a frozen encoder pass here as there, but its similarity and the softmax weighting
are our reading of "retrieves the top-k prompts and combines them". Initialisation (ours): memory
prompts are sampled vocabulary embeddings (prompt tuning's recipe), keys are standard normal
(cosine similarity ignores their scale).

Zero-shot transfer: ``zero_shot_variants`` gives, for a task held out of the training mixture,
the retrieved prompt (no task prompt), a random prompt of the memory's scale, and the memory's
mean as one fixed prompt (``commands.compare_zero_shot`` scores all three).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Dict, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prompt_t5x.methods import prompt_init, sentence_repr
from prompt_t5x.methods.interface import TASK_IDS, Method
from prompt_t5x.methods.prompt_tuning import PromptTuning
from prompt_t5x.model import prompt_inputs
from prompt_t5x.model.t5 import T5

SIMILARITIES = ("cosine", "dot")
COMBINES = ("weighted", "concat")


def retrieve(memory: jax.Array, keys: jax.Array, representation: jax.Array, top_k: int,
             similarity: str = "cosine", temperature: float = 1.0
             ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(indices [B, k], weights [B, k], selected prompts [B, k, P, D]) of each example."""
    if similarity == "cosine":
        unit = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)  # noqa
        scores = unit(representation) @ unit(keys).T
    else:
        scores = representation @ keys.T
    values, indices = jax.lax.top_k(scores / temperature, top_k)
    return indices, jax.nn.softmax(values, axis=-1), jnp.take(memory, indices, axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class SPT(Method):
    """Retrieved prompts from a trainable memory (module docstring)."""

    kind: ClassVar[str] = "spt"
    model: T5
    memory_size: int = 16
    prompt_length: int = 10
    top_k: int = 2
    similarity: str = "cosine"
    temperature: float = 1.0
    combine: str = "weighted"
    representation: str = "encoder"
    task_prompt_length: int = 0
    tasks: Tuple[str, ...] = ()
    prompt_mode: str = "prepend"

    def __post_init__(self):
        if self.memory_size < 1 or self.prompt_length < 1:
            raise ValueError("memory_size and prompt_length must be >= 1")
        if not 1 <= self.top_k <= self.memory_size:
            raise ValueError(f"top_k={self.top_k} must be in 1..memory_size={self.memory_size}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity={self.similarity!r}; choose from {SIMILARITIES}")
        if self.combine not in COMBINES:
            raise ValueError(f"combine={self.combine!r}; choose from {COMBINES}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.representation not in sentence_repr.REPRESENTATIONS:
            raise ValueError(f"representation={self.representation!r}; choose from "
                             f"{sentence_repr.REPRESENTATIONS}")
        if self.prompt_mode not in prompt_inputs.COMBINE_MODES:
            raise ValueError(f"prompt_mode={self.prompt_mode!r}; choose from "
                             f"{prompt_inputs.COMBINE_MODES}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.task_prompt_length < 0:
            raise ValueError("task_prompt_length must be >= 0")
        if self.task_prompt_length and not self.tasks:
            raise ValueError("task_prompt_length > 0 needs the mixture's tasks (tasks=[...])")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {list(self.tasks)} name a task twice")

    @property
    def retrieved_length(self) -> int:
        return self.prompt_length * (self.top_k if self.combine == "concat" else 1)

    # -- what is trained ------------------------------------------------------------------
    def init_trainable(self, rng, frozen):
        d = self.model.config.emb_dim
        embedding = frozen["token_embedder"]["embedding"]
        k_mem, k_keys, k_task = jax.random.split(rng, 3)
        memory = jnp.stack([prompt_init.sampled_vocab(k, embedding, self.prompt_length)
                            for k in jax.random.split(k_mem, self.memory_size)])
        state = {"memory": memory, "keys": jax.random.normal(k_keys, (self.memory_size, d))}
        if self.task_prompt_length:
            state["task_prompts"] = jnp.stack([
                prompt_init.sampled_vocab(k, embedding, self.task_prompt_length)
                for k in jax.random.split(k_task, len(self.tasks))])
        return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), state)

    def retrieved_prompt(self, frozen, trainable, tokens) -> jax.Array:
        """Each example's retrieved prompt [B, P', D] (P' = P, or k*P for 'concat')."""
        rep = sentence_repr.sentence_representation(self.model, frozen, tokens,
                                                    self.representation)
        _, weights, chosen = retrieve(trainable["memory"], trainable["keys"], rep, self.top_k,
                                      self.similarity, self.temperature)
        if self.combine == "weighted":
            return jnp.einsum("bk,bkpd->bpd", weights, chosen)
        scaled = chosen * (self.top_k * weights)[..., None, None]
        return scaled.reshape(scaled.shape[0], -1, scaled.shape[-1])

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        raise ValueError("spt retrieves each example's prompt from its input: use "
                         "example_inputs (the batch's encoder_input_tokens)")

    def example_inputs(self, frozen, trainable, features):
        prompt = self.retrieved_prompt(frozen, trainable, features["encoder_input_tokens"])
        if self.task_prompt_length:
            if TASK_IDS not in features:
                raise ValueError(f"spt with task prompts needs {TASK_IDS!r} in the batch")
            own = jnp.take(trainable["task_prompts"], features[TASK_IDS], axis=0)
            prompt = jnp.concatenate([own, prompt], axis=1)
        return {"prompt": prompt, "prompt_mode": self.prompt_mode}

    @property
    def prompt_positions(self) -> int:
        return self.task_prompt_length + self.retrieved_length

    # -- transfer to a task outside the mixture ----------------------------------------------
    def zero_shot_variants(self, trainable) -> Dict[str, Tuple[Method, dict]]:
        """{name: (method, state)} for a held-out task: the retrieval alone (no task prompt),
        a random prompt at the memory's scale, and the memory's mean as a fixed prompt."""
        retrieval = dataclasses.replace(self, task_prompt_length=0, tasks=())
        state = {k: trainable[k] for k in ("memory", "keys")}
        fixed = PromptTuning(self.model, self.prompt_length, self.prompt_mode)
        memory = jnp.asarray(trainable["memory"])
        noise = jax.random.normal(jax.random.PRNGKey(0), memory.shape[1:])
        return {"retrieved": (retrieval, state),
                "random": (fixed, {"prompt": noise * jnp.std(memory) + jnp.mean(memory)}),
                "memory_mean": (fixed, {"prompt": jnp.mean(memory, axis=0)})}

    # -- how it describes itself ----------------------------------------------------------
    def config(self):
        return {"memory_size": self.memory_size, "prompt_length": self.prompt_length,
                "top_k": self.top_k, "similarity": self.similarity,
                "temperature": self.temperature, "combine": self.combine,
                "representation": self.representation,
                "task_prompt_length": self.task_prompt_length, "tasks": list(self.tasks),
                "prompt_mode": self.prompt_mode}

    def logical_axes(self, trainable):
        axes = {"memory": PartitionSpec("memory", "prompt", "prompt_embed"),
                "keys": PartitionSpec("memory", "prompt_embed")}
        if "task_prompts" in trainable:
            axes["task_prompts"] = PartitionSpec("tasks", "prompt", "prompt_embed")
        return axes

