"""What ``prompt-t5x bench`` (``prompt_t5x.bench.bench``) and its HF PEFT peer
(``prompt_t5x.bench.peft_peer``)
share, so both time the same work the same way: the flags and their checks, the model
configuration, the random batches, and the timing protocol.

Timing: ``warmup`` untimed calls, then ``steps`` calls each synchronised with the device (median
and min reported), then ``steps`` calls back to back with one synchronisation at the end
(``pipelined``: what a training loop with no host sync sees).

Imports no TensorFlow (the GPU machine has none) and no PyTorch (ours never needs it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from prompt_t5x.bench import bench_report

DESCRIPTION = "Throughput, MFU and memory of prompt tuning a frozen T5 on random data."
H100_BF16_PEAK = 790e12  # dense bf16 FLOP/s measured on the H100 (nominal 989e12)
PHASES = bench_report.PHASES


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: --peer runs re-build the children's command lines by flag name.
    p = argparse.ArgumentParser(prog="prompt-t5x bench", description=DESCRIPTION,
                                allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="example (CPU smoke test, about a minute): prompt-t5x "
                                       "bench --size tiny --batch 2 --encoder_len 24 "
                                       "--prompt_len 4 --decoder_len 5")
    p.add_argument("--size", default="tiny",
                   help="model size: tiny, small, base, large, xl, xxl")
    p.add_argument("--batch", type=int, default=32, help="examples per step")
    p.add_argument("--encoder_len", type=int, default=512,
                   help="encoder positions incl. the prompt (inputs = encoder_len - prompt_len)")
    p.add_argument("--prompt_len", type=int, default=100, help="prompt vectors")
    p.add_argument("--decoder_len", type=int, default=16, help="target positions")
    p.add_argument("--remat", default="none", help="rematerialisation: none, full, dots, "
                                                    "dots_no_batch, save_attention_and_mlp_out")
    p.add_argument("--attention", default="einsum", help="einsum | xla | cudnn")
    p.add_argument("--dtype", default=None,
                   help="activation dtype (default: float32 on a CPU, bfloat16 elsewhere and "
                        "with --aot)")
    p.add_argument("--param_dtype", default=None,
                   help="storage dtype of the frozen weights (default as --dtype)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout rate (> 0 makes xla/cudnn attention fall back to einsum)")
    p.add_argument("--microbatches", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--steps", type=int, default=10, help="timed calls per phase")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per phase after compile")
    p.add_argument("--phases", default="train,rank,decode",
                   help=f"comma list of {PHASES}")
    p.add_argument("--num_candidates", type=int, default=2, help="rank classification labels")
    p.add_argument("--decode_len", type=int, default=None,
                   help="greedy tokens (default decoder_len)")
    p.add_argument("--peak_flops", type=float, default=None,
                   help="the device's peak FLOP/s for MFU. Default: GPU 790e12 (dense bf16 "
                        "measured on an H100); CPU measured here with a large matmul in --dtype;"
                        " other backends: no MFU")
    p.add_argument("--aot", action="store_true",
                   help="only compile the train step for abstract inputs; report FLOPs/memory")
    p.add_argument("--peer", choices=["peft"], default=None,
                   help="also run HF PEFT for the same configuration and print the ratio")
    p.add_argument("--peer_compile", action="store_true", help="peer: torch.compile the model")
    p.add_argument("--peer_grad_ckpt", action="store_true", help="peer: gradient checkpointing")
    p.add_argument("--cpu_threads", type=int, default=None,
                   help="CPU cores each side may use: its process is pinned to the first N cores "
                        "of this command's CPU affinity (default: all of them) and its thread "
                        "pools sized N; ours and the peer are pinned alike")
    p.add_argument("--seed", type=int, default=0, help="of the random weights and batches")
    p.add_argument("--method", default=None, metavar="KIND",
                   help="time this method's train step (a methods.registry kind) against prompt "
                        "tuning at --prompt_len, alternated, and print the ratio "
                        "(prompt_t5x.bench.method_bench)")
    p.add_argument("--method_config", default="{}", metavar="JSON",
                   help="with --method: its settings, e.g. '{\"prefix_length\": 8}'")
    p.add_argument("--rounds", type=int, default=5,
                   help="with --method: alternated rounds of --steps timed calls per method")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="ours only: trace --steps more calls of each phase into DIR/PHASE and "
                        "split their device time into matmul / attention / collective / other")
    return p


# CPU peak: a square matmul big enough to leave the caches and the dispatch overhead behind,
# small enough to time in about a second on two cores.
PEAK_MATMUL_N = 1024
PEAK_MATMUL_REPEATS = 8


def measure_matmul_peak(dtype: str, n: int = PEAK_MATMUL_N,
                        repeats: int = PEAK_MATMUL_REPEATS) -> float:
    """FLOP/s of the fastest of ``repeats`` jitted [n, n] @ [n, n] matmuls in ``dtype`` on the
    default device: the attainable peak that MFU on a CPU is measured against."""
    import time

    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))   # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


def resolve_peak_flops(args) -> str:
    """Set ``args.peak_flops`` for the backend when the user gave none; say where it came from.

    MFU against an H100's peak is meaningless on a CPU (it printed 0.0005%), so a CPU gets its
    own measured matmul peak and a backend with no known peak (TPU) gets no MFU at all.
    """
    import jax
    if args.peak_flops is not None:
        return "--peak_flops"
    backend = jax.default_backend()
    if backend == "gpu":
        args.peak_flops = H100_BF16_PEAK
        return "H100 dense bf16 (measured; pass --peak_flops for another GPU)"
    if backend == "cpu":
        args.peak_flops = measure_matmul_peak(args.dtype)
        return (f"measured on this CPU: {PEAK_MATMUL_N}x{PEAK_MATMUL_N} {args.dtype} matmul, "
                f"{args.peak_flops / 1e9:.1f} GFLOP/s")
    return f"none known for {backend}; pass --peak_flops for MFU"


def usage_error(msg: str):
    """A ``cli.UsageError`` (exit status 2, one line), imported late: ``cli`` loads commands."""
    from prompt_t5x.base.errors import UsageError
    return UsageError(msg)


def validate(args: argparse.Namespace) -> None:
    from prompt_t5x.model import attention, t5
    if args.size not in t5.SIZES:
        raise usage_error(f"--size {args.size!r} unknown; choose from {sorted(t5.SIZES)}")
    if args.remat not in t5.REMAT_POLICIES:
        raise usage_error(f"--remat {args.remat!r} unknown; choose from "
                          f"{sorted(t5.REMAT_POLICIES)}")
    if args.attention not in attention.IMPLEMENTATIONS:
        raise usage_error(f"--attention {args.attention!r}; choose from "
                          f"{attention.IMPLEMENTATIONS}")
    for name in ("batch", "prompt_len", "decoder_len", "steps", "num_candidates", "microbatches"):
        if getattr(args, name) < 1:
            raise usage_error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.encoder_len <= args.prompt_len:
        raise usage_error(f"--encoder_len {args.encoder_len} must exceed --prompt_len "
                          f"{args.prompt_len} (encoder = inputs + prompt)")
    if args.batch % args.microbatches:
        raise usage_error(f"--batch {args.batch} is not divisible by --microbatches "
                          f"{args.microbatches}")
    if args.cpu_threads is not None and not 1 <= args.cpu_threads <= len(os.sched_getaffinity(0)):
        raise usage_error(f"--cpu_threads {args.cpu_threads}: this process may use "
                          f"{len(os.sched_getaffinity(0))} cores")
    unknown = set(phases(args)) - set(PHASES)
    if unknown:
        raise usage_error(f"--phases: unknown {sorted(unknown)}; choose from {PHASES}")


def cpu_cores(threads: Optional[int]) -> List[int]:
    """The CPU cores a side runs on: the first ``threads`` of this process's affinity (all when
    None)."""
    cores = sorted(os.sched_getaffinity(0))
    return cores if threads is None else cores[:threads]


def pin_cpus(threads: Optional[int]) -> List[int]:
    """Pin this process to ``cpu_cores(threads)`` and size OpenMP pools to match; the cores.

    The pin is what makes the sides comparable: an option such as
    ``--xla_cpu_multi_thread_eigen=false`` still left XLA:CPU ~1.5 busy cores (its runtime has
    threads of its own) while PyTorch ran on one. An affinity mask binds every thread either
    framework starts, and XLA:CPU sizes its thread pools from it. Called before jax/torch
    create their pools (the children are also pinned from the start by the ``--peer`` parent).
    """
    cores = cpu_cores(threads)
    os.sched_setaffinity(0, cores)
    os.environ["OMP_NUM_THREADS"] = str(len(cores))
    return cores


_PIN_AND_RUN = ("import os, runpy, sys; "
                "os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(',')]); "
                "sys.argv = sys.argv[2:]; runpy.run_module(sys.argv[0], run_name='__main__', "
                "alter_sys=True)")


def pinned_python(cores: List[int], module: str, argv: List[str]) -> List[str]:
    """The command ``python -m module argv`` whose process pins itself to ``cores`` before
    anything else runs (a ``preexec_fn`` would run in a fork of a process that may hold JAX's
    threads)."""
    return [sys.executable, "-c", _PIN_AND_RUN, ",".join(map(str, cores)), module, *argv]


def phases(args) -> List[str]:
    return [s for s in args.phases.split(",") if s]


def resolve_dtypes(args, on_cpu: bool) -> None:
    """Fill in ``--dtype``/``--param_dtype`` left unset: float32 when the run is on a CPU, where
    XLA computes every bf16 matmul in float32 behind a convert of each operand and its result
    (pure overhead) and PyTorch has no fast bf16 path on most CPUs either; bfloat16 on GPU/TPU,
    and for ``--aot``, which sizes accelerator runs. Each side resolves by its own device."""
    default = "float32" if on_cpu and not args.aot else "bfloat16"
    args.dtype = args.dtype or default
    args.param_dtype = args.param_dtype or default


def model_config(args):
    from prompt_t5x.model import t5
    return t5.get_config(args.size, dtype=args.dtype, param_dtype=args.param_dtype,
                         remat_policy=args.remat, attention_impl=args.attention,
                         dropout_rate=args.dropout)


# ----------------------------------------------------------------------------- inputs, timing

def init_std(kind: str, fan_in: int, head_dim: int) -> float:
    """Standard deviation of the random frozen weights both sides start from: T5X's scales.

    ``kind``: ``query`` (T5X folds the 1/sqrt(head_dim) logit scaling into the query kernel's
    init), ``kernel`` (every other projection, the untied ``lm_head`` included: N(0, 1/fan_in)),
    ``table`` (token embedding, relative-position tables: N(0, 1)). Norm scales are 1.
    HF's own random init gives ``lm_head`` std 1.0 instead: logits of std ~sqrt(d_model), a first
    loss near 93 rather than ~ln(vocab), and softmax probabilities that underflow to subnormal
    floats, which PyTorch computes slowly on a CPU. Both sides use this rule, so they run the
    same function from the same distribution (compare the first-step losses the bench prints).
    """
    if kind == "query":
        return float(fan_in * head_dim) ** -0.5
    if kind == "kernel":
        return float(fan_in) ** -0.5
    if kind == "table":
        return 1.0
    raise ValueError(f"unknown weight kind {kind!r}")


def random_train_batch(rng: np.random.Generator, vocab: int, batch: int, inputs_len: int,
                       decoder_len: int) -> Dict[str, np.ndarray]:
    """Random SeqIO-style batch with no padding (ids 2..vocab-1; 0 = pad, 1 = EOS)."""
    targets = rng.integers(2, vocab, (batch, decoder_len), dtype=np.int32)
    return {"encoder_input_tokens": rng.integers(2, vocab, (batch, inputs_len), dtype=np.int32),
            "decoder_input_tokens": np.concatenate(
                [np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((batch, decoder_len), np.float32)}


def time_calls(call: Callable[[], Any], steps: int, warmup: int,
               sync: Callable[[Any], Any]) -> Dict[str, float]:
    """Median / min of ``steps`` synchronised calls, plus one pipelined run of ``steps``.

    ``sync(out)`` returns once the work behind ``out = call()`` is done on the device
    (``jax.block_until_ready`` for ours; a CUDA synchronize for the peer).
    """
    for _ in range(warmup):
        sync(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = call()
    sync(out)
    pipelined = (time.perf_counter() - start) / steps
    return {"median_s": statistics.median(times), "min_s": min(times),
            "pipelined_s": pipelined, "steps": steps}
