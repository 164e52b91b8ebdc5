"""IPT (methods/ipt.py, methods/ipt_encoders.py): the method contract for every instance
strategy; the 'lookup' and 'mlp' instance prompts against a numpy computation; instance parts
that differ across examples and agree for identical inputs; the docstring's parameter table; bad
settings; one CLI run."""

import functools
import json

import jax
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.base.errors import UsageError
from prompt_t5x.commands import cli
from prompt_t5x.methods import interface, ipt, registry
from prompt_t5x.model import t5

# Sizes chosen so no trainable 2-D shape equals a 'test' T5 kernel (32, 40, 48, 101 dims).
SMALL = {"task_length": 3, "instance_length": 2, "hidden": 12, "lookup_rows": 64}
VARIANTS = {name: {"kind": "ipt", "instance": name, **SMALL} for name in ipt.INSTANCES}
VARIANTS["prefix"]["parts"] = ["encoder", "decoder_self", "decoder_cross"]


# One layer per stack (the 'test' T5 has 2 + 3), so every check compiles a fraction of the
# model; 'prefix' keeps two encoder layers, so its layer-0 addition stands apart from the plain
# tables of the other layer.
CONFIG = contract.tiny_config(num_encoder_layers=1, num_decoder_layers=1)
PREFIX_CONFIG = contract.tiny_config(num_decoder_layers=1)


def _config(name):
    return PREFIX_CONFIG if name == "prefix" else CONFIG


def _build(name, config=None):
    return registry.build(t5.T5(config or _config(name)), VARIANTS[name])


def _inputs(method, frozen, state, tokens):
    """``example_inputs``' per-example arrays, jitted (eager op-by-op is the slow part)."""
    def arrays(frozen, state, tokens):
        inputs = method.example_inputs(frozen, state, {"encoder_input_tokens": tokens})
        return {k: v for k, v in inputs.items() if k in ("prompt", "prefixes")}
    return jax.jit(arrays)(frozen, state, tokens)


@functools.lru_cache(maxsize=None)
def _frozen(config):
    return contract.tiny_frozen(config)


@pytest.fixture(scope="module")
def frozen_of():
    """frozen_of(name): the frozen T5 of variant ``name``'s config (one per config)."""
    return lambda name: _frozen(_config(name))


@pytest.mark.parametrize("name", ipt.INSTANCES)
def test_contract_on_one_device(name, frozen_of):
    """Every variant trains only (and all of) its own parameters. The instance encoders
    ('lookup', 'bilstm', 'cnn') only change how the [B, P_inst, D] prompt is made, which then
    enters the model exactly as 'mlp''s does: the model-side checks (no frozen-kernel gradient,
    cached decoding, the rebuilt and exported forms) run on the two paths into the model, the
    prompt ('mlp') and the prefixes ('prefix'), to keep the suite within its CI budget."""
    frozen = frozen_of(name)
    method = _build(name)
    state = contract.check_trains_only_its_parameters(method, frozen)
    if name in ("mlp", "prefix"):
        contract.check_no_frozen_kernel_gradient(method, frozen)
        contract.check_cached_decoding(method, frozen, state.params)
        contract.check_config_round_trip(method, frozen, state.params)


def test_meshes_match_one_device():
    config = contract.mesh_config(num_encoder_layers=1, num_decoder_layers=1)
    contract.check_mesh_matches_one_device(_build("lookup", config),
                                           contract.tiny_frozen(config), meshes=("2x4",))


def test_sigkill_resume_is_exact(tmp_path):
    contract.check_sigkill_resume_is_exact(VARIANTS["mlp"], tmp_path)


def _trained_like(method, frozen, seed=7):
    """A state whose every leaf is perturbed, so no check passes on an init coincidence."""
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    leaves, tree = jax.tree_util.tree_flatten(state)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape)
                                               for x, k in zip(leaves, keys)])


def test_lookup_prompt_by_hand(frozen_of):
    frozen = frozen_of("lookup")
    method = _build("lookup")
    state = _trained_like(method, frozen)
    tokens = contract.make_batch(1)["encoder_input_tokens"]
    tokens[0, :2] = [70, 6]           # 70 >= 64 rows: reads row 6, like token 6
    table = np.asarray(state["lookup"])
    want = table[tokens[:, :2] % 64]                                       # [B, 2, D]
    prompt = np.asarray(_inputs(method, frozen, state, tokens)["prompt"])
    np.testing.assert_allclose(prompt[:, 3:], want, rtol=1e-6)
    np.testing.assert_allclose(prompt[0, 3], prompt[0, 4], rtol=1e-6)      # the shared bucket
    task = np.asarray(state["task_prompt"])
    np.testing.assert_allclose(prompt[:, :3], np.broadcast_to(task, (8, 3, 32)), rtol=1e-6)
    # the table starts as the frozen embedding's first 64 rows
    init = method.init_trainable(jax.random.PRNGKey(0), frozen)["lookup"]
    np.testing.assert_array_equal(np.asarray(init),
                                  np.asarray(frozen["token_embedder"]["embedding"])[:64])


