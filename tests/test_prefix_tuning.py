"""Prefix-tuning and P-tuning v2 (prompt_t5x/methods/prefix_tuning.py): the shared method
contract on both parameterisations, the initialisers, prefix dropout, and the CLI end to end."""

import json

import jax
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.checkpoints import method_export
from prompt_t5x.commands import cli
from prompt_t5x.methods import registry
from prompt_t5x.model import t5

# Li & Liang: MLP over every part, text init, prefix dropout; P-tuning v2: direct encoder tables;
# PEFT's form: decoder self-attention only, 'leading' position bias, layers j and j + L/2 tied.
LI_LIANG = {"kind": "prefix_tuning", "prefix_length": 3, "reparameterization": "mlp",
            "mlp_hidden": 24, "init": "text", "init_text_ids": [5, 6, 7, 8],
            "prefix_dropout": 0.2}
P_TUNING_V2 = {"kind": "prefix_tuning", "prefix_length": 3, "parts": ["encoder"],
               "reparameterization": "direct", "init": "random"}
PEFT_LAYOUT = {"kind": "prefix_tuning", "prefix_length": 2, "parts": ["decoder_self"],
               "reparameterization": "direct", "init": "zero", "prefix_bias": "leading",
               "peft_layout": True}
CONFIGS = {"li_liang": LI_LIANG, "p_tuning_v2": P_TUNING_V2, "peft_layout": PEFT_LAYOUT}


@pytest.fixture(scope="module")
def frozen():
    return contract.tiny_frozen(contract.tiny_config())


def _method(config, model_config=None):
    return registry.build(t5.T5(model_config or contract.tiny_config()), config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_contract_on_one_device(name, frozen):
    method = _method(CONFIGS[name])
    state = contract.check_trains_only_its_parameters(method, frozen)
    assert set(state.params) == set(method.parts)
    contract.check_no_frozen_kernel_gradient(method, frozen)
    contract.check_config_round_trip(method, frozen, state.params)
    if "decoder_self" in method.parts:   # prefixes inside the KV cache ('zero' and 'leading')
        contract.check_cached_decoding(method, frozen, state.params)
    tables, export_config = method.export(state.params)
    assert export_config["reparameterization"] == "direct"
    assert {k: v.shape for k, v in tables.items()} == {
        f"{part}/{kv}": ((2 if part == "encoder" else 3), method.prefix_length, 4, 10)
        for part in method.parts for kv in ("key", "value")}


# Each mesh is a compile: the two parameterisations split the three meshes between them.
@pytest.mark.parametrize("name, meshes", [("li_liang", ("2x4", "4x2")),
                                          ("p_tuning_v2", ("1x8",))])
def test_meshes_match_one_device(name, meshes):
    config = dict(CONFIGS[name], init="random", init_text_ids=None)
    model_config = contract.mesh_config()
    contract.check_mesh_matches_one_device(_method(config, model_config),
                                           contract.tiny_frozen(model_config), meshes)


def test_sigkill_resume_is_exact(tmp_path):
    # The driver's T5 has dropout 0.1 and this run prefix dropout 0.2: the saved rng counts; the
    # MLP's tree is the one whose checkpoint differs from the inference form.
    contract.check_sigkill_resume_is_exact(LI_LIANG, tmp_path)


def test_text_init_is_the_frozen_models_own_keys(frozen):
    """Encoder layer 0's prefix = RMSNorm(embedding of the text) @ its key/value kernels,
    computed here by hand; a 2-token text repeats cyclically to fill P = 3."""
    ids = [7, 9]
    method = _method({"kind": "prefix_tuning", "prefix_length": 3, "parts": ["encoder"],
                      "reparameterization": "direct", "init": "text", "init_text_ids": ids})
    table = method.init_trainable(jax.random.PRNGKey(0), frozen)["encoder"]
    x = np.asarray(frozen["token_embedder"]["embedding"])[ids]
    layer = frozen["encoder"]["layers_0"]
    scale = np.asarray(layer["pre_attention_layer_norm"]["scale"])
    h = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + 1e-6) * scale
    for kv in ("key", "value"):
        want = (h @ np.asarray(layer["attention"][kv]["kernel"])).reshape(2, 4, 10)[[0, 1, 0]]
        np.testing.assert_allclose(np.asarray(table[kv][0]), want, rtol=1e-5, atol=1e-5)
    # the MLP starts at the same table (least-squares last layer, hidden 24 >= P 3)
    mlp = _method({**method.method_config(), "reparameterization": "mlp", "mlp_hidden": 24})
    start = mlp.prefix_tables(mlp.init_trainable(jax.random.PRNGKey(1), frozen))["encoder"]
    np.testing.assert_allclose(np.asarray(start[0]), np.asarray(table["key"]), atol=1e-4)


