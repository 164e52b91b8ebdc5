"""P-tuning (prompt_t5x.methods.p_tuning): the placeholder combine mode, the shared method
contract, parity of the prompt encoders with PEFT's ``PromptEncoder`` from the same weights, and
the CLI (train on a generated task through a template, eval/infer from the run dir and from the
exported file, gin mistakes as one line with exit 2)."""

import json
import os

import jax
import jax.numpy as jnp
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.methods import registry, templates
from prompt_t5x.methods.p_tuning import PromptEncoder, PTuning
from prompt_t5x.model import prompt_inputs, t5

TEMPLATE = "[P*2] {inputs} [P]"


def test_placeholders_take_prompt_rows_in_order():
    embedded = jnp.arange(2 * 5 * 2, dtype=jnp.float32).reshape(2, 5, 2)
    tokens = jnp.asarray([[9, 4, 9, 1, 0], [4, 9, 9, 9, 1]])
    prompt = -jnp.arange(1, 5, dtype=jnp.float32)[:, None] * jnp.ones((4, 2))   # rows -1..-4
    prompt = prompt[:2]                                    # P = 2: a third placeholder reuses row 1
    combined, index = prompt_inputs.place_at_placeholders(embedded, tokens, prompt, 9)
    np.testing.assert_array_equal(index, [[0, -1, 1, -1, -1], [-1, 0, 1, 1, -1]])
    want = np.array(embedded)
    want[0, 0], want[0, 2] = -1, -2
    want[1, 1], want[1, 2], want[1, 3] = -1, -2, -2
    np.testing.assert_array_equal(combined, want)


@pytest.fixture(scope="module")
def setup():
    config = contract.tiny_config()
    method = PTuning(t5.T5(config), template=TEMPLATE, encoder="mlp", encoder_hidden=12,
                     population=50)
    return method, contract.tiny_frozen(config), contract.template_batch_fn(method.pseudo_token_id)


def test_p_tuning_trains_only_its_encoder_and_exports_the_table(setup):
    method, frozen, batches = setup
    assert method.prompt_positions == 0 and method.num_virtual_tokens == 3
    assert method.pseudo_token_id == method.model.config.vocab_size - 1
    state = contract.check_trains_only_its_parameters(method, frozen, batch_fn=batches)
    assert set(state.params) == {"embedding", "encoder"}
    assert state.params["embedding"].shape == (3, method.model.config.emb_dim)
    contract.check_no_frozen_kernel_gradient(method, frozen, batch_fn=batches)
    # The rebuilt method and the exported [P, D] table (encoder='none') give the same logits.
    contract.check_config_round_trip(method, frozen, state.params, batch_fn=batches)
    tables, config = method.export(state.params)
    assert set(tables) == {"embedding"} and config["encoder"] == "none"
    assert config["template"] == TEMPLATE
    np.testing.assert_allclose(tables["embedding"], method.prompt(state.params), atol=1e-6)
    contract.check_cached_decoding(method, frozen, state.params, batch_fn=batches)


def test_the_prompt_reaches_the_model_only_at_placeholders(setup):
    method, frozen, batches = setup
    trainable = method.init_trainable(jax.random.PRNGKey(0), frozen)
    moved = jax.tree_util.tree_map(lambda x: x + 0.5, trainable)
    with_placeholders = batches(0)
    without = contract.make_batch(0)
    without["encoder_input_tokens"][without["encoder_input_tokens"] == method.pseudo_token_id] = 2
    assert not np.allclose(method.logits(frozen, trainable, with_placeholders),
                           method.logits(frozen, moved, with_placeholders))
    np.testing.assert_array_equal(method.logits(frozen, trainable, without),
                                  method.logits(frozen, moved, without))


