"""Are XLA:CPU's matmul kernels the gap to PyTorch? Every matmul of our train step, timed in both.

The CPU profile (docs/performance.md) puts ~89% of our train step's op time in matmuls, at the
minimum FLOP count. What is left to explain a ratio to the PEFT peer is then how fast each side's
matmul *kernels* are at the step's shapes. This probe compiles our train step for the bench's
configuration (abstract inputs, nothing allocated), reads every ``dot`` of the compiled HLO,
reduces each to a canonical batched matmul ``[b, M, K] x [b, K, N]`` (batch, free and contracted
dimensions multiplied out; the layouts each side prefers are prepared outside the timing), and
times every distinct problem in JAX (``jnp.matmul``, jitted, float32) and in PyTorch
(``torch.matmul``) in the same process, pinned to the same cores, calls alternated between the
two, median of ``--repeats`` rounds.

It prints a table per problem and the totals per train step (each problem weighted by how often
the step runs it): our matmul time, the peer's matmul time for the same work, and their ratio —
the speed-up (or slow-down) the matmul kernels alone predict.

    python -m prompt_t5x.bench.matmul_probe --size small --batch 8 --encoder_len 128 \\
        --prompt_len 20 --decoder_len 8 --cpu_threads 1

Needs PyTorch (the ``reference`` extra). Times only; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import statistics
import sys
import time
from typing import Dict, List, Tuple

from prompt_t5x.bench import bench_protocol as protocol

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\][^ ]*\s+(\S+?)\((.*)$")
Problem = Tuple[int, int, int, int]   # (batch, M, K, N)


def _ints(text: str) -> Tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _dims_attr(rest: str, name: str) -> Tuple[int, ...]:
    m = re.search(name + r"=\{([\d,]*)\}", rest)
    return _ints(m.group(1)) if m else ()


def matmul_problems(hlo_text: str) -> Dict[Problem, int]:
    """Every ``dot`` of an HLO module as (batch, M, K, N) -> how many times the module runs it.

    M / N multiply the lhs / rhs dimensions that are neither batch nor contracted.
    """
    shapes: Dict[str, Tuple[int, ...]] = {}
    dots = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dims, op, rest = m.groups()
        shapes[name] = _ints(dims)
        if op == "dot":
            dots.append((name, rest))
    problems: Dict[Problem, int] = collections.Counter()
    for name, rest in dots:
        operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])[:2]
        lhs, rhs = (shapes.get(o) for o in operands)
        if lhs is None or rhs is None:
            raise ValueError(f"cannot read the operands of HLO dot {name!r}")
        lb, lc = _dims_attr(rest, "lhs_batch_dims"), _dims_attr(rest, "lhs_contracting_dims")
        rb, rc = _dims_attr(rest, "rhs_batch_dims"), _dims_attr(rest, "rhs_contracting_dims")
        batch = math.prod(lhs[i] for i in lb)
        k = math.prod(lhs[i] for i in lc)
        if k != math.prod(rhs[i] for i in rc) or batch != math.prod(rhs[i] for i in rb):
            raise ValueError(f"HLO dot {name!r}: operand dimensions disagree")
        m_size = math.prod(s for i, s in enumerate(lhs) if i not in lb + lc)
        n_size = math.prod(s for i, s in enumerate(rhs) if i not in rb + rc)
        problems[(batch, m_size, k, n_size)] += 1
    return dict(problems)


def step_problems(args) -> Dict[Problem, int]:
    """The matmul problems of our compiled train step at the bench configuration ``args``."""
    from prompt_t5x.bench import bench
    from prompt_t5x.training import optim
    cfg = protocol.model_config(args)
    method, optimizer = bench._method(args, cfg), optim.adafactor()
    state, frozen, batch = bench._abstract_train_inputs(args, cfg, method, optimizer)
    compiled = bench._make_step(args, method, optimizer).lower(state, frozen, batch).compile()
    return matmul_problems(compiled.as_text())


def _timer(run, sync, calls: int):
    def once() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            out = run()
        sync(out)
        return (time.perf_counter() - start) / calls
    return once


def time_problem(problem: Problem, repeats: int, min_seconds: float = 0.02) -> Dict[str, float]:
    """Median seconds per call of one problem in JAX and in PyTorch, rounds alternated."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    batch, m, k, n = problem
    rng = np.random.default_rng(0)
    a = rng.standard_normal((batch, m, k), np.float32)
    b = rng.standard_normal((batch, k, n), np.float32)
    if batch == 1:
        a, b = a[0], b[0]
    ja, jb = jax.device_put(a), jax.device_put(b)
    jmm = jax.jit(jnp.matmul)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    jax_run = lambda: jmm(ja, jb)  # noqa: E731
    torch_run = lambda: torch.matmul(ta, tb)  # noqa: E731
    jax_run().block_until_ready()
    torch_run()
    # Enough calls per round that a round lasts ~min_seconds (timer resolution, dispatch).
    start = time.perf_counter()
    jax_run().block_until_ready()
    calls = max(1, int(min_seconds / max(time.perf_counter() - start, 1e-6)))
    timers = {"jax": _timer(jax_run, lambda o: o.block_until_ready(), calls),
              "torch": _timer(torch_run, lambda o: None, calls)}
    rounds: Dict[str, List[float]] = {"jax": [], "torch": []}
    for r in range(repeats):
        order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
        for side in order:
            rounds[side].append(timers[side]())
    return {side: statistics.median(v) for side, v in rounds.items()}


