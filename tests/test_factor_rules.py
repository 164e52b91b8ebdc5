"""Adafactor factor rules (training/factor_rules.py) for 3-D/4-D method parameters: the second
moment's shapes, per-layer factoring against separate per-layer runs, the rule API, gin."""

import dataclasses
from typing import ClassVar

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from prompt_t5x.base.errors import UsageError
from prompt_t5x.commands import configurables, gin_checks  # noqa: F401  (registers optim.*)
from prompt_t5x.methods.interface import Method
from prompt_t5x.model import t5
from prompt_t5x.training import factor_rules, optim, train

PREFIX_AXES = ("layers", "prefix", "heads", "kv")


def _run(params, grads, axes=None, **kw):
    opt = optim.adafactor(**kw)
    if axes is not None:
        opt = optim.with_logical_axes(opt, axes)
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return jax.tree.map(np.asarray, params), state


def _grads(shape, n=4, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(*shape).astype(np.float32) * s for s in (1.0, 0.02, 3.0, 0.5)[:n]]


@pytest.mark.parametrize("min_dim", [128, 8])
def test_per_layer_factoring_equals_separate_runs_per_layer_matrix(min_dim):
    """[layers, P, heads, head_dim] with the prefix axis names: each layer's update is that of
    Adafactor on the layer's own [P, heads*head_dim] matrix (factored when both >= min_dim; at
    128 the 4 x 40 matrices are not, at 8 they are)."""
    layers, p, heads, kv = 3, 12, 4, 10
    rng = np.random.RandomState(1)
    param = rng.randn(layers, p, heads, kv).astype(np.float32)
    grads = _grads(param.shape)
    # Update clipping is per *parameter* (as in T5X), not per layer: off here, so that only the
    # factoring is compared.
    got, state = _run({"key": jnp.asarray(param)}, [{"key": jnp.asarray(g)} for g in grads],
                      axes={"key": PartitionSpec(*PREFIX_AXES)}, min_dim_size_to_factor=min_dim,
                      clipping_threshold=None)
    m = state.moments["key"]
    if min_dim == 8:   # factored per layer: rows P, columns heads x head_dim
        assert m.v_row.shape == (layers, p) and m.v_col.shape == (layers, heads, kv)
        assert m.v.shape == ()
    else:
        assert m.v.shape == param.shape and m.v_row.shape == ()
    for i in range(layers):
        flat = [{"w": jnp.asarray(g[i].reshape(p, heads * kv))} for g in grads]
        want, want_state = _run({"w": jnp.asarray(param[i].reshape(p, heads * kv))}, flat,
                                min_dim_size_to_factor=min_dim, clipping_threshold=None)
        np.testing.assert_allclose(got["key"][i].reshape(p, heads * kv), want["w"],
                                   rtol=1e-5, atol=1e-6)
        if min_dim == 8:
            np.testing.assert_allclose(np.asarray(m.v_row[i]),
                                       np.asarray(want_state.moments["w"].v_row), rtol=1e-5)


def test_rules_choose_the_factoring_and_2d_is_unchanged():
    shapes = {"deep": (2, 160, 130), "big": (256, 4, 300), "none3d": (4, 200, 300),
              "mat": (150, 129), "vec": (300,)}
    params = {k: jnp.zeros(s) for k, s in shapes.items()}
    axes = {"deep": PartitionSpec("layers", "prompt", "embed"),
            "big": PartitionSpec(None, None, None), "none3d": PartitionSpec("a", "b", "c"),
            "mat": PartitionSpec("embed", "mlp"), "vec": PartitionSpec("embed")}
    opt = optim.with_logical_axes(optim.adafactor(factor_rules={"none3d$": "none"}), axes)
    m = opt.init(params).moments
    # default rule for axes 'layers' first: per layer over (axis 1, rest)
    assert m["deep"].v_row.shape == (2, 160) and m["deep"].v_col.shape == (2, 130)
    # no rule: the two largest dims (256, 300), the 4 a batch -- as before
    assert m["big"].v_row.shape == (256, 4) and m["big"].v_col.shape == (4, 300)
    assert m["none3d"].v.shape == (4, 200, 300) and m["none3d"].v_row.shape == ()
    assert m["mat"].v_row.shape == (129,) and m["mat"].v_col.shape == (150,)
    assert m["vec"].v.shape == (300,)
    # without axis names the 'layers' default cannot match: two largest dims (160, 130)
    plain = optim.adafactor().init(params).moments
    assert plain["deep"].v_row.shape == (2, 130) and plain["deep"].v_col.shape == (2, 160)
    # a user rule by axis names wins over the default; '*' matches any name
    opt = optim.with_logical_axes(optim.adafactor(factor_rules=[("axes:layers,*,embed",
                                                                 "none")]), axes)
    assert opt.init(params).moments["deep"].v.shape == (2, 160, 130)
    # 'default' overrides the layers default back to the two largest dims
    opt = optim.with_logical_axes(optim.adafactor(factor_rules={"axes:layers,*,*": "default"}),
                                  axes)
    assert opt.init(params).moments["deep"].v_row.shape == (2, 130)