def test_zero_init_values_and_peft_layout_ties(frozen):
    # 4 decoder layers: PEFT gives layers 0 and 2 (1 and 3) one prefix; with 3 (odd) none share.
    four = _method(PEFT_LAYOUT, contract.tiny_config(num_decoder_layers=4))
    trainable = four.init_trainable(jax.random.PRNGKey(0), frozen)["decoder_self"]
    assert trainable["key"].shape == (2, 2, 4, 10)
    assert not np.any(np.asarray(trainable["value"]))
    assert np.std(np.asarray(trainable["key"])) > 0.5
    key, _ = four.prefix_tables({"decoder_self": trainable})["decoder_self"]
    np.testing.assert_array_equal(key[2], key[0])
    np.testing.assert_array_equal(key[3], key[1])
    assert not np.array_equal(key[1], key[0])
    three = _method(PEFT_LAYOUT).init_trainable(jax.random.PRNGKey(0), frozen)
    assert three["decoder_self"]["key"].shape == (3, 2, 4, 10)


def test_prefix_dropout_only_in_training(frozen):
    method = _method(dict(LI_LIANG, prefix_dropout=0.5))   # tiny T5: model dropout 0
    trainable = method.init_trainable(jax.random.PRNGKey(0), frozen)
    batch = contract.make_batch(0)
    clean = np.asarray(method.logits(frozen, trainable, batch))
    np.testing.assert_array_equal(np.asarray(method.logits(
        frozen, trainable, batch, enable_dropout=False, rng=jax.random.PRNGKey(3))), clean)
    a, b, a2 = (np.asarray(method.logits(frozen, trainable, batch, enable_dropout=True,
                                         rng=jax.random.PRNGKey(s))) for s in (3, 4, 3))
    assert not np.allclose(a, clean) and not np.allclose(a, b)
    np.testing.assert_array_equal(a, a2)


def test_leading_prefix_is_leading_tokens():
    """With one encoder layer, a 'leading'-bias encoder prefix holding that layer's keys/values
    of tokens t (the text init) encodes x exactly as the plain model encodes [t, x] at x's
    positions: the prefix keys take the bias of P real tokens before x, and x's own positions
    shift by P. With the default 'zero' bias the result differs."""
    model_config = contract.tiny_config(num_encoder_layers=1)
    frozen = contract.tiny_frozen(model_config)
    t = [7, 9, 11]
    x = contract.make_batch(2)["encoder_input_tokens"]
    model = t5.T5(model_config)
    full, _ = model.apply({"params": frozen}, np.concatenate([np.tile(t, (len(x), 1)), x], 1),
                          method=t5.T5.encode)
    config = {"kind": "prefix_tuning", "prefix_length": 3, "parts": ["encoder"],
              "reparameterization": "direct", "init": "text", "init_text_ids": t}
    for bias, equal in (("leading", True), ("zero", False)):
        method = _method({**config, "prefix_bias": bias}, model_config)
        inputs = method.model_inputs(method.init_trainable(jax.random.PRNGKey(0), frozen))
        encoded, _ = model.apply({"params": frozen}, x, method=t5.T5.encode, **inputs)
        valid = (x > 0)[..., None]
        close = np.allclose(np.asarray(encoded) * valid, np.asarray(full[:, 3:]) * valid,
                            rtol=1e-5, atol=1e-5)
        assert close == equal, bias


def test_bad_settings_are_usage_errors(frozen):
    """The method's own checks (ValueError) reach a user as one line: registry.build makes
    them UsageErrors naming the method."""
    from prompt_t5x.base.errors import UsageError
    for bad, needle in ((dict(parts=["encoder", "decoder"]), "parts"),
                        (dict(reparameterization="lstm"), "reparameterization"),
                        (dict(init="text"), "init_text"),
                        (dict(prefix_bias="left"), "prefix_bias"),
                        (dict(prefix_length=0), "prefix_length")):
        with pytest.raises(UsageError, match=f"method 'prefix_tuning': .*{needle}"):
            _method({"kind": "prefix_tuning", **bad})


