"""``prompt-t5x eval`` / ``infer`` end to end on a tiny T5X checkpoint and a local SST-2 task."""

import json
import os

import jax
import numpy as np
import pytest

from prompt_t5x.checkpoints import t5x_writer
from prompt_t5x.commands import cli, evaluate_cmd
from prompt_t5x.inference import decoding, evaluation, rank_classification
from prompt_t5x.methods import prompt_tuning
from prompt_t5x.model import t5

N_EXAMPLES = 6
LENGTHS = ["--gin.INPUTS_LENGTH=24", "--gin.TARGETS_LENGTH=4", "--gin.BATCH_SIZE=4"]


@pytest.fixture(scope="module")
def world(fixtures_dir, tmp_path_factory):
    """A random tiny T5 saved as a T5X checkpoint, two prompts, and a 6-example SST-2 dir."""
    root = tmp_path_factory.mktemp("eval")
    config = t5.get_config("tiny")
    params = t5.init_params(config, jax.random.PRNGKey(0))
    ckpt = str(root / "frozen" / "checkpoint_0")
    t5x_writer.save_t5x_checkpoint(ckpt, params, step=0)
    prompts = []
    for i in range(2):
        p = np.asarray(jax.random.uniform(jax.random.PRNGKey(10 + i), (4, config.emb_dim),
                                          minval=-1.0, maxval=1.0))
        np.save(root / f"prompt{i}.npy", p)
        prompts.append(p)
    data_dir = root / "data" / "sst2"
    data_dir.mkdir(parents=True)
    lines = (fixtures_dir / "data" / "sst2" / "dev.tsv").read_text().splitlines()
    (data_dir / "dev.tsv").write_text("\n".join(lines[:N_EXAMPLES + 1]) + "\n")
    (data_dir / "train.tsv").write_text("\n".join(lines[:N_EXAMPLES + 1]) + "\n")
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    import tasks
    tasks.register_all(vocab_path=vocab, data_dir=str(root / "data"))
    rows = [line.split("\t") for line in lines[1:N_EXAMPLES + 1]]
    return dict(root=root, config=config, params=params, ckpt=ckpt, prompts=prompts,
                vocab=vocab, data_dir=str(root / "data"), texts=[r[0] for r in rows],
                labels=[int(r[1]) for r in rows])


def _flags(world, out, *extra):
    # The model config is bound (tiny, float32 activations) rather than inferred from the
    # checkpoint (which would give bfloat16 activations), so results match the references.
    return (["--gin_file=models/tiny.gin", "--gin_file=runs/eval.gin",
             "--gin.evaluate.model=@t5.get_config()", "--gin.TASK='local_glue_sst2'",
             f"--gin.OUTPUT_DIR='{out}'", f"--gin.CHECKPOINT='{world['ckpt']}'",
             f"--gin.VOCABULARY='{world['vocab']}'", f"--gin.DATA_DIR='{world['data_dir']}'"]
            + LENGTHS + list(extra))


def _encoder_rows(world):
    """The split's encoder inputs [E, 24] as the data bridge makes them."""
    from prompt_t5x.data import seqio_bridge
    spec = seqio_bridge.BatchSpec(24, 4, 4, prompt_length=4)
    batches = list(seqio_bridge.eval_batches("local_glue_sst2", spec, split="validation"))
    rows = np.concatenate([b["encoder_input_tokens"][b["example_mask"]] for b in batches])
    assert rows.shape == (N_EXAMPLES, 24)
    return rows


def _reference_rank(world, prompt):
    """Independent rank classification: one prompt shared by the rows (no ensemble layout)."""
    import tasks
    vocab = tasks.vocab.get_vocabulary(world["vocab"])
    method = prompt_tuning.PromptTuning(t5.T5(world["config"]), prompt_length=4)
    labels = rank_classification.encode_labels(["negative", "positive"], vocab.encode, 4)
    classify = rank_classification.make_rank_classifier(method, labels)
    _, predicted = classify(world["params"], {"prompt": prompt}, _encoder_rows(world))
    return np.asarray(predicted).tolist()