def probe(args) -> Dict[str, object]:
    cores = protocol.pin_cpus(args.cpu_threads)
    import torch
    torch.set_num_threads(len(cores))
    torch.set_flush_denormal(True)
    problems = step_problems(args)
    rows = []
    for problem, count in sorted(problems.items(), key=lambda kv: -math.prod(kv[0]) * kv[1]):
        t = time_problem(problem, args.repeats)
        flops = 2 * math.prod(problem)
        rows.append({"problem": list(problem), "count": count, "flops": flops,
                     "jax_s": t["jax"], "torch_s": t["torch"],
                     "jax_gflops": flops / t["jax"] / 1e9,
                     "torch_gflops": flops / t["torch"] / 1e9})
    jax_total = sum(r["jax_s"] * r["count"] for r in rows)
    torch_total = sum(r["torch_s"] * r["count"] for r in rows)
    import jax
    return {"cores": cores, "jax": jax.__version__, "torch": torch.__version__,
            "rows": rows, "step_matmul_flops": sum(r["flops"] * r["count"] for r in rows),
            "jax_matmul_s_per_step": jax_total, "torch_matmul_s_per_step": torch_total,
            "matmul_speed_ratio": torch_total / jax_total}


def print_report(result: Dict[str, object]) -> None:
    print(f"cores {result['cores']}, jax {result['jax']}, torch {result['torch']}")
    print(f"{'[b, M, K, N]':>26} {'per step':>8} {'jax ms':>8} {'torch ms':>9} "
          f"{'jax GF/s':>9} {'torch GF/s':>10} {'jax/torch speed':>15}")
    for r in result["rows"]:
        print(f"{str(r['problem']):>26} {r['count']:>8} {1e3 * r['jax_s']:>8.3f} "
              f"{1e3 * r['torch_s']:>9.3f} {r['jax_gflops']:>9.1f} {r['torch_gflops']:>10.1f} "
              f"{r['torch_s'] / r['jax_s']:>14.2f}x")
    print(f"per train step: {result['step_matmul_flops'] / 1e9:.1f} GFLOP in matmuls; "
          f"JAX {1e3 * result['jax_matmul_s_per_step']:.1f} ms, PyTorch "
          f"{1e3 * result['torch_matmul_s_per_step']:.1f} ms: the matmul kernels alone predict "
          f"ours at {result['matmul_speed_ratio']:.2f}x the peer's speed")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prompt_t5x.bench.matmul_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--encoder_len", type=int, default=128)
    parser.add_argument("--prompt_len", type=int, default=20)
    parser.add_argument("--decoder_len", type=int, default=8)
    parser.add_argument("--cpu_threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    # What bench's model config and step builder read, fixed to the CPU protocol.
    args.dtype = args.param_dtype = "float32"
    args.remat, args.attention, args.microbatches, args.dropout = "none", "einsum", 1, 0.0
    result = probe(args)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
