"""Bias tuning with null prompts (methods/bias_tuning.py): the shared method contract, the
overlay that leaves the T5X tree alone, the CLI end to end and its gin mistakes."""

import json
import os

import jax
import method_contract as contract
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from prompt_t5x.commands import cli
from prompt_t5x.methods import bias_tuning, registry
from prompt_t5x.methods.bias_tuning import BiasTuning
from prompt_t5x.model import t5


@pytest.fixture(scope="module")
def setup():
    """Every bias (key included), every norm delta."""
    config = contract.tiny_config()
    return (BiasTuning(t5.T5(config), biases=bias_tuning.BIAS_TARGETS),
            contract.tiny_frozen(config))


def _random_trainable(method, frozen, seed=3, scale=0.3):
    """Non-zero biases/deltas (zero ones would make several checks vacuous)."""
    zeros = method.init_trainable(jax.random.PRNGKey(0), frozen)
    leaves, treedef = jax.tree_util.tree_flatten(zeros)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _paths(tree):
    return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_plain_t5_tree_is_unchanged_and_zero_biases_are_the_pretrained_model(setup):
    method, frozen = setup
    # A plain init creates no bias / scale_delta: the T5X tree is the checkpoint's.
    for path in _paths(t5.param_shapes(method.model.config)):
        assert "['bias']" not in path and "scale_delta" not in path, path
    assert _paths(frozen) == _paths(t5.param_shapes(method.model.config))
    trainable = method.init_trainable(jax.random.PRNGKey(0), frozen)
    # 2 enc layers x (q,k,v,o + wi_0,wi_1,wo) + 3 dec layers x (2 x 4 + 3) biases; norms
    # 2x2 + 1 + 3x3 + 1.
    assert len(jax.tree_util.tree_leaves(trainable)) == 2 * 7 + 3 * 11 + 15
    batch = contract.make_batch(1)
    plain = t5.T5(method.model.config).apply({"params": frozen}, batch)
    np.testing.assert_array_equal(np.asarray(method.logits(frozen, trainable, batch)),
                                  np.asarray(plain))
    # The overlay is a new structure sharing the frozen leaves; the frozen tree is untouched.
    params = method.variables(frozen, trainable)["params"]
    assert params is not frozen and "bias" not in frozen["encoder"]["layers_0"]["mlp"]["wo"]
    assert params["encoder"]["layers_0"]["mlp"]["wo"]["kernel"] is \
        frozen["encoder"]["layers_0"]["mlp"]["wo"]["kernel"]


def test_each_bias_and_delta_changes_the_model_but_key_biases(setup):
    """Every trainable leaf is really used: perturbing it alone moves the logits; except a key
    bias, which softmax cancels (why the default leaves it out)."""
    method, frozen = setup
    batch = contract.make_batch(2)
    zeros = method.init_trainable(jax.random.PRNGKey(0), frozen)
    logits = jax.jit(lambda trainable: method.logits(frozen, trainable, batch))
    base = np.asarray(logits(zeros))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(zeros)
    for i, (path, leaf) in enumerate(leaves):
        moved = [x if j != i else x + 0.5 for j, (_, x) in enumerate(leaves)]
        got = np.asarray(logits(treedef.unflatten(moved)))
        change = np.abs(got - base).max()
        if jax.tree_util.keystr(path).endswith("['key']['bias']"):
            assert change < 1e-5, jax.tree_util.keystr(path)
        else:
            assert change > 1e-3, jax.tree_util.keystr(path)
    assert "key" not in bias_tuning.DEFAULT_BIASES


def test_absent_biases_cost_nothing(setup):
    """A model without the variables traces no bias adds: the plain forward has exactly the
    overlaid one's ops minus one add per trainable leaf."""
    method, frozen = setup
    batch = contract.make_batch(0)
    trainable = method.init_trainable(jax.random.PRNGKey(0), frozen)

    def adds(params):
        jaxpr = jax.make_jaxpr(lambda p: method.model.apply({"params": p}, batch))(params)
        return sum(e.primitive.name == "add" for e in jaxpr.jaxpr.eqns)
    n_leaves = len(jax.tree_util.tree_leaves(trainable))
    assert adds(method.variables(frozen, trainable)["params"]) - adds(frozen) == n_leaves


def test_selection_and_logical_axes(setup):
    method, frozen = setup
    only = BiasTuning(method.model, biases=("wo", "key"), norm_scales=False)
    tree = only.init_trainable(None, frozen)
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert {path[-2].key for path, _ in leaves} == {"wo", "key"}
    axes = method.logical_axes(method.init_trainable(None, frozen))
    layer = axes["decoder"]["layers_1"]
    assert layer["encoder_decoder_attention"]["value"]["bias"] == PartitionSpec("joined_kv")
    assert layer["self_attention"]["out"]["bias"] == PartitionSpec("embed")
    assert layer["mlp"]["wi_1"]["bias"] == PartitionSpec("mlp")
    assert axes["encoder"]["encoder_norm"]["scale_delta"] == PartitionSpec("embed")
    for bad, match in ((dict(biases=("wq",)), "unknown biases"),
                       (dict(biases=(), norm_scales=False), "nothing to train")):
        with pytest.raises(ValueError, match=match):
            BiasTuning(method.model, **bad)