def test_eval_rank_classification_matches_reference(world, tmp_path, capsys):
    out = tmp_path / "eval"
    prompt = str(world["root"] / "prompt0.npy")
    assert cli.main(["eval"] + _flags(world, out, f"--prompt={prompt}")) == 0
    record = json.loads((out / "local_glue_sst2_validation_metrics.json").read_text())
    assert record["mode"] == "rank" and record["num_examples"] == N_EXAMPLES
    expected = _reference_rank(world, world["prompts"][0])
    accuracy = 100.0 * np.mean(np.array(expected) == np.array(world["labels"]))
    assert record["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert "accuracy" in capsys.readouterr().out

    # infer: one JSON line per example, label words in split order.
    out = tmp_path / "infer"
    flags = [f.replace("runs/eval.gin", "runs/infer.gin").replace("evaluate.", "infer.")
             for f in _flags(world, out)]
    assert cli.main(["infer"] + flags + [f"--prompt={prompt}"]) == 0
    rows = [json.loads(line) for line in
            (out / "local_glue_sst2_validation_predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in rows] == [["negative", "positive"][i] for i in expected]
    assert [r["target"] for r in rows] == [["negative", "positive"][i] for i in world["labels"]]
    assert rows[0]["inputs"].startswith("sst2 sentence: ")


def test_infer_decode_matches_decoder(world, tmp_path):
    prompt = world["prompts"][1]
    path = evaluation.infer(task="local_glue_sst2", output_dir=str(tmp_path), prompt=str(
        world["root"] / "prompt1.npy"), checkpoint=world["ckpt"], vocabulary=world["vocab"],
        data_dir=world["data_dir"], inputs_length=24, targets_length=4, batch_size=4,
        mode="decode", strategy="beam", beam_size=2, model=world["config"])
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == N_EXAMPLES
    import tasks
    vocab = tasks.vocab.get_vocabulary(world["vocab"])
    method = prompt_tuning.PromptTuning(t5.T5(world["config"]), prompt_length=4)
    tokens = _encoder_rows(world)[:1]
    out = decoding.decode_jit(method, world["params"], {"prompt": prompt}, tokens,
                              decoding.DecodeSpec(strategy="beam", beam_size=2, max_decode_len=4))
    assert rows[0]["prediction"] == vocab.decode(np.asarray(out.tokens[0]).tolist())
    assert rows[0]["score"] == pytest.approx(float(out.scores[0]), rel=1e-4, abs=1e-4)


def test_eval_ensemble_per_prompt_and_combined(world, tmp_path):
    p0, p1 = (str(world["root"] / f"prompt{i}.npy") for i in range(2))
    out = tmp_path / "ens"
    assert cli.main(["eval"] + _flags(world, out, f"--ensemble={p0},{p1},{p0}",
                                      "--gin.ENSEMBLE_RULE='sum'")) == 0
    record = json.loads((out / "local_glue_sst2_validation_metrics.json").read_text())
    assert [p["source"] for p in record["prompts"]] == [p0, p1, p0]
    single = [_reference_rank(world, p) for p in world["prompts"]]
    for info, predicted in zip(record["prompts"], [single[0], single[1], single[0]]):
        want = 100.0 * np.mean(np.array(predicted) == np.array(world["labels"]))
        assert info["metrics"]["accuracy"] == pytest.approx(want)
    assert record["ensemble_rule"] == "sum"
    # Copies of one prompt ensemble to that prompt.
    same = evaluation.evaluate(task="local_glue_sst2", output_dir=str(tmp_path / "same"),
                               ensemble=[p1, p1, p1], checkpoint=world["ckpt"],
                               vocabulary=world["vocab"], data_dir=world["data_dir"],
                               inputs_length=24, targets_length=4, batch_size=4,
                               model=world["config"])
    want = 100.0 * np.mean(np.array(single[1]) == np.array(world["labels"]))
    assert same["metrics"]["accuracy"] == pytest.approx(want)


def test_bad_input_exits_2_without_output(world, tmp_path, capsys):
    prompt = str(world["root"] / "prompt0.npy")
    out = tmp_path / "never"
    cases = [
        (_flags(world, out, "--prompt=/nope/prompt.npy"), "/nope/prompt.npy"),
        ([f for f in _flags(world, out) if "CHECKPOINT" not in f]
         + ["--gin.CHECKPOINT='/nope/ckpt'", f"--prompt={prompt}"], "/nope/ckpt"),
        ([f for f in _flags(world, out) if "CHECKPOINT" not in f] + [f"--prompt={prompt}"],
         "CHECKPOINT"),
        (_flags(world, out), "no prompt"),
        ([f.replace("local_glue_sst2", "local_glue_sst3") for f in _flags(world, out)]
         + [f"--prompt={prompt}"], "local_glue_sst3"),
        (_flags(world, out, f"--prompt={prompt}", "--gin.MODE='guess'"), "mode"),
        # evaluate's gin parameters are EvalConfig's fields: a typo is caught, not swallowed.
        (_flags(world, out, f"--prompt={prompt}", "--gin.evaluate.stratgy='beam'"),
         "Did you mean 'strategy'"),
    ]
    for argv, needle in cases:
        assert cli.main(["eval"] + argv) == 2, needle
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (needle, err)
        assert not out.exists()
    # A prompt of the wrong width for the checkpoint's model.
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros((4, 32), np.float32))
    assert cli.main(["eval"] + _flags(world, out, f"--prompt={wide}")) == 2
    assert "d_model" in capsys.readouterr().err and not out.exists()


def test_train_then_eval_and_infer_from_the_model_dir(world, tmp_path):
    """2 training steps, then eval/infer given only the model dir: the frozen weights, model
    config, prompt mode and seed come from the run's manifest, and eval reproduces the training
    loop's own validation accuracy for that step."""
    model_dir = tmp_path / "run"
    common = [f"--gin.DATA_DIR='{world['data_dir']}'", f"--gin.VOCABULARY='{world['vocab']}'",
              "--gin.TASK='local_glue_sst2'"] + LENGTHS
    assert cli.main(["train", "--gin_file=models/tiny.gin", "--gin_file=runs/prompt_tuning.gin",
                     f"--gin.MODEL_DIR='{model_dir}'", "--gin.TRAIN_STEPS=2",
                     "--gin.PROMPT_LENGTH=4", "--gin.EVAL_EVERY=2", "--gin.train.progress_bar=False",
                     "--gin.train.tensorboard=False", "--gin.train.seed=3",
                     # not the defaults, so eval must really read them from the manifest
                     "--gin.methods.prompt_tuning.prompt_mode='before_eos'"] + common) == 0
    best = json.loads((model_dir / "best.json").read_text())
    assert best["step"] == 2
    out = tmp_path / "eval"
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT='{model_dir}'",
                     f"--gin.OUTPUT_DIR='{out}'"] + common) == 0
    record = json.loads((out / "local_glue_sst2_validation_metrics.json").read_text())
    assert record["prompts"][0]["step"] == 2 and record["checkpoint"] is None
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT='{model_dir}'",
                     f"--gin.OUTPUT_DIR='{out}'"] + common) == 0
    rows = [json.loads(r) for r in
            (out / "local_glue_sst2_validation_predictions.jsonl").read_text().splitlines()]
    # Reference: train's random frozen weights (seed 3 + 1), its prompt mode and the step-2
    # prompt it saved.
    import tasks
    config = t5.get_config("tiny", dropout_rate=0.1)
    frozen = t5.init_params(config, jax.random.PRNGKey(4))
    prompt = np.load(model_dir / "prompts" / "step_2.npy")
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=4, prompt_mode="before_eos")
    labels = rank_classification.encode_labels(
        ["negative", "positive"], tasks.vocab.get_vocabulary(world["vocab"]).encode, 4)
    scores, _ = rank_classification.make_rank_classifier(method, labels)(
        frozen, {"prompt": prompt}, _encoder_rows(world))
    np.testing.assert_allclose([r["score"] for r in rows], np.asarray(scores).max(-1),
                               rtol=1e-5, atol=1e-5)


