"""Adafactor with T5X's semantics, as an optax ``GradientTransformation``.

The prompt-tuning recipe (Lester et al., 2021): learning rate 0.3 (constant), second-moment decay
``beta2_t = 1 - t^-0.8``, update clipping at RMS 1.0, no momentum, weight decay 1e-5 applied to the
parameter directly (``p <- p - lr * u - 1e-5 * p``, NOT scaled by the learning rate), no
parameter scaling.

Per parameter, with ``g2 = g*g + eps1``:

- factored (with no factor rule: the two largest dims both >= ``min_dim_size_to_factor``, ``d0``
  the largest, ``d1`` the second): ``v_row = b*v_row + (1-b)*mean(g2, d0)``,
  ``v_col = b*v_col + (1-b)*mean(g2, d1)``, ``u = g * (v_row / mean(v_row, d1))^-1/2 * v_col^-1/2``;
- otherwise ``v = b*v + (1-b)*g2``, ``u = g * v^-1/2``;
- ``u /= max(1, rms(u) / clipping_threshold)``; update ``-lr * u`` (times ``max(rms(p), eps2)`` when
  ``multiply_by_parameter_scale``), minus ``weight_decay_rate * p``.

The step ``t`` used for the decay and the learning-rate schedule is the optimizer's own count plus
``initial_step`` minus ``step_offset``: T5X keeps counting from the pretrained checkpoint's step
(1,100,000 for the LM-adapted T5 1.1) and decays ``beta2`` with it, so a prompt-tuning run that
reproduces T5X sets ``initial_step=1_100_000``. ``step_offset`` has T5X's meaning (subtracted).

Which dims are factored is chosen per parameter by ``factor_rules`` (``training.factor_rules``:
by path or by logical axis names); the factored update above generalises to row/column *sets*
of dims with any other dims a batch of independent matrices. Axis-name rules need the method's
``logical_axes``: ``with_logical_axes(optimizer, axes)`` binds them (the train step does).
The factoring fixes the optimizer state's shapes, so a resumed run must use the same rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prompt_t5x.training import factor_rules as rules_lib

Schedule = Union[float, Callable[[jax.Array], jax.Array]]


class FactoredMoments(NamedTuple):
    v_row: jax.Array  # shape with the column dims removed ([] placeholder when unfactored)
    v_col: jax.Array  # shape with the row dims removed
    v: jax.Array      # full shape when unfactored ([] placeholder when factored)


class AdafactorState(NamedTuple):
    count: jax.Array  # int32 scalar: updates applied by this optimizer
    moments: Any      # tree of FactoredMoments, same structure as the params


def factored_dims(shape: Tuple[int, ...], factored: bool = True,
                  min_dim_size_to_factor: int = 128) -> Optional[Tuple[int, int]]:
    """(d1, d0): the second-largest and largest dims to factor over, or None (the rule used
    when no factor rule matches)."""
    if not factored:
        return None
    dims = rules_lib.default_factoring(tuple(shape), min_dim_size_to_factor)
    return None if dims is None else (dims[0][0], dims[1][0])


def _reduced_positions(dims: Tuple[int, ...], removed: Tuple[int, ...]) -> Tuple[int, ...]:
    """Where ``dims`` sit once the ``removed`` dims are gone."""
    return tuple(d - sum(r < d for r in removed) for d in dims)


@dataclasses.dataclass(frozen=True, eq=False)
class _Adafactor:
    """The hyper-parameters, factor rules and (optionally) the params' logical axis names."""

    learning_rate: Schedule
    decay_rate: float
    initial_step: int
    step_offset: int
    clipping_threshold: Optional[float]
    weight_decay_rate: Optional[float]
    epsilon1: float
    epsilon2: float
    factored: bool
    min_dim_size_to_factor: int
    multiply_by_parameter_scale: bool
    factor_rules: Tuple[rules_lib.FactorRule, ...] = ()
    logical_axes: Any = None

    def transformation(self) -> optax.GradientTransformation:
        return optax.GradientTransformation(self.init, self.update)

    def factorings(self, params) -> list:
        return rules_lib.resolve(params, self.factor_rules, self.logical_axes, self.factored,
                                 self.min_dim_size_to_factor)

    def init(self, params):
        # Distinct placeholder buffers: the state is donated, and one buffer donated twice is
        # an error.
        empty = lambda: jnp.zeros((), jnp.float32)  # noqa: E731
        leaves, treedef = jax.tree.flatten(params)
        moments = []
        for p, dims in zip(leaves, self.factorings(params)):
            if dims is None:
                moments.append(FactoredMoments(empty(), empty(),
                                               jnp.zeros(p.shape, jnp.float32)))
                continue
            rows, cols = dims
            moments.append(FactoredMoments(jnp.zeros(np.delete(p.shape, cols), jnp.float32),
                                           jnp.zeros(np.delete(p.shape, rows), jnp.float32),
                                           empty()))
        return AdafactorState(jnp.zeros((), jnp.int32), treedef.unflatten(moments))

    def update(self, grads, state, params=None):
        if params is None:
            raise ValueError("adafactor needs the params (for weight decay / parameter scaling)")
        step = (state.count + self.initial_step - self.step_offset).astype(jnp.float32)
        lr = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
        beta2 = 1.0 - (step + 1.0) ** (-self.decay_rate)
        mix = 1.0 - beta2

        def one(g, m, p, dims):
            g = g.astype(jnp.float32)
            p32 = p.astype(jnp.float32)
            g2 = g * g + self.epsilon1
            if dims is None:
                v = beta2 * m.v + mix * g2
                u = g * jax.lax.rsqrt(v)
                new_m = FactoredMoments(m.v_row, m.v_col, v)
            else:
                rows, cols = dims
                v_row = beta2 * m.v_row + mix * jnp.mean(g2, axis=cols)
                v_col = beta2 * m.v_col + mix * jnp.mean(g2, axis=rows)
                # Normalised per matrix: the mean over its row dims only (batch dims stay).
                row_mean = jnp.mean(v_row, axis=_reduced_positions(rows, cols), keepdims=True)
                row_factor = jax.lax.rsqrt(v_row / row_mean)
                col_factor = jax.lax.rsqrt(v_col)
                u = g * jnp.expand_dims(row_factor, cols) * jnp.expand_dims(col_factor, rows)
                new_m = FactoredMoments(v_row, v_col, m.v)
            if self.clipping_threshold is not None:
                u = u / jnp.maximum(1.0, jnp.sqrt(jnp.mean(u * u)) / self.clipping_threshold)
            scale = lr
            if self.multiply_by_parameter_scale:
                scale = scale * jnp.maximum(jnp.sqrt(jnp.mean(p32 * p32)), self.epsilon2)
            update = -scale * u
            if self.weight_decay_rate:
                update = update - self.weight_decay_rate * p32
            return update.astype(p.dtype), new_m

        is_moment = lambda x: isinstance(x, FactoredMoments)  # noqa: E731
        flat_m, treedef = jax.tree.flatten(state.moments, is_leaf=is_moment)
        flat_g = treedef.flatten_up_to(grads)
        flat_p = treedef.flatten_up_to(params)
        results = [one(g, m, p, dims) for g, m, p, dims
                   in zip(flat_g, flat_m, flat_p, self.factorings(params))]
        updates = treedef.unflatten([r[0] for r in results])
        moments = treedef.unflatten([r[1] for r in results])
        return updates, AdafactorState(state.count + 1, moments)


