"""profile_report: HLO instructions get the right kind of work, device lines are picked right,
and ``bench --profile`` splits a real CPU trace of the train step."""

import json

import pytest

from prompt_t5x.bench import bench, profile_report

# A GPU-style optimised module: cuBLAS and Triton GEMMs, a cuDNN attention call inside a fusion,
# a collective, a loop whose body holds a dot, element-wise fusions, and a header long enough to
# carry XLA's /*index=N*/ comments.
HLO = """HloModule jit_step, is_scheduled=true

%fused_add (param_0: bf16[8,16], param_1: bf16[8,16]) -> bf16[8,16] {
  %param_0 = bf16[8,16]{1,0} parameter(0)
  %param_1 = bf16[8,16]{1,0} parameter(1)
  ROOT %add.1 = bf16[8,16]{1,0} add(%param_0, %param_1)
}

%triton_gemm_computation (p0: bf16[8,16], p1: bf16[16,16]) -> bf16[8,16] {
  %p0 = bf16[8,16]{1,0} parameter(0)
  %p1 = bf16[16,16]{1,0} parameter(1)
  ROOT %dot.7 = bf16[8,16]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%attention_wrapper (a: bf16[2,4,8,16], b: bf16[2,4,8,16], c: bf16[2,4,8,16], d: bf16[1,4,8,8], /*index=4*/e: s32[2]) -> (bf16[2,4,8,16], u8[0]) {
  %a = bf16[2,4,8,16]{3,2,1,0} parameter(0)
  %b = bf16[2,4,8,16]{3,2,1,0} parameter(1)
  %c = bf16[2,4,8,16]{3,2,1,0} parameter(2)
  %d = bf16[1,4,8,8]{3,2,1,0} parameter(3)
  %e = s32[2]{0} parameter(4)
  ROOT %custom-call.3 = (bf16[2,4,8,16]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b, %c, %d, %e), custom_call_target="__cudnn$fmhaScaleBiasSoftmax"
}

%body (s: (s32[], bf16[8,16])) -> (s32[], bf16[8,16]) {
  %s = (s32[], bf16[8,16]{1,0}) parameter(0)
  %x = bf16[8,16]{1,0} get-tuple-element(%s), index=1
  %i = s32[] get-tuple-element(%s), index=0
  %dot.9 = bf16[8,16]{1,0} dot(%x, %x), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %t = (s32[], bf16[8,16]{1,0}) tuple(%i, %dot.9)
}

%cond (s.1: (s32[], bf16[8,16])) -> pred[] {
  %s.1 = (s32[], bf16[8,16]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main.5 (x.1: bf16[8,16], w.1: bf16[16,16]) -> bf16[8,16] {
  %x.1 = bf16[8,16]{1,0} parameter(0)
  %w.1 = bf16[16,16]{1,0} parameter(1)
  %gemm.2 = (bf16[8,16]{1,0}, s8[4]{0}) custom-call(%x.1, %w.1), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/dot_general"}
  %gte = bf16[8,16]{1,0} get-tuple-element(%gemm.2), index=0
  %gemm_fusion.4 = bf16[8,16]{1,0} fusion(%gte, %w.1), kind=kCustom, calls=%triton_gemm_computation
  %fmha.1 = (bf16[2,4,8,16]{3,2,1,0}, u8[0]{0}) fusion(%x.1, %x.1, %x.1, %x.1, %x.1), kind=kCustom, calls=%attention_wrapper
  %all-reduce-start.2 = bf16[8,16]{1,0} all-reduce-start(%gemm_fusion.4), to_apply=%fused_add
  %loop_add_fusion = bf16[8,16]{1,0} fusion(%gte, %gemm_fusion.4), kind=kLoop, calls=%fused_add
  %init = (s32[], bf16[8,16]{1,0}) tuple(%x.1, %loop_add_fusion)
  %while.3 = (s32[], bf16[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %copy.1 = bf16[8,16]{1,0} copy(%loop_add_fusion)
}
"""


def test_instruction_categories_of_a_gpu_style_module():
    cats = profile_report.instruction_categories(HLO)
    assert cats["gemm.2"] == "matmul"            # cuBLASLt custom call
    assert cats["gemm_fusion.4"] == "matmul"     # Triton GEMM fusion: holds a dot
    assert cats["fmha.1"] == "attention"         # fusion around the cuDNN attention call
    assert cats["custom-call.3"] == "attention"
    assert cats["all-reduce-start.2"] == "collective"
    assert cats["loop_add_fusion"] == "other"
    assert cats["while.3"] == "control"          # its body's ops are events of their own
    assert cats["dot.9"] == "matmul" and cats["copy.1"] == "other"
    assert cats["e"] == "other"                  # parameter of the /*index=4*/ header


