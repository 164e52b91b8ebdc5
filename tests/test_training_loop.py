"""The training loop: end-to-end train -> checkpoint -> resume, NaN guard, gradient accumulation.

The loop tests feed in-memory numpy batches to ``run_loop`` (no TensorFlow); the end-to-end tests
drive ``prompt-t5x train`` on a local-file SST-2 task cut from the real fixture.
"""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prompt_t5x.checkpoints import train_checkpoints
from prompt_t5x.commands import cli
from prompt_t5x.methods import prompt_init, prompt_tuning
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train
from prompt_t5x.training import training_loop as loop_lib
from prompt_t5x.training.metrics_writer import read_jsonl

CONFIG = t5.get_config("test")          # vocab 101, d_model 32: fast on CPU
PROMPT_LENGTH = 3


def _batches(seed=0, batch_size=4, inputs=6, targets=3):
    """Endless deterministic batches; ``position`` = batches produced so far."""
    class Stream:
        def __init__(self, position):
            self.position = position

        def __iter__(self):
            return self

        def __next__(self):
            rng = np.random.default_rng([seed, self.position])
            self.position += 1
            enc = rng.integers(2, CONFIG.vocab_size, (batch_size, inputs)).astype(np.int32)
            tgt = rng.integers(2, CONFIG.vocab_size, (batch_size, targets)).astype(np.int32)
            tgt[:, -1] = 1
            dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), tgt[:, :-1]], 1)
            return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in,
                    "decoder_target_tokens": tgt,
                    "decoder_loss_weights": np.ones((batch_size, targets), np.float32)}
    return Stream


@pytest.fixture(scope="module")
def frozen():
    return t5.init_params(CONFIG, jax.random.PRNGKey(0))


# One method/optimizer object for all loop tests: the compiled step is cached per object.
METHOD = prompt_tuning.PromptTuning(t5.T5(CONFIG), PROMPT_LENGTH,
                              prompt_init=prompt_init.random_uniform_init())
OPTIMIZER = optim.adafactor()


def _method():
    return METHOD


def _config(**kw):
    base = dict(train_steps=4, log_every=2, eval_every=2, checkpoint_every=2, progress_bar=False,
                metric="loss", metric_mode="min")
    base.update(kw)
    return loop_lib.LoopConfig(**base)


_EVAL_STEPS = {}


def _eval_fn(method, frozen):
    batch = next(_batches(seed=99)(0))
    if id(frozen) not in _EVAL_STEPS:
        _EVAL_STEPS[id(frozen)] = jax.jit(lambda tr: method.logits(frozen, tr, batch))
    step = _EVAL_STEPS[id(frozen)]

    def evaluate(trainable):
        logits = step(trainable)
        lp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(lp, batch["decoder_target_tokens"][..., None], -1).mean()
        return {"loss": float(nll)}
    return evaluate