def test_mlp_prompt_by_hand(frozen_of):
    frozen = frozen_of("mlp")
    method = _build("mlp")
    state = _trained_like(method, frozen)
    tokens = contract.make_batch(2)["encoder_input_tokens"]
    emb = np.asarray(frozen["token_embedder"]["embedding"], np.float64)
    enc = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), state["encoder"])
    want = []
    for row in tokens:
        mean = emb[row[row > 0]].mean(axis=0)                             # valid tokens only
        h = np.tanh(mean @ enc["hidden"]["kernel"] + enc["hidden"]["bias"])
        out = h @ enc["out_prompt"]["kernel"] + enc["out_prompt"]["bias"]
        want.append(out.reshape(2, 32))
    got = _inputs(method, frozen, state, tokens)["prompt"]
    np.testing.assert_allclose(np.asarray(got)[:, 3:], np.stack(want), rtol=1e-4, atol=1e-5)


def _instance_part(method, frozen, state, tokens):
    inputs = _inputs(method, frozen, state, tokens)
    if method.instance == "prefix":
        key, value = inputs["prefixes"]["encoder"]                  # [layers, B, P, H, Dh]
        return np.asarray(key[0]).reshape(len(tokens), -1), np.asarray(key[1:])
    return np.asarray(inputs["prompt"][:, 3:]).reshape(len(tokens), -1), None


@pytest.mark.parametrize("name", ipt.INSTANCES)
def test_instance_parts_follow_the_input(name, frozen_of):
    """Rows 0 and 1 hold the same input (row 1 with extra padding for the pooled encoders):
    identical instance parts; every other row's input differs and so does its part."""
    frozen = frozen_of(name)
    method = _build(name)
    state = _trained_like(method, frozen)
    tokens = contract.make_batch(3, length=9)["encoder_input_tokens"]
    tokens[1] = 0
    tokens[1, :6] = tokens[0, :6]
    tokens[0, 6:] = 0
    part, deeper = _instance_part(method, frozen, state, tokens)
    np.testing.assert_allclose(part[1], part[0], rtol=1e-5, atol=1e-6)
    for b in range(2, len(tokens)):
        assert not np.allclose(part[b], part[0], atol=1e-4), f"row {b} equals row 0"
    if deeper is not None:   # the other layers' prefixes are the plain tables, for every row
        table = np.asarray(state["prefixes"]["encoder"]["key"])[1:]
        np.testing.assert_array_equal(deeper, np.broadcast_to(table[:, None], deeper.shape))


def test_parameter_table_in_the_docstring():
    """The module docstring's table is what ``jax.eval_shape`` counts (base at the defaults,
    'test' at this file's settings)."""
    for size in ("test", "base"):
        config = t5.get_config(size)
        for name in ipt.INSTANCES:
            settings = SMALL if size == "test" else {}
            method = registry.build(t5.T5(config), {"kind": "ipt", "instance": name,
                                                    **settings})
            count = interface.count_parameters(jax.eval_shape(
                method.init_trainable, jax.random.PRNGKey(0), t5.param_shapes(config)))
            row = next(line for line in ipt.__doc__.splitlines() if line.startswith(name + " "))
            cell = f"{count:,} ({100 * count / config.num_params:.3g}%)"
            assert cell in row, (size, name, cell, row)


def test_model_inputs_alone_and_bad_settings_refuse(frozen_of):
    frozen = frozen_of("mlp")
    method = _build("mlp")
    with pytest.raises(ValueError, match="encoder_input_tokens"):
        method.model_inputs(method.init_trainable(jax.random.PRNGKey(0), frozen))
    model = t5.T5(CONFIG)
    for bad, needle in (({"instance": "gru"}, "instance"), ({"task_length": 0}, "task_length"),
                        ({"instance": "lookup", "lookup_rows": 1000}, "lookup_rows"),
                        ({"instance": "bilstm", "hidden": 7}, "hidden"),
                        ({"parts": ["decoder"]}, "parts")):
        with pytest.raises(UsageError, match=needle):
            registry.build(model, {"kind": "ipt", **bad})


def test_cli_train_then_eval(tmp_path):
    run = str(tmp_path / "run")
    common = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13",
              "--gin.TARGETS_LENGTH=2"]
    assert cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/ipt.gin",
                     f"--gin.MODEL_DIR={run}", "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2",
                     "--gin.BATCH_SIZE=4", "--gin.TASK_LENGTH=2", "--gin.INSTANCE_LENGTH=2",
                     "--gin.HIDDEN=8", "--gin.train.progress_bar=False",
                     "--gin.train.tensorboard=False", "--gin.train.max_eval_examples=8"]
                    + common) == 0
    out = str(tmp_path / "eval")
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={out}", "--gin.evaluate.max_examples=8"] + common) == 0
    record = json.loads((tmp_path / "eval" /
                         "synthetic_contains_validation_metrics.json").read_text())
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
