"""Prompt export: .npy and PEFT adapters (loaded by ``peft`` onto the HF-converted T5, same
logits as ours), PEFT import back, the ``prompt-t5x export`` command, released prompts as inits."""

import json
import os

os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from prompt_t5x.checkpoints import hf_checkpoint, prompt_export, train_checkpoints
from prompt_t5x.commands import cli
from prompt_t5x.methods import prompt_init, prompt_tuning
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train

BATCH = dict(encoder_input_tokens=np.array([[5, 6, 7, 1, 0, 0], [3, 4, 9, 9, 2, 1]], np.int32),
             decoder_input_tokens=np.array([[0, 9, 8], [0, 2, 3]], np.int32),
             decoder_target_tokens=np.array([[9, 8, 1], [2, 3, 1]], np.int32),
             decoder_loss_weights=np.ones((2, 3), np.float32))


@pytest.fixture(scope="module")
def model():
    config = t5.get_config("test")
    return config, t5.init_params(config, jax.random.PRNGKey(0))


def _peft_logits(hf_dir, adapter_dir):
    base = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir).eval()
    wrapped = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return wrapped(input_ids=torch.tensor(BATCH["encoder_input_tokens"]).long(),
                       attention_mask=torch.tensor(BATCH["encoder_input_tokens"] > 0).long(),
                       decoder_input_ids=torch.tensor(BATCH["decoder_input_tokens"]).long()
                       ).logits.numpy()


def test_peft_adapter_gives_our_logits_with_the_prompt(tmp_path, model):
    config, params = model
    prompt = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, config.emb_dim)))
    hf_checkpoint.save_hf_t5(str(tmp_path / "hf"), params, config)
    prompt_export.write_peft_prompt_adapter(str(tmp_path / "adapter"), prompt,
                                     num_layers=config.num_encoder_layers,
                                     num_attention_heads=config.num_heads)
    saved = hf_checkpoint.read_safetensors(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert list(saved) == ["prompt_embeddings"] and saved["prompt_embeddings"].shape == (4, 32)
    ours = t5.T5(config).apply({"params": params}, BATCH, prompt=prompt, prompt_mode="prepend")
    np.testing.assert_allclose(_peft_logits(tmp_path / "hf", tmp_path / "adapter"),
                               np.asarray(ours), atol=1e-4, rtol=0)
    # And the prompt matters: without it the logits differ.
    without = t5.T5(config).apply({"params": params}, BATCH)
    assert np.abs(np.asarray(without) - np.asarray(ours)).max() > 1e-3


def test_adapter_written_by_peft_imports_back(tmp_path):
    hf_config = transformers.T5Config(vocab_size=50, d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                      num_heads=2, feed_forward_proj="gated-gelu",
                                      tie_word_embeddings=False)
    base = transformers.T5ForConditionalGeneration(hf_config)
    # PEFT's default for seq2seq: two submodules -> a [2P, D] table, encoder rows first.
    peft_config = peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_2_SEQ_LM,
                                          num_virtual_tokens=5)
    wrapped = peft.get_peft_model(base, peft_config)
    wrapped.save_pretrained(tmp_path)
    table = wrapped.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert table.shape == (10, 8)
    prompt, config = prompt_export.read_peft_prompt_adapter(str(tmp_path))
    np.testing.assert_array_equal(prompt, table[:5])
    assert config["peft_type"] == "PROMPT_TUNING"
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "back.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "back.npy"), table[:5])


def _train_two_steps(model_dir, config, params):
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=3,
                                  prompt_init=prompt_init.random_uniform_init())
    optimizer = optim.adafactor()
    state = train.create_train_state(method, optimizer, params, jax.random.PRNGKey(1))
    step = train.make_train_step(method, optimizer)
    for _ in range(2):
        state, _ = step(state, params, BATCH)
    train_checkpoints.TrainCheckpointer(str(model_dir)).save(state, model_config=config)
    return np.asarray(state.params["prompt"])


def test_export_command_from_training_checkpoint(tmp_path, model, capsys):
    config, params = model
    prompt = _train_two_steps(tmp_path / "run", config, params)
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "p.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), prompt)
    assert "wrote npy prompt [3, 32]" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "run"), "--step", "2", "--out",
                     str(tmp_path / "adapter"), "--base_model", "t5-test"]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["num_virtual_tokens"] == 3 and adapter_config["token_dim"] == 32
    assert adapter_config["num_layers"] == 2 and adapter_config["num_attention_heads"] == 4
    assert adapter_config["base_model_name_or_path"] == "t5-test"
    back, _ = prompt_export.read_peft_prompt_adapter(str(tmp_path / "adapter"))
    np.testing.assert_array_equal(back, prompt)
    # The per-save prompt file agrees with the export.
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "prompts" / "step_2.npy"), prompt)
    # inspect understands the run, the prompt file and the adapter.
    for path, text in [(tmp_path / "run", "prompt_t5x training checkpoint"),
                       (tmp_path / "p.npy", "prompt .npy"),
                       (tmp_path / "adapter", "PEFT prompt-tuning adapter")]:
        assert cli.main(["inspect", str(path)]) == 0
        assert text in capsys.readouterr().out


def test_export_errors_exit_2(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "x.npy")]) == 2
    assert "not a prompt .npy file" in capsys.readouterr().err
    np.save(tmp_path / "p.npy", np.zeros((2, 4), np.float32))
    assert cli.main(["export", str(tmp_path / "p.npy"), "--format", "npy",
                     "--out", str(tmp_path / "out.txt")]) == 2
    np.save(tmp_path / "bad.npy", np.zeros((2, 4, 1), np.float32))
    assert cli.main(["export", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o.npy")]) == 2
    assert "2-D" in capsys.readouterr().err


def test_released_prompts_load_as_prompt_inits(fixtures_dir):
    path = fixtures_dir / "prompts" / "t5_1_1_lm100k_base_sst2.npy"
    prompt, info = prompt_export.load_prompt(str(path))
    assert prompt.shape == (100, 768) and prompt.dtype == np.float32 and info["kind"] == "npy"
    np.testing.assert_array_equal(prompt, np.load(path))
    # As the init of a prompt-tuning method for a d_model=768 model (T5 1.1 base width).
    config = t5.get_config("test", emb_dim=768)
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=100,
                                  prompt_init=prompt_init.npy_init(str(path)))
    trainable = method.init_trainable(jax.random.PRNGKey(0), frozen=None)
    np.testing.assert_array_equal(np.asarray(trainable["prompt"]), prompt)
    wrong = prompt_tuning.PromptTuning(t5.T5(t5.get_config("test")), prompt_length=100,
                                 prompt_init=prompt_init.npy_init(str(path)))
    with pytest.raises(ValueError, match="d_model"):
        wrong.init_trainable(jax.random.PRNGKey(0), frozen=None)
    assert prompt_init.from_npy(str(path), (100, 768)).shape == (100, 768)