def _meta(pid, tid, kind, name):
    return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}


def test_device_ops_line_is_counted_once_per_op():
    """GPU traces repeat each op as kernels on stream lines: only 'XLA Ops' counts."""
    trace = {"traceEvents": [
        _meta(1, 0, "process_name", "/device:GPU:0"), _meta(1, 10, "thread_name", "XLA Ops"),
        _meta(1, 11, "thread_name", "Stream #13(Compute)"),
        _meta(2, 0, "process_name", "/host:CPU"), _meta(2, 20, "thread_name", "python"),
        {"ph": "X", "pid": 1, "tid": 10, "name": "gemm.2", "dur": 300.0},
        {"ph": "X", "pid": 1, "tid": 10, "name": "fmha.1", "dur": 200.0},
        {"ph": "X", "pid": 1, "tid": 10, "name": "loop_add_fusion", "dur": 100.0},
        {"ph": "X", "pid": 1, "tid": 10, "name": "command_buffer_3", "dur": 60.0},
        {"ph": "X", "pid": 1, "tid": 10, "name": "while.3", "dur": 500.0},   # spans dot.9
        {"ph": "X", "pid": 1, "tid": 11, "name": "sm90_gemm_kernel", "dur": 299.0,
         "args": {"hlo_op": "gemm.2"}},
        {"ph": "X", "pid": 2, "tid": 20, "name": "PjitFunction(step)", "dur": 900.0},
    ]}
    r = profile_report.summarize(trace, profile_report.instruction_categories(HLO), steps=2,
                                 flops=1e9, peak=1e12, step_s=400e-6)
    assert r["devices"] == 1
    assert r["op_time_s"] == pytest.approx(300e-6)          # (300 + 200 + 100) us / 2 steps
    assert r["unattributed_s"] == pytest.approx(30e-6)      # names no instruction
    assert r["coverage"] == pytest.approx(0.75)
    assert r["category_s"]["matmul"] == pytest.approx(150e-6)
    assert r["category_s"]["attention"] == pytest.approx(100e-6)
    assert r["category_share"]["other"] == pytest.approx(1 / 6)
    # FLOP-bearing work: matmuls and the fused attention.
    assert r["flop_work_utilisation"] == pytest.approx(1e9 / 250e-6 / 1e12)
    assert [op["op"] for op in r["top_ops"]] == ["gemm.2", "fmha.1", "loop_add_fusion"]


def test_bench_profile_splits_a_real_cpu_trace(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--size", "test", "--batch", "4", "--encoder_len", "24", "--prompt_len",
                       "4", "--decoder_len", "6", "--steps", "2", "--warmup", "1", "--phases",
                       "train", "--profile", str(tmp_path / "prof"), "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["train"]["profile"]
    assert prof["steps"] == 2 and prof["op_time_s"] > 0 and prof["coverage"] > 0
    # The step is mostly matmuls by FLOPs; on XLA:CPU they are dot fusions of the executable.
    assert prof["category_s"]["matmul"] > 0 and prof["category_s"]["other"] > 0
    assert sum(prof["category_share"].values()) == pytest.approx(1.0)
    assert "profile train: device ops" in capsys.readouterr().out
    # The saved capture reads back to the same split.
    again = profile_report.report(str(tmp_path / "prof" / "train"))
    assert again["category_s"] == pytest.approx(prof["category_s"])


def test_a_profiler_failure_keeps_the_timing(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise RuntimeError("profiler refused")

    monkeypatch.setattr(profile_report, "capture", refuse)
    out = tmp_path / "r.json"
    assert bench.main(["--size", "test", "--batch", "2", "--encoder_len", "12", "--prompt_len",
                       "2", "--decoder_len", "4", "--steps", "1", "--warmup", "0", "--phases",
                       "train", "--profile", str(tmp_path / "prof"), "--json", str(out)]) == 0
    train = json.loads(out.read_text())["train"]
    assert train["examples_per_s"] > 0 and "profile" not in train
    assert train["profile_error"] == "RuntimeError: profiler refused"
    assert "profile train failed: RuntimeError: profiler refused" in capsys.readouterr().out