def test_loop_checkpoints_logs_and_resumes(tmp_path, frozen):
    method = _method()
    model_dir = str(tmp_path / "run")
    first = loop_lib.run_loop(method=method, optimizer=OPTIMIZER, frozen=frozen,
                              make_batches=_batches(), model_dir=model_dir,
                              config=_config(train_steps=2), evaluate=_eval_fn(method, frozen))
    assert first.last_step == 2 and first.resumed_from is None and first.best_step == 2
    ckpt = train_checkpoints.TrainCheckpointer(model_dir)
    assert ckpt.all_steps() == [2]
    assert ckpt.read_manifest(2)["data_state"]["position"] == 2
    ckpt.close()

    records = read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    train_rec = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_rec] == [2]
    assert {"loss", "token_accuracy", "grad_norm", "prompt_norm", "steps_per_second",
            "examples_per_second"} <= set(train_rec[0])
    assert np.isfinite(train_rec[0]["loss"]) and train_rec[0]["examples_per_second"] > 0
    assert glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(model_dir, "prompts", "best.npy"))

    # A run killed after step 3's metrics but before step 3's checkpoint, mid-way through a
    # record: the resumed run drops both and writes step 3 and 4 afresh.
    with open(os.path.join(model_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": 3, "split": "train", "loss": 123.0}) + '\n{"step": 4, "spl')

    # Resume: continues from step 2 with the saved data position and optimizer state, and
    # lands on exactly the state of an uninterrupted 4-step run.
    seen = []

    def recording(position):
        seen.append(position)
        return _batches()(position)
    second = loop_lib.run_loop(method=method, optimizer=OPTIMIZER, frozen=frozen,
                               make_batches=recording, model_dir=model_dir,
                               config=_config(), evaluate=_eval_fn(method, frozen))
    assert seen == [2] and second.resumed_from == 2 and second.last_step == 4
    records = read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    assert all(r.get("loss") != 123.0 for r in records)
    straight_dir = str(tmp_path / "straight")
    loop_lib.run_loop(method=method, optimizer=OPTIMIZER, frozen=frozen,
                      make_batches=_batches(), model_dir=straight_dir, config=_config(),
                      evaluate=_eval_fn(method, frozen))
    resumed = np.load(os.path.join(model_dir, "prompts", "step_4.npy"))
    straight = np.load(os.path.join(straight_dir, "prompts", "step_4.npy"))
    np.testing.assert_allclose(resumed, straight, rtol=1e-6, atol=1e-6)
    # A finished run is a no-op.
    again = loop_lib.run_loop(method=method, optimizer=OPTIMIZER, frozen=frozen,
                              make_batches=_batches(), model_dir=model_dir, config=_config())
    assert again.last_step == 4 and again.resumed_from == 4


def test_early_stopping_after_patience_evaluations(tmp_path, frozen):
    result = loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                               make_batches=_batches(), model_dir=str(tmp_path / "es"),
                               config=_config(train_steps=10, early_stopping_patience=1),
                               evaluate=lambda trainable: {"loss": 1.0})
    # Step 2 sets the best; step 4 does not improve on it -> patience 1 exhausted.
    assert result.stopped_early and result.last_step == 4 and result.best_step == 2
    assert [e["step"] for e in result.evaluations] == [2, 4]


def test_tensorboard_event_file_is_readable_by_tensorflow(tmp_path):
    tf = pytest.importorskip("tensorflow")
    from tensorflow.core.util import event_pb2

    from prompt_t5x.training.metrics_writer import MetricsWriter, crc32c
    assert crc32c(b"123456789") == 0xE3069283   # the CRC-32C check value
    with MetricsWriter(str(tmp_path), "train") as writer:
        writer.write(7, {"loss": 1.5, "accuracy": 0.25})
    path, = glob.glob(str(tmp_path / "train" / "events.out.tfevents.*"))
    events = [event_pb2.Event.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7
    assert {v.tag: v.simple_value for v in events[1].summary.value} == {"loss": 1.5,
                                                                        "accuracy": 0.25}


def test_evaluator_scores_real_rows_only_in_split_order(frozen):
    from prompt_t5x.data import run_data
    from prompt_t5x.training import validation
    full = [next(_batches(seed=5, batch_size=4)(0)), next(_batches(seed=6, batch_size=2)(0))]
    batches = run_data.pad_eval_batches(full, 4)          # 4 + 2 real rows, 2 padding rows
    examples = [{"id": i} for i in range(6)]
    seen = {}

    def predict(trainable, batch):
        return [f"row{int(i)}" for i in batch["example_index"]]

    def compute_metrics(exs, preds):
        seen["pairs"] = [(e["id"], p) for e, p in zip(exs, preds)]
        return {"n": len(preds)}
    evaluate = validation.make_evaluator(METHOD, frozen, batches, examples=examples,
                                         compute_metrics=compute_metrics, predict=predict)
    prompt = {"prompt": jnp.zeros((PROMPT_LENGTH, CONFIG.emb_dim))}
    results = evaluate(prompt)
    assert results["n"] == 6 and seen["pairs"] == [(i, f"row{i}") for i in range(6)]
    assert results["loss"] > 0 and 0 <= results["token_accuracy"] <= 100   # percent
    limited = run_data.limit_examples(batches, 5)
    assert validation.make_evaluator(METHOD, frozen, limited, examples=examples,
                                     compute_metrics=compute_metrics,
                                     predict=predict)(prompt)["n"] == 5
    assert limited[1]["decoder_loss_weights"][1:].sum() == 0   # masked rows carry no loss


def _nan_at(count_to_poison):
    """An optimizer whose update at its ``count_to_poison``-th call is NaN."""
    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(grads, count, params=None):
        poison = jnp.where(count == count_to_poison, jnp.nan, 0.0)
        return jax.tree.map(lambda g: -0.1 * g + poison, grads), count + 1
    return optax.GradientTransformation(init, update)


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path, frozen):
    model_dir = str(tmp_path / "nan")
    with pytest.raises(loop_lib.NonFiniteError) as err:
        loop_lib.run_loop(method=_method(), optimizer=_nan_at(2), frozen=frozen,
                          make_batches=_batches(), model_dir=model_dir,
                          config=_config(train_steps=8, log_every=4, eval_every=0))
    message = str(err.value)
    assert "step 3" in message and "param_norm=nan" in message
    assert "last good checkpoint is step 2" in message
    ckpt = train_checkpoints.TrainCheckpointer(model_dir)
    assert ckpt.all_steps() == [2]      # nothing written after the NaN
    state_template = train.create_train_state(
        _method(), _nan_at(2), frozen, jax.random.PRNGKey(0))
    state, _ = ckpt.restore(state_template, 2)
    assert np.all(np.isfinite(np.asarray(state.params["prompt"])))
    ckpt.close()


def _sharded_stream(num_shards, any_count=False):
    """``_batches()`` whose state says it is one of ``num_shards`` host shards."""
    base = _batches()

    class Stream(base):
        resumes_with_any_shard_count = any_count

        def state(self):
            return {"position": self.position, "shard_index": 0, "num_shards": num_shards}
    return Stream


def test_resume_with_another_data_shard_count_is_refused(tmp_path, frozen):
    model_dir = str(tmp_path / "run")
    loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                      make_batches=_sharded_stream(2), model_dir=model_dir,
                      config=_config(train_steps=2))
    with pytest.raises(loop_lib.ResumeError, match=r"data shards \(hosts along the mesh's "
                                                   r"'data' axis\): 2 in the checkpoint, 1 now"):
        loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                          make_batches=_sharded_stream(1), model_dir=model_dir, config=_config())
    # A stream whose global batches do not depend on the split (generated tasks) may resume.
    result = loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                               make_batches=_sharded_stream(1, any_count=True),
                               model_dir=model_dir, config=_config())
    assert result.resumed_from == 2 and result.last_step == 4


