"""``prompt-t5x plan`` on a tiny T5: AOT compile for abstract, sharded inputs; the table it prints.

The real-size tables (xl, xxl) take minutes to compile on CPU and live in docs/scaling.md; here a
small model checks that the numbers mean what the columns say.
"""

import os
import subprocess
import sys

import pytest

from prompt_t5x.commands import plan
from prompt_t5x.model import t5

# Dims divisible by 8; frozen weights bf16 as in the real plan.
CFG = t5.get_config("test", vocab_size=128, emb_dim=56, num_heads=8, head_dim=6, mlp_dim=40,
                    num_encoder_layers=1, num_decoder_layers=1, param_dtype="bfloat16")
SIZES = dict(batch_size=8, inputs_length=12, targets_length=4, prompt_length=5)


def _norm_params(cfg):
    # RMSNorm scales: ('embed',) only, so never split over 'model'.
    return cfg.emb_dim * (2 * cfg.num_encoder_layers + 3 * cfg.num_decoder_layers + 2)


@pytest.mark.parametrize("mesh_text,param_dims,expected_weight_bytes", [
    # pure data parallel: every device holds every weight
    ("8x1", 1, lambda c: 2 * c.num_params),
    # model 8: everything but the norm scales is split 8 ways ('embed' over data, size 1)
    ("1x8", 2, lambda c: 2 * ((c.num_params - _norm_params(c)) // 8 + _norm_params(c))),
])
def test_plan_one_reports_sharded_weights_memory_and_flops(mesh_text, param_dims,
                                                           expected_weight_bytes):
    row = plan.plan_one(CFG, mesh_text, parameter_partitioning_dims=param_dims, **SIZES)
    assert row["mesh"] == mesh_text and row["devices"] == 8
    assert round(row["weights_gib"] * plan.GIB) == expected_weight_bytes(CFG)
    # the arguments are the weight shards plus the (small) state and batch shard
    assert row["weights_gib"] < row["arguments_gib"] < row["weights_gib"] + 1e-3
    assert row["peak_gib"] >= row["arguments_gib"]
    # XLA's count includes element-wise work on top of the matmuls of prompt_t5x.bench.flops
    # the compiled step does every counted matmul (so never less) plus a little bookkeeping
    assert 1.0 <= row["tflops_compiled"] / row["tflops_analytic"] <= 1.5
    assert all(row["fits"].values())


def test_plan_rejects_a_batch_the_data_axis_cannot_split():
    with pytest.raises(plan.UsageError, match=r"batch size 6 is not divisible by the data axis"):
        plan.plan_one(CFG, "4x2", **dict(SIZES, batch_size=6))


def _cli(*args):
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the command sets its own device count before JAX starts
    return subprocess.run([sys.executable, "-m", "prompt_t5x", "plan", *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_plan_command_prints_the_table():
    proc = _cli("--size", "test", "--mesh", "2x1", "--mesh", "1x2", "--batch_size", "4",
                "--inputs_length", "16", "--targets_length", "4", "--prompt_length", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# prompt-t5x plan:") and "on 2 fake devices" in lines[0]
    assert lines[1] == plan.HEADER
    assert lines[3].startswith("| 2x1 | 2 | 1/1 | ")
    assert lines[3].endswith(" |") and lines[3].count("|") == plan.HEADER.count("|")
    # vocab 101 cannot be split over model=2: that row names the parameter instead
    assert lines[4].startswith("| 1x2 | - | cannot plan:")
    assert "token_embedder/embedding" in lines[4]


@pytest.mark.parametrize("args,message", [
    (["--size", "test", "--mesh=-1x2"], "both sizes given"),
    (["--size", "giant", "--mesh", "1x1"], "unknown model size 'giant'"),
    (["--mesh", "1x1"], "no model: pass --gin_file=models/xxl.gin or --size=xxl"),
])
def test_plan_command_usage_errors(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_plan_reads_model_and_run_sizes_through_gin():
    # tiny.gin names the model; prompt_tuning.gin gives prompt 100 and targets 8 (its MODEL_DIR and
    # TASK stay unset: a plan needs neither); flags override batch and inputs.
    proc = _cli("--gin_file=models/tiny.gin", "--gin_file=runs/prompt_tuning.gin", "--mesh", "2x1",
                "--batch_size", "2", "--inputs_length", "8")
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert "(d_model 64, 2+2 layers)" in first
    assert "batch 2, inputs 8 + prompt 100, targets 8." in first
    assert proc.stdout.splitlines()[3].startswith("| 2x1 | 2 | 1/1 | ")
