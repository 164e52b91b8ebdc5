"""The classification head (methods/classification_head.py): its logits against numpy, its class
targets and loss, the two generic hooks (loss_sums, label_scores), the shared method contract,
and the command line (learns a generated task; eval/infer/export from the run dir)."""

import json

import jax
import method_contract as contract
import numpy as np
import pytest
import resume_driver

from prompt_t5x.base.errors import UsageError
from prompt_t5x.commands import cli
from prompt_t5x.inference import decoding, rank_classification
from prompt_t5x.methods import prompt_init, registry
from prompt_t5x.methods.classification_head import ClassificationHead
from prompt_t5x.methods.prompt_tuning import PromptTuning
from prompt_t5x.model import t5
from prompt_t5x.training import train

UNIFORM = prompt_init.random_uniform_init(symmetric=True)


def _labels_of(batches):
    """Every distinct target (without EOS) of ``batches``: a label set that labels every row."""
    rows = np.concatenate([b["decoder_target_tokens"] for b in batches])
    return sorted({tuple(int(i) for i in r[:-1]) for r in rows})


def _head(config, label_tokens, prompt_mode="before_eos"):
    inner = PromptTuning(t5.T5(config), prompt_length=3, prompt_mode=prompt_mode,
                         prompt_init=UNIFORM)
    return ClassificationHead(inner, tuple(f"label{c}" for c in range(len(label_tokens))),
                              tuple(label_tokens))


@pytest.fixture(scope="module")
def setup():
    config = contract.tiny_config()
    head = _head(config, _labels_of([contract.make_batch(i) for i in range(3)]))
    return head, contract.tiny_frozen(config)