def adafactor(learning_rate: Schedule = 0.3, decay_rate: float = 0.8, initial_step: int = 0,
              step_offset: int = 0, clipping_threshold: Optional[float] = 1.0,
              weight_decay_rate: Optional[float] = 1e-5, epsilon1: float = 1e-30,
              epsilon2: float = 1e-3, factored: bool = True, min_dim_size_to_factor: int = 128,
              multiply_by_parameter_scale: bool = False,
              factor_rules: Optional[rules_lib.Rules] = None) -> optax.GradientTransformation:
    """T5X Adafactor (defaults: the prompt-tuning paper's recipe). See the module docstring;
    ``factor_rules``: ``{pattern: factoring}``, see ``prompt_t5x.training.factor_rules``."""
    return _Adafactor(learning_rate, decay_rate, initial_step, step_offset, clipping_threshold,
                      weight_decay_rate, epsilon1, epsilon2, factored, min_dim_size_to_factor,
                      multiply_by_parameter_scale,
                      rules_lib.parse(factor_rules)).transformation()


def with_logical_axes(optimizer: optax.GradientTransformation,
                      logical_axes: Any) -> optax.GradientTransformation:
    """``optimizer`` with the params' logical axis names (a ``PartitionSpec`` tree like the
    params) for its axis-name factor rules; any other optimizer is returned as it is."""
    impl = getattr(optimizer.init, "__self__", None)
    if not isinstance(impl, _Adafactor):
        return optimizer
    return dataclasses.replace(impl, logical_axes=logical_axes).transformation()
