"""IDPG (methods/idpg.py): the generator against a hand computation, per-example prompts, the
first pass compiled forward-only, S- and M-IDPG through the method contract, the CLI."""

import json

import jax
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.commands import cli
from prompt_t5x.methods import registry, sentence_repr
from prompt_t5x.methods.idpg import IDPG, phm_matrix
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train

S_IDPG = {"kind": "idpg", "prompt_length": 2, "bottleneck": 8}
M_IDPG = {"kind": "idpg", "prompt_length": 2, "bottleneck": 8, "generator": "phm", "phm_n": 2,
          "layers": "all", "representation": "embedding"}


@pytest.fixture(scope="module")
def frozen():
    return contract.tiny_frozen(contract.tiny_config(num_encoder_layers=2))


def _method(config):
    return registry.build(t5.T5(contract.tiny_config(num_encoder_layers=2)), config)


def test_generator_is_the_bottleneck_on_the_frozen_representation(frozen):
    method = _method(S_IDPG)
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    state = jax.tree_util.tree_map(lambda x: x + 0.01 * np.arange(x.size).reshape(x.shape)
                                   % 0.7, state)   # away from the init's structure
    tokens = contract.make_batch(1)["encoder_input_tokens"]
    got = np.asarray(method.example_inputs(frozen, state, {"encoder_input_tokens": tokens})
                     ["prompt"])
    # M(x) by hand: the encoder without prompt, averaged over the non-padding positions.
    encoded, _ = method.model.apply({"params": frozen}, tokens, method=t5.T5.encode)
    valid = (tokens > 0)[..., None]
    rep = (np.asarray(encoded) * valid).sum(1) / valid.sum(1)
    s = jax.tree_util.tree_map(np.asarray, state)
    z = np.tanh(rep @ s["down"]["kernel"] + s["down"]["bias"])
    want = (z @ s["up"]["kernel"] + s["up"]["bias"]).reshape(len(tokens), 2, -1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], got[1], atol=1e-4)        # a prompt per example
    same = np.asarray(method.example_inputs(frozen, state, {
        "encoder_input_tokens": np.repeat(tokens[:1], 3, axis=0)})["prompt"])
    np.testing.assert_array_equal(same[0], same[2])          # ... a function of the input


def test_phm_generator_counts_and_composes(frozen):
    method = _method(M_IDPG)
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    n, m, td = 2, 8, 2 * method.model.config.emb_dim
    assert state["up"]["rules"].shape == (n, n, n)
    assert state["up"]["factors"].shape == (n, m // n, td // n)
    # n^3 + m*t*D/n numbers instead of m*t*D
    assert state["up"]["rules"].size + state["up"]["factors"].size == n ** 3 + m * td // n
    rules, factors = np.asarray(state["up"]["rules"]), np.asarray(state["up"]["factors"])
    want = sum(np.kron(rules[i], factors[i]) for i in range(n))
    np.testing.assert_allclose(np.asarray(phm_matrix(rules, factors)), want, rtol=1e-6)
    assert state["layer_offsets"].shape == (1, 2, method.model.config.emb_dim)


def _dot_count(method, frozen, batch):
    optimizer = optim.adafactor(learning_rate=0.1)
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(1))
    jaxpr = jax.make_jaxpr(train.train_step_fn(method, optimizer))(state, frozen, batch).jaxpr
    return len(contract._dot_output_shapes(jaxpr))


def test_first_pass_is_forward_only(frozen):
    """The 'encoder' representation adds exactly one forward encoder's matmuls to the step
    (the 'embedding' one adds none): a differentiated first pass would add about three times
    as many (forward, and two per matmul backward)."""
    batch = contract.make_batch(0)
    with_pass = _dot_count(_method(S_IDPG), frozen, batch)
    without = _dot_count(_method(dict(S_IDPG, representation="embedding")), frozen, batch)
    model = t5.T5(contract.tiny_config(num_encoder_layers=2))
    encode = jax.make_jaxpr(lambda p, x: sentence_repr.sentence_representation(model, p, x))(
        frozen, batch["encoder_input_tokens"]).jaxpr
    one_pass = len(contract._dot_output_shapes(encode))
    assert one_pass > 0 and with_pass - without == one_pass


@pytest.mark.parametrize("config", [S_IDPG, M_IDPG], ids=["s_idpg", "m_idpg"])
def test_contract_on_one_device(config, frozen):
    method = _method(config)
    state = contract.check_trains_only_its_parameters(method, frozen)
    contract.check_no_frozen_kernel_gradient(method, frozen)
    contract.check_cached_decoding(method, frozen, state.params)
    contract.check_config_round_trip(method, frozen, state.params)


def test_mesh_matches_one_device():
    config = contract.mesh_config(num_encoder_layers=2)
    method = registry.build(t5.T5(config), M_IDPG)
    contract.check_mesh_matches_one_device(method, contract.tiny_frozen(config), ("2x4",))


def test_resume_after_sigkill_is_exact(tmp_path):
    contract.check_sigkill_resume_is_exact(S_IDPG, tmp_path)


def test_bad_settings_are_refused():
    model = t5.T5(contract.tiny_config())
    with pytest.raises(ValueError, match="phm_n"):
        IDPG(model, bottleneck=6, generator="phm", phm_n=4)
    with pytest.raises(ValueError, match="representation"):
        IDPG(model, representation="cls")
    with pytest.raises(ValueError, match=">= 2 encoder layers"):
        IDPG(t5.T5(contract.tiny_config(num_encoder_layers=1)), layers="all")


def test_train_and_eval_from_the_command_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]
    assert cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/idpg.gin",
                     f"--gin.MODEL_DIR={run}", "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2",
                     "--gin.BATCH_SIZE=8", "--gin.BOTTLENECK=16",
                     "--gin.train.max_eval_examples=64"] + common) == 0
    assert "idpg: " in capsys.readouterr().out
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    out = tmp_path / "eval"
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={out}", "--gin.MAX_EXAMPLES=64"] + common) == 0
    record = json.loads((out / "synthetic_contains_validation_metrics.json").read_text())
    assert record["method"]["kind"] == "idpg"
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