def test_head_logits_are_mean_pool_then_linear(setup):
    head, frozen = setup
    trainable = head.init_trainable(jax.random.PRNGKey(3), frozen)
    tokens = contract.make_batch(2)["encoder_input_tokens"]        # rows of 3 lengths
    encoded, mask = head.model.apply({"params": frozen}, tokens,
                                     prompt=trainable["inner"]["prompt"],
                                     prompt_mode="before_eos", method=t5.T5.encode)
    encoded, mask = np.asarray(encoded, np.float64), np.asarray(mask, np.float64)
    assert mask.shape == (8, 10) and len(set(mask.sum(1))) == 3
    pooled = (encoded * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    want = (pooled @ np.asarray(trainable["head"]["kernel"], np.float64)
            + np.asarray(trainable["head"]["bias"], np.float64))
    got = head.class_logits(frozen, trainable, tokens)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    log_softmax = want - np.log(np.exp(want).sum(-1, keepdims=True))
    scores = rank_classification.label_scores(head, frozen, trainable, tokens,
                                              {"decoder_target_tokens": np.zeros((24, 3))})
    np.testing.assert_allclose(np.asarray(scores), log_softmax, rtol=1e-5, atol=1e-5)
    with pytest.raises(UsageError, match="trained on 24 labels"):
        head.label_scores(frozen, trainable, tokens, 2)


def test_class_targets_and_loss():
    """The class is the label whose tokens + EOS are the target; other rows weigh nothing."""
    config = contract.tiny_config()
    head = _head(config, [(7,), (5, 9), (4, 4, 4, 4)])     # the last is too long for T = 3
    batch = contract.make_batch(4, batch=6)
    batch["decoder_target_tokens"] = np.array(
        [[5, 9, 1], [7, 1, 0], [7, 1, 0], [8, 1, 0], [0, 0, 0], [5, 9, 1]], np.int32)
    batch["decoder_loss_weights"] = (batch["decoder_target_tokens"] > 0).astype(np.float32)
    batch["decoder_loss_weights"][5] = 0.0                   # a masked filler row
    classes, weight = head.class_targets(batch)
    np.testing.assert_array_equal(np.asarray(weight), [1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(np.asarray(classes)[:3], [1, 0, 0])
    frozen = contract.tiny_frozen(config)
    trainable = head.init_trainable(jax.random.PRNGKey(0), frozen)
    logits = np.asarray(head.class_logits(frozen, trainable, batch["encoder_input_tokens"]),
                        np.float64)[:3]
    log_z = np.log(np.exp(logits).sum(-1))
    ce = log_z - logits[np.arange(3), [1, 0, 0]]
    loss, z, correct, total = head.loss_sums(frozen, trainable, batch, z_loss=1e-2)
    np.testing.assert_allclose([float(loss), float(z)], [ce.sum(), 1e-2 * (log_z ** 2).sum()],
                               rtol=1e-5)
    assert float(total) == 3.0
    assert float(correct) == float((logits.argmax(-1) == [1, 0, 0]).sum())
    # the train step optimises exactly these sums (the generic hook)
    sums = train.eval_sums_fn(head, z_loss=1e-2)(trainable, frozen, batch)
    np.testing.assert_allclose(float(sums["loss_sum"]), ce.sum() + 1e-2 * (log_z ** 2).sum(),
                               rtol=1e-5)


def test_head_contract(setup):
    head, frozen = setup
    state = contract.check_trains_only_its_parameters(head, frozen)
    assert set(state.params) == {"inner", "head"} and set(state.params["inner"]) == {"prompt"}
    contract.check_no_frozen_kernel_gradient(head, frozen)
    contract.check_config_round_trip(head, frozen, state.params)
    # the round trip must also keep the head: class logits of the rebuilt and exported forms
    tokens = contract.make_batch(5)["encoder_input_tokens"]
    want = np.asarray(head.class_logits(frozen, state.params, tokens))
    config = json.loads(json.dumps(head.method_config()))
    assert config["inner"]["kind"] == "prompt_tuning" and len(config["label_tokens"]) == 24
    rebuilt = registry.build(head.model, config)
    np.testing.assert_allclose(np.asarray(rebuilt.class_logits(frozen, state.params, tokens)),
                               want, rtol=1e-5, atol=1e-5)
    # decoding text is refused in one line; the inner method still decodes
    with pytest.raises(UsageError, match="predicts a label with its head"):
        decoding.decode(head, frozen, state.params, tokens, decoding.DecodeSpec())
    contract.check_cached_decoding(head.inner, frozen, state.params["inner"])


def test_head_around_deep_prompts_on_meshes_matches_one_device():
    config = contract.mesh_config()
    labels = _labels_of([contract.make_batch(0)])
    method = registry.build(t5.T5(config), {
        "kind": "classification_head", "inner": {"kind": "deep_prompts", "prompt_length": 3},
        "labels": [f"l{c}" for c in range(len(labels))], "label_tokens": labels})
    # one mesh splitting both axes: the inner deep prompts pass all three in their own file,
    # and the head's own leaves are replicated like them
    contract.check_mesh_matches_one_device(method, contract.tiny_frozen(config), meshes=("2x4",))


def test_head_resume_after_sigkill_is_exact(tmp_path):
    labels = _labels_of([resume_driver.batch_for_step(i) for i in range(6)])
    contract.check_sigkill_resume_is_exact({
        "kind": "classification_head", "inner": {"kind": "prompt_tuning", "prompt_length": 3},
        "labels": [f"l{c}" for c in range(len(labels))],
        "label_tokens": [list(ids) for ids in labels]}, tmp_path)


COMMON = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]
EXAMPLES = 128


def _eval(tmp_path, name, prompt, *extra):
    out = tmp_path / name
    rc = cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT='{prompt}'",
                   f"--gin.OUTPUT_DIR={out}", f"--gin.MAX_EXAMPLES={EXAMPLES}"]
                  + list(extra) + COMMON)
    if rc:
        return rc
    return json.loads((out / "synthetic_contains_validation_metrics.json").read_text())


