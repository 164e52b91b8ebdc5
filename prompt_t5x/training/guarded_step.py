"""The train step inside a non-finite guard: what ``prompt-t5x train`` runs at every step.

``guarded_step_fn`` wraps ``train.train_step_fn`` with two small on-device accumulators, so the
training loop never waits for the device between steps: the running sums of the logged metrics
(``AVERAGED``) and a guard that records the first step whose loss, gradient norm or updated
parameters (``GUARDED``) are NaN/Inf. ``make_guarded_step`` partitions it over a mesh
(``partitioning.partition_step``; one device is a 1x1 mesh), and ``prompt-t5x plan`` compiles
that very function.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from prompt_t5x.methods.interface import Method
from prompt_t5x.parallel import partitioning
from prompt_t5x.training import train as train_lib

PyTree = Any
# Scalars averaged over the logging window (the rest are reported at the window's last step).
AVERAGED = ("loss", "z_loss", "token_accuracy", "grad_norm")
GUARDED = ("loss", "grad_norm", "param_norm")


def make_guarded_step(method: Method, optimizer: optax.GradientTransformation, mesh, rules,
                      frozen_shardings: PyTree, num_microbatches: int = 1,
                      z_loss: float = 1e-4):
    """:func:`guarded_step_fn` partitioned over ``mesh`` (``partitioning.partition_step``:
    state, accumulators and outputs replicated, ``frozen`` in ``frozen_shardings``, the batch
    split over 'data'; state and accumulators donated); runs (and traces) under the mesh +
    ``rules``. The only way a training step is built: one device is a 1x1 mesh
    (``sharding.single_device_mesh``). ``prompt-t5x plan`` compiles this very function.

    Cached per (method, optimizer, mesh, rules, shardings, settings), so a resumed or repeated
    run in the same process (scaling sweeps, tests) reuses the compiled step.
    """
    leaves, treedef = jax.tree_util.tree_flatten(frozen_shardings)
    return _cached_guarded_step(method, optimizer, mesh, tuple(rules), treedef, tuple(leaves),
                                num_microbatches, z_loss)


@functools.lru_cache(maxsize=8)
def _cached_guarded_step(method, optimizer, mesh, rules, treedef, leaves, num_microbatches,
                         z_loss):
    frozen_shardings = jax.tree_util.tree_unflatten(treedef, leaves)
    return partitioning.partition_step(
        guarded_step_fn(method, optimizer, num_microbatches, z_loss), mesh, rules,
        frozen_shardings, num_carried=1)


def fresh_accumulators():
    """The guarded step's ``acc`` at the start of a logging window: (metric sums, guard)."""
    sums = {k: jnp.zeros((), jnp.float32) for k in AVERAGED}
    sums["steps"] = jnp.zeros((), jnp.float32)
    return sums, jnp.asarray([-1.0, 0.0, 0.0, 0.0], jnp.float32)


def guarded_step_fn(method: Method, optimizer: optax.GradientTransformation,
                    num_microbatches: int = 1, z_loss: float = 1e-4):
    """Pure ``(state, frozen, batch, acc) -> (state, acc, last)``; ``acc`` = (metric sums,
    guard), ``last`` = the step's other metrics (param/prompt norms, tokens).

    The guard is ``[first bad step, loss, grad_norm, param_norm]`` at the first non-finite step
    (step -1 while all is well). Everything stays on device.
    """
    step_fn = train_lib.train_step_fn(method, optimizer, z_loss=z_loss,
                                      num_microbatches=num_microbatches)

    def guarded(state, frozen, batch, acc):
        sums, guard = acc
        new_state, metrics = step_fn(state, frozen, batch)
        values = jnp.stack([metrics[k].astype(jnp.float32) for k in GUARDED])
        ok = jnp.all(jnp.isfinite(values))
        first = jnp.logical_and(guard[0] < 0, jnp.logical_not(ok))
        guard = jnp.where(first, jnp.concatenate([new_state.step[None].astype(jnp.float32),
                                                  values]), guard)
        sums = {k: sums[k] + metrics[k].astype(jnp.float32) for k in AVERAGED}
        last = {k: v.astype(jnp.float32) for k, v in metrics.items() if k not in AVERAGED}
        return new_state, ({**sums, "steps": acc[0]["steps"] + 1.0}, guard), last

    return guarded
