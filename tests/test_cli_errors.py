"""Bad input to ``prompt-t5x train`` / ``scaling``: one clear message, exit status 2, and no
model directory left behind."""

import os

import numpy as np
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


# ----------------------------------------------------------------- the error-policy table ----
# Every row: a user's mistake -> exit status 2, exactly one stderr line starting with
# "prompt-t5x", no traceback, and no MODEL_DIR left behind. Each row builds its inputs under
# tmp_path (``make(tmp_path, fixtures)`` -> extra flags); rows that need the shared fixtures say
# so and are skipped without them.
def _rte_dir(tmp_path, fixtures, train_text):
    data = tmp_path / "data" / "super_glue_rte"
    data.mkdir(parents=True)
    (data / "val.jsonl").write_text((fixtures / "data" / "super_glue_rte" / "val.jsonl")
                                    .read_text())
    (data / "train.jsonl").write_text(train_text)
    return data.parent


def _rte_flags(fixtures, data_dir, targets_length=6):
    vocab = fixtures / "vocab" / "t5_cc_all_32000_100extra.spm.model"
    return ["--gin.TASK=local_super_glue_rte", f"--gin.DATA_DIR={data_dir}",
            f"--gin.VOCABULARY={vocab}", "--gin.t5.get_config.vocab_size=32128",
            f"--gin.TARGETS_LENGTH={targets_length}"]


def _gin_file(tmp_path, text):
    path = tmp_path / "bad.gin"
    path.write_text(text)
    return [f"--gin_file={path}"]


def _npy(tmp_path, array, allow_pickle=False):
    path = tmp_path / "prompt.npy"
    np.save(path, array, allow_pickle=allow_pickle)
    return ["--gin_file=prompts/from_file.gin", f"--gin.PROMPT_FILE={path}"]


def _malformed_jsonl(tmp_path, fixtures):
    good = (fixtures / "data" / "super_glue_rte" / "train.jsonl").read_text().splitlines()
    text = "\n".join(good[:3] + ['{"premise": "cut off', ] + good[3:6]) + "\n"
    return _rte_flags(fixtures, _rte_dir(tmp_path, fixtures, text))


ROWS = {
    # id: (make(tmp_path, fixtures) -> flags, needs fixtures, phrases in the message)
    "binding_unclosed_bracket": (lambda t, f: ["--gin.train.batch_size=[4"], False,
                                 ("--gin.train.batch_size=[4", "never closed")),
    "gin_file_unclosed_paren": (lambda t, f: _gin_file(t, "# mine\ntrain.batch_size = (\n"),
                                False, ("bad.gin, line 2", "'(' opened there is never closed")),
    "steps_not_a_number": (lambda t, f: ["--gin.TRAIN_STEPS=abc"], False,
                           ("--gin.TRAIN_STEPS='abc'", "train.train_steps",
                            "positive integer")),
    "rate_not_a_number": (lambda t, f: ["--gin.LEARNING_RATE=fast"], False,
                          ("--gin.LEARNING_RATE='fast'", "positive finite number")),
    "steps_fractional": (lambda t, f: ["--gin.TRAIN_STEPS=1.5"], False,
                         ("--gin.TRAIN_STEPS=1.5", "positive integer", "got float")),
    "rate_negative": (lambda t, f: ["--gin.LEARNING_RATE=-0.3"], False,
                      ("--gin.LEARNING_RATE=-0.3", "positive finite number")),
    "batch_size_zero": (lambda t, f: ["--gin.BATCH_SIZE=0"], False,
                        ("--gin.BATCH_SIZE=0", "train.batch_size", "positive integer")),
    "metric_mode_unknown": (lambda t, f: ["--gin.train.metric_mode='maximum'"], False,
                            ("train.metric_mode='maximum'", "one of 'max', 'min'")),
    "prompt_mode_unknown": (lambda t, f: ["--gin.methods.prompt_tuning.prompt_mode='front'"],
                            False, ("prompt_mode='front'", "'prepend'")),
    "vocabulary_is_text": (lambda t, f: _rte_flags(f, f / "data")[:2] + [
        f"--gin.VOCABULARY={f / 'data' / 'sst2' / 'dev.tsv'}"], True,
        ("dev.tsv", "is not a SentencePiece model", "--gin.VOCABULARY")),
    "jsonl_malformed_line": (_malformed_jsonl, True, ("train.jsonl:4", "not valid JSON")),
    "train_split_empty": (lambda t, f: _rte_flags(f, _rte_dir(t, f, "")), True,
                          ("split 'train' is empty", "train.jsonl has no records")),
    "prompt_npy_wrong_shape": (lambda t, f: _npy(t, np.zeros((3, 3), np.float32)), False,
                               ("prompt.npy", "prompt shape (3, 3) != expected (2, 64)")),
    "prompt_npy_object_array": (lambda t, f: _npy(t, np.array([{"a": 1}], object), True),
                                False, ("prompt.npy", "not a plain numeric .npy array")),
    "targets_length_too_short": (lambda t, f: _rte_flags(f, f / "data", targets_length=2),
                                 True, ("tokens with EOS but targets_length is 2",
                                        "--gin.TARGETS_LENGTH")),
    "nan_at_step_1": (lambda t, f: ["--gin.LEARNING_RATE=1e38"], False,
                      ("non-finite values at training step 1",
                       "no checkpoint was written before it", "start the run again")),
}