def _declared_stream(**changes):
    """A factory like ``run_data.train_stream``'s: it declares its stream's ``identity`` (what
    the stream's state records) and notes every stream it builds."""
    identity = {"name": "task_a", "split": "train", "seed": 0, "num_shards": 1, **changes}

    class Stream(_batches()):
        def state(self):
            return {**identity, "position": self.position, "shard_index": 0}

    class Factory:
        resumes_with_any_shard_count = False

        def __init__(self):
            self.identity, self.built = identity, []

        def __call__(self, position):
            self.built.append(position)
            return Stream(position)
    return Factory()


def test_resume_that_would_read_another_stream_is_refused_before_building_it(tmp_path,
                                                                             frozen):
    model_dir = str(tmp_path / "run")
    loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                      make_batches=_declared_stream(), model_dir=model_dir,
                      config=_config(train_steps=2), batch_size=4)
    ckpt = train_checkpoints.TrainCheckpointer(model_dir, read_only=True)
    assert ckpt.read_manifest(2)["data_state"] == {
        "name": "task_a", "split": "train", "seed": 0, "num_shards": 1, "position": 2,
        "shard_index": 0, "batch_size": 4}   # the global batch size is recorded too
    ckpt.close()
    other = _declared_stream(split="validation", seed=1)
    with pytest.raises(loop_lib.ResumeError) as error:
        loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                          make_batches=other, model_dir=model_dir, config=_config(),
                          batch_size=8)
    assert other.built == []   # refused before the (possibly slow) stream was built
    assert (f"cannot resume step 2 of {model_dir}: this run would read another data stream "
            "(split: 'train' in the checkpoint, 'validation' now; seed: 0 in the checkpoint, "
            "1 now; global batch size: 4 in the checkpoint, 8 now)") in str(error.value)
    with pytest.raises(loop_lib.ResumeError, match="task: 'task_a' in the checkpoint, 'task_b'"):
        loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                          make_batches=_declared_stream(name="task_b"), model_dir=model_dir,
                          config=_config(), batch_size=4)
    same = _declared_stream()
    result = loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                               make_batches=same, model_dir=model_dir, config=_config(),
                               batch_size=4)
    assert result.resumed_from == 2 and result.last_step == 4 and same.built == [2]


