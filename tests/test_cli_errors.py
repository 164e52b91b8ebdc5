"""Bad input to ``prompt-t5x train`` / ``scaling``: one clear message, exit status 2, and no
model directory left behind."""

import pytest

from prompt_t5x.commands import cli


def _train(tmp_path, *extra, task="synthetic_contains", model_dir=None):
    model_dir = model_dir or tmp_path / "run"
    argv = ["train", "--gin_file=models/tiny.gin", "--gin_file=runs/prompt_tuning.gin",
            f"--gin.MODEL_DIR={model_dir}", f"--gin.TASK={task}",
            "--gin.t5.get_config.vocab_size=32", "--gin.INPUTS_LENGTH=13",
            "--gin.TARGETS_LENGTH=2", "--gin.TRAIN_STEPS=1", "--gin.PROMPT_LENGTH=2"]
    argv += list(extra)
    return argv, model_dir


def _fails_cleanly(capsys, argv, model_dir, *phrases):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("prompt-t5x")]
    assert len(lines) == 1, err                # one message, no traceback
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in err, (phrase, err)
    assert not model_dir.exists()
    return err


@pytest.mark.parametrize("flag,phrases", [
    ("--gin.train.train_stpes=3",
     ("unknown gin binding train.train_stpes", "Did you mean 'train_steps'")),
    ("--gin.optim.adafactr.learning_rate=0.1",
     ("unknown gin configurable 'optim.adafactr'", "'optim.adafactor'")),
    ("--gin.t5.get_config.emb_dimm=16",
     ("'emb_dimm' is not a T5Config field", "Did you mean emb_dim")),
    ("--gin.TRAIN_STEP=3",
     ("--gin.TRAIN_STEP sets a macro that no gin file uses", "Did you mean 'TRAIN_STEPS'")),
    ("--gin_file=runs/prompt_tunning.gin",
     ("gin file 'runs/prompt_tunning.gin' not found", "runs/prompt_tuning.gin")),
])
def test_misspelt_flag_is_one_error_with_a_suggestion(tmp_path, capsys, flag, phrases):
    argv, model_dir = _train(tmp_path, flag)
    _fails_cleanly(capsys, argv, model_dir, *phrases)


def test_missing_required_macro(tmp_path, capsys):
    argv = ["train", "--gin_file=models/tiny.gin", "--gin_file=runs/prompt_tuning.gin",
            "--gin.TASK=synthetic_contains"]
    err = _fails_cleanly(capsys, argv, tmp_path / "none", "MODEL_DIR", "--gin.MODEL_DIR=")
    assert "required gin macro" in err


def test_missing_checkpoint(tmp_path, capsys):
    argv, model_dir = _train(tmp_path, f"--gin.CHECKPOINT={tmp_path / 'no_such_ckpt'}")
    _fails_cleanly(capsys, argv, model_dir, "checkpoint", "no_such_ckpt", "not found")


def test_checkpoint_of_the_wrong_size(tmp_path, capsys, fixtures_dir):
    # The fixture T5X checkpoint is a tiny T5 with the full 32128 vocabulary.
    ckpt = fixtures_dir / "t5x" / "t5_1_1_tiny_checkpoint_3"
    argv, model_dir = _train(tmp_path, f"--gin.CHECKPOINT={ckpt}")
    _fails_cleanly(capsys, argv, model_dir, "cannot load checkpoint", "right size")


def test_missing_vocabulary(tmp_path, capsys):
    argv, model_dir = _train(tmp_path, f"--gin.VOCABULARY={tmp_path / 'spm.model'}")
    _fails_cleanly(capsys, argv, model_dir, "vocabulary", "spm.model", "not found")


def test_unknown_task(tmp_path, capsys, fixtures_dir):
    vocab = fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model"
    argv, model_dir = _train(tmp_path, f"--gin.VOCABULARY={vocab}",
                             task="super_glue_rte_v10")
    _fails_cleanly(capsys, argv, model_dir, "unknown task or mixture 'super_glue_rte_v10'",
                   "super_glue_rte_v102")


def test_existing_model_dir_is_kept_on_error(tmp_path, capsys):
    model_dir = tmp_path / "mine"
    model_dir.mkdir()
    (model_dir / "notes.txt").write_text("keep me")
    argv, _ = _train(tmp_path, f"--gin.CHECKPOINT={tmp_path / 'nope'}", model_dir=model_dir)
    assert cli.main(argv) == 2
    assert (model_dir / "notes.txt").read_text() == "keep me"


def test_scaling_bad_model_entry(tmp_path, capsys):
    argv = ["scaling", "--gin_file=runs/scaling.gin", f"--gin.OUTPUT_DIR={tmp_path / 'sc'}",
            "--gin.MODELS=[{'name': 'a', 'size': 'tiny', 'num_layerz': 1}]"]
    _fails_cleanly(capsys, argv, tmp_path / "sc", "scaling.models entry 'a'", "num_layerz")


@pytest.mark.parametrize("flag", ["--gin.MODEL_DIR", "--gin.=3"])
def test_malformed_binding(tmp_path, capsys, flag):
    argv, model_dir = _train(tmp_path, flag)
    _fails_cleanly(capsys, argv, model_dir, "bad binding")
