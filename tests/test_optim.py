"""Adafactor (T5X semantics) against values computed by hand in numpy."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_t5x.training import optim


def _numpy_adafactor(param, grads, lr=0.3, decay=0.8, clip=1.0, wd=1e-5, start=0):
    """Plain numpy, written out step by step for a 2-D parameter."""
    p = param.astype(np.float64).copy()
    rows, cols = p.shape
    factored = min(rows, cols) >= 128
    v = np.zeros_like(p)
    # largest dim d0 is averaged out of v_row; second-largest d1 out of v_col
    d0 = 1 if cols >= rows else 0
    v_row = np.zeros(p.shape[1 - d0]) if factored else None
    v_col = np.zeros(p.shape[d0]) if factored else None
    for t, g in enumerate(grads):
        g = g.astype(np.float64)
        beta = 1.0 - (t + start + 1.0) ** -decay
        g2 = g * g + 1e-30
        if factored:
            v_row = beta * v_row + (1 - beta) * g2.mean(axis=d0)
            v_col = beta * v_col + (1 - beta) * g2.mean(axis=1 - d0)
            r = v_row / v_row.mean()
            if d0 == 1:   # v_row indexed by rows, v_col by columns
                u = g / np.sqrt(r[:, None]) / np.sqrt(v_col[None, :])
            else:
                u = g / np.sqrt(r[None, :]) / np.sqrt(v_col[:, None])
        else:
            v = beta * v + (1 - beta) * g2
            u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
        p = p - lr * u - wd * p
    return p


def _run(param, grads, **kw):
    opt = optim.adafactor(**kw)
    params = {"w": jnp.asarray(param)}
    state = opt.init(params)
    for g in grads:
        updates, state = opt.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["w"]), state


@pytest.mark.parametrize("shape", [(5, 8), (130, 140), (150, 129)])
def test_matches_numpy(shape):
    rng = np.random.RandomState(0)
    param = rng.randn(*shape).astype(np.float32)
    grads = [rng.randn(*shape).astype(np.float32) * s for s in (1.0, 0.01, 3.0, 0.5)]
    got, state = _run(param, grads)
    want = _numpy_adafactor(param, grads)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    moments = state.moments["w"]
    if min(shape) >= 128:   # factored: no full-size second moment is kept
        assert moments.v.shape == () and moments.v_row.ndim == 1
    else:
        assert moments.v.shape == shape


def test_first_step_update_is_clipped_sign():
    """Step 1: beta2 = 0, so u = g/|g| = sign(g) (RMS 1, no clipping); lr 0.3 plus decay."""
    param = np.array([[1.0, -2.0, 3.0]], np.float32)
    grad = np.array([[0.5, -4.0, 1e-3]], np.float32)
    got, _ = _run(param, [grad])
    np.testing.assert_allclose(got, param - 0.3 * np.sign(grad) - 1e-5 * param, rtol=1e-6)


def test_weight_decay_not_scaled_by_learning_rate():
    param = np.full((2, 3), 2.0, np.float32)
    zero = np.zeros_like(param)
    # zero gradient: u = 0/sqrt(eps) = 0, so only the decay moves the parameter
    got, _ = _run(param, [zero], learning_rate=1e-9)
    np.testing.assert_allclose(got, param * (1 - 1e-5), rtol=1e-7)


def test_initial_step_continues_the_decay_schedule():
    rng = np.random.RandomState(1)
    param = rng.randn(4, 6).astype(np.float32)
    grads = [rng.randn(4, 6).astype(np.float32) for _ in range(3)]
    got, _ = _run(param, grads, initial_step=1_100_000)
    np.testing.assert_allclose(got, _numpy_adafactor(param, grads, start=1_100_000), rtol=2e-5)
    fresh, _ = _run(param, grads)
    assert np.abs(got - fresh).max() > 1e-3   # the offset really changes the update
    # T5X's step_offset is subtracted: initial_step=10, step_offset=10 == a fresh run
    same, _ = _run(param, grads, initial_step=10, step_offset=10)
    np.testing.assert_allclose(same, fresh, rtol=1e-6)


def test_learning_rate_schedule_sees_the_global_step():
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.3
    _run(np.ones((2, 2), np.float32), [np.ones((2, 2), np.float32)], learning_rate=schedule,
         initial_step=7)
    assert float(seen[0]) == 7.0


def test_factored_dims_rule():
    assert optim.factored_dims((100, 768)) is None          # a T5 base prompt: not factored
    assert optim.factored_dims((768,)) is None
    assert optim.factored_dims((768, 2048)) == (0, 1)
    assert optim.factored_dims((4096, 64, 10)) is None       # second largest < 128
    assert optim.factored_dims((512, 4, 1024)) == (0, 2)
