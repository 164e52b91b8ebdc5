"""Training state and the pure, jitted train step that differentiates only the trainable tree.

Two trees: the frozen T5 weights (an argument of every step, never differentiated, never in the
optimizer state, never donated) and a small ``TrainState`` (trainable params, optimizer state,
step, rng). Because the frozen weights enter ``jax.grad`` as constants, XLA never builds their
weight-gradient matmuls: the backward pass is activation gradients only (tested on the jaxpr).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax

from prompt_t5x.methods.interface import Method

# Re-exported: the LM loss now lives with the methods (the default ``Method.loss_sums``).
from prompt_t5x.methods.token_loss import cross_entropy_sums  # noqa: F401
from prompt_t5x.training import optim

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array       # int32 scalar: train steps taken
    params: PyTree        # the trainable tree only
    opt_state: PyTree
    rng: jax.Array        # base key; the step's dropout key is fold_in(rng, step)


def create_train_state(method: Method, optimizer: optax.GradientTransformation, frozen: PyTree,
                       rng: jax.Array, trainable: Optional[PyTree] = None,
                       step: int = 0) -> TrainState:
    """A fresh state; ``trainable`` defaults to ``method.init_trainable``."""
    init_rng, rng = jax.random.split(rng)
    if trainable is None:
        trainable = method.init_trainable(init_rng, frozen)
    # The method's axis names choose how Adafactor factors its parameters (factor_rules).
    optimizer = optim.with_logical_axes(optimizer, method.logical_axes(trainable))
    return TrainState(step=jnp.asarray(step, jnp.int32), params=trainable,
                      opt_state=optimizer.init(trainable), rng=rng)


def _split_microbatches(batch: Batch, n: int) -> Batch:
    """[B, ...] -> [n, B/n, ...] with microbatch i = rows i, i+n, i+2n, ...

    Strided rather than contiguous: with the batch sharded over the mesh's 'data' axis, every
    microbatch then holds rows of every data shard, so all devices work on every microbatch.
    """
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} microbatches")
        return jnp.swapaxes(x.reshape((x.shape[0] // n, n) + x.shape[1:]), 0, 1)
    return {k: split(v) for k, v in batch.items()}


def train_step_fn(method: Method, optimizer: optax.GradientTransformation, *,
                  z_loss: float = 1e-4, num_microbatches: int = 1, enable_dropout: bool = True
                  ) -> Callable[[TrainState, PyTree, Batch], Tuple[TrainState, Metrics]]:
    """The pure (unjitted) step; ``make_train_step`` jits it, ``sharding`` adds shardings.

    The loss is ``method.loss_sums`` (the LM cross entropy unless the method says otherwise)
    divided by its weight (target tokens summed over the whole batch, across microbatches), so
    gradient accumulation gives the same gradient as one big batch.
    """

    def sums(trainable, frozen, batch, rng):
        ce, zl, correct, weight = method.loss_sums(frozen, trainable, batch,
                                                   enable_dropout=enable_dropout, rng=rng,
                                                   z_loss=z_loss)
        return ce + zl, (ce, zl, correct, weight)

    grad_fn = jax.grad(sums, has_aux=True)

    def step(state: TrainState, frozen: PyTree, batch: Batch) -> Tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(state.rng, state.step)
        if num_microbatches == 1:
            grads, (ce, zl, correct, weight) = grad_fn(state.params, frozen, batch, rng)
        else:
            micro = _split_microbatches(batch, num_microbatches)

            def body(carry, xs):
                acc, i = carry
                g, aux = grad_fn(state.params, frozen, xs, jax.random.fold_in(rng, i))
                acc = jax.tree.map(jnp.add, acc, (g, aux))
                return (acc, i + 1), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     tuple(jnp.zeros((), jnp.float32) for _ in range(4)))
            ((grads, (ce, zl, correct, weight)), _), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.int32)), micro)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        bound = optim.with_logical_axes(optimizer, method.logical_axes(state.params))
        updates, opt_state = bound.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": (ce + zl) / denom, "z_loss": zl / denom,
                   # teacher-forced, in percent like validation's (data.metrics): not the
                   # task's "accuracy", which validation reports under that name
                   "token_accuracy": 100.0 * correct / denom, "tokens": weight,
                   "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params)}
        if isinstance(params, Mapping) and "prompt" in params:
            metrics["prompt_norm"] = jnp.linalg.norm(params["prompt"].astype(jnp.float32))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return step


def make_train_step(method: Method, optimizer: optax.GradientTransformation, *,
                    z_loss: float = 1e-4, num_microbatches: int = 1, enable_dropout: bool = True,
                    donate: bool = True):
    """Jitted ``train_step(state, frozen, batch) -> (state, metrics)``; the state is donated."""
    fn = train_step_fn(method, optimizer, z_loss=z_loss, num_microbatches=num_microbatches,
                       enable_dropout=enable_dropout)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


def eval_sums_fn(method: Method, *, z_loss: float = 1e-4):
    """Pure ``(trainable, frozen, batch) -> sums`` for teacher-forced evaluation (no dropout)."""

    def sums(trainable, frozen, batch):
        ce, zl, correct, weight = method.loss_sums(frozen, trainable, batch,
                                                   enable_dropout=False, z_loss=z_loss)
        return {"loss_sum": ce + zl, "correct": correct, "tokens": weight}

    return sums


def make_eval_step(method: Method, *, z_loss: float = 1e-4):
    return jax.jit(eval_sums_fn(method, z_loss=z_loss))
