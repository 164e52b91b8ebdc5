"""``prompt-t5x compare``: methods by their own run files, each in its own process -> CSV/MD/PNG."""

import dataclasses
import json
import math

import pytest

from prompt_t5x.commands import cli, compare, compare_report, gin_cli
from prompt_t5x.commands.quickstart import QUICKSTART_CONFIG

FAST = ["--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=2", "--gin.BATCH_SIZE=8"]


def test_compare_runs_each_method_and_resumes(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", f"--gin.OUTPUT_DIR={out}", *FAST,
            "--gin.METHODS=['prompt_tuning', 'model_tuning']"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| prompt_tuning | prompt_tuning | 512 |" in printed
    rows = compare_report.read_csv(str(out / "compare.csv"))
    assert [(r["method"], r["kind"]) for r in rows] == [("prompt_tuning", "prompt_tuning"),
                                                         ("model_tuning", "model_tuning")]
    trainable = {"prompt_tuning": 8 * QUICKSTART_CONFIG.emb_dim,
                 "model_tuning": QUICKSTART_CONFIG.num_params}
    for r in rows:
        assert r["status"] == "ok" and r["task"] == "synthetic_contains"
        assert r["trainable_parameters"] == trainable[r["method"]]
        assert r["model_parameters"] == QUICKSTART_CONFIG.num_params
        assert r["last_step"] == 2 and r["best_step"] == 2
        assert 0.0 <= r["best_value"] <= 100.0
        # The train child's own peak RSS (JAX alone is more than 100 MiB), its own wall time.
        assert r["peak_rss_bytes"] > 100 * 2 ** 20 and r["seconds"] > 0
        best = json.loads((out / r["method"] / "best.json").read_text())
        assert best["value"] == pytest.approx(r["best_value"])
        assert r["command"].startswith("prompt-t5x train --gin_file=models/quickstart.gin "
                                       f"--gin_file=runs/{r['method']}.gin")
        assert (out / "logs" / f"{r['method']}.log").read_text().startswith("$ prompt-t5x")
    md = (out / "compare.md").read_text()
    assert "chance 50%" in md and "| model_tuning | model_tuning | 201,728 | 100% |" in md
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"

    # Run again with one method picked: nothing is re-run, the other method's row is kept.
    assert cli.main(argv + ["--gin.METHODS=['prompt_tuning']"]) == 0
    assert "prompt_tuning: finished earlier with the same command; not re-run" in \
        capsys.readouterr().out
    again = compare_report.read_csv(str(out / "compare.csv"))
    assert [(r["method"], r["seconds"]) for r in again] == [(r["method"], r["seconds"])
                                                           for r in rows]


def test_a_method_override_wins_over_the_shared_settings(tmp_path):
    gin_cli.parse(gin_cli.split_argv([
        f"--gin.OUTPUT_DIR={tmp_path}", "--gin.TRAIN_STEPS=10",
        "--gin.MODEL_TUNING=['runs/model_tuning.gin', 'TRAIN_STEPS = 3', "
        "'LEARNING_RATE = 0.05']"]), default_files=["runs/compare.gin"])
    cfg = gin_cli.call(compare.compare_config)
    plans = {p.label: p for p in compare.plan(cfg)}
    assert plans["prompt_tuning"].run.loop.train_steps == 10
    assert plans["model_tuning"].run.loop.train_steps == 3
    assert plans["prompt_tuning"].run.method.prompt_length == 8
    assert plans["model_tuning"].run.model.dropout_rate == 0.0   # shared DROPOUT_RATE
    assert plans["model_tuning"].model_dir == str(tmp_path / "model_tuning")
    argv = plans["model_tuning"].argv
    # Shared settings, then the method's own (the later binding wins); strings as typed.
    assert argv.index("--gin.TRAIN_STEPS=10") < argv.index("--gin.TRAIN_STEPS=3")
    assert f"--gin.MODEL_DIR={tmp_path / 'model_tuning'}" in argv
    assert "--gin.TASK=synthetic_contains" in argv
    assert not tmp_path.joinpath("model_tuning").exists()         # planning writes nothing


def test_the_default_compares_every_method_of_the_registry(tmp_path):
    """Every registered kind has its row in the default, and every row plans (its run file,
    the shared settings and its overrides parse and pass the gin checks), nothing trained."""
    from prompt_t5x.methods import registry
    kinds = set()
    for default in ("runs/compare.gin", "runs/compare_multitask.gin"):
        gin_cli.parse(gin_cli.split_argv([f"--gin.OUTPUT_DIR={tmp_path}", f"--gin_file={default}"]))
        cfg = gin_cli.call(compare.compare_config)
        plans = compare.plan(cfg)
        kinds |= {p.run.method.kind for p in plans}
    assert kinds == set(registry.MODULES)
    # the multi-task default: every method on the mixture (but a zero-shot row's own TASK)
    assert {p.run.task for p in plans if p.label not in cfg.zero_shot} == {"synthetic_skills"}
    assert not any(tmp_path.iterdir())   # planning writes nothing
    assert all(p.trainable and p.trainable > 0 for p in plans)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    # The second method's mistake stops the command before the first trains.
    (["--gin.MODEL_TUNING=['runs/model_tuning.gin', 'PROMPT_LENGTH = 8']"],
     "compare.runs['model_tuning']: --gin.PROMPT_LENGTH sets a macro that no gin file uses"),
    (["--gin.METHODS=['nope']"], "compare.methods=['nope']: pick labels"),
    (["--gin.MODEL_TUNING=['LEARNING_RATE = 0.01']"], "give a list with the method's run gin"),
])
def test_configuration_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, flags,
                                                               message):
    out = tmp_path / "cmp"
    assert cli.main(["compare", f"--gin.OUTPUT_DIR={out}", *FAST, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_method_whose_train_refuses_its_input_stops_with_its_line(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli.main(["compare", f"--gin.OUTPUT_DIR={out}", *FAST,
                     "--gin.PROMPT_TUNING=['runs/prompt_tuning.gin', "
                     "\"CHECKPOINT = '/nope/ckpt'\"]", "--gin.METHODS=['prompt_tuning']"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "method 'prompt_tuning'" in err[0] and "/nope/ckpt" in err[0]
    assert not (out / "compare.csv").exists() and not (out / "prompt_tuning").exists()


def test_report_of_a_failed_method_has_no_point_but_keeps_its_cost(tmp_path):
    row = {"method": "m", "kind": "model_tuning", "task": "synthetic_first", "metric": "accuracy",
           "best_value": math.nan, "best_step": None, "last_step": None, "train_steps": 4,
           "trainable_parameters": 10, "model_parameters": 10, "trainable_percent": 100.0,
           "seconds": 3.0, "peak_rss_bytes": 2 ** 28, "device_peak_bytes": None,
           "resumed": False, "status": "failed (exit 1)", "model_dir": "x", "command": "c"}
    ok = dict(row, method="p", best_value=75.0, best_step=4, status="ok",
              trainable_parameters=5, device_peak_bytes=2 ** 20)
    table = compare_report.markdown_table([ok, row], chance=50.0)
    assert "| m | model_tuning | 10 | 100% | - | - | - | - | 3 s | 256 MiB (process RSS) |" in table
    assert "| 75.00% | 4 |" in table and "1 MiB (device)" in table
    # a mixture's row: a column per task (a row without that task shows '-'), the step time
    mixed = dict(ok, method="bank", per_task=json.dumps({"t1": 80.0, "t2": 70.0}),
                 step_seconds=0.012)
    table = compare_report.markdown_table([mixed, row])
    assert "accuracy (all tasks) | t1 | t2 | at step" in table
    assert "| 75.00% | 80.00% | 70.00% | 4 | - | 12 ms |" in table
    assert "| - | - | - | - | - | - | 3 s |" in table
    compare_report.write_csv([ok, row, mixed], str(tmp_path / "c.csv"))
    back = compare_report.read_csv(str(tmp_path / "c.csv"))
    assert compare_report.per_task(back[2]) == {"t1": 80.0, "t2": 70.0}
    assert back[2]["step_seconds"] == pytest.approx(0.012) and back[0]["per_task"] == ""
    back = back[:2]
    assert back[1]["best_step"] is None and math.isnan(back[1]["best_value"])
    assert back[0]["device_peak_bytes"] == 2 ** 20
    assert compare_report.default_chance(back) == 50.0
    png = compare_report.plot(back, str(tmp_path / "c.png"), chance=50.0)
    assert open(png, "rb").read(4) == b"\x89PNG"


def test_a_real_task_on_a_t5x_checkpoint_plans_from_its_weights(tmp_path, fixtures_dir):
    """The README's real-task command line: the fixture T5X checkpoint's config is read from its
    weights, and every method is planned on it (no training here: that is the CLI run above)."""
    ckpt = fixtures_dir / "t5x" / "t5_1_1_tiny_checkpoint_3"
    gin_cli.parse(gin_cli.split_argv([
        f"--gin.OUTPUT_DIR={tmp_path}", "--gin.MODEL_GIN=models/from_checkpoint.gin",
        f"--gin.CHECKPOINT={ckpt}", "--gin.TASK=local_glue_sst2",
        f"--gin.DATA_DIR={fixtures_dir / 'data'}",
        f"--gin.VOCABULARY={fixtures_dir / 'vocab' / 't5_cc_all_32000_100extra.spm.model'}",
        "--gin.INPUTS_LENGTH=64", "--gin.TARGETS_LENGTH=4"]),
        default_files=["runs/compare.gin"])
    plans = {p.label: p for p in compare.plan(gin_cli.call(compare.compare_config))}
    model = plans["prompt_tuning"].run.model
    assert model.vocab_size == 32128 and plans["model_tuning"].run.model == model
    assert plans["prompt_tuning"].trainable == 8 * model.emb_dim
    assert plans["model_tuning"].trainable == model.num_params
    # A head's size needs the task's labels: its count comes from its run's own first line.
    assert plans["classification_head"].trainable is None
    assert plans["prompt_tuning"].run.checkpoint == str(ckpt)
    assert f"--gin.CHECKPOINT={ckpt}" in plans["model_tuning"].argv


def test_a_crashing_train_gets_a_failed_row_instead_of_stopping_the_comparison(tmp_path):
    """A child that dies of a bug (not a user mistake, which is exit 2) is recorded as failed,
    with its exit status and its traceback in its log; run_all returns instead of raising."""
    gin_cli.parse(gin_cli.split_argv([f"--gin.OUTPUT_DIR={tmp_path}", *FAST]),
                  default_files=["runs/compare.gin"])
    cfg = gin_cli.call(compare.compare_config)
    good = compare.plan(cfg)[0]
    # The planner would refuse this model (there is none); the child crashes on it.
    broken = dataclasses.replace(good, label="broken", argv=good.argv + ["--gin.train.model=None"])
    rows = compare.run_all(cfg, [broken], log=lambda line: None)
    assert rows[0]["status"] == "failed (exit 1)" and math.isnan(rows[0]["best_value"])
    assert rows[0]["peak_rss_bytes"] > 0
    assert compare_report.read_csv(str(tmp_path / "compare.csv"))[0]["status"].startswith(
        "failed")
    assert "Traceback" in (tmp_path / "logs" / "broken.log").read_text()
