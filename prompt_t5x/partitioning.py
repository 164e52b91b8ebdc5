"""Sharded init, restore and train step: the frozen T5 never exists whole on one device.

Shapes come first (``t5.param_shapes``: ``jax.eval_shape``, nothing allocated); the logical axis
rules turn them into ``NamedSharding`` s; then the weights are produced *inside* a jit whose
``out_shardings`` are those shardings, so each device only ever materialises its own shard. The
same abstract tree (``ShapeDtypeStruct`` with ``.sharding``) feeds checkpoint restore and the
ahead-of-time compilation of ``prompt-t5x plan``.

Every partitioned step (``partition_step``: the train step here, the guarded step of
``prompt-t5x train`` and ``plan``) is jitted with explicit in/out shardings and runs under the
mesh and the logical-axis rules, so the model's activation constraints
(``nn.with_logical_constraint``) resolve to mesh axes. The trainable state (prompt, optimizer
slots, step, rng) is replicated: for prompt tuning it is a few hundred KB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
from flax import linen as nn
from jax.sharding import Mesh

from prompt_t5x import sharding as sharding_lib
from prompt_t5x import t5

PyTree = Any


@contextlib.contextmanager
def partitioning_context(mesh: Mesh, rules: sharding_lib.Rules):
    """Mesh + logical-axis rules: inside it flax's activation constraints bind to ``mesh``."""
    with sharding_lib.mesh_context(mesh), nn.logical_axis_rules(rules):
        yield


def abstract_frozen(config: t5.T5Config, mesh: Mesh, rules: sharding_lib.Rules) -> PyTree:
    """``ShapeDtypeStruct`` per frozen parameter (dtype = ``config.param_dtype``) with its sharding.

    Raises ValueError naming every parameter the mesh cannot split evenly.
    """
    shapes = t5.param_shapes(config)
    shardings = sharding_lib.frozen_shardings(config, mesh, rules)
    sharding_lib.check_divisible(shapes, shardings)
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def shardings_of(abstract: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda a: a.sharding, abstract)


def init_frozen(config: t5.T5Config, rng: jax.Array, mesh: Mesh,
                rules: sharding_lib.Rules) -> PyTree:
    """Random T5 weights created directly in their shards (for tests, benchmarks, from-scratch).

    Same values as ``t5.init_params(config, rng)``: the random numbers do not depend on layout.
    """
    shardings = shardings_of(abstract_frozen(config, mesh, rules))
    with partitioning_context(mesh, rules):
        return jax.jit(functools.partial(t5.init_params, config), out_shardings=shardings)(rng)


def restore_frozen(path: str, config: t5.T5Config, mesh: Mesh, rules: sharding_lib.Rules, *,
                   step: Optional[int] = None) -> PyTree:
    """Reads a T5X checkpoint's ``target`` tree straight into the shards of ``mesh``.

    Each host reads only the slices its devices hold (``checkpoints.LazyArray.to_jax``), so an
    11B checkpoint never passes through one host's memory whole. Floating weights are cast to
    ``config.param_dtype`` while reading (bf16 frozen weights from an f32 checkpoint).
    """
    from prompt_t5x import checkpoints  # owns the on-disk formats
    shardings = shardings_of(abstract_frozen(config, mesh, rules))
    loaded = checkpoints.load_t5x(path, config, step=step, shardings=shardings,
                                  dtype=config.param_dtype)
    return loaded.params


def abstract_train_state(method, optimizer, abstract_frozen_tree: PyTree, mesh: Mesh,
                         trainable: Optional[PyTree] = None) -> PyTree:
    """``ShapeDtypeStruct`` tree of the TrainState (replicated) without running any init."""
    from prompt_t5x import train
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
    from prompt_t5x import train
    state_shardings = jax.tree_util.tree_map(
        lambda _: sharding_lib.replicated(mesh),
        jax.eval_shape(lambda f, r: train.create_train_state(method, optimizer, f, r, trainable),
                       frozen, rng))
    with partitioning_context(mesh, rules):
        return jax.jit(
            lambda f, r: train.create_train_state(method, optimizer, f, r, trainable),
            out_shardings=state_shardings)(frozen, rng)


