"""Mixed-task batches (methods/task_bank.py): every example of a mixed batch computes what it
computes in a batch of its own task, for prompt tuning and per-example prefixes; the method
contract; rank classification and decoding route by task id; config and export."""

import json

import jax
import jax.numpy as jnp
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.base.errors import UsageError
from prompt_t5x.commands import cli
from prompt_t5x.data import run_data, synthetic
from prompt_t5x.inference import decoding
from prompt_t5x.inference import rank_classification as rank_lib
from prompt_t5x.inference.predictor import Predictor
from prompt_t5x.methods import interface, registry
from prompt_t5x.model import t5

TASKS = ["first", "last", "majority"]
PROMPT = {"kind": "prompt_tuning", "prompt_length": 3, "prompt_mode": "before_eos"}
# Every prefix part, through the MLP: per-example keys/values in all three attentions.
PREFIX = {"kind": "prefix_tuning", "prefix_length": 2, "reparameterization": "mlp",
          "mlp_hidden": 12, "init": "random"}
INNERS = {"prompt": PROMPT, "prefix": PREFIX}
MIXED = contract.task_batch_fn(len(TASKS))


def _bank(inner, config=None):
    return registry.build(t5.T5(config or contract.tiny_config()),
                          {"kind": "multitask_prompts", "tasks": TASKS, "inner": inner})


@pytest.fixture(scope="module")
def frozen():
    return contract.tiny_frozen()


@pytest.mark.parametrize("name", sorted(INNERS))
def test_mixed_batch_equals_each_tasks_own_batch(name, frozen):
    bank = _bank(INNERS[name])
    state = bank.init_trainable(jax.random.PRNGKey(0), frozen)
    batch = MIXED(2)
    bank_logits = jax.jit(bank.logits)
    mixed = np.asarray(bank_logits(frozen, state, batch))
    ids = batch[interface.TASK_IDS]
    single_task = jax.jit(bank.inner.logits)
    plain = {k: v for k, v in batch.items() if k != interface.TASK_IDS}
    for task in range(len(TASKS)):
        # the whole batch under this task's state alone; its rows of this task must agree
        single = np.asarray(single_task(frozen, bank.task_state(state, task), plain))
        rows = np.flatnonzero(ids == task)
        np.testing.assert_allclose(mixed[rows], single[rows], rtol=1e-5, atol=1e-5,
                                   err_msg=f"task {task}")
    # and the states do differ: routing an example to another task changes its logits
    wrong = dict(batch, **{interface.TASK_IDS: (ids + 1) % len(TASKS)})
    assert not np.allclose(np.asarray(bank_logits(frozen, state, wrong)), mixed, atol=1e-4)


@pytest.mark.parametrize("name", sorted(INNERS))
def test_contract_on_one_device(name, frozen):
    bank = _bank(INNERS[name])
    state = contract.check_trains_only_its_parameters(bank, frozen, batch_fn=MIXED)
    contract.check_no_frozen_kernel_gradient(bank, frozen, batch_fn=MIXED)
    contract.check_cached_decoding(bank, frozen, state.params, batch_fn=MIXED)
    contract.check_config_round_trip(bank, frozen, state.params, batch_fn=MIXED)


def test_mixed_step_trains_every_task_on_its_own_examples(frozen):
    """One step on a batch without task 2's examples leaves task 2's state untouched."""
    bank = _bank(PROMPT)
    state = bank.init_trainable(jax.random.PRNGKey(0), frozen)
    batch = MIXED(1)
    keep = batch[interface.TASK_IDS] != 2
    batch = {k: v[keep] for k, v in batch.items()}
    grads = jax.jit(jax.grad(lambda s: bank.loss_sums(frozen, s, batch)[0]))(state)["prompt"]
    assert np.all(np.asarray(grads[2]) == 0)
    assert np.all(np.abs(np.asarray(grads[:2])).sum(axis=(1, 2)) > 0)


def test_meshes_match_one_device():
    config = contract.mesh_config()
    bank = _bank(PREFIX, config)
    contract.check_mesh_matches_one_device(bank, contract.tiny_frozen(config), meshes=("2x4",),
                                           batch_fn=MIXED)