def _cli_flags(run):
    return ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]


@pytest.mark.parametrize("run_file, extra", [
    ("prefix_tuning", ["--gin.PREFIX_LENGTH=3", "--gin.MLP_HIDDEN=16",
                       "--gin.INIT_TEXT='yes or no'"]),
    ("p_tuning_v2", ["--gin.PROMPT_LENGTH=3"])])
def test_cli_train_eval_infer_export(run_file, extra, tmp_path, capsys):
    run = str(tmp_path / "run")
    common = _cli_flags(run)
    assert cli.main(["train", "--gin_file=models/quickstart.gin",
                     f"--gin_file=runs/{run_file}.gin", f"--gin.MODEL_DIR={run}",
                     "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2", "--gin.BATCH_SIZE=4",
                     "--gin.train.progress_bar=False", "--gin.train.tensorboard=False",
                     "--gin.train.max_eval_examples=16"] + extra + common) == 0
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    out = str(tmp_path / "eval")
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={out}", "--gin.evaluate.max_examples=16"] + common) == 0
    record = json.loads((tmp_path / "eval" /
                         "synthetic_contains_validation_metrics.json").read_text())
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={out}", "--gin.infer.max_examples=4"] + common) == 0
    rows = (tmp_path / "eval" / "synthetic_contains_validation_predictions.jsonl").read_text()
    assert len(rows.splitlines()) == 4
    exported = str(tmp_path / "prefix.safetensors")
    assert cli.main(["export", run, "--out", exported]) == 0
    tables, method_config, _ = method_export.read_method_file(exported)
    assert method_config["kind"] == "prefix_tuning"
    assert method_config["reparameterization"] == "direct"
    # The exported file (the MLP collapsed) evaluates like the run dir, on the same frozen T5.
    out2 = str(tmp_path / "eval2")
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={exported}",
                     "--gin.CHECKPOINT=quickstart", f"--gin.OUTPUT_DIR={out2}",
                     "--gin.evaluate.max_examples=16"] + common) == 0
    again = json.loads((tmp_path / "eval2" /
                        "synthetic_contains_validation_metrics.json").read_text())
    assert again["metrics"] == record["metrics"]
    if run_file == "p_tuning_v2":   # encoder prefixes: no PEFT adapter can hold them
        capsys.readouterr()
        assert cli.main(["export", run, "--out", str(tmp_path / "peft"), "--format", "peft"]) == 2
        err = capsys.readouterr().err.strip()
        assert "only decoder self-attention" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("binding, needle", [
    ("--gin.methods.prefix_tuning.parts=['encoder', 'decoder']", "methods.prefix_tuning.parts"),
    ("--gin.PREFIX_LENGTH=0", "PREFIX_LENGTH"),
    ("--gin.methods.prefix_tuning.reparameterization='lstm'", "reparameterization")])
def test_gin_mistake_is_one_line_exit_2(binding, needle, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--gin_file=models/quickstart.gin",
                     "--gin_file=runs/prefix_tuning.gin", f"--gin.MODEL_DIR={run}",
                     binding] + _cli_flags(str(run))) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not run.exists()


def test_rematerialised_layers_give_the_same_gradient(frozen):
    """Prefixes pass through rematerialised layers (PEFT's prefix-tuning refuses gradient
    checkpointing): with full remat the loss and the prefix gradient equal the plain ones."""
    batch = contract.make_batch(4)

    def loss_and_grad(remat_policy):
        method = _method(LI_LIANG, contract.tiny_config(remat_policy=remat_policy))
        trainable = method.init_trainable(jax.random.PRNGKey(2), frozen)

        def loss(tr):
            total, z, _, weight = method.loss_sums(frozen, tr, batch)
            return (total + z) / weight
        return jax.value_and_grad(loss)(trainable)

    (plain, plain_grad), (remat, remat_grad) = loss_and_grad("none"), loss_and_grad("full")
    np.testing.assert_allclose(remat, plain, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(plain_grad), jax.tree_util.tree_leaves(remat_grad)):
        assert np.abs(np.asarray(a)).max() > 0
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