@pytest.mark.parametrize("row", sorted(ROWS))
def test_error_policy_table(tmp_path, capsys, request, row):
    make, needs_fixtures, phrases = ROWS[row]
    fixtures = request.getfixturevalue("fixtures_dir") if needs_fixtures else None
    argv, model_dir = _train(tmp_path, *make(tmp_path, fixtures))
    err = _fails_cleanly(capsys, argv, model_dir, *phrases)
    assert "resume from that checkpoint" not in err


def test_export_refuses_to_overwrite(tmp_path, capsys, fixtures_dir):
    source = fixtures_dir / "prompts" / "prompt_5x256.npy"
    out = tmp_path / "mine.npy"
    out.write_bytes(b"an earlier export")
    assert cli.main(["export", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "existing file" in err and "--overwrite" in err
    assert out.read_bytes() == b"an earlier export"
    assert cli.main(["export", str(source), "--out", str(out), "--overwrite"]) == 0
    np.testing.assert_array_equal(np.load(out), np.load(source).astype(np.float32))


# --------------------------------------------------------------------- a full disk ----
def test_disk_full_during_a_save_reports_the_first_error_and_the_last_good_step(
        tmp_path, capsys, monkeypatch):
    import errno
    import subprocess
    import sys

    import orbax.checkpoint as ocp

    from prompt_t5x.training import metrics_writer
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
        if step == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    def close(self):
        raise RuntimeError("a later error while closing")   # must not mask the first
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(metrics_writer.MetricsWriter, "close", close)
    argv, model_dir = _train(tmp_path, "--gin.TRAIN_STEPS=3", "--gin.CHECKPOINT_EVERY=1",
                             "--gin.EVAL_EVERY=0")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("prompt-t5x")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "no space left on the device" in lines[0] and "later error" not in err
    assert "the last good checkpoint is step 1 (kept)" in lines[0]
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["1"]
    assert not (model_dir / ".prompt_t5x.lock").exists()
    monkeypatch.undo()

    # Leftovers of a killed writer, then a resume on a disk that is still full: one line,
    # and the leftovers are gone.
    (model_dir / "checkpoints" / "2.orbax-checkpoint-tmp-123").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    leftover = model_dir / "prompts" / f"step_2.npy.tmp-{dead.pid}"
    leftover.write_bytes(b"half")
    from prompt_t5x.checkpoints import write_errors
    monkeypatch.setattr(write_errors, "_free_bytes", lambda path: 1000)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the disk is still full (1000 bytes free" in err, err
    assert "last good checkpoint is step 1" in err
    assert sorted(os.listdir(model_dir / "checkpoints")) == ["1"] and not leftover.exists()
    monkeypatch.undo()
    assert cli.main(argv) == 0          # space again: resumes and finishes
    assert "resumed from 1" in capsys.readouterr().out


def test_write_error_recognition():
    import errno

    from prompt_t5x.checkpoints import write_errors
    assert write_errors.write_error_reason(OSError(errno.EDQUOT, "q")) == "disk quota exceeded"
    wrapped = ValueError("RESOURCE_EXHAUSTED: Error writing \"x/.zarray\": [OS error: No space")
    assert write_errors.write_error_reason(wrapped) == "no space left on the device"
    try:
        try:
            raise OSError(errno.EROFS, "ro")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert write_errors.write_error_reason(e) == "the file system is read-only"
    # A device out of memory is not a full disk; a bug is not a write error.
    assert write_errors.write_error_reason(RuntimeError("RESOURCE_EXHAUSTED: Out of memory")) \
        is None
    assert write_errors.write_error_reason(KeyError("x")) is None


@pytest.mark.parametrize("command,flag,phrases", [
    ("eval", "--gin.BATCH_SIZE=two",
     ("--gin.BATCH_SIZE='two'", "evaluate.batch_size", "positive integer")),
    ("infer", "--gin.BEAM_SIZE=0.5",
     ("--gin.BEAM_SIZE=0.5", "infer.beam_size", "positive integer")),
    ("eval", "--gin.TARGETS_LENGTH=[8", ("--gin.TARGETS_LENGTH=[8", "never closed")),
])
def test_eval_and_infer_check_gin_types_too(tmp_path, capsys, command, flag, phrases):
    out = tmp_path / "out"
    argv = [command, f"--gin_file=runs/{'eval' if command == 'eval' else 'infer'}.gin",
            "--gin.TASK=synthetic_contains", f"--gin.OUTPUT_DIR={out}", flag]
    _fails_cleanly(capsys, argv, out, *phrases)
