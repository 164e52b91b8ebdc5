"""Partitioned functions and weights: the frozen T5 never exists whole on one device.

Shapes come first (``t5.param_shapes``: ``jax.eval_shape``, nothing allocated); the logical axis
rules turn them into ``NamedSharding`` s; then the weights are produced *inside* a jit whose
``out_shardings`` are those shardings, so each device only ever materialises its own shard. The
same abstract tree (``ShapeDtypeStruct`` with ``.sharding``) feeds checkpoint restore
(``checkpoints.frozen_sources``) and the ahead-of-time compilation of ``prompt-t5x plan``.

Every step of every run is one ``partition_step``: jitted with explicit in/out shardings and run
under the mesh and the logical-axis rules, so the model's activation constraints
(``nn.with_logical_constraint``) resolve to mesh axes. One device is a 1x1 mesh; there is no
second, unpartitioned path. The trainable state (prompt, optimizer slots, step, rng) is
replicated: for prompt tuning it is a few hundred KB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import jax
from flax import linen as nn
from jax.sharding import Mesh

from prompt_t5x.model import t5
from prompt_t5x.parallel import sharding as sharding_lib

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