def test_trainable_share_of_base_and_xxl():
    """The figures the README and runs/bias_tuning.gin state (the paper: ~0.1%)."""
    count, share = bias_tuning.trainable_share(t5.get_config("base"))
    # per encoder layer q,v,o (3 x 768) + wi_0,wi_1 (2 x 2048) + wo (768); per decoder layer
    # two attentions; 62 RMSNorms of 768.
    assert count == 12 * (4 * 768 + 2 * 2048) + 12 * (7 * 768 + 2 * 2048) + 62 * 768 == 247_296
    assert round(share, 4) == 0.0999
    count, share = bias_tuning.trainable_share(t5.get_config("xxl"))
    assert count == 2_564_096 and round(share, 4) == 0.0230
    count, _ = bias_tuning.trainable_share(t5.get_config("base"), biases=bias_tuning.BIAS_TARGETS)
    assert count == 247_296 + 36 * 768


def test_bias_tuning_trains_only_its_parameters(setup):
    method, frozen = setup
    state = contract.check_trains_only_its_parameters(method, frozen)
    contract.check_no_frozen_kernel_gradient(method, frozen)
    contract.check_config_round_trip(method, frozen, state.params)
    only = registry.build(method.model, {"kind": "bias_tuning", "biases": ["value"],
                                         "norm_scales": False})
    contract.check_config_round_trip(only, frozen, _random_trainable(only, frozen))


def test_bias_tuning_cached_decoding(setup):
    method, frozen = setup
    contract.check_cached_decoding(method, frozen, _random_trainable(method, frozen))


def test_bias_tuning_on_meshes_matches_one_device():
    config = contract.mesh_config()
    # One mesh that splits both the batch and the heads / mlp (the biases' axes): the full
    # 1x8, 2x4, 4x2 sweep is prompt tuning's (a minute more on two shared cores).
    contract.check_mesh_matches_one_device(BiasTuning(t5.T5(config)), contract.tiny_frozen(config),
                                           meshes=("2x4",))


def test_bias_tuning_sigkill_resume_is_exact(tmp_path):
    contract.check_sigkill_resume_is_exact({"kind": "bias_tuning", "biases": ["query", "wo"]},
                                           tmp_path)


def test_run_file_is_the_documented_recipe():
    import gin

    from prompt_t5x.commands import configurables, gin_cli, run_train
    gin_cli.parse(gin_cli.split_argv(["--gin_file=models/base.gin",
                                      "--gin_file=runs/bias_tuning.gin",
                                      "--gin.MODEL_DIR='/tmp/never_created'",
                                      "--gin.TASK='null_super_glue_rte_v102'"]))
    run = gin_cli.call(run_train.train_config)
    assert run.method == configurables.method_spec(
        "bias_tuning", biases=bias_tuning.DEFAULT_BIASES, norm_scales=True)
    assert run.method.trainable_parameters(run.model) == 247_296
    impl = run.optimizer.init.__self__
    assert (impl.learning_rate, impl.weight_decay_rate, impl.multiply_by_parameter_scale) == \
        (1e-3, None, False)
    assert gin.query_parameter("%TASK") == "null_super_glue_rte_v102"
    gin.clear_config()


COMMON = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]


def test_cli_train_eval_infer_export(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/bias_tuning.gin",
                     f"--gin.MODEL_DIR={run}", "--gin.TRAIN_STEPS=3", "--gin.EVAL_EVERY=3",
                     "--gin.CHECKPOINT_EVERY=3", "--gin.BATCH_SIZE=8",
                     "--gin.BIASES=['wo', 'value']"] + COMMON) == 0
    out = capsys.readouterr().out
    assert "bias_tuning:" in out and "trainable parameters" in out
    for mode in ("rank", "decode"):
        assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                         f"--gin.OUTPUT_DIR={tmp_path / mode}", f"--gin.MODE='{mode}'",
                         "--gin.MAX_EXAMPLES=16"] + COMMON) == 0
        record = json.loads(open(os.path.join(
            tmp_path / mode, "synthetic_contains_validation_metrics.json")).read())
        assert 0.0 <= record["metrics"]["accuracy"] <= 100.0
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={tmp_path / 'infer'}", "--gin.MAX_EXAMPLES=8"]
                    + COMMON) == 0
    rows = [json.loads(line) for line in open(
        tmp_path / "infer" / "synthetic_contains_validation_predictions.jsonl")]
    assert len(rows) == 8
    exported = tmp_path / "bias.safetensors"
    assert cli.main(["export", run, "--out", str(exported)]) == 0
    from safetensors.numpy import load_file
    tables = load_file(str(exported))
    assert "decoder/layers_0/mlp/wo/bias" in tables and "encoder/encoder_norm/scale_delta" in tables
    assert not any("query" in name for name in tables)


@pytest.mark.parametrize("bindings, wanted", [
    (["--gin.BIASES=['wq']"], "a list of distinct names from"),
    (["--gin.BIASES=['wo', 'wo']"], "a list of distinct names from"),
    (["--gin.NORM_SCALES=1"], "True or False"),
    (["--gin.BIASES=[]", "--gin.NORM_SCALES=False"], "trains nothing"),
    (["--gin.optim.adafactor.factor_rules={'axes:layers,*': 'row,batch'}"], "factor_rules"),
])
def test_gin_mistakes_are_one_line(tmp_path, capsys, bindings, wanted):
    run = tmp_path / "run"
    assert cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/bias_tuning.gin",
                     f"--gin.MODEL_DIR={run}", *bindings] + COMMON) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and wanted in err, err
    assert not run.exists()