def test_train_stream_declares_what_its_checkpoints_record():
    from prompt_t5x.data import run_data
    from prompt_t5x.parallel import distributed
    source = run_data.SyntheticData("synthetic_contains", 13, 2, batch_size=8, seed=3)
    factory = run_data.train_stream(source)
    state = factory(5).state()
    assert factory.identity == {"name": "synthetic_contains", "seed": 3, "num_shards": 1}
    assert {k: state[k] for k in factory.identity} == factory.identity
    assert factory.resumes_with_any_shard_count   # generated batches do not depend on it
    assert run_data.TrainStream(source, distributed.DataShard(1, 2)).identity["num_shards"] == 2


def test_partitioned_loop_takes_host_rows_and_never_slices_them(tmp_path, frozen):
    """One process owns every 'data' row: its rows are the global batch. A stream that gives
    fewer rows than its share (e.g. slicing twice) is one clear error, not a smaller batch."""
    from prompt_t5x.parallel import sharding
    mesh_config = sharding.MeshConfig.parse("8x1")
    mesh = sharding.make_mesh(mesh_config)
    with pytest.raises(ValueError, match="gave this host 4 rows but its share of the global "
                                         "batch of 8 is 8"):
        loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                          make_batches=_batches(batch_size=4), model_dir=str(tmp_path / "r"),
                          config=_config(), batch_size=8, mesh=mesh, rules=mesh_config.rules())


