"""Adafactor with T5X's semantics, as an optax ``GradientTransformation``.

The prompt-tuning recipe (Lester et al., 2021): learning rate 0.3 (constant), second-moment decay
``beta2_t = 1 - t^-0.8``, update clipping at RMS 1.0, no momentum, weight decay 1e-5 applied to the
parameter directly (``p <- p - lr * u - 1e-5 * p``, NOT scaled by the learning rate), no
parameter scaling.

Per parameter, with ``g2 = g*g + eps1``:

- factored (the two largest dims both >= ``min_dim_size_to_factor``, ``d0`` the largest, ``d1`` the
  second): ``v_row = b*v_row + (1-b)*mean(g2, d0)``, ``v_col = b*v_col + (1-b)*mean(g2, d1)``,
  ``u = g * (v_row / mean(v_row, d1))^-1/2 * v_col^-1/2``;
- otherwise ``v = b*v + (1-b)*g2``, ``u = g * v^-1/2``;
- ``u /= max(1, rms(u) / clipping_threshold)``; update ``-lr * u`` (times ``max(rms(p), eps2)`` when
  ``multiply_by_parameter_scale``), minus ``weight_decay_rate * p``.

The step ``t`` used for the decay and the learning-rate schedule is the optimizer's own count plus
``initial_step`` minus ``step_offset``: T5X keeps counting from the pretrained checkpoint's step
(1,100,000 for the LM-adapted T5 1.1) and decays ``beta2`` with it, so a prompt-tuning run that
reproduces T5X sets ``initial_step=1_100_000``. ``step_offset`` has T5X's meaning (subtracted).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Union[float, Callable[[jax.Array], jax.Array]]


class FactoredMoments(NamedTuple):
    v_row: jax.Array  # shape with d0 removed ([] placeholder when unfactored)
    v_col: jax.Array  # shape with d1 removed
    v: jax.Array      # full shape when unfactored ([] placeholder when factored)


class AdafactorState(NamedTuple):
    count: jax.Array  # int32 scalar: updates applied by this optimizer
    moments: Any      # tree of FactoredMoments, same structure as the params


def factored_dims(shape: Tuple[int, ...], factored: bool = True,
                  min_dim_size_to_factor: int = 128) -> Optional[Tuple[int, int]]:
    """(d1, d0): the second-largest and largest dims to factor over, or None (T5X's rule)."""
    if not factored or len(shape) < 2:
        return None
    order = np.argsort(shape, kind="stable")
    if shape[order[-2]] < min_dim_size_to_factor:
        return None
    return int(order[-2]), int(order[-1])


def adafactor(learning_rate: Schedule = 0.3, decay_rate: float = 0.8, initial_step: int = 0,
              step_offset: int = 0, clipping_threshold: Optional[float] = 1.0,
              weight_decay_rate: Optional[float] = 1e-5, epsilon1: float = 1e-30,
              epsilon2: float = 1e-3, factored: bool = True, min_dim_size_to_factor: int = 128,
              multiply_by_parameter_scale: bool = False) -> optax.GradientTransformation:
    """T5X Adafactor (defaults: the prompt-tuning paper's recipe). See the module docstring."""

    def init_fn(params):
        def moments(p):
            dims = factored_dims(p.shape, factored, min_dim_size_to_factor)
            # Distinct placeholder buffers: the state is donated, and one buffer donated twice
            # is an error.
            empty = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
            if dims is None:
                return FactoredMoments(empty(), empty(), jnp.zeros(p.shape, jnp.float32))
            d1, d0 = dims
            return FactoredMoments(jnp.zeros(np.delete(p.shape, d0), jnp.float32),
                                   jnp.zeros(np.delete(p.shape, d1), jnp.float32), empty())
        return AdafactorState(jnp.zeros((), jnp.int32), jax.tree.map(moments, params))

    def update_fn(grads, state, params=None):
        if params is None:
            raise ValueError("adafactor needs the params (for weight decay / parameter scaling)")
        step = (state.count + initial_step - step_offset).astype(jnp.float32)
        lr = learning_rate(step) if callable(learning_rate) else learning_rate
        beta2 = 1.0 - (step + 1.0) ** (-decay_rate)
        mix = 1.0 - beta2

        def one(g, m, p):
            g = g.astype(jnp.float32)
            p32 = p.astype(jnp.float32)
            g2 = g * g + epsilon1
            dims = factored_dims(g.shape, factored, min_dim_size_to_factor)
            if dims is None:
                v = beta2 * m.v + mix * g2
                u = g * jax.lax.rsqrt(v)
                new_m = FactoredMoments(m.v_row, m.v_col, v)
            else:
                d1, d0 = dims
                v_row = beta2 * m.v_row + mix * jnp.mean(g2, axis=d0)
                v_col = beta2 * m.v_col + mix * jnp.mean(g2, axis=d1)
                reduced_d1 = d1 - 1 if d1 > d0 else d1
                row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row, axis=reduced_d1, keepdims=True))
                col_factor = jax.lax.rsqrt(v_col)
                u = g * jnp.expand_dims(row_factor, d0) * jnp.expand_dims(col_factor, d1)
                new_m = FactoredMoments(v_row, v_col, m.v)
            if clipping_threshold is not None:
                u = u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(u * u)) / clipping_threshold)
            scale = lr
            if multiply_by_parameter_scale:
                scale = scale * jnp.maximum(jnp.sqrt(jnp.mean(p32 * p32)), epsilon2)
            update = -scale * u
            if weight_decay_rate:
                update = update - weight_decay_rate * p32
            return update.astype(p.dtype), new_m

        is_moment = lambda x: isinstance(x, FactoredMoments)  # noqa: E731
        flat_m, treedef = jax.tree.flatten(state.moments, is_leaf=is_moment)
        flat_g = treedef.flatten_up_to(grads)
        flat_p = treedef.flatten_up_to(params)
        results = [one(g, m, p) for g, m, p in zip(flat_g, flat_m, flat_p)]
        updates = treedef.unflatten([r[0] for r in results])
        moments = treedef.unflatten([r[1] for r in results])
        return updates, AdafactorState(state.count + 1, moments)

    return optax.GradientTransformation(init_fn, update_fn)