def test_offline_train_eval_infer_on_the_generated_task(tmp_path, capsys):
    """The README's fresh-machine commands: bundled quickstart model, generated task, no TF."""
    from prompt_t5x.commands import cli
    run = str(tmp_path / "run")
    common = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]
    assert cli.main(["train", "--gin_file=models/quickstart.gin",
                     "--gin_file=runs/prompt_tuning.gin", f"--gin.MODEL_DIR={run}",
                     "--gin.PROMPT_LENGTH=8", "--gin.TRAIN_STEPS=120", "--gin.EVAL_EVERY=120",
                     ] + common) == 0
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    accuracies = {}
    for mode in ("rank", "decode"):
        out = str(tmp_path / f"eval_{mode}")
        assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                         f"--gin.OUTPUT_DIR={out}", f"--gin.MODE='{mode}'"] + common) == 0
        record = json.loads(open(os.path.join(
            out, "synthetic_contains_validation_metrics.json")).read())
        accuracies[mode] = record["metrics"]["accuracy"]
    # The run exported as its method (.safetensors + JSON config) evaluates the same.
    exported = str(tmp_path / "prompt.safetensors")
    assert cli.main(["export", run, "--out", exported]) == 0
    out = str(tmp_path / "eval_exported")
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT='{exported}'",
                     "--gin.CHECKPOINT='quickstart'", f"--gin.OUTPUT_DIR={out}",
                     "--gin.MODE='rank'"] + common) == 0
    record = json.loads(open(os.path.join(
        out, "synthetic_contains_validation_metrics.json")).read())
    assert record["metrics"]["accuracy"] == pytest.approx(accuracies["rank"])
    assert record["method"] == {"kind": "prompt_tuning", "prompt_length": 8,
                                "prompt_mode": "prepend"}
    # eval scores the loop's own validation set: the same accuracy as the loop's best step
    assert accuracies["rank"] == pytest.approx(best["metrics"]["accuracy"])
    assert accuracies["rank"] >= 95.0 and accuracies["decode"] >= 95.0
    out = str(tmp_path / "infer")
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={out}"] + common) == 0
    rows = [json.loads(line) for line in open(os.path.join(
        out, "synthetic_contains_validation_predictions.jsonl"))]
    assert len(rows) == 512 and {r["prediction"] for r in rows} <= {"yes", "no"}
    assert sum(r["prediction"] == r["target"] for r in rows) / len(rows) >= 0.95


def test_gin_parameters_are_the_config_fields():
    """gin's view of evaluate/infer is EvalConfig's init fields, with their defaults."""
    import dataclasses
    import inspect

    import gin
    params = inspect.signature(evaluate_cmd._gin_bindings).parameters
    fields = [f for f in dataclasses.fields(evaluation.EvalConfig) if f.init]
    assert list(params) == [f.name for f in fields]
    assert params["task"].default is gin.REQUIRED and params["output_dir"].default is gin.REQUIRED
    assert params["batch_size"].default == 32 and params["ensemble"].default == ()
