"""Replacement deep prompts (methods/deep_prompts.py): where the rows enter, the shared method
contract, and the command line (train, eval/infer from the run dir, export, a gin mistake)."""

import json

import jax
import jax.numpy as jnp
import method_contract as contract
import numpy as np
import pytest

from prompt_t5x.commands import cli
from prompt_t5x.methods import prompt_init, registry
from prompt_t5x.methods.deep_prompts import DeepPrompts
from prompt_t5x.methods.prompt_tuning import PromptTuning
from prompt_t5x.model import t5

UNIFORM = prompt_init.random_uniform_init(symmetric=True)


@pytest.fixture(scope="module")
def setup():
    config = contract.tiny_config()
    method = DeepPrompts(t5.T5(config), prompt_length=3, prompt_mode="before_eos",
                         prompt_init=UNIFORM)
    return method, contract.tiny_frozen(config)


def test_deep_table_has_a_row_per_layer_after_the_first(setup):
    method, frozen = setup
    trainable = method.init_trainable(jax.random.PRNGKey(0), frozen)
    layers = method.model.config.num_encoder_layers
    assert trainable["prompt"].shape == (3, 32)
    assert trainable["deep_prompts"].shape == (layers - 1, 3, 32)
    # each layer's rows are drawn on their own (not copies of the input prompt)
    assert not np.allclose(trainable["deep_prompts"][0], trainable["prompt"])
    with pytest.raises(ValueError, match=">= 2 encoder layers"):
        DeepPrompts(t5.T5(contract.tiny_config(num_encoder_layers=1)), prompt_length=3)


def test_rows_replace_the_states_entering_each_layer():
    """Deep rows equal to the states that prompt tuning's layers hand up at the prompt
    positions reproduce prompt tuning exactly; any other rows change the output."""
    config = contract.tiny_config(num_encoder_layers=3)
    frozen = contract.tiny_frozen(config)
    model = t5.T5(config)
    batch = {k: v[:1] for k, v in contract.make_batch(1).items()}     # one row: [P, D] rows
    shallow = PromptTuning(model, prompt_length=3, prompt_init=UNIFORM)
    prompt = shallow.init_trainable(jax.random.PRNGKey(4), frozen)["prompt"]
    _, state = model.apply({"params": frozen}, batch["encoder_input_tokens"], prompt=prompt,
                           method=t5.T5.encode, capture_intermediates=True,
                           mutable=["intermediates"])
    hidden = state["intermediates"]["encoder"]
    # prepend: the prompt sits at positions 0..P-1; layer i's input is layer i-1's output
    handed_up = jnp.stack([hidden[f"layers_{i}"]["__call__"][0][0, :3] for i in range(2)])
    deep = DeepPrompts(model, prompt_length=3, prompt_init=UNIFORM)
    want = np.asarray(shallow.logits(frozen, {"prompt": prompt}, batch))
    same = deep.logits(frozen, {"prompt": prompt, "deep_prompts": handed_up}, batch)
    np.testing.assert_allclose(np.asarray(same), want, rtol=1e-5, atol=1e-5)
    for layer in range(2):   # the row of every layer is read
        moved = handed_up.at[layer].add(1.0)
        other = deep.logits(frozen, {"prompt": prompt, "deep_prompts": moved}, batch)
        assert np.abs(np.asarray(other) - want).max() > 1e-3, layer


def test_deep_prompts_contract(setup):
    method, frozen = setup
    state = contract.check_trains_only_its_parameters(method, frozen)
    assert set(state.params) == {"prompt", "deep_prompts"}
    contract.check_no_frozen_kernel_gradient(method, frozen)
    contract.check_cached_decoding(method, frozen, state.params)
    contract.check_config_round_trip(method, frozen, state.params)
    tables, config = method.export(state.params)
    assert config == {"kind": "deep_prompts", "prompt_length": 3, "prompt_mode": "before_eos"}
    assert sorted(tables) == ["deep_prompts", "prompt"]


def test_deep_prompts_on_meshes_match_one_device():
    config = contract.mesh_config()
    method = registry.build(t5.T5(config), {"kind": "deep_prompts", "prompt_length": 3})
    # One mesh (each is a compile): 4x2 splits both the batch and the model's heads/vocabulary.
    contract.check_mesh_matches_one_device(method, contract.tiny_frozen(config), ("4x2",))


def test_deep_prompts_resume_after_sigkill_is_exact(tmp_path):
    contract.check_sigkill_resume_is_exact({"kind": "deep_prompts", "prompt_length": 3},
                                           tmp_path, encoder_layers=2)


COMMON = ["--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2"]
LIMIT = ["--gin.MAX_EXAMPLES=128"]   # eval/infer; training validates the same first 128


def test_train_eval_infer_export_from_the_command_line(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train", "--gin_file=models/quickstart.gin",
                     "--gin_file=runs/deep_prompts.gin", f"--gin.MODEL_DIR={run}",
                     "--gin.PROMPT_LENGTH=4", "--gin.TRAIN_STEPS=3", "--gin.EVAL_EVERY=3",
                     "--gin.BATCH_SIZE=8", "--gin.train.max_eval_examples=128"] + COMMON) == 0
    assert "deep_prompts: 512 trainable parameters" in capsys.readouterr().out   # 2 x 4 x 64
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    out = tmp_path / "eval"
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={out}"] + LIMIT + COMMON) == 0
    record = json.loads((out / "synthetic_contains_validation_metrics.json").read_text())
    assert record["method"] == {"kind": "deep_prompts", "prompt_length": 4,
                                "prompt_mode": "prepend"}
    assert record["metrics"]["accuracy"] == pytest.approx(best["metrics"]["accuracy"])
    assert cli.main(["infer", "--gin_file=runs/infer.gin", f"--gin.PROMPT={run}",
                     f"--gin.OUTPUT_DIR={tmp_path / 'infer'}", "--gin.MODE='decode'"]
                    + LIMIT + COMMON) == 0
    rows = (tmp_path / "infer" / "synthetic_contains_validation_predictions.jsonl").read_text()
    assert len(rows.splitlines()) == 128
    exported = tmp_path / "deep.safetensors"
    assert cli.main(["export", run, "--out", str(exported)]) == 0
    assert "inner" not in capsys.readouterr().out
    # the exported file alone reproduces the run's accuracy
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT='{exported}'",
                     "--gin.CHECKPOINT='quickstart'", "--gin_file=models/quickstart.gin",
                     "--gin.evaluate.model=@t5.get_config()",
                     f"--gin.OUTPUT_DIR={tmp_path / 'eval2'}"] + LIMIT + COMMON) == 0
    again = json.loads((tmp_path / "eval2" / "synthetic_contains_validation_metrics.json")
                       .read_text())
    assert again["metrics"]["accuracy"] == pytest.approx(record["metrics"]["accuracy"])


def test_a_gin_mistake_is_one_line(tmp_path, capsys):
    rc = cli.main(["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/deep_prompts.gin",
                   f"--gin.MODEL_DIR={tmp_path / 'run'}",
                   "--gin.methods.deep_prompts.prompt_mode='middle'"] + COMMON)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "--gin.methods.deep_prompts.prompt_mode='middle' must be one of 'prepend'" in err
    assert not (tmp_path / "run").exists()
