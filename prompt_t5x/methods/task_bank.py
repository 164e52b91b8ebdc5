"""A task bank: one state of a prompt method per task, each example routed to its task's state.

Mixed-task batches for any method whose trainable state enters the frozen T5 only through its
model inputs (``Method.inputs_only``: prompt tuning, prefix-tuning, deep prompts, P-tuning). The
bank stacks the inner method's trainable tree along a leading ``tasks`` axis (a prompt bank
``[tasks, P, D]``, prefix tables ``[tasks, layers, P, H, Dh]``, ...) and every batch carries
``task_ids`` int32 [B] (``interface.TASK_IDS``, built by the data bridge from each example's
task). ``example_inputs`` runs the inner method's ``model_inputs`` on every task's state
(``jax.vmap``: a reparameterisation such as prefix-tuning's MLP runs once per task, not per
example) and gathers each example's row, so one step trains every task's state on a mixture and
one decode serves every task: no Python-side loop over tasks.

Per-example inputs come out in the layouts ``T5`` takes (prompt [B, P, D], deep prompts
[layers, B, P, D], prefixes [layers, B, P, H, Dh]). Example b of a mixed batch computes exactly
what it computes in a batch of its own task under the inner method with that task's state
(``tests/test_task_bank.py``).

This is the multi-task setting of the prompt-tuning papers that keep one prompt per task on one
frozen model (Lester et al., 2021, sec. 1: "mixed-task inference"); PEFT has no mixed-task batch
for any method. Task names are the mixture's task names; their order is the id order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from prompt_t5x.methods.interface import TASK_IDS, Method, flatten_tables
from prompt_t5x.model.t5 import T5

PyTree = Any
# Model inputs that may vary per example, and the axis where the batch goes in each.
PER_EXAMPLE_AXIS = {"prompt": 0, "deep_prompts": 1, "prefixes": 1}


def task_index(tasks: Sequence[str], names: Sequence[str], where: str = "the batch") -> list:
    """Task names -> bank ids; ValueError naming every task the bank does not know."""
    position = {name: i for i, name in enumerate(tasks)}
    unknown = sorted({n for n in names if n not in position})
    if unknown:
        raise ValueError(f"{where} has tasks {unknown} that the task bank does not know; its "
                         f"tasks are {list(tasks)}")
    return [position[n] for n in names]


@dataclasses.dataclass(frozen=True, eq=False)
class TaskBank(Method):
    """One ``inner`` state per task of ``tasks`` (module docstring)."""

    kind: ClassVar[str] = "multitask_prompts"
    inputs_only: ClassVar[bool] = True
    model: T5
    inner: Method = None
    tasks: Tuple[str, ...] = ()

    def __post_init__(self):
        if self.inner is None or not isinstance(self.inner, Method):
            raise ValueError("multitask_prompts needs an inner method (e.g. prompt_tuning)")
        if not type(self.inner).inputs_only:
            raise ValueError(f"multitask_prompts: {self.inner.kind!r} changes the frozen model's "
                             "variables, which a batch cannot vary per example; choose a method "
                             "whose state is a model input (prompt_tuning, prefix_tuning, "
                             "deep_prompts, p_tuning)")
        if type(self.inner).example_inputs is not Method.example_inputs:
            raise ValueError(f"multitask_prompts: {self.inner.kind!r} computes per-example "
                             "inputs itself and cannot be stacked per task")
        if getattr(self.inner, "prefix_dropout", 0.0):
            # Prefix dropout lives in prefix-tuning's own logits, which a bank does not call:
            # refused rather than silently not applied.
            raise ValueError("multitask_prompts does not apply an inner prefix_dropout; set it "
                             "to 0")
        tasks = tuple(self.tasks)
        if not tasks:
            raise ValueError("multitask_prompts needs the list of its tasks (tasks=[...])")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"multitask_prompts: tasks {list(tasks)} name a task twice")
        object.__setattr__(self, "tasks", tasks)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    # -- what is trained ------------------------------------------------------------------
    def split(self, params):
        raise ValueError("multitask_prompts has no trainable part inside the pretrained params; "
                         "use init_trainable")

    def init_trainable(self, rng, frozen):
        """Every task's state from the inner initialiser, each with its own key, stacked."""
        states = [self.inner.init_trainable(key, frozen)
                  for key in jax.random.split(rng, self.num_tasks)]
        return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)

    def task_state(self, trainable: PyTree, task: int) -> PyTree:
        """The inner method's state of task ``task`` (what a single-task run would hold)."""
        return jax.tree_util.tree_map(lambda x: x[task], trainable)

    # -- how it enters the model ----------------------------------------------------------
    def variables(self, frozen, trainable):
        return {"params": frozen}

    def model_inputs(self, trainable):
        raise ValueError("multitask_prompts routes every example to its task: its inputs need "
                         f"the batch's {TASK_IDS!r} (example_inputs), which this call lacks")

    def example_inputs(self, frozen, trainable, features: Mapping[str, jax.Array]
                       ) -> Dict[str, Any]:
        if TASK_IDS not in features:
            raise ValueError(f"multitask_prompts needs {TASK_IDS!r} [B] in the batch (the data "
                             "bridge adds them for a mixture of the bank's tasks)")
        ids = jnp.asarray(features[TASK_IDS], jnp.int32)
        settings = {k: v for k, v in self.inner.model_inputs(self.task_state(trainable, 0))
                    .items() if k not in PER_EXAMPLE_AXIS}

        def per_task(state):
            inputs = self.inner.model_inputs(state)
            unknown = [k for k, v in inputs.items()
                       if k not in PER_EXAMPLE_AXIS and isinstance(v, jax.Array)]
            if unknown:
                raise ValueError(f"multitask_prompts: inner input(s) {unknown} cannot vary per "
                                 "example")
            return {k: v for k, v in inputs.items() if k in PER_EXAMPLE_AXIS}

        stacked = jax.vmap(per_task)(trainable)             # every leaf [tasks, ...]
        out = dict(settings)
        for name, value in stacked.items():
            axis = PER_EXAMPLE_AXIS[name]
            out[name] = jax.tree_util.tree_map(
                lambda x, a=axis: jnp.moveaxis(jnp.take(x, ids, axis=0), 0, a), value)
        return out

    @property
    def prompt_positions(self) -> int:
        return self.inner.prompt_positions

    # -- how it describes itself ----------------------------------------------------------
    def config(self):
        return {"tasks": list(self.tasks), "inner": self.inner.method_config()}

    @classmethod
    def from_config(cls, model, config, *, label_words=None, encode=None, **build_context):
        """``inner``: a method config, or (first build, from gin) a spec with ``build``."""
        # The registry lists this module: imported here, not at the top, to avoid a cycle.
        from prompt_t5x.methods import registry

        config = dict(config)
        inner = config.pop("inner", None)
        if hasattr(inner, "build"):       # a gin MethodSpec (commands.configurables)
            inner = inner.build(model, label_words, encode)
        elif isinstance(inner, Mapping):
            inner = registry.build(model, inner, label_words=label_words, encode=encode,
                                   **build_context)
        else:
            raise ValueError("multitask_prompts needs inner={'kind': ..., ...}")
        return cls(model, inner=inner, **config)

    def logical_axes(self, trainable):
        inner_axes = self.inner.logical_axes(self.task_state(trainable, 0))
        return jax.tree_util.tree_map(lambda spec: PartitionSpec("tasks", *spec), inner_axes,
                                      is_leaf=lambda x: isinstance(x, PartitionSpec))

    def export(self, trainable):
        """Each task's inner inference tables stacked along a leading task axis, run by a bank
        of the inner method's inference form."""
        per_task = [self.inner.export(self.task_state(trainable, t)) for t in range(self.num_tasks)]
        inner_config = per_task[0][1]
        tables = {name: jnp.stack([tables[name] for tables, _ in per_task])
                  for name in per_task[0][0]}
        return flatten_tables(tables), {"kind": self.kind, "tasks": list(self.tasks),
                                        "inner": inner_config}