@dataclasses.dataclass
class ShardedFunction:
    """A jitted function bound to a mesh and rules: calls and lowers inside that context."""
    jitted: Callable
    mesh: Mesh
    rules: sharding_lib.Rules

    def __call__(self, *args):
        with partitioning_context(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        """Lowers for concrete or abstract (``ShapeDtypeStruct``) arguments; ``.compile()`` it."""
        with partitioning_context(self.mesh, self.rules):
            return self.jitted.lower(*args)


def partition(fn: Callable, mesh: Mesh, rules: sharding_lib.Rules, in_shardings,
              out_shardings, donate_argnums=()) -> ShardedFunction:
    """``jax.jit(fn)`` with explicit shardings, bound to ``mesh`` and ``rules``."""
    return ShardedFunction(jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                                   donate_argnums=donate_argnums), mesh, rules)


def partition_step(step_fn: Callable, mesh: Mesh, rules: sharding_lib.Rules,
                   frozen_shardings: PyTree, *, num_carried: int = 0,
                   donate: bool = True) -> ShardedFunction:
    """A step ``(state, frozen, batch, *carried) -> outputs`` partitioned over ``mesh``.

    The one layout of every training step here: state, carried values and all outputs
    replicated; ``frozen`` in ``frozen_shardings`` (from the rules); batch features
    [batch, ...] split over 'data'. ``donate`` donates the state and the carried values.
    """
    rep = sharding_lib.replicated(mesh)
    in_shardings = (rep, frozen_shardings, sharding_lib.batch_sharding(mesh)) + \
        (rep,) * num_carried
    donated = ((0,) + tuple(range(3, 3 + num_carried))) if donate else ()
    return partition(step_fn, mesh, rules, in_shardings, rep, donated)


def sharded_train_step(method, optimizer, mesh: Mesh, rules: sharding_lib.Rules,
                       frozen_shardings: PyTree, *, donate_state: bool = True,
                       **step_kwargs) -> ShardedFunction:
    """``train_step(state, frozen, batch) -> (state, metrics)`` partitioned over ``mesh``
    (:func:`partition_step`'s layout). ``step_kwargs`` go to ``train.train_step_fn`` (z_loss,
    num_microbatches, enable_dropout). ``prompt-t5x train`` runs the same step inside its
    non-finite guard (``guarded_step.make_sharded_guarded_step``), which is what
    ``prompt-t5x plan`` compiles.
    """
    from prompt_t5x import train
    return partition_step(train.train_step_fn(method, optimizer, **step_kwargs), mesh, rules,
                          frozen_shardings, donate=donate_state)


def place_on_mesh(tree: PyTree, mesh: Mesh):
    """(tree on ``mesh``, its shardings): leaves already on ``mesh`` keep their sharding (the
    rules' layout chosen by whoever created them); anything else is replicated onto it."""
    rep = sharding_lib.replicated(mesh)

    def sharding_of(leaf):
        current = getattr(leaf, "sharding", None)
        if (isinstance(current, jax.sharding.NamedSharding)
                and current.mesh.devices.shape == mesh.devices.shape
                and (current.mesh.devices == mesh.devices).all()):
            return current
        return rep

    shardings = jax.tree_util.tree_map(sharding_of, tree)
    return jax.device_put(tree, shardings), shardings


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
        frozen = restore_frozen(checkpoint, config, mesh, rules)
    else:
        frozen = init_frozen(config, frozen_rng, mesh, rules)
    state = create_train_state(method, optimizer, frozen, state_rng, mesh, rules, trainable)
    step = sharded_train_step(method, optimizer, mesh, rules, shardings_of(frozen),
                              **step_kwargs)
    return ShardedRun(mesh, rules, frozen, state, step)
