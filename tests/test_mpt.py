"""MPT (methods/mpt.py): the composition and its init (u vᵀ ≈ 1), the distillation loss against an
independent computation, both stages through the method contract, teachers from a bank run."""

import jax
import jax.numpy as jnp
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.base.errors import UsageError
from prompt_t5x.commands import cli
from prompt_t5x.methods import registry
from prompt_t5x.methods.mpt import compose
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train

TASKS = ["a", "b"]
SOURCE = {"kind": "mpt_source", "tasks": TASKS, "prompt_length": 3, "rank": 2,
          "kl_weight": 0.5, "mse_weight": 2.0, "temperature": 2.0}
TARGET = {"kind": "mpt_target", "tasks": TASKS, "prompt_length": 3, "rank": 1}
MIXED = contract.task_batch_fn(2)


@pytest.fixture(scope="module")
def frozen():
    return contract.tiny_frozen()


def _model():
    return t5.T5(contract.tiny_config())


def _teachers(seed=0):
    return np.random.RandomState(seed).normal(size=(2, 3, 32)).astype(np.float32)


def test_composition_and_init(frozen):
    method = registry.build(_model(), SOURCE, teacher_prompts=_teachers())
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    product = np.einsum("tpr,tdr->tpd", state["u"], state["v"])
    assert np.abs(product - 1.0).max() < 1e-2            # u vᵀ ≈ 1: P* is not thrown away
    np.testing.assert_allclose(np.asarray(state["shared"]), _teachers().mean(0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(method.task_prompts(state)),
                               np.asarray(state["shared"])[None] * product, rtol=1e-5)
    u, v = np.asarray(state["u"]), np.asarray(state["v"])
    np.testing.assert_allclose(np.asarray(compose(state["shared"], state["u"], state["v"]))[1],
                               np.asarray(state["shared"]) * (u[1] @ v[1].T), rtol=1e-5)
    batch = MIXED(0)
    prompts = method.example_inputs(frozen, state, batch)["prompt"]
    np.testing.assert_array_equal(np.asarray(prompts),
                                  np.asarray(method.task_prompts(state))[batch["task_ids"]])


def test_distillation_loss_is_ce_plus_weighted_kl_and_mse(frozen):
    teachers = _teachers(1)
    method = registry.build(_model(), SOURCE, teacher_prompts=teachers)
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    state = dict(state, u=state["u"] + 0.3)            # student != teacher mean
    batch = MIXED(2)
    total, _, _, weight = method.loss_sums(frozen, state, batch)
    # Independently: the plain LM loss of the student, of the teachers, and the encoder states.
    plain = registry.build(_model(), {"kind": "prompt_tuning", "prompt_length": 3})
    prompts = method.task_prompts(state)[batch["task_ids"]]
    student = np.asarray(plain.logits(frozen, {"prompt": prompts}, batch), np.float64)
    teacher = np.asarray(plain.logits(frozen, {"prompt": jnp.asarray(teachers)[
        batch["task_ids"]]}, batch), np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    targets, w = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
    ce = -(np.take_along_axis(log_softmax(student), targets[..., None], -1)[..., 0] * w).sum()
    t, s = log_softmax(teacher / 2.0), log_softmax(student / 2.0)
    kl = ((np.exp(t) * (t - s)).sum(-1) * 4.0 * w).sum()

    def encoded(prompt):
        out, mask = plain.model.apply({"params": frozen}, batch["encoder_input_tokens"], prompt,
                                      method=t5.T5.encode)
        return np.asarray(out, np.float64), np.asarray(mask)
    (es, mask), (et, _) = encoded(prompts), encoded(jnp.asarray(teachers)[batch["task_ids"]])
    mse = (((es - et) ** 2).mean(-1) * mask).sum() / mask.sum()
    want = ce + 0.5 * kl + 2.0 * mse * w.sum()
    assert float(weight) == w.sum()
    np.testing.assert_allclose(float(total), want, rtol=1e-4)
    # no distillation weight: the plain LM loss; no teachers (a rebuilt run): the same
    for config, context in ((dict(SOURCE, kl_weight=0.0, mse_weight=0.0),
                             {"teacher_prompts": teachers}), (SOURCE, {})):
        bare = registry.build(_model(), config, **context)
        np.testing.assert_allclose(float(bare.loss_sums(frozen, state, batch)[0]), ce,
                                   rtol=1e-4)


def test_teachers_get_no_gradient_and_stay_outside_the_state(frozen):
    teachers = _teachers()
    method = registry.build(_model(), SOURCE, teacher_prompts=teachers)
    state = contract.check_trains_only_its_parameters(method, frozen, batch_fn=MIXED)
    assert sorted(state.params) == ["shared", "u", "v"]
    np.testing.assert_array_equal(method.teacher_prompts, _teachers())    # untouched


@pytest.mark.parametrize("stage", ["source", "target"])
def test_contract_on_one_device(stage, frozen):
    if stage == "source":
        method = registry.build(_model(), SOURCE, teacher_prompts=_teachers())
    else:
        shared = np.random.RandomState(3).normal(size=(3, 32)).astype(np.float32)
        method = registry.build(_model(), dict(TARGET, train_shared=True), shared_init=shared)
        np.testing.assert_array_equal(method.init_trainable(jax.random.PRNGKey(0), frozen)[
            "shared"], shared)
    contract.check_no_frozen_kernel_gradient(method, frozen, batch_fn=MIXED)
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    contract.check_cached_decoding(method, frozen, state, batch_fn=MIXED)
    contract.check_config_round_trip(method, frozen, state, batch_fn=MIXED)


def test_target_stage_keeps_the_shared_prompt_fixed(frozen):
    shared = np.random.RandomState(3).normal(size=(3, 32)).astype(np.float32)
    method = registry.build(_model(), TARGET, shared_init=shared)
    optimizer = optim.adafactor(learning_rate=0.3)
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(1))
    step = train.make_train_step(method, optimizer, donate=False)
    start = jax.tree_util.tree_map(np.array, state.params)
    for i in range(2):
        state, _ = step(state, frozen, MIXED(i))
    assert sorted(state.params) == ["u", "v"]        # P* is the source's, not trained
    assert not np.array_equal(np.asarray(state.params["u"]), start["u"])
    np.testing.assert_array_equal(np.asarray(method.shared_prompt(state.params)), shared)
    # the export stands alone: P* in its tables, the same prompts
    tables, config = method.export(state.params)
    exported = registry.build(method.model, config)
    np.testing.assert_allclose(np.asarray(exported.task_prompts(tables)),
                               np.asarray(method.task_prompts(state.params)), rtol=1e-6)
    with pytest.raises(ValueError, match="source"):   # rebuilt without its source run
        registry.build(method.model, TARGET).example_inputs(frozen, state.params, MIXED(0))


def test_mesh_matches_one_device():
    config = contract.mesh_config()
    method = registry.build(t5.T5(config), dict(SOURCE), teacher_prompts=np.random.RandomState(
        0).normal(size=(2, 3, config.emb_dim)).astype(np.float32))
    contract.check_mesh_matches_one_device(method, contract.tiny_frozen(config), ("2x4",),
                                           batch_fn=MIXED)


def test_resume_after_sigkill_is_exact(tmp_path):
    contract.check_sigkill_resume_is_exact(dict(TARGET, train_shared=True), tmp_path)


def test_bad_settings_and_teachers_are_refused(tmp_path):
    with pytest.raises(UsageError, match="teacher prompts of shape"):
        registry.build(_model(), SOURCE, teacher_prompts=np.zeros((3, 3, 32), np.float32))
    with pytest.raises(UsageError, match="distinct task names"):
        registry.build(_model(), dict(SOURCE, tasks=[]))
    from prompt_t5x.inference import prompted_model
    with pytest.raises(UsageError, match="not found"):
        prompted_model.load_task_prompts(str(tmp_path / "none"), TASKS)


def test_both_stages_from_the_command_line(tmp_path, capsys):
    """Teachers (a bank) -> source stage distilled from them -> target stage from its P*."""
    skills = ["synthetic_first", "synthetic_last", "synthetic_majority", "synthetic_contains"]
    common = ["--gin_file=models/quickstart.gin", "--gin.TASK=synthetic_skills",
              "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.TRAIN_STEPS=2",
              "--gin.EVAL_EVERY=2", "--gin.BATCH_SIZE=8", "--gin.PROMPT_LENGTH=3",
              f"--gin.TASKS={skills}", "--gin.train.max_eval_examples=32"]
    teachers, source, target = (str(tmp_path / n) for n in ("teachers", "source", "target"))
    assert cli.main(["train", "--gin_file=runs/multitask_prompts.gin",
                     f"--gin.MODEL_DIR={teachers}"] + common) == 0
    assert cli.main(["train", "--gin_file=runs/mpt_source.gin", f"--gin.MODEL_DIR={source}",
                     f"--gin.TEACHERS='{teachers}'"] + common) == 0
    assert "mpt_source: 460 trainable parameters" in capsys.readouterr().out  # 192 + 12 + 256
    assert cli.main(["train", "--gin_file=runs/mpt_target.gin", f"--gin.MODEL_DIR={target}",
                     f"--gin.SOURCE='{source}'"] + common) == 0
    assert "mpt_target: 268 trainable parameters" in capsys.readouterr().out   # 4 x (3 + 64)
    # eval from the run dir: the fixed P* is read from the source run again
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={target}",
                     "--gin.TASK=synthetic_first", f"--gin.OUTPUT_DIR={tmp_path / 'eval'}",
                     "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2",
                     "--gin.MAX_EXAMPLES=32"]) == 0
    capsys.readouterr()
    rc = cli.main(["train", "--gin_file=runs/mpt_source.gin", f"--gin.MODEL_DIR={tmp_path / 'x'}",
                   f"--gin.TEACHERS='{source}'"] + common)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "multitask_prompts bank" in err, err
