"""What a new user meets in the first hour (issue 16), part 2: the quickstart shows learning as
it happens, bench's MFU on a CPU is against that CPU, help texts say what to do, and the scaling
figure has its chance level and its spread over seeds. Part 1: ``test_first_hour.py``."""

from __future__ import annotations

import pytest

from prompt_t5x.commands import cli


# ----------------------------------------------------------------------------------- 6 ----
def test_quickstart_curve_helpers():
    from prompt_t5x.commands import quickstart
    assert quickstart.eval_steps(30) == list(range(1, 11)) + [12, 14, 16, 18, 20, 25, 30]
    assert quickstart.eval_steps(400)[-4:] == [100, 200, 300, 400]
    assert quickstart.sparkline([0.0, 50.0, 100.0, 120.0]) == " ▄██"


@pytest.mark.parametrize("with_matplotlib", [True, False])
def test_quickstart_ends_with_a_plot_or_a_sparkline(hide_modules, tmp_path, capsys,
                                                    with_matplotlib):
    from prompt_t5x.commands import quickstart
    if not with_matplotlib:
        hide_modules("matplotlib")
    png = tmp_path / "curve.png"
    # 12 steps reach 100% from ~44% (the rise is at steps 8-10): 0 means it learned.
    assert quickstart.main(["--steps", "12", "--plot", str(png)]) == 0
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
    args = bench_protocol.build_parser().parse_args(["--peak_flops", "1e12"])
    assert bench_protocol.resolve_peak_flops(args) == "--peak_flops" and args.peak_flops == 1e12


# ----------------------------------------------------------------------------------- 9 ----
@pytest.mark.parametrize("command", ["train", "eval", "infer", "scaling", "compare"])
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
        return types.SimpleNamespace(best_value=value, best_step=2, last_step=2, stopped=None)

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
