"""What a new user meets in the first hour (issue 16), part 1: extras checked before work, the
generated tasks listed and named in errors, ``quickstart`` accepted as a checkpoint everywhere,
a config read from a checkpoint's weights, one unit for metrics, and commands that print only
our own output. Part 2 (quickstart curve, bench MFU, help texts, scaling figure):
``test_first_hour_output.py``."""

from __future__ import annotations

import pytest

from prompt_t5x.base import errors, extras
from prompt_t5x.commands import cli


# ----------------------------------------------------------------------------------- 1 ----
def test_scaling_refuses_before_any_run_when_matplotlib_is_missing(hide_modules, monkeypatch,
                                                                   tmp_path, capsys):
    from prompt_t5x.commands import scaling

    hide_modules("matplotlib")
    ran = []
    monkeypatch.setattr(scaling, "run_sweep", lambda *a, **k: ran.append(1) or [])
    rc = cli.main(["scaling", f"--gin.OUTPUT_DIR={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and not ran
    assert "'plot' extra (matplotlib not installed)" in err
    assert "pip install 'prompt_t5x[plot]'" in err and "--no_plot" in err
    assert not list(tmp_path.iterdir())   # nothing written either


def test_scaling_no_plot_writes_the_csv_without_matplotlib(hide_modules, monkeypatch, tmp_path,
                                                            capsys):
    from prompt_t5x.commands import scaling

    hide_modules("matplotlib")
    row = {"method": "Prompt tuning", "model": "d32", "size": "tiny", "model_parameters": 10,
           "trainable_parameters": 2, "trainable_percent": 20.0, "metric": "accuracy",
           "best_value": 75.0}

    def fake_sweep(cfg, gin_text="", log=print):
        scaling.write_csv([row], str(tmp_path / "scaling.csv"))
        return [row]

    monkeypatch.setattr(scaling, "run_sweep", fake_sweep)
    assert cli.main(["scaling", f"--gin.OUTPUT_DIR={tmp_path}", "--no_plot"]) == 0
    assert "wrote " + str(tmp_path / "scaling.csv") + "\n" in capsys.readouterr().out
    assert not (tmp_path / "scaling.png").exists()


def test_extras_name_their_missing_modules(hide_modules):
    hide_modules("peft")
    assert extras.missing("reference") == ["peft"] and extras.available("plot")
    with pytest.raises(errors.UsageError, match=r"X needs the 'reference' extra \(peft not"):
        extras.require("reference", "X")


# ----------------------------------------------------------------------------------- 4 ----
def _plain_install(monkeypatch):
    """As without the data extra: ``import tasks`` (SeqIO, TensorFlow) fails."""
    import sys
    for name in ("tensorflow", "seqio", "tasks"):
        monkeypatch.setitem(sys.modules, name, None)   # 'import NAME' raises ImportError


def test_tasks_lists_the_generated_tasks_in_a_plain_install(monkeypatch, capsys):
    _plain_install(monkeypatch)
    assert cli.main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("synthetic_first", "synthetic_contains", "synthetic_marked"):
        assert f"  {name} " in out
    assert "splits: train, validation" in out
    assert "SeqIO tasks: not available" in out and "pip install 'prompt_t5x[data]'" in out


def test_tasks_filter_keeps_generated_tasks_beside_seqio_ones(capsys):
    assert cli.main(["tasks", "--filter", "contains"]) == 0
    out = capsys.readouterr().out
    # the skill's task and the mixture that holds it out; no other generated task
    assert "generated tasks (2;" in out and "synthetic_contains " in out
    assert "synthetic_skills_but_contains" in out and "synthetic_first" not in out


@pytest.mark.parametrize("plain", [True, False])
def test_misspelt_generated_task_is_unknown_with_a_suggestion(monkeypatch, capsys, tmp_path,
                                                              plain):
    if plain:
        _plain_install(monkeypatch)
    rc = cli.main(["show-task", "synthetic_contain"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown task 'synthetic_contain'. Did you mean synthetic_contains?" in err
    assert "data extra" not in err
    rc = cli.main(["train", "--gin_file=models/quickstart.gin",
                   "--gin_file=runs/prompt_tuning.gin", f"--gin.MODEL_DIR={tmp_path / 'm'}",
                   "--gin.TASK=synthetic_contain"])
    assert rc == 2 and "Did you mean synthetic_contains?" in capsys.readouterr().err


def test_show_task_prints_a_generated_task(monkeypatch, capsys):
    _plain_install(monkeypatch)   # needs no extra
    assert cli.main(["show-task", "synthetic_contains", "-n", "2", "--split", "train"]) == 0
    out = capsys.readouterr().out
    blocks = out.split("=== synthetic_contains [train] example ")[1:]
    assert len(blocks) == 2
    from prompt_t5x.data import synthetic
    for block in blocks:
        lines = dict(line.split(": ", 1) for line in block.strip().splitlines()[1:])
        ids = [int(t) for t in lines[next(k for k in lines if k.startswith("inputs_ids"))]
               .strip("[]").split(", ")]
        assert ids == synthetic.encode(lines["inputs"]) + [synthetic.EOS]
        assert lines["targets"] in synthetic.LABELS
    assert cli.main(["show-task", "synthetic_contains", "--split", "test"]) == 2
    assert "no split 'test'; available: train, validation" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- 5 ----
def test_neighbors_takes_the_quickstart_checkpoint_and_prints_its_words(tmp_path, capsys):
    import numpy as np

    from prompt_t5x.checkpoints import bundled
    from prompt_t5x.data import synthetic

    _, params = bundled.load_asset()
    table = np.asarray(params["token_embedder"]["embedding"])
    words = ["contains:", "yes", "k"]
    # Rows of the embedding itself (scaled: cosine ignores length): each is its own neighbour.
    prompt = 3.0 * table[[synthetic.WORD_TO_ID[w] for w in words]]
    np.save(tmp_path / "p.npy", prompt)
    assert cli.main(["neighbors", "--prompt", str(tmp_path / "p.npy"),
                     "--checkpoint", "quickstart", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ", 1)[1].split(" (")[0] for line in lines] == words
    assert all("(1.000)" in line for line in lines)


# ----------------------------------------------------------------------------------- 3 ----
def _user_env():
    """The environment of a user's shell: none of the test session's log or device settings."""
    import os
    import pathlib
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "XLA_FLAGS", "JAX_PLATFORMS", "GRPC_VERBOSITY")}
    env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1])
    return env


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """A 4-step prompt-tuning run of the bundled quickstart T5 (the README's train command)."""
    model_dir = tmp_path_factory.mktemp("qs") / "run"
    argv = ["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/prompt_tuning.gin",
            f"--gin.MODEL_DIR={model_dir}", "--gin.TASK=synthetic_contains",
            "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.PROMPT_LENGTH=8",
            "--gin.TRAIN_STEPS=4", "--gin.EVAL_EVERY=4", "--gin.train.progress_bar=False"]
    assert cli.main(argv) == 0
    return model_dir


def test_eval_prints_only_our_own_lines(quickstart_run, tmp_path):
    """No TensorFlow/absl/Orbax log lines on stderr: only 'wrote ...' (stdout: the metrics)."""
    import subprocess
    import sys
    argv = [sys.executable, "-m", "prompt_t5x", "eval", "--gin_file=runs/eval.gin",
            f"--gin.PROMPT={quickstart_run}", "--gin.TASK=synthetic_contains",
            "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", f"--gin.OUTPUT_DIR={tmp_path}"]
    proc = subprocess.run(argv, env=_user_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == f"wrote {tmp_path / 'synthetic_contains_validation_metrics.json'}\n"
    assert proc.stdout.startswith("synthetic_contains validation (512 examples, rank): ")


def test_data_commands_print_no_tensorflow_start_up_lines():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "prompt_t5x", "tasks", "--filter", "rte"],
                          env=_user_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "super_glue_rte_v102" in proc.stdout
    assert proc.stderr == ""   # no oneDNN / cudart / cuInit / absl lines


def test_reading_a_run_writes_and_warns_nothing(quickstart_run, caplog):
    import logging

    from prompt_t5x.checkpoints import train_checkpoints
    before = sorted(p for p in quickstart_run.rglob("*"))
    with caplog.at_level(logging.INFO):
        params, step = train_checkpoints.read_trainable(str(quickstart_run))
    assert step == 4 and params["prompt"].shape == (8, 64)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(p for p in quickstart_run.rglob("*")) == before
    reader = train_checkpoints.TrainCheckpointer(str(quickstart_run), read_only=True)
    with pytest.raises(ValueError, match="opened read-only"):
        reader.save(None)


# ---------------------------------------------------------------------------------- 11 ----
def test_config_from_checkpoint_is_the_inferred_one(fixtures_dir):
    from prompt_t5x.checkpoints import bundled, t5x_reader
    from prompt_t5x.commands import configurables

    path = str(fixtures_dir / "t5x" / "t5_1_1_tiny_checkpoint_3")
    config = configurables.get_config("from_checkpoint", checkpoint=path, dropout_rate=0.0)
    assert config == t5x_reader.open_checkpoint(path).infer_config(dropout_rate=0.0)
    assert (config.emb_dim, config.num_heads, config.head_dim, config.vocab_size) == (
        4, 2, 2, 32128)
    with pytest.raises(errors.UsageError, match="emb_dim=8 but checkpoint has 4"):
        configurables.get_config("from_checkpoint", checkpoint=path, emb_dim=8)
    assert configurables.get_config("from_checkpoint", checkpoint="quickstart") == \
        bundled.load_asset()[0]
    with pytest.raises(errors.UsageError, match="set --gin.CHECKPOINT"):
        configurables.get_config("from_checkpoint", checkpoint=None)


def test_train_from_a_checkpoint_of_no_named_size(fixtures_dir, tmp_path, capsys):
    """The tiny T5X fixture: no --gin.t5.get_config.* overrides, loaded strictly, trains."""
    path = fixtures_dir / "t5x" / "t5_1_1_tiny_checkpoint_3"
    argv = ["train", "--gin_file=models/from_checkpoint.gin",
            "--gin_file=runs/prompt_tuning.gin", f"--gin.CHECKPOINT={path}",
            f"--gin.MODEL_DIR={tmp_path / 'run'}", "--gin.TASK=synthetic_contains",
            "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.PROMPT_LENGTH=4",
            "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2", "--gin.BATCH_SIZE=8",
            "--gin.train.progress_bar=False"]
    assert cli.main(argv) == 0
    assert "trained prompt_tuning on synthetic_contains to step 2" in capsys.readouterr().out
    from prompt_t5x.checkpoints import train_checkpoints
    saved = train_checkpoints.TrainCheckpointer(str(tmp_path / "run"),
                                                read_only=True).read_manifest()["model_config"]
    assert (saved["emb_dim"], saved["vocab_size"]) == (4, 32128)
    # A shape override that contradicts the weights stops before anything is written.
    assert cli.main(argv[:-1] + [f"--gin.MODEL_DIR={tmp_path / 'bad'}",
                                 "--gin.t5.get_config.num_heads=4"]) == 2
    assert "num_heads=4 but checkpoint has 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------------- 7 ----
def test_one_unit_for_metrics_percent_everywhere(quickstart_run, tmp_path, capsys):
    import json

    from prompt_t5x.data import metrics
    assert metrics.format_metrics({"accuracy": 87.5, "loss": 0.42131, "token_accuracy": 93.75}) \
        == "accuracy=87.50%, loss=0.4213, token_accuracy=93.75%"
    records = [json.loads(line) for line in (quickstart_run / "metrics.jsonl").open()]
    assert {r["split"] for r in records} == {"train", "validation"}
    for record in records:
        # Two target tokens (label, EOS): a fraction would be <= 1; percent is far above.
        assert 1.0 < record["token_accuracy"] <= 100.0
        # "accuracy" is the task's metric (validation), never the train step's token one.
        assert ("accuracy" in record) == (record["split"] == "validation")
        if record["split"] == "validation":   # a yes/no task: a fraction would be <= 1
            assert 1.0 < record["accuracy"] <= 100.0
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={quickstart_run}",
                     "--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13",
                     "--gin.TARGETS_LENGTH=2", f"--gin.OUTPUT_DIR={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "accuracy=" in out and out.strip().endswith("%")