def test_head_learns_a_generated_task_and_eval_reproduces_it(tmp_path, capsys):
    """Deep prompts + head (runs/classification_head.gin) on the quickstart T5: 40 steps lift the
    validation accuracy well above chance (the yes/no task is balanced: 50%)."""
    run = tmp_path / "run"
    assert cli.main(["train", "--gin_file=models/quickstart.gin",
                     "--gin_file=runs/classification_head.gin", f"--gin.MODEL_DIR={run}",
                     "--gin.PROMPT_LENGTH=4", "--gin.TRAIN_STEPS=40", "--gin.EVAL_EVERY=40",
                     "--gin.BATCH_SIZE=16", f"--gin.train.max_eval_examples={EXAMPLES}"]
                    + COMMON) == 0
    assert "classification_head: 642 trainable parameters" in capsys.readouterr().out
    best = json.loads((run / "best.json").read_text())["metrics"]
    print(f"head validation accuracy after 40 steps: {best['accuracy']:.2f}%")
    assert best["accuracy"] >= 65.0, best
    record = _eval(tmp_path, "eval", run)
    assert record["mode"] == "rank" and record["method"]["labels"] == ["yes", "no"]
    assert record["metrics"]["accuracy"] == pytest.approx(best["accuracy"])
    capsys.readouterr()
    rc = _eval(tmp_path, "decode", run, "--gin.MODE='decode'")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "predicts a label with its head" in err
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={tmp_path / 'infer'}", f"--gin.MAX_EXAMPLES={EXAMPLES}"]
                    + COMMON) == 0
    rows = [json.loads(line) for line in (tmp_path / "infer" /
            "synthetic_contains_validation_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == EXAMPLES and {r["prediction"] for r in rows} <= {"yes", "no"}
    hits = sum(r["prediction"] == r["target"] for r in rows)
    assert 100.0 * hits / EXAMPLES == pytest.approx(best["accuracy"])
    exported = tmp_path / "head.safetensors"
    assert cli.main(["export", str(run), "--out", str(exported)]) == 0
    assert "head/kernel [64, 2], inner/deep_prompts [1, 4, 64]" in capsys.readouterr().out
    again = _eval(tmp_path, "exported", exported, "--gin.CHECKPOINT='quickstart'",
                  "--gin_file=models/quickstart.gin", "--gin.evaluate.model=@t5.get_config()")
    assert again["metrics"]["accuracy"] == pytest.approx(best["accuracy"])


def test_head_gin_mistakes_are_one_line(tmp_path, capsys):
    base = ["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/classification_head.gin",
            f"--gin.MODEL_DIR={tmp_path / 'run'}"] + COMMON
    assert cli.main(base + ["--gin.methods.classification_head.labels=['yes']"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a list of two or more distinct label words" in err, err
    assert cli.main(base + ["--gin.methods.classification_head.inner=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be a method, e.g. @methods.prompt_tuning()" in err, err
    assert not (tmp_path / "run").exists()



def test_gin_wraps_the_head_around_either_prompt_method():
    """runs/classification_head.gin's inner deep prompts, or prompt tuning by one binding; the
    inner spec is built with the task's label words (prompt tuning's class-label init)."""
    from prompt_t5x.commands import gin_cli, run_train
    from prompt_t5x.data import synthetic
    from prompt_t5x.methods.deep_prompts import DeepPrompts
    base = ["--gin_file=models/quickstart.gin", "--gin_file=runs/classification_head.gin",
            "--gin.MODEL_DIR=/tmp/x", "--gin.TASK=synthetic_contains", "--gin.PROMPT_LENGTH=6"]
    for extra, inner_type in (([], DeepPrompts), (
            ["--gin.methods.classification_head.inner=@methods.prompt_tuning()"], PromptTuning)):
        gin_cli.parse(gin_cli.split_argv(base + extra))
        spec = gin_cli.call(run_train.train_config).method
        assert spec.kind == "classification_head" and spec.prompt_length == 6
        head = spec.build(t5.T5(contract.tiny_config()), ("yes", "no"), synthetic.encode)
        assert type(head.inner) is inner_type and head.prompt_positions == 6
        assert head.labels == ("yes", "no")
        assert head.label_tokens == (tuple(synthetic.encode("yes")), tuple(synthetic.encode("no")))
    assert head.inner.prompt_init.__qualname__.startswith("class_labels_init")
