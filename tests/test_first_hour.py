"""What a new user meets in the first hour: extras checked before work, the generated tasks
listed and named in errors, ``quickstart`` accepted as a checkpoint everywhere, help texts that
say what to do, and commands that print only our own output."""

from __future__ import annotations

import importlib.util

import pytest

from prompt_t5x.base import errors, extras
from prompt_t5x.commands import cli


def _hide_modules(monkeypatch, *names):
    """Make ``find_spec`` report ``names`` as not installed (as in a plain install)."""
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.split(".")[0] in names:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(extras.importlib.util, "find_spec", find_spec)


# ----------------------------------------------------------------------------------- 1 ----
def test_scaling_refuses_before_any_run_when_matplotlib_is_missing(monkeypatch, tmp_path,
                                                                   capsys):
    from prompt_t5x.commands import scaling

    _hide_modules(monkeypatch, "matplotlib")
    ran = []
    monkeypatch.setattr(scaling, "run_sweep", lambda *a, **k: ran.append(1) or [])
    rc = cli.main(["scaling", f"--gin.OUTPUT_DIR={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and not ran
    assert "'plot' extra (matplotlib not installed)" in err
    assert "pip install 'prompt_t5x[plot]'" in err and "--no_plot" in err
    assert not list(tmp_path.iterdir())   # nothing written either


def test_scaling_no_plot_writes_the_csv_without_matplotlib(monkeypatch, tmp_path, capsys):
    from prompt_t5x.commands import scaling

    _hide_modules(monkeypatch, "matplotlib")
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


def test_extras_name_their_missing_modules(monkeypatch):
    _hide_modules(monkeypatch, "peft")
    assert extras.missing("reference") == ["peft"] and extras.available("plot")
    with pytest.raises(errors.UsageError, match=r"X needs the 'reference' extra \(peft not"):
        extras.require("reference", "X")


# ----------------------------------------------------------------------------------- 4 ----
def _plain_install(monkeypatch):
    """As without the data extra: ``import tasks`` (SeqIO, TensorFlow) fails."""
    import sys
    monkeypatch.setitem(sys.modules, "tasks", None)


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
    assert "generated tasks (1;" in out and "synthetic_contains" in out


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
        assert 0.0 <= record.get("accuracy", 0.0) <= 100.0
    assert cli.main(["eval", "--gin_file=runs/eval.gin", f"--gin.PROMPT={quickstart_run}",
                     "--gin.TASK=synthetic_contains", "--gin.INPUTS_LENGTH=13",
                     "--gin.TARGETS_LENGTH=2", f"--gin.OUTPUT_DIR={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "accuracy=" in out and out.strip().endswith("%")


# ----------------------------------------------------------------------------------- 6 ----
def test_quickstart_curve_helpers():
    from prompt_t5x.commands import quickstart
    assert quickstart.eval_steps(30) == list(range(1, 11)) + [12, 14, 16, 18, 20, 25, 30]
    assert quickstart.eval_steps(400)[-4:] == [100, 200, 300, 400]
    assert quickstart.sparkline([0.0, 50.0, 100.0, 120.0]) == " ▄██"


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_quickstart_ends_with_a_plot_or_a_sparkline(monkeypatch, tmp_path, capsys,
                                                    with_matplotlib):
    from prompt_t5x.commands import quickstart
    if not with_matplotlib:
        _hide_modules(monkeypatch, "matplotlib")
    png = tmp_path / "curve.png"
    assert quickstart.main(["--steps", "12", "--plot", str(png)]) in (0, 1)
    out = capsys.readouterr().out
    assert "compiled and ran the first training step in" in out
    assert "examples/s after compilation" in out
    assert "validation accuracy: before " in out and "%" in out
    spark = out.split("accuracy over steps 0..12: |")[1].split("|")[0]
    assert len(spark) == 1 + len(quickstart.eval_steps(12))   # step 0 and every evaluation
    if with_matplotlib:
        assert png.read_bytes()[:4] == b"\x89PNG" and f"wrote {png}" in out
    else:
        assert not png.exists() and "no plot: matplotlib is not installed" in out


# ----------------------------------------------------------------------------------- 8 ----
def test_bench_on_cpu_measures_its_own_peak(tmp_path, capsys):
    import json

    from prompt_t5x.bench import bench_protocol
    argv = ["bench", "--size", "tiny", "--batch", "2", "--encoder_len", "12", "--prompt_len",
            "4", "--decoder_len", "3", "--steps", "2", "--warmup", "1", "--phases", "train",
            "--json", str(tmp_path / "r.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    peak = result["config"]["peak_flops"]
    assert result["peak_flops_source"].startswith("measured on this CPU")
    # A CPU's matmul peak: far below the H100's, so MFU is a share of what this machine can do.
    assert 1e8 < peak < bench_protocol.H100_BF16_PEAK / 100
    assert 0 < result["train"]["mfu"] <= 1.5   # measured peak: MFU near, not above, 100%
    assert "MFU peak:" in out and "measured on this CPU" in out
    # Given explicitly, the peak is the user's.
    assert cli.main(argv[:-2] + ["--peak_flops", "1e12"]) == 0
    assert "MFU peak: 1e+12 FLOP/s (--peak_flops)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- 9 ----
@pytest.mark.parametrize("command", ["train", "eval", "infer", "scaling"])
def test_gin_commands_help_reads_like_t5x(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "gin files to start from" in text and "common knobs" in text and "example:" in text
    assert f"prompt-t5x {command} " in text.split("example:")[1]
    assert "--gin_file FILE" in text and "--gin.NAME VALUE" in text
    # Written for users: no internal module/function names, no docstring markup.
    for internal in ("``", "frozen_sources", "run_data", "make_evaluator", "exit_at_once",
                     "training_loop", "RunConfig"):
        assert internal not in text, internal
    if command == "train":
        # The gin flags come before the multi-host ones.
        assert text.index("--gin_file FILE") < text.index("--coordinator_address")
        assert "models/from_checkpoint.gin" in text and "runs/prompt_tuning.gin" in text


def test_bench_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    assert "examples per step (default: 32)" in text and "(default: train,rank,decode)" in text
    assert "example (CPU smoke test" in text and "t5.SIZES" not in text


def test_plan_reports_progress_while_it_compiles():
    import io
    import time as time_

    from prompt_t5x.commands import plan
    out = io.StringIO()
    with plan.still_working("mesh 2x4: compiling", every=0.05, out=out):
        time_.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines[0] == "mesh 2x4: compiling ..."
    assert len([line for line in lines if line.startswith("  ... mesh 2x4: compiling: ")]) >= 2
    assert lines[-1].startswith("  mesh 2x4: compiling: done in ")


# ---------------------------------------------------------------------------------- 10 ----
def test_scaling_runs_every_seed_and_plots_mean_spread_and_chance(monkeypatch, tmp_path,
                                                                    capsys):
    """SEEDS=[0, 1]: each (method, model) trained per seed in its own dir; the figure shows the
    mean with min-max bars and the chance line (50% for the generated yes/no task)."""
    import types

    from prompt_t5x.commands import run_train, scaling
    calls = []

    def fake_execute(run, gin_config=""):
        # The training itself is tested elsewhere; here: which runs the sweep asks for.
        calls.append((run.model_dir, run.seed, run.method.kind))
        value = 60.0 + 10 * run.seed + (5 if run.method.kind == "model_tuning" else 0)
        return types.SimpleNamespace(best_value=value, best_step=2, last_step=2)

    monkeypatch.setattr(run_train, "execute", fake_execute)
    models = ("[{'name': 'd16', 'size': 'tiny', 'vocab_size': 32, 'emb_dim': 16, "
              "'num_heads': 2, 'head_dim': 8, 'mlp_dim': 24}]")
    out = tmp_path / "s"
    assert cli.main(["scaling", f"--gin.OUTPUT_DIR={out}", f"--gin.MODELS={models}",
                     "--gin.SEEDS=[0, 1]"]) == 0
    runs = [c for c in calls if "pretrain" not in c[0]]
    assert sorted((c[0].split("/s/")[1], c[1]) for c in runs) == [
        ("model_tuning/d16/seed_0", 0), ("model_tuning/d16/seed_1", 1),
        ("prompt_tuning/d16/seed_0", 0), ("prompt_tuning/d16/seed_1", 1)]
    assert len(calls) == 5   # pretrained once per model, not per seed
    rows = scaling.read_csv(str(out / "scaling.csv"))
    assert sorted((r["method"], r["seed"], r["best_value"]) for r in rows) == [
        ("Model tuning", 0, 65.0), ("Model tuning", 1, 75.0),
        ("Prompt tuning", 0, 60.0), ("Prompt tuning", 1, 70.0)]
    points = {p["method"]: p for p in scaling.aggregate(rows)}
    assert (points["Prompt tuning"]["mean"], points["Prompt tuning"]["min"],
            points["Prompt tuning"]["max"], points["Prompt tuning"]["seeds"]) == (65.0, 60.0,
                                                                                 70.0, 2)
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"


def test_scaling_chance_defaults_only_for_generated_yes_no_tasks():
    import types

    from prompt_t5x.commands import scaling

    def run(task, metric="accuracy"):
        return types.SimpleNamespace(task=task, loop=types.SimpleNamespace(metric=metric))
    assert scaling.default_chance([run("synthetic_first"), run("synthetic_marked")]) == 50.0
    assert scaling.default_chance([run("super_glue_rte_v102")]) is None
    assert scaling.default_chance([run("synthetic_first", "loss")]) is None