def test_lstm_encoder_round_trips_and_exports_its_vectors(setup):
    """The contract above runs the MLP encoder (faster to compile); the paper's LSTM one must
    also rebuild from its config and export to the same logits (the CLI test trains it)."""
    _, frozen, batches = setup
    method = PTuning(t5.T5(contract.tiny_config()), template=TEMPLATE, population=50)
    trainable = method.init_trainable(jax.random.PRNGKey(3), frozen)
    assert {"lstm_0_forward", "lstm_1_backward", "mlp_1"} <= set(trainable["encoder"])
    contract.check_config_round_trip(method, frozen, trainable, batch_fn=batches)


def test_p_tuning_on_meshes_matches_one_device():
    config = contract.mesh_config()
    method = PTuning(t5.T5(config), template=TEMPLATE, encoder="mlp", encoder_hidden=12,
                     population=50)
    # One mesh that splits both axes (each mesh is a compile: the suite's time budget).
    contract.check_mesh_matches_one_device(
        method, contract.tiny_frozen(config), meshes=("2x4",),
        batch_fn=contract.template_batch_fn(method.pseudo_token_id))


def test_sigkill_resume_is_exact(tmp_path):
    # The driver's batches are random ids: the placeholder is EOS, the one id every row has.
    # The MLP encoder: three processes compile the step, and the LSTM's scan compiles slower.
    contract.check_sigkill_resume_is_exact(
        {"kind": "p_tuning", "template": "[P] {inputs} [P]", "pseudo_token_id": 1,
         "encoder": "mlp", "encoder_hidden": 6}, tmp_path)


def test_bad_settings_are_refused(setup):
    method, _, _ = setup
    with pytest.raises(templates.TemplateError, match="no pseudo tokens"):
        PTuning(method.model, template="{inputs}")
    with pytest.raises(ValueError, match="encoder='gru'"):
        PTuning(method.model, template=TEMPLATE, encoder="gru")
    with pytest.raises(ValueError, match="not a row"):
        PTuning(method.model, template=TEMPLATE, pseudo_token_id=101)
    with pytest.raises(registry.UnknownMethodError, match="bad settings"):
        registry.build(method.model, {"kind": "p_tuning", "templat": TEMPLATE})


# ------------------------------------------------------------------- parity with PEFT ----
def _peft_encoder(kind: str, num_tokens: int, dim: int, hidden: int):
    import torch
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning.model import PromptEncoder as PeftPromptEncoder
    torch.manual_seed(0)
    config = PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=num_tokens,
                                 token_dim=dim, encoder_hidden_size=hidden,
                                 encoder_reparameterization_type=kind.upper(),
                                 num_transformer_submodules=1)
    return PeftPromptEncoder(config).eval()


def _lstm_cell_params(lstm, layer: int, suffix: str, units: int):
    """torch gates (i, f, g, o) stacked in rows -> flax OptimizedLSTMCell's named kernels; torch's
    two biases add up to flax's one (on the hidden-side kernels)."""
    w_ih = getattr(lstm, f"weight_ih_l{layer}{suffix}").detach().numpy()
    w_hh = getattr(lstm, f"weight_hh_l{layer}{suffix}").detach().numpy()
    bias = (getattr(lstm, f"bias_ih_l{layer}{suffix}")
            + getattr(lstm, f"bias_hh_l{layer}{suffix}")).detach().numpy()
    params = {}
    for k, gate in enumerate("ifgo"):
        rows = slice(k * units, (k + 1) * units)
        params[f"i{gate}"] = {"kernel": w_ih[rows].T}
        params[f"h{gate}"] = {"kernel": w_hh[rows].T, "bias": bias[rows]}
    return params


def _dense(linear):
    return {"kernel": linear.weight.detach().numpy().T, "bias": linear.bias.detach().numpy()}


