"""The train step: only the trainable tree moves, no weight gradients, loss falls, no TF."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_t5x.methods import model_tuning, prompt_tuning
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train


@pytest.fixture(scope="module")
def setup():
    config = t5.get_config("test", dropout_rate=0.1)
    model = t5.T5(config)
    frozen = t5.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.RandomState(0)
    # batch 6, inputs 11 (+5 prompt), targets 5: no product of these (30, 66, 96) equals a
    # kernel dimension (32, 40, 48, 101), so a flattened activation never looks like a kernel.
    batch = {"encoder_input_tokens": rng.randint(2, 101, (6, 11)).astype(np.int32),
             "decoder_input_tokens": rng.randint(2, 101, (6, 5)).astype(np.int32),
             "decoder_target_tokens": rng.randint(2, 101, (6, 5)).astype(np.int32),
             "decoder_loss_weights": np.ones((6, 5), np.float32)}
    batch["decoder_loss_weights"][:, -1] = 0.0
    return config, model, frozen, {k: jnp.asarray(v) for k, v in batch.items()}


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_only_the_prompt_moves_and_frozen_is_bit_identical(setup):
    config, model, frozen, batch = setup
    method = prompt_tuning.PromptTuning(model, prompt_length=5)
    opt = optim.adafactor()
    before = _copy(frozen)
    state = train.create_train_state(method, opt, frozen, jax.random.PRNGKey(1))
    prompt0 = np.array(state.params["prompt"])
    step = train.make_train_step(method, opt)
    evaluate = train.make_eval_step(method)
    sums = evaluate(state.params, frozen, batch)
    loss_before = float(sums["loss_sum"] / sums["tokens"])
    for _ in range(30):
        state, metrics = step(state, frozen, batch)
    sums = evaluate(state.params, frozen, batch)
    loss_after = float(sums["loss_sum"] / sums["tokens"])
    after = jax.tree.map(np.asarray, frozen)
    jax.tree.map(np.testing.assert_array_equal, before, after)   # bit-identical
    assert set(state.params) == {"prompt"}
    assert np.abs(np.asarray(state.params["prompt"]) - prompt0).max() > 1e-2
    assert int(state.step) == 30
    # the optimizer holds state for the prompt only
    leaves = jax.tree.leaves(state.opt_state)
    assert sum(x.size for x in leaves) < 3 * prompt0.size
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)  # falls on a fixed batch
    assert {"loss", "z_loss", "token_accuracy", "grad_norm", "prompt_norm"} <= set(metrics)


def _dot_output_shapes(jaxpr):
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.append(tuple(eqn.outvars[0].aval.shape))
        for sub in _subjaxprs(eqn.params):
            shapes.extend(_dot_output_shapes(sub))
    return shapes


def _subjaxprs(params):
    for value in params.values():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr
            elif hasattr(v, "eqns"):
                yield v


def _kernel_shapes(frozen):
    shapes = set()
    for leaf in jax.tree.leaves(frozen):
        if leaf.ndim == 2:
            shapes.add(tuple(leaf.shape))
            shapes.add(tuple(leaf.shape[::-1]))
    return shapes


def _weight_gradient_dots(method, frozen, trainable, batch, opt):
    state = train.create_train_state(method, opt, frozen, jax.random.PRNGKey(1), trainable)
    fn = train.train_step_fn(method, opt)
    jaxpr = jax.make_jaxpr(fn)(state, frozen, batch).jaxpr
    kernels = _kernel_shapes(frozen if frozen else trainable)
    in_jaxpr = [s for s in _dot_output_shapes(jaxpr) if s in kernels]
    hlo = jax.jit(fn).lower(state, frozen, batch).compile().as_text()
    in_hlo = []
    for shape in kernels:
        pattern = r"= f32\[%s\]\{[0-9,]*\} dot\(" % ",".join(map(str, shape))
        in_hlo += re.findall(pattern, hlo)
    return in_jaxpr, in_hlo


def test_no_weight_gradient_matmuls_for_prompt_tuning(setup):
    config, model, frozen, batch = setup
    method = prompt_tuning.PromptTuning(model, prompt_length=5)
    opt = optim.adafactor()
    in_jaxpr, in_hlo = _weight_gradient_dots(method, frozen, None, batch, opt)
    assert in_jaxpr == [] and in_hlo == []
    # Positive control: model tuning must show those matmuls, so the check can fail.
    tuning = model_tuning.ModelTuning(model)
    empty, trainable = tuning.split(frozen)
    ctl_jaxpr, ctl_hlo = _weight_gradient_dots(tuning, empty, trainable, batch, opt)
    assert len(ctl_jaxpr) >= 10 and len(ctl_hlo) >= 1


def test_model_tuning_trains_every_weight_through_the_same_step(setup):
    config, model, frozen, batch = setup
    method = model_tuning.ModelTuning(model)
    empty, trainable = method.split(_copy(frozen))
    opt = optim.adafactor(learning_rate=1e-2)
    state = train.create_train_state(method, opt, empty, jax.random.PRNGKey(1), trainable)
    step = train.make_train_step(method, opt)
    for _ in range(3):
        state, metrics = step(state, empty, batch)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                         frozen)
    assert min(jax.tree.leaves(moved)) > 0.0
    assert "prompt_norm" not in metrics


def test_dropout_rng_depends_on_step_and_is_reproducible(setup):
    config, model, frozen, batch = setup
    method = prompt_tuning.PromptTuning(model, prompt_length=5)
    opt = optim.adafactor()
    step = train.make_train_step(method, opt, donate=False)
    s0 = train.create_train_state(method, opt, frozen, jax.random.PRNGKey(1))
    a, ma = step(s0, frozen, batch)
    b, mb = step(s0, frozen, batch)
    np.testing.assert_array_equal(np.asarray(a.params["prompt"]), np.asarray(b.params["prompt"]))
    c, mc = step(a, frozen, batch)
    no_drop = train.make_train_step(method, opt, donate=False, enable_dropout=False)
    d, md = no_drop(s0, frozen, batch)
    assert float(ma["loss"]) != float(md["loss"])   # dropout is really on in training


def test_microbatches_equal_one_big_batch(setup):
    config, model, frozen, batch = setup
    method = prompt_tuning.PromptTuning(model, prompt_length=5)
    opt = optim.adafactor()
    s = train.create_train_state(method, opt, frozen, jax.random.PRNGKey(1))
    full = train.make_train_step(method, opt, donate=False, enable_dropout=False)
    micro = train.make_train_step(method, opt, donate=False, enable_dropout=False,
                                  num_microbatches=3)
    a, ma = full(s, frozen, batch)
    b, mb = micro(s, frozen, batch)
    np.testing.assert_allclose(np.asarray(a.params["prompt"]), np.asarray(b.params["prompt"]),
                               atol=1e-6)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        train.make_train_step(method, opt, num_microbatches=4, donate=False)(s, frozen, batch)


def test_z_loss_and_weights():
    logits = jnp.asarray(np.random.RandomState(0).randn(2, 3, 7), jnp.float32)
    targets = jnp.asarray([[1, 2, 3], [4, 5, 0]])
    weights = jnp.asarray([[1, 1, 1], [1, 1, 0]], jnp.float32)
    ce, zl, correct, w = train.cross_entropy_sums(logits, targets, weights, 1e-4)
    lg = np.asarray(logits)
    logz = np.log(np.exp(lg).sum(-1))
    ce_ref = logz - np.take_along_axis(lg, np.asarray(targets)[..., None], -1)[..., 0]
    wn = np.asarray(weights)
    np.testing.assert_allclose(float(ce), (ce_ref * wn).sum(), rtol=1e-5)
    np.testing.assert_allclose(float(zl), 1e-4 * (logz ** 2 * wn).sum(), rtol=1e-5)
    assert float(w) == 5.0


def test_core_imports_no_tensorflow():
    """Every module of every wing imports without TensorFlow/SeqIO: a GPU machine without them
    runs the model, methods, checkpoints, decoding, meshes, bench and the train/eval commands on
    the generated tasks. (SeqIO is imported lazily, once a SeqIO task is opened.)"""
    root = pathlib.Path(train.__file__).resolve().parents[1]
    modules = sorted(".".join(p.relative_to(root.parent).with_suffix("").parts)
                     for p in root.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(modules) > 40
    code = ("import sys\n"
            f"import {', '.join(modules)}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'seqio', 'tensorflow_datasets'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_microbatches_are_strided_so_each_spans_every_data_shard():
    split = train._split_microbatches({"x": jnp.arange(12).reshape(6, 2)}, 2)["x"]
    assert split.shape == (2, 3, 2)
    np.testing.assert_array_equal(np.asarray(split[0, :, 0]), [0, 4, 8])   # rows 0, 2, 4
    np.testing.assert_array_equal(np.asarray(split[1, :, 0]), [2, 6, 10])  # rows 1, 3, 5