def test_rank_classification_routes_by_task(frozen):
    bank = _bank(PREFIX)
    state = bank.init_trainable(jax.random.PRNGKey(3), frozen)
    batch = MIXED(4)
    labels = rank_lib.make_label_batch([[7], [9, 11]], 3)
    classify = rank_lib.make_rank_classifier(bank, labels)
    scores, _ = classify(frozen, state, batch["encoder_input_tokens"], batch[interface.TASK_IDS])
    unshared = rank_lib.make_rank_classifier(bank, labels, share_encoder=False)
    ref, _ = unshared(frozen, state, batch["encoder_input_tokens"], batch[interface.TASK_IDS])
    np.testing.assert_allclose(np.asarray(scores), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for task in range(len(TASKS)):
        rows = np.flatnonzero(batch[interface.TASK_IDS] == task)
        single = rank_lib.make_rank_classifier(bank.inner, labels)
        own, _ = single(frozen, bank.task_state(state, task), batch["encoder_input_tokens"][rows])
        np.testing.assert_allclose(np.asarray(scores)[rows], np.asarray(own), rtol=1e-5,
                                   atol=1e-5)


def test_bank_needs_task_ids_and_a_stackable_method(frozen):
    bank = _bank(PROMPT)
    state = bank.init_trainable(jax.random.PRNGKey(0), frozen)
    with pytest.raises(ValueError, match="task_ids"):
        bank.logits(frozen, state, contract.make_batch(0))
    with pytest.raises(UsageError, match="variables"):
        _bank({"kind": "bias_tuning"})
    with pytest.raises(UsageError, match="twice"):
        registry.build(t5.T5(contract.tiny_config()),
                       {"kind": "multitask_prompts", "tasks": ["a", "a"], "inner": PROMPT})


def test_export_stacks_the_inference_form(frozen):
    bank = _bank(PREFIX)
    state = bank.init_trainable(jax.random.PRNGKey(0), frozen)
    tables, config = bank.export(state)
    assert config["inner"]["reparameterization"] == "direct"   # the MLP collapsed per task
    layers = bank.model.config.num_encoder_layers
    assert tables["encoder/key"].shape[:3] == (len(TASKS), layers, 2)
    exported = registry.build(bank.model, config)
    batch = MIXED(0)
    got = exported.logits(frozen, jax.tree_util.tree_map(
        jnp.asarray, interface.unflatten_tables(tables)), batch)
    np.testing.assert_allclose(np.asarray(got), np.asarray(bank.logits(frozen, state, batch)),
                               rtol=1e-5, atol=1e-5)


def test_decoding_routes_by_task(frozen):
    bank = _bank(PROMPT)
    state = bank.init_trainable(jax.random.PRNGKey(0), frozen)
    batch = MIXED(3, batch=6)
    spec = decoding.DecodeSpec("beam", max_decode_len=4, beam_size=2, eos_id=None)
    out = decoding.decode_jit(bank, frozen, state, batch["encoder_input_tokens"], spec,
                              task_ids=batch[interface.TASK_IDS])
    for task in range(len(TASKS)):
        rows = np.flatnonzero(batch[interface.TASK_IDS] == task)
        own = decoding.decode_jit(bank.inner, frozen, bank.task_state(state, task),
                                  batch["encoder_input_tokens"][rows], spec)
        np.testing.assert_array_equal(np.asarray(out.tokens)[rows], np.asarray(own.tokens))


SKILLS = ["synthetic_first", "synthetic_last", "synthetic_majority", "synthetic_contains"]
CLI_COMMON = ["--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]


def test_train_eval_infer_a_mixture_from_the_command_line(tmp_path, capsys):
    """Train one prompt per task on the generated mixture, then evaluate it per task and on one
    task of the bank; an unknown task and a bank that is not the mixture are one-line errors."""
    run = str(tmp_path / "run")
    train = ["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/multitask_prompts.gin",
             "--gin.TASK='synthetic_skills'", "--gin.PROMPT_LENGTH=4", "--gin.BATCH_SIZE=8",
             "--gin.train.max_eval_examples=64"] + CLI_COMMON
    assert cli.main(train + [f"--gin.MODEL_DIR={run}", f"--gin.TASKS={SKILLS}",
                             "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2"]) == 0
    assert "multitask_prompts: 1,024 trainable parameters" in capsys.readouterr().out  # 4x4x64
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert "synthetic_first/accuracy" in best["metrics"], best   # validation is per task
    out = tmp_path / "eval"
    limit = ["--gin.MAX_EXAMPLES=64"]
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                     "--gin.TASK='synthetic_skills'", f"--gin.OUTPUT_DIR={out}"]
                    + limit + CLI_COMMON) == 0
    record = json.loads((out / "synthetic_skills_validation_metrics.json").read_text())
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
    assert record["metrics"]["synthetic_first/accuracy"] == pytest.approx(
        best["metrics"]["synthetic_first/accuracy"])
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT={run}",
                     "--gin.TASK='synthetic_last'", f"--gin.OUTPUT_DIR={tmp_path / 'infer'}"]
                    + limit + CLI_COMMON) == 0
    rows = [json.loads(line) for line in
            (tmp_path / "infer" / "synthetic_last_validation_predictions.jsonl").open()]
    # The serving API: examples of several tasks in one batch, each routed to its task.
    predictor = Predictor.load(run, encode=synthetic.encode, decode=synthetic.decode,
                               inputs_length=13, targets_length=2, batch_size=8)
    last = [{"inputs": r["inputs"], "task": "synthetic_last"} for r in rows[:12]]
    mixed = run_data.SyntheticData("synthetic_skills", 13, 2, 8).eval_examples()[:12]
    both = [x for pair in zip(last, mixed) for x in pair]
    got = predictor.predict(both, labels=list(synthetic.LABELS))
    assert got[0::2] == [r["prediction"] for r in rows[:12]]
    assert got[1::2] == predictor.predict(mixed, labels={t: synthetic.LABELS for t in SKILLS})
    decoded = predictor.predict(both)    # an example's decode does not depend on its batch
    assert decoded[0::2] == predictor.predict(last) and len(decoded) == 24
    with pytest.raises(UsageError, match="does not know"):
        predictor.predict([{"inputs": "a b", "task": "synthetic_marked"}])
    capsys.readouterr()
    rc = cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT={run}",
                   "--gin.TASK='synthetic_marked'", f"--gin.OUTPUT_DIR={tmp_path / 'bad'}"]
                  + limit + CLI_COMMON)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not know" in err, err
    assert not (tmp_path / "bad").exists()
    rc = cli.main(train + [f"--gin.MODEL_DIR={tmp_path / 'run2'}", f"--gin.TASKS={SKILLS[:3]}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "would never train" not in err, err
    assert "does not know" in err and not (tmp_path / "run2").exists()
