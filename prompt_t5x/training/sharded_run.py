"""A training run's state and step on a mesh: replicated train state, partitioned train step.

``create_train_state`` builds the ``TrainState`` (``training.train``) replicated over the mesh,
``sharded_train_step`` partitions the pure train step (``parallel.partitioning.partition_step``'s
layout: state replicated, frozen weights in their rule shardings, batch split over 'data'), and
``prepare_sharded_run`` puts mesh, frozen weights, state and step together for library users.
One device is a 1x1 mesh: this is the only way a step is built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from jax.sharding import Mesh

from prompt_t5x.checkpoints import frozen_sources
from prompt_t5x.model import t5
from prompt_t5x.parallel import sharding as sharding_lib
from prompt_t5x.parallel.partitioning import (
    ShardedFunction,
    init_frozen,
    partition_step,
    partitioning_context,
    shardings_of,
)
from prompt_t5x.training import train

PyTree = Any


def abstract_train_state(method, optimizer, abstract_frozen_tree: PyTree, mesh: Mesh,
                         trainable: Optional[PyTree] = None) -> PyTree:
    """``ShapeDtypeStruct`` tree of the TrainState (replicated) without running any init."""
    shapes = jax.eval_shape(
        lambda frozen, rng: train.create_train_state(method, optimizer, frozen, rng, trainable),
        abstract_frozen_tree, jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_lib.replicated(mesh)),
        shapes)


def create_train_state(method, optimizer, frozen: PyTree, rng: jax.Array, mesh: Mesh,
                       rules: sharding_lib.Rules, trainable: Optional[PyTree] = None) -> PyTree:
    """``train.create_train_state`` with its output replicated over ``mesh``.

    ``frozen`` may be sharded (an initializer such as 'sampled_vocab' reads the embedding).
    """
    # One sharding is a prefix of the whole output tree: no shape pass needed to spell it out.
    with partitioning_context(mesh, rules):
        return jax.jit(
            lambda f, r: train.create_train_state(method, optimizer, f, r, trainable),
            out_shardings=sharding_lib.replicated(mesh))(frozen, rng)


def sharded_train_step(method, optimizer, mesh: Mesh, rules: sharding_lib.Rules,
                       frozen_shardings: PyTree, *, donate_state: bool = True,
                       **step_kwargs) -> ShardedFunction:
    """``train_step(state, frozen, batch) -> (state, metrics)`` partitioned over ``mesh``
    (:func:`partition_step`'s layout). ``step_kwargs`` go to ``train.train_step_fn`` (z_loss,
    num_microbatches, enable_dropout). ``prompt-t5x train`` runs the same step inside its
    non-finite guard (``guarded_step.make_guarded_step``), which is what
    ``prompt-t5x plan`` compiles.
    """
    return partition_step(train.train_step_fn(method, optimizer, **step_kwargs), mesh, rules,
                          frozen_shardings, donate=donate_state)


@dataclasses.dataclass
class ShardedRun:
    """Everything a training loop needs to run on a mesh, built by :func:`prepare_sharded_run`."""
    mesh: Mesh
    rules: sharding_lib.Rules
    frozen: PyTree             # frozen weights, sharded by the rules
    state: PyTree              # TrainState, replicated
    train_step: ShardedFunction

    def shard_batch(self, batch) -> dict:
        """This host's rows -> the global batch split over 'data' (see ``sharding.shard_batch``)."""
        return sharding_lib.shard_batch(batch, self.mesh)


def prepare_sharded_run(config: t5.T5Config, method, optimizer,
                        mesh_config: sharding_lib.MeshConfig, rng: jax.Array, *,
                        checkpoint: Optional[str] = None, trainable: Optional[PyTree] = None,
                        devices=None, **step_kwargs) -> ShardedRun:
    """Mesh, frozen weights (restored from ``checkpoint`` or random), state and train step.

    rng is split in two: frozen-weight init (unused with a checkpoint) and the train state.
    ``step_kwargs`` go to ``train.train_step_fn`` (z_loss, num_microbatches, enable_dropout).
    """
    mesh = sharding_lib.make_mesh(mesh_config, devices)
    rules = mesh_config.rules()
    frozen_rng, state_rng = jax.random.split(rng)
    if checkpoint is not None:
        frozen = frozen_sources.restore_frozen(checkpoint, config, mesh, rules)
    else:
        frozen = init_frozen(config, frozen_rng, mesh, rules)
    state = create_train_state(method, optimizer, frozen, state_rng, mesh, rules, trainable)
    step = sharded_train_step(method, optimizer, mesh, rules, shardings_of(frozen),
                              **step_kwargs)
    return ShardedRun(mesh, rules, frozen, state, step)