@pytest.mark.parametrize("kind", ["lstm", "mlp"])
def test_prompt_encoder_matches_peft(kind):
    import torch
    num_tokens, dim, units = 5, 12, 8
    peft_encoder = _peft_encoder(kind, num_tokens, dim, units)
    with torch.no_grad():
        want = peft_encoder(torch.arange(num_tokens)).numpy()
    inputs = peft_encoder.embedding.weight.detach().numpy()
    if kind == "lstm":   # PEFT's hidden size is per direction; ours counts both directions
        ours = PromptEncoder("lstm", dim, 2 * units)
        params = {f"lstm_{layer}_{direction}": _lstm_cell_params(
            peft_encoder.lstm_head, layer, suffix, units)
            for layer in range(2) for direction, suffix in (("forward", ""),
                                                            ("backward", "_reverse"))}
        params["mlp_0"] = _dense(peft_encoder.mlp_head[0])
        params["mlp_1"] = _dense(peft_encoder.mlp_head[2])
    else:
        ours = PromptEncoder("mlp", dim, units)
        params = {f"mlp_{i}": _dense(peft_encoder.mlp_head[2 * i]) for i in range(3)}
    shapes = jax.tree_util.tree_map(np.shape, ours.init(jax.random.PRNGKey(0), inputs)["params"])
    assert shapes == jax.tree_util.tree_map(np.shape, params)
    got = ours.apply({"params": params}, inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- CLI ----
def test_cli_train_eval_infer_export_through_a_template(tmp_path, capsys):
    from prompt_t5x.commands import cli
    run, exported = str(tmp_path / "run"), str(tmp_path / "p_tuning.safetensors")
    # 3 pseudo tokens + up to 11 symbols + EOS > 13: the symbols are cut, never [P].
    common = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13",
              "--gin.TARGETS_LENGTH=2", "--gin.BATCH_SIZE=8"]
    assert cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/p_tuning.gin",
                     f"--gin.MODEL_DIR={run}", f"--gin.TEMPLATE='{TEMPLATE}'",
                     "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2", "--gin.CHECKPOINT_EVERY=2",
                     "--gin.train.max_eval_examples=64"] + common) == 0
    assert cli.main(["export", run, "--out", exported]) == 0
    accuracies = {}
    # An exported file names no frozen model: it is given, as for any exported method.
    frozen = ["--gin.CHECKPOINT='quickstart'"]
    for name, source, extra in (("run", run, []), ("exported", exported, frozen)):
        out = str(tmp_path / f"eval_{name}")
        assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT='{source}'",
                         f"--gin.OUTPUT_DIR='{out}'", "--gin.MAX_EXAMPLES=64"]
                        + common + extra) == 0
        record = json.loads(open(os.path.join(
            out, "synthetic_contains_validation_metrics.json")).read())
        accuracies[name] = record["metrics"]["accuracy"]
    assert accuracies["exported"] == pytest.approx(accuracies["run"])
    out = str(tmp_path / "infer")
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT='{exported}'",
                     f"--gin.OUTPUT_DIR='{out}'", "--gin.MAX_EXAMPLES=8"] + common + frozen) == 0
    rows = [json.loads(line) for line in open(os.path.join(
        out, "synthetic_contains_validation_predictions.jsonl"))]
    assert len(rows) == 8 and {r["prediction"] for r in rows} <= {"yes", "no"}


@pytest.mark.parametrize("flags, needle", [
    (["--gin.TEMPLATE='[P*3] {symbols}'"], "has no field 'symbols'; its fields: inputs"),
    (["--gin.TEMPLATE='{inputs} only'"], "methods.p_tuning.template"),
    (["--gin.ENCODER='gru'"], "methods.p_tuning.encoder"),
    (["--gin.TEMPLATE='[P*20] {inputs}'"], "raise inputs_length"),
    ([], "no P-tuning template for task 'synthetic_contains'; templates are given for: "),
])
def test_gin_mistakes_exit_2_with_one_line(tmp_path, capsys, flags, needle):
    from prompt_t5x.commands import cli
    run = tmp_path / "run"
    assert cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/p_tuning.gin",
                     f"--gin.MODEL_DIR={run}", "--gin.TASK=synthetic_contains",
                     "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not run.exists()