def test_explicit_roles_update_matches_numpy():
    """Roles 'row,batch,col,col' (non-leading batch, merged columns) against numpy."""
    shape = (6, 2, 3, 5)
    rng = np.random.RandomState(3)
    param = rng.randn(*shape).astype(np.float32)
    grads = _grads(shape, n=3, seed=4)
    got, _ = _run({"w": jnp.asarray(param)}, [{"w": jnp.asarray(g)} for g in grads],
                  factor_rules={"^w$": "row,batch,col,col"}, min_dim_size_to_factor=1)
    p = param.astype(np.float64)
    v_row, v_col = np.zeros((6, 2)), np.zeros((2, 3, 5))
    for t, g in enumerate(grads):
        g = g.astype(np.float64)
        beta = 1.0 - (t + 1.0) ** -0.8
        g2 = g * g + 1e-30
        v_row = beta * v_row + (1 - beta) * g2.mean(axis=(2, 3))
        v_col = beta * v_col + (1 - beta) * g2.mean(axis=0)
        r = v_row / v_row.mean(axis=0, keepdims=True)      # per batch index
        u = g / np.sqrt(r[:, :, None, None]) / np.sqrt(v_col[None])
        u = u / max(1.0, np.sqrt(np.mean(u * u)))
        p = p - 0.3 * u - 1e-5 * p
    np.testing.assert_allclose(got["w"], p, rtol=2e-5, atol=2e-6)


def test_bad_rules_are_value_errors():
    for rules, match in (({"axes:layers,*": "row,col,col"}, "2 axes but 3 roles"),
                         ({"x": "row,batch"}, "one 'row' and one 'col'"),
                         ({"x": "rows,cols"}, "roles from"),
                         ({"(": "none"}, "not a regular expression"),
                         ("none", "must be a dict")):
        with pytest.raises(ValueError, match=match):
            optim.adafactor(factor_rules=rules)
    opt = optim.adafactor(factor_rules={"w": "row,col"})
    with pytest.raises(ValueError, match="gives 2 roles to 'w' of shape"):
        opt.init({"w": jnp.zeros((2, 3, 4))})


@dataclasses.dataclass(frozen=True, eq=False)
class _DeepTable(Method):
    """A method with one trainable [layers, P, D] table added to the encoder output (so it gets
    a gradient); enough to see the train step hand its axis names to the optimizer."""

    kind: ClassVar[str] = "deep_table_test"
    model: t5.T5

    def init_trainable(self, rng, frozen):
        return {"table": jnp.zeros((2, 130, 140))}

    def variables(self, frozen, trainable):
        return {"params": frozen}

    def logits(self, frozen, trainable, batch, *, enable_dropout=False, rng=None):
        base = self.model.apply({"params": frozen}, batch)
        return base + jnp.mean(trainable["table"])

    def logical_axes(self, trainable):
        return {"table": PartitionSpec("layers", "prompt", "embed")}


def test_train_step_uses_the_methods_axis_names():
    config = t5.get_config("test", dropout_rate=0.0)
    method = _DeepTable(t5.T5(config))
    frozen = t5.init_params(config, jax.random.PRNGKey(0))
    opt = optim.adafactor()
    state = train.create_train_state(method, opt, frozen, jax.random.PRNGKey(1))
    m = state.opt_state.moments["table"]
    assert m.v_row.shape == (2, 130) and m.v_col.shape == (2, 140)   # per layer, not (130, 140)
    batch = {k: jnp.asarray(v) for k, v in t5.dummy_batch(2, 4, 2).items()}
    state, _ = train.make_train_step(method, opt, donate=False)(state, frozen, batch)
    assert state.opt_state.moments["table"].v_row.shape == (2, 130)


def test_gin_rule_binding(tmp_path):
    gin.clear_config()
    try:
        gin.parse_config("optim.adafactor.factor_rules = "
                         "{'axes:layers,prefix,heads,kv': 'batch,row,col,col', 'prompt': 'none'}")
        gin_checks.check_bindings()
        opt = gin.get_configurable("optim.adafactor")()
        impl = opt.init.__self__
        assert [r.pattern for r in impl.factor_rules] == ["axes:layers,prefix,heads,kv", "prompt"]
        assert impl.factor_rules[0].roles == ("batch", "row", "col", "col")
        gin.clear_config()
        gin.parse_config("optim.adafactor.factor_rules = {'prompt': 'rows'}")
        with pytest.raises(UsageError, match="optim.adafactor.factor_rules="):
            gin_checks.check_bindings()
    finally:
        gin.clear_config()
    assert factor_rules.DEFAULT_FACTOR_RULES[1].axes == ("layers", "*", "*", "*")