def test_gradient_accumulation_matches_one_big_batch(frozen):
    method = _method()
    batch = next(_batches(batch_size=8)(0))
    results = []
    from prompt_t5x.parallel import partitioning, sharding
    from prompt_t5x.training import sharded_run
    mesh, rules = sharding.single_device_mesh(), sharding.rules_or_default(None)
    on_mesh, shardings = partitioning.place_on_mesh(frozen, mesh)
    for micro in (1, 2):
        opt = optax.sgd(0.5)
        state = sharded_run.create_train_state(method, opt, on_mesh, jax.random.PRNGKey(3), mesh,
                                               rules)
        step = loop_lib.make_guarded_step(method, opt, mesh, rules, shardings,
                                          num_microbatches=micro)
        acc = jax.device_put(loop_lib.fresh_accumulators(), sharding.replicated(mesh))
        state, acc, _ = step(state, on_mesh, sharding.shard_batch(batch, mesh), acc)
        results.append((np.asarray(state.params["prompt"]), float(acc[0]["loss"]),
                        float(acc[0]["grad_norm"])))
    (p1, l1, g1), (p2, l2, g2) = results
    assert g1 > 0
    np.testing.assert_allclose(p2, p1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([l2, g2], [l1, g1], rtol=1e-5)


# ----------------------------------------------------------------------- end to end (CLI) ----
def _sst2_dir(root, fixtures_dir):
    """A small local SST-2 (first rows of the real fixture files)."""
    out = root / "data" / "glue_sst2"
    out.mkdir(parents=True)
    for src, dst, n in (("train_full.tsv", "train.tsv", 64), ("dev.tsv", "dev.tsv", 12)):
        lines = (fixtures_dir / "data" / "sst2" / src).read_text().splitlines()[:n + 1]
        (out / dst).write_text("\n".join(lines) + "\n")
    return str(root / "data")


def train_argv(model_dir, data_dir, vocab, steps=2, extra=()):
    return ["train", "--gin_file=models/tiny.gin", "--gin_file=runs/prompt_tuning.gin",
            f"--gin.MODEL_DIR={model_dir}", "--gin.TASK=local_glue_sst2",
            f"--gin.DATA_DIR={data_dir}", f"--gin.VOCABULARY={vocab}",
            f"--gin.TRAIN_STEPS={steps}", "--gin.BATCH_SIZE=4", "--gin.INPUTS_LENGTH=16",
            "--gin.TARGETS_LENGTH=4", "--gin.PROMPT_LENGTH=4", "--gin.EVAL_EVERY=2",
            "--gin.CHECKPOINT_EVERY=2", "--gin.train.log_every=1",
            "--gin.train.progress_bar=False"] + list(extra)


def test_train_command_end_to_end_then_resume(tmp_path, fixtures_dir, capsys):
    vocab = str(fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model")
    data_dir = _sst2_dir(tmp_path, fixtures_dir)
    model_dir = tmp_path / "pt"
    assert cli.main(train_argv(model_dir, data_dir, vocab)) == 0
    out = capsys.readouterr().out
    assert "to step 2" in out and "best validation accuracy" in out
    best = json.loads((model_dir / "best.json").read_text())
    assert best["step"] == 2 and 0.0 <= best["metrics"]["accuracy"] <= 100.0
    assert {"loss", "token_accuracy", "accuracy"} <= set(best["metrics"])
    prompt = np.load(model_dir / "prompts" / "step_2.npy")
    assert prompt.shape == (4, t5.SIZES["tiny"].emb_dim)
    ckpt = train_checkpoints.TrainCheckpointer(str(model_dir))
    manifest = ckpt.read_manifest(2)
    ckpt.close()
    assert manifest["data_state"]["position"] == 2
    assert "TRAIN_STEPS = 2" in manifest["gin_config"]

    # Resume to step 4 from the saved checkpoint.
    assert cli.main(train_argv(model_dir, data_dir, vocab, steps=4)) == 0
    assert "to step 4 (resumed from 2)" in capsys.readouterr().out
    ckpt = train_checkpoints.TrainCheckpointer(str(model_dir))
    assert ckpt.latest_step() == 4 and ckpt.read_manifest(4)["data_state"]["position"] == 4
    ckpt.close()
    # Another seed or split would read another stream: exit 2 naming both, nothing written.
    assert cli.main(train_argv(model_dir, data_dir, vocab, steps=6, extra=(
        "--gin.train.seed=1", "--gin.train.train_split='validation'"))) == 2
    err = capsys.readouterr().err
    assert ("split: 'train' in the checkpoint, 'validation' now; seed: 0 in the checkpoint, "
            "1 now") in err
    ckpt = train_checkpoints.TrainCheckpointer(str(model_dir), read_only=True)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()

    # eval / infer read this run's checkpoint (frozen model, prompt mode, seed from its
    # manifest); eval's rank-classification accuracy equals the loop's own at step 4.
    if "eval" not in cli.COMMANDS:
        return
    common = [f"--gin.PROMPT={model_dir}", "--gin.TASK=local_glue_sst2",
              f"--gin.DATA_DIR={data_dir}", f"--gin.VOCABULARY={vocab}", "--gin.BATCH_SIZE=4",
              "--gin.INPUTS_LENGTH=16", "--gin.TARGETS_LENGTH=4"]
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.OUTPUT_DIR={tmp_path / 'ev'}"]
                    + common) == 0
    metrics = json.loads((tmp_path / "ev" / "local_glue_sst2_validation_metrics.json").read_text())
    last_eval = [r for r in read_jsonl(str(model_dir / "metrics.jsonl"))
                 if r["split"] == "validation" and r["step"] == 4][-1]
    assert metrics["metrics"]["accuracy"] == pytest.approx(last_eval["accuracy"])
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.OUTPUT_DIR={tmp_path / 'inf'}"]
                    + common) == 0
    lines = (tmp_path / "inf" / "local_glue_sst2_validation_predictions.jsonl").read_text()
    assert len(lines.strip().splitlines()) == 12
