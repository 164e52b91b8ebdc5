"""Where a compiled step's device time goes: matmuls, fused attention, collectives, the rest.

``bench --profile DIR`` runs each timed phase ``--steps`` more times under ``jax.profiler.trace``
and keeps, per phase, the trace and the compiled HLO text of the executable it timed. This module
joins the two: every op event on the device's timeline is named after an HLO instruction of that
executable, and the instruction says what kind of work it is:

- ``matmul``: ``dot``/``convolution``, cuBLAS/cuBLASLt GEMM custom calls, and fusions that
  contain one (XLA:GPU's Triton GEMM fusions, XLA:CPU's dot fusions);
- ``attention``: cuDNN fused attention custom calls (``__cudnn$fmha...``) and fusions holding one;
- ``collective``: all-reduce / all-gather / reduce-scatter / all-to-all / collective-permute;
- ``other``: everything else (element-wise and reduction fusions, copies, transposes).

Control flow (``while``, ``conditional``) is left out: its body's ops are events of their own,
and the loop's event would count them twice.

Summed over the captured steps and divided by their count (and by the number of devices), the
categories split the step time; ``coverage`` (their sum over the step's wall time) says how much
of the step they explain. With the analytic FLOPs they also give the utilisation of the time
spent in FLOP-bearing work (matmul + attention): whether a missed MFU target is lost inside the
matmuls or around them.

On GPUs, XLA may group runs of kernels into command buffers, whose trace events name the
command buffer rather than its ops: such time is ``unattributed`` (low coverage). Re-run with
``XLA_FLAGS=--xla_gpu_enable_command_buffer=`` to see it split.

Run on a saved profile: ``python -m prompt_t5x.bench.profile_report DIR [--flops F --peak P]``.
Imports no TensorFlow (the trace is read from its Perfetto JSON export).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional

CATEGORIES = ("matmul", "attention", "collective", "other")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
_OPCODE = re.compile(r"(?:^|[\s}\])])([a-z][a-z0-9\-]*)\(")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations|"
                     r"called_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_NAME = re.compile(r"%?([\w.\-]+)")
_TARGET = re.compile(r'custom_call_target="([^"]+)"')


CONTROL = "control"   # while / conditional: not counted (their bodies' ops are)


def _own_category(opcode: str, rest: str) -> Optional[str]:
    if opcode in ("while", "conditional"):
        return CONTROL
    if opcode in ("dot", "convolution"):
        return "matmul"
    if opcode.startswith(_COLLECTIVES):
        return "collective"
    if opcode == "custom-call":
        target = (_TARGET.search(rest) or [None, ""])[1].lower()
        if "fmha" in target or "flash" in target:
            return "attention"
        if "gemm" in target or "matmul" in target or "cublas" in target:
            return "matmul"
    return None


def instruction_categories(hlo_text: str) -> Dict[str, str]:
    """HLO instruction name -> category, for every instruction of an optimised module's text.

    A fusion (or call) takes the weightiest category found in the computations it calls,
    attention > matmul > collective; ``while``/``conditional`` are ``CONTROL``.
    """
    own: Dict[str, Optional[str]] = {}
    calls: Dict[str, List[str]] = {}
    members: Dict[str, List[str]] = collections.defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        if line.startswith("}"):
            computation = None
            continue
        match = _INSTRUCTION.match(line)
        if match is None:
            header = _COMPUTATION.match(line)   # 'ENTRY %main.5 (p: f32[2]) -> f32[] {'
            if header:
                computation = header.group(1)
            continue
        if computation is None:
            continue
        name, rest = match.groups()
        opcode = _OPCODE.search(rest)
        own[name] = _own_category(opcode.group(1) if opcode else "", rest)
        calls[name] = [c for group in _CALLED.findall(rest) for c in _NAME.findall(group)]
        members[computation].append(name)

    rank = {CONTROL: -1, "other": 0, "collective": 1, "matmul": 2, "attention": 3}
    memo: Dict[str, str] = {}

    def of_computation(comp: str, seen: frozenset) -> str:
        best = "other"
        for inst in members.get(comp, ()):
            cat = of_instruction(inst, seen)
            if rank[cat] > rank[best]:
                best = cat
        return best

    def of_instruction(inst: str, seen: frozenset = frozenset()) -> str:
        if inst in memo:
            return memo[inst]
        if own.get(inst) == CONTROL:
            memo[inst] = CONTROL
            return CONTROL
        best = own.get(inst) or "other"
        for comp in calls.get(inst, ()):
            if comp not in seen:
                cat = of_computation(comp, seen | {comp})
                if rank[cat] > rank[best]:
                    best = cat
        memo[inst] = best
        return best

    return {name: of_instruction(name) for name in own}


def _processes(trace: Dict[str, Any]) -> Dict[Any, str]:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return {e.get("pid"): e["args"]["name"] for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}


def _has_devices(trace: Dict[str, Any]) -> bool:
    return any(name.startswith("/device:") for name in _processes(trace).values())


def _device_events(trace: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Complete ('X') events of the device's op timeline.

    GPU/TPU: the '/device:...' processes, their 'XLA Ops' thread when there is one (kernel
    threads repeat the same ops). CPU: the XLA threads of '/host:CPU' (client and Eigen pool),
    where XLA:CPU runs its ops, possibly split over several threads at once.
    """
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = _processes(trace)
    threads = {(e.get("pid"), e.get("tid")): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = {pid for pid, name in processes.items() if name.startswith("/device:")}
    if device:
        ops_lines = {key for key, name in threads.items() if key[0] in device and name == "XLA Ops"}
        keep: Callable[[Any, Any], bool] = (
            (lambda pid, tid: (pid, tid) in ops_lines) if ops_lines
            else (lambda pid, tid: pid in device))
    else:
        xla = {key for key, name in threads.items() if "XLA" in name}
        keep = lambda pid, tid: (pid, tid) in xla  # noqa: E731
    return [e for e in events if e.get("ph") == "X" and keep(e.get("pid"), e.get("tid"))]


def summarize(trace: Dict[str, Any], categories: Dict[str, str], steps: int,
              flops: Optional[float] = None, peak: Optional[float] = None,
              step_s: Optional[float] = None) -> Dict[str, Any]:
    """Per-step, per-device time of the executable's ops by category (seconds) and the top ops.

    Events on the op timeline that name no instruction of the executable are ``unattributed``
    (runtime wrappers on CPU, command buffers on GPU); ``step_s`` (the timed median) gives
    ``coverage``, the share of the step that the categorised ops explain.
    """
    per_op: Dict[str, float] = collections.defaultdict(float)
    unattributed = 0.0
    events = _device_events(trace)
    for e in events:
        name = (e.get("args") or {}).get("hlo_op") or e.get("name", "")
        seconds = e.get("dur", 0.0) * 1e-6   # trace durations are in microseconds
        if name not in categories:
            unattributed += seconds
        elif categories[name] != CONTROL:
            per_op[name] += seconds
    # Several devices run the same program: report one device's share.
    devices = len({e.get("pid") for e in events}) if _has_devices(trace) else 1
    per_step = steps * max(devices, 1)
    by_cat = {c: 0.0 for c in CATEGORIES}
    for name, seconds in per_op.items():
        by_cat[categories[name]] += seconds
    total = sum(by_cat.values())
    out: Dict[str, Any] = {
        "steps": steps, "devices": devices, "op_time_s": total / per_step,
        "unattributed_s": unattributed / per_step,
        "category_s": {c: v / per_step for c, v in by_cat.items()},
        "category_share": {c: (v / total if total else 0.0) for c, v in by_cat.items()},
        "top_ops": [{"op": n, "category": categories[n], "s": s / per_step}
                    for n, s in sorted(per_op.items(), key=lambda kv: -kv[1])[:12]]}
    if step_s:
        out["coverage"] = (total / per_step) / step_s
    busy = (by_cat["matmul"] + by_cat["attention"]) / per_step
    if flops and peak and busy > 0:
        # Every analytic FLOP is a matmul FLOP (attention's q k^T and p v included, wherever the
        # attention runs): this is how fast the FLOP-bearing work itself runs.
        out["flop_work_utilisation"] = flops / busy / peak
    return out


def capture(call: Callable[[], Any], steps: int, out_dir: str, hlo_text: str,
            sync: Callable[[Any], Any]) -> str:
    """Trace ``steps`` synced calls into ``out_dir`` next to the executable's HLO text."""
    import jax
    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(os.path.join(out_dir, "compiled.hlo.txt.gz"), "wt") as f:
        f.write(hlo_text)
    sync(call())   # nothing of a previous phase left in flight inside the trace
    with jax.profiler.trace(out_dir):
        for _ in range(steps):
            sync(call())
    with open(os.path.join(out_dir, "steps.json"), "w") as f:
        json.dump({"steps": steps}, f)
    return out_dir


def report(profile_dir: str, flops: Optional[float] = None, peak: Optional[float] = None,
           step_s: Optional[float] = None) -> Dict[str, Any]:
    """Summarise what ``capture`` left in ``profile_dir``."""
    # The profiler's own Chrome-trace export (one per host); no Perfetto conversion needed.
    traces = sorted(glob.glob(os.path.join(profile_dir, "**", "*.trace.json.gz"),
                              recursive=True))
    hlo = os.path.join(profile_dir, "compiled.hlo.txt.gz")
    if not traces or not os.path.exists(hlo):
        raise FileNotFoundError(f"{profile_dir}: no *.trace.json.gz and compiled.hlo.txt.gz"
                                " (written by prompt-t5x bench --profile DIR)")
    with gzip.open(hlo, "rt") as f:
        categories = instruction_categories(f.read())
    with gzip.open(traces[-1], "rt") as f:
        trace = json.load(f)
    with open(os.path.join(profile_dir, "steps.json")) as f:
        steps = json.load(f)["steps"]
    return summarize(trace, categories, steps, flops, peak, step_s)


def format_report(name: str, r: Dict[str, Any]) -> str:
    share = r["category_share"]
    parts = [f"{c} {1e3 * r['category_s'][c]:.2f} ms ({100 * share[c]:.1f}%)" for c in CATEGORIES]
    line = (f"  profile {name}: device ops {1e3 * r['op_time_s']:.2f} ms/step = "
            + ", ".join(parts) + f"; unattributed {1e3 * r['unattributed_s']:.2f} ms")
    if "coverage" in r:
        line += f"; {100 * r['coverage']:.0f}% of the step"
    if "flop_work_utilisation" in r:
        line += f"; matmul+attention time at {100 * r['flop_work_utilisation']:.1f}% of peak"
    return line


def main(argv: Optional[Iterable[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prompt_t5x.bench.profile_report",
                                description="Split a bench --profile capture by kind of work.")
    p.add_argument("profile_dir")
    p.add_argument("--flops", type=float, default=None, help="analytic FLOPs per step")
    p.add_argument("--peak", type=float, default=None, help="peak FLOP/s of the device")
    p.add_argument("--step_s", type=float, default=None, help="timed step (median), seconds")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    r = report(args.profile_dir, args.flops, args.peak, args.step_s)
    print(format_report(os.path.basename(os.path.normpath(args.profile_dir)), r))
    for op in r["top_ops"]:
        print(f"    {1e3 * op['s']:9.3f} ms  {op['category']:10s} {op['op']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
