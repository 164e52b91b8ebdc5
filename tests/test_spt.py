"""SPT (methods/spt.py): retrieval against an independent numpy computation, where the gradient
goes, task prompts routed by task id, the zero-shot variants, the method contract, the CLI."""

import json

import jax
import jax.numpy as jnp
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.commands import cli
from prompt_t5x.methods import registry
from prompt_t5x.model import t5

SPT = {"kind": "spt", "memory_size": 5, "prompt_length": 2, "top_k": 2,
       "representation": "embedding"}
TASK_SPT = dict(SPT, representation="encoder", combine="concat", task_prompt_length=1,
                tasks=["a", "b"])


@pytest.fixture(scope="module")
def frozen():
    return contract.tiny_frozen()


def _method(config):
    return registry.build(t5.T5(contract.tiny_config()), config)


def _numpy_retrieval(method, frozen, state, tokens):
    emb = np.asarray(frozen["token_embedder"]["embedding"])
    valid = (tokens > 0)[..., None]
    rep = (emb[tokens] * valid).sum(1) / valid.sum(1)
    keys = np.asarray(state["keys"])
    sims = (rep / np.linalg.norm(rep, axis=1, keepdims=True)) @ \
        (keys / np.linalg.norm(keys, axis=1, keepdims=True)).T
    top = np.argsort(-sims, axis=1)[:, :method.top_k]
    vals = np.take_along_axis(sims, top, axis=1)
    w = np.exp(vals - vals.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    return top, w, np.einsum("bk,bkpd->bpd", w, np.asarray(state["memory"])[top])


def test_retrieval_is_top_k_by_cosine_then_softmax_weighted(frozen):
    method = _method(SPT)
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    tokens = contract.make_batch(2)["encoder_input_tokens"]
    top, w, want = _numpy_retrieval(method, frozen, state, tokens)
    got = np.asarray(method.example_inputs(frozen, state, {"encoder_input_tokens": tokens})
                     ["prompt"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len({tuple(sorted(r)) for r in top}) > 1     # examples retrieve different prompts


def test_gradient_reaches_only_the_retrieved_rows_and_keys(frozen):
    method = _method(SPT)
    state = method.init_trainable(jax.random.PRNGKey(0), frozen)
    batch = {k: v[:1] for k, v in contract.make_batch(2).items()}     # one example: k rows
    top, _, _ = _numpy_retrieval(method, frozen, state, batch["encoder_input_tokens"])
    grads = jax.jit(jax.grad(lambda s: method.loss_sums(frozen, s, batch)[0]))(state)
    for name in ("memory", "keys"):
        norms = np.abs(np.asarray(grads[name])).reshape(method.memory_size, -1).sum(1)
        assert set(np.flatnonzero(norms)) == set(top[0]), name


def test_task_prompts_are_routed_by_task_id(frozen):
    method = _method(TASK_SPT)
    state = method.init_trainable(jax.random.PRNGKey(1), frozen)
    batch = contract.task_batch_fn(2)(0)
    inputs = method.example_inputs(frozen, state, batch)
    assert inputs["prompt"].shape[1] == method.prompt_positions == 1 + 2 * 2
    want = np.asarray(state["task_prompts"])[batch["task_ids"]]
    np.testing.assert_array_equal(np.asarray(inputs["prompt"][:, :1]), want)
    with pytest.raises(ValueError, match="task_ids"):
        method.example_inputs(frozen, state, contract.make_batch(0))


@pytest.mark.parametrize("config", [SPT, TASK_SPT], ids=["weighted", "task_concat"])
def test_contract_on_one_device(config, frozen):
    method = _method(config)
    batch_fn = contract.task_batch_fn(2)
    state = contract.check_trains_only_its_parameters(method, frozen, batch_fn=batch_fn)
    contract.check_no_frozen_kernel_gradient(method, frozen, batch_fn=batch_fn)
    contract.check_cached_decoding(method, frozen, state.params, batch_fn=batch_fn)
    contract.check_config_round_trip(method, frozen, state.params, batch_fn=batch_fn)


def test_zero_shot_variants(frozen):
    method = _method(TASK_SPT)
    state = method.init_trainable(jax.random.PRNGKey(2), frozen)
    variants = method.zero_shot_variants(state)
    assert sorted(variants) == ["memory_mean", "random", "retrieved"]
    batch = contract.make_batch(4)          # a held-out task: no task ids
    logits = {name: np.asarray(m.logits(frozen, s, batch)) for name, (m, s) in variants.items()}
    assert variants["retrieved"][0].prompt_positions == 4    # the retrieval, no task prompt
    mean_only = registry.build(method.model, {"kind": "prompt_tuning", "prompt_length": 2})
    want = mean_only.logits(frozen, {"prompt": jnp.mean(state["memory"], axis=0)}, batch)
    np.testing.assert_allclose(logits["memory_mean"], np.asarray(want), rtol=1e-6)
    assert not np.allclose(logits["random"], logits["memory_mean"], atol=1e-4)


def test_mesh_matches_one_device():
    config = contract.mesh_config()
    method = registry.build(t5.T5(config), TASK_SPT)
    contract.check_mesh_matches_one_device(method, contract.tiny_frozen(config), ("2x4",),
                                           batch_fn=contract.task_batch_fn(2))


def test_resume_after_sigkill_is_exact(tmp_path):
    contract.check_sigkill_resume_is_exact(TASK_SPT, tmp_path)


def test_bad_settings_are_refused():
    model = t5.T5(contract.tiny_config())
    for bad, needle in [({"top_k": 9}, "top_k"), ({"combine": "max"}, "combine"),
                        ({"task_prompt_length": 2}, "tasks")]:
        with pytest.raises(ValueError, match=needle):
            registry.method_class("spt")(model, **{"memory_size": 4, **bad})


def test_train_and_eval_from_the_command_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]
    assert cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/spt.gin",
                     f"--gin.MODEL_DIR={run}", "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2",
                     "--gin.BATCH_SIZE=8", "--gin.MEMORY_SIZE=4", "--gin.PROMPT_LENGTH=3",
                     "--gin.train.max_eval_examples=64"] + common) == 0
    assert "spt: 1,024 trainable parameters" in capsys.readouterr().out   # 4 x (3 + 1) x 64
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    out = tmp_path / "eval"
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={out}", "--gin.MAX_EXAMPLES=64"] + common) == 0
    record = json.loads((out / "synthetic_contains_validation_metrics.json").read_text())
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
