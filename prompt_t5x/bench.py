"""``prompt-t5x bench``: throughput, MFU and memory of prompt tuning a frozen T5 on random data.

What is timed (all on random tokens, every position real, no padding):

- ``train``: the jitted, state-donating prompt-tuning step (``train.make_train_step`` with
  ``methods.PromptTuning`` and ``optim.adafactor``), frozen weights an argument.
- ``rank``: rank classification, one encoder pass per example and a teacher-forced decoder pass
  per label candidate (``rank_classification.make_rank_classifier``).
- ``decode``: cached greedy decoding of ``--decode_len`` tokens with EOS disabled, so every row
  runs every step (``decoding.decode``, jitted).

Each phase is compiled ahead of time (compile time, ``cost_analysis`` and ``memory_analysis`` come
from the executable that is timed), warmed up, then timed call by call with
``jax.block_until_ready`` (median reported) and once more as a back-to-back run with a single
sync at the end (``pipelined``: what a training loop with no host sync sees). Batches are placed
on the device before timing. MFU = analytic matmul FLOPs (``prompt_t5x.flops``) / median time /
``--peak_flops``. Peak memory: ``device.memory_stats()['peak_bytes_in_use']`` where the backend
has it (GPU/TPU); always also the compiled executable's ``memory_analysis()`` (on CPU the only
figure; see docs/performance.md for its caveats).

``--aot`` compiles the train step for abstract inputs (``jax.ShapeDtypeStruct``: no weight is
allocated) and reports FLOPs and the compiled memory analysis only: how xl/xxl are sized on a
machine without the memory to run them.

``--peer peft`` runs ours and then ``prompt_t5x.peft_peer`` (HF PEFT on PyTorch) for the same
configuration, each in a child process of this command so each has the accelerator to itself
(JAX keeps the memory it reserved until its process exits), and prints both and the ratio.

This module imports no TensorFlow (the GPU machine has none).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from prompt_t5x import bench_report
from prompt_t5x import flops as flops_lib

H100_BF16_PEAK = 790e12  # dense bf16 FLOP/s measured on the issue's H100 (nominal 989e12)
PHASES = bench_report.PHASES


# ----------------------------------------------------------------------------- flags

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prompt-t5x bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="tiny",
                   help="t5.SIZES name: tiny, small, base, large, xl, xxl")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--encoder_len", type=int, default=512,
                   help="encoder positions incl. the prompt (inputs = encoder_len - prompt_len)")
    p.add_argument("--prompt_len", type=int, default=100)
    p.add_argument("--decoder_len", type=int, default=16)
    p.add_argument("--remat", default="none", help="t5.REMAT_POLICIES name")
    p.add_argument("--attention", default="einsum", help="einsum | xla | cudnn")
    p.add_argument("--dtype", default="bfloat16", help="activation dtype")
    p.add_argument("--param_dtype", default="bfloat16", help="storage dtype of the frozen weights")
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
    p.add_argument("--peak_flops", type=float, default=H100_BF16_PEAK)
    p.add_argument("--aot", action="store_true",
                   help="only compile the train step for abstract inputs; report FLOPs/memory")
    p.add_argument("--peer", choices=["peft"], default=None,
                   help="also run HF PEFT for the same configuration and print the ratio")
    p.add_argument("--peer_compile", action="store_true", help="peer: torch.compile the model")
    p.add_argument("--peer_grad_ckpt", action="store_true", help="peer: gradient checkpointing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p


def _usage_error(msg: str):
    from prompt_t5x.cli import UsageError
    return UsageError(msg)


def validate(args: argparse.Namespace) -> None:
    from prompt_t5x import attention, t5
    if args.size not in t5.SIZES:
        raise _usage_error(f"--size {args.size!r} unknown; choose from {sorted(t5.SIZES)}")
    if args.remat not in t5.REMAT_POLICIES:
        raise _usage_error(f"--remat {args.remat!r} unknown; choose from "
                           f"{sorted(t5.REMAT_POLICIES)}")
    if args.attention not in attention.IMPLEMENTATIONS:
        raise _usage_error(f"--attention {args.attention!r}; choose from "
                           f"{attention.IMPLEMENTATIONS}")
    for name in ("batch", "prompt_len", "decoder_len", "steps", "num_candidates", "microbatches"):
        if getattr(args, name) < 1:
            raise _usage_error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.encoder_len <= args.prompt_len:
        raise _usage_error(f"--encoder_len {args.encoder_len} must exceed --prompt_len "
                           f"{args.prompt_len} (encoder = inputs + prompt)")
    if args.batch % args.microbatches:
        raise _usage_error(f"--batch {args.batch} is not divisible by --microbatches "
                           f"{args.microbatches}")
    unknown = set(phases(args)) - set(PHASES)
    if unknown:
        raise _usage_error(f"--phases: unknown {sorted(unknown)}; choose from {PHASES}")


def phases(args) -> List[str]:
    return [s for s in args.phases.split(",") if s]


def model_config(args):
    from prompt_t5x import t5
    return t5.get_config(args.size, dtype=args.dtype, param_dtype=args.param_dtype,
                         remat_policy=args.remat, attention_impl=args.attention,
                         dropout_rate=args.dropout)


# ----------------------------------------------------------------------------- inputs

def random_train_batch(rng: np.random.Generator, vocab: int, batch: int, inputs_len: int,
                       decoder_len: int) -> Dict[str, np.ndarray]:
    """Random SeqIO-style batch with no padding (ids 2..vocab-1; 0 = pad, 1 = EOS)."""
    targets = rng.integers(2, vocab, (batch, decoder_len), dtype=np.int32)
    return {"encoder_input_tokens": rng.integers(2, vocab, (batch, inputs_len), dtype=np.int32),
            "decoder_input_tokens": np.concatenate(
                [np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1),
            "decoder_target_tokens": targets,
            "decoder_loss_weights": np.ones((batch, decoder_len), np.float32)}


def random_frozen(cfg, seed: int):
    """Frozen weights with T5-like scales, generated on the device leaf by leaf.

    One small jitted generator per distinct shape instead of ``t5.init_params``' single program
    over every layer: far quicker to compile for xl/xxl, same shapes, dtypes and magnitudes
    (kernels N(0, 1/fan_in), embeddings N(0, 1), norm scales 1).
    """
    import functools
    import jax
    import jax.numpy as jnp
    from prompt_t5x import t5

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def normal(key, shape, dtype, std):
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    shapes = t5.param_shapes(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    key = jax.random.PRNGKey(seed)
    out = []
    for i, (path, s) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            out.append(jnp.ones(s.shape, s.dtype))
        elif "kernel" in name:
            std = float(s.shape[0]) ** -0.5
            out.append(normal(jax.random.fold_in(key, i), s.shape, s.dtype, std))
        else:  # token embedding, relative position tables
            out.append(normal(jax.random.fold_in(key, i), s.shape, s.dtype, 1.0))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- timing

def time_calls(call: Callable[[], Any], steps: int, warmup: int) -> Dict[str, float]:
    """Median / min of ``steps`` device-synchronised calls, plus one pipelined run of ``steps``."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(call())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    out = None
    for _ in range(steps):
        out = call()
    jax.block_until_ready(out)
    pipelined = (time.perf_counter() - start) / steps
    return {"median_s": statistics.median(times), "min_s": min(times),
            "pipelined_s": pipelined, "steps": steps}


def device_peak_bytes() -> Optional[int]:
    import jax
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def compiled_memory(compiled) -> Dict[str, int]:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                           "alias_size_in_bytes", "temp_size_in_bytes")}
    # Arguments + outputs + temporaries, minus outputs that reuse donated argument buffers.
    out["estimated_peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                   + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    return out


# ----------------------------------------------------------------------------- phases

def _method(args, cfg):
    from prompt_t5x import methods, t5
    return methods.PromptTuning(t5.T5(cfg), prompt_length=args.prompt_len,
                                prompt_init=methods.random_uniform_init())


def _abstract_train_inputs(args, cfg, method, optimizer):
    import jax
    import jax.numpy as jnp
    from prompt_t5x import t5, train
    frozen = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), t5.param_shapes(cfg))
    state = jax.eval_shape(lambda f: train.create_train_state(method, optimizer, f,
                                                              jax.random.PRNGKey(0)), frozen)
    inputs_len = args.encoder_len - args.prompt_len
    shape = lambda n, dt: jax.ShapeDtypeStruct((args.batch, n), dt)  # noqa: E731
    batch = {"encoder_input_tokens": shape(inputs_len, jnp.int32),
             "decoder_input_tokens": shape(args.decoder_len, jnp.int32),
             "decoder_target_tokens": shape(args.decoder_len, jnp.int32),
             "decoder_loss_weights": shape(args.decoder_len, jnp.float32)}
    return state, frozen, batch


def _make_step(args, method, optimizer):
    from prompt_t5x import train
    return train.make_train_step(method, optimizer, num_microbatches=args.microbatches,
                                 enable_dropout=args.dropout > 0)


def saved_residual_bytes(args, cfg, method, frozen, batch) -> Optional[int]:
    """Bytes the forward pass keeps for the backward pass (weights and inputs excluded).

    Read from JAX's own residual list (``jax.ad_checkpoint.print_saved_residuals`` is its
    printing form), so it is exact for the remat policy and independent of the backend: on the
    CPU it is the activation-memory figure to trust, as XLA:CPU neither keeps bf16 nor honours
    remat in its buffer assignment. None when this jax lacks the helper.
    """
    import jax
    import jax.numpy as jnp
    from prompt_t5x import train
    try:
        from jax._src.ad_checkpoint import saved_residuals
    except ImportError:
        return None
    prompt = {"prompt": jax.ShapeDtypeStruct((args.prompt_len, cfg.emb_dim), jnp.float32)}

    def loss(trainable, frozen, batch):
        logits = method.logits(frozen, trainable, batch)
        ce, zl, _, _ = train.cross_entropy_sums(logits, batch["decoder_target_tokens"],
                                                batch["decoder_loss_weights"], 1e-4)
        return ce + zl

    residuals = saved_residuals(loss, prompt, frozen, batch)
    return int(sum(aval.size * aval.dtype.itemsize for aval, why in residuals
                   if "argument" not in why))


def aot_train(args) -> Dict[str, Any]:
    """Compile the train step for abstract inputs; nothing is allocated or run."""
    import jax
    from prompt_t5x import optim
    cfg = model_config(args)
    method, optimizer = _method(args, cfg), optim.adafactor()
    step = _make_step(args, method, optimizer)
    start = time.perf_counter()
    state, frozen, batch = _abstract_train_inputs(args, cfg, method, optimizer)
    residual_bytes = saved_residual_bytes(args, cfg, method, frozen, batch)
    lowered = step.lower(state, frozen, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    analytic = flops_lib.train_step_flops(cfg, args.batch, args.encoder_len, args.decoder_len)
    return {"compile_s": compile_s, "flops_analytic": analytic.total,
            "flops_forward": analytic.forward, "flops_backward": analytic.backward,
            "flops_issue_convention": analytic.issue_convention,
            "flops_hlo_dots": flops_lib.hlo_dot_flops(compiled.as_text()),
            "flops_cost_analysis": flops_lib.cost_analysis_flops(compiled),
            "compiled_memory": compiled_memory(compiled),
            "saved_residual_bytes": residual_bytes,
            "frozen_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(frozen))}


def bench_train(args, cfg, frozen, rng) -> Dict[str, Any]:
    import jax
    from prompt_t5x import optim, train
    method, optimizer = _method(args, cfg), optim.adafactor()
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(args.seed))
    inputs_len = args.encoder_len - args.prompt_len
    batches = [jax.device_put(random_train_batch(rng, cfg.vocab_size, args.batch, inputs_len,
                                                 args.decoder_len)) for _ in range(2)]
    step = _make_step(args, method, optimizer)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batches[0]).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state, "i": 0, "metrics": None}

    def call():
        holder["state"], holder["metrics"] = compiled(holder["state"], frozen,
                                                      batches[holder["i"] % 2])
        holder["i"] += 1
        return holder["state"]

    timing = time_calls(call, args.steps, args.warmup)
    analytic = flops_lib.train_step_flops(cfg, args.batch, args.encoder_len, args.decoder_len)
    out = {"compile_s": compile_s, **timing,
           **bench_report.figures(timing, args.batch, args.batch * (args.encoder_len + args.decoder_len),
                      analytic.total, args.peak_flops),
           "mfu_issue_convention": analytic.issue_convention / timing["median_s"] / args.peak_flops,
           "flops_cost_analysis": flops_lib.cost_analysis_flops(compiled),
           "compiled_memory": compiled_memory(compiled), "device_peak_bytes": device_peak_bytes(),
           "final_loss": float(holder["metrics"]["loss"])}
    return out


def bench_rank(args, cfg, frozen, trainable, rng) -> Dict[str, Any]:
    import jax
    from prompt_t5x import rank_classification as rank
    method = _method(args, cfg)
    labels = [list(rng.integers(2, cfg.vocab_size, args.decoder_len - 1))
              for _ in range(args.num_candidates)]
    classify = rank.make_rank_classifier(method, rank.make_label_batch(labels, args.decoder_len))
    inputs = jax.device_put(rng.integers(2, cfg.vocab_size,
                                         (args.batch, args.encoder_len - args.prompt_len),
                                         dtype=np.int32))
    start = time.perf_counter()
    compiled = classify.lower(frozen, trainable, inputs).compile()
    compile_s = time.perf_counter() - start
    timing = time_calls(lambda: compiled(frozen, trainable, inputs), args.steps, args.warmup)
    step_flops = flops_lib.rank_classification_flops(cfg, args.batch, args.encoder_len,
                                                     args.decoder_len, args.num_candidates)
    tokens = args.batch * (args.encoder_len + args.num_candidates * args.decoder_len)
    return {"compile_s": compile_s, "num_candidates": args.num_candidates, **timing,
            **bench_report.figures(timing, args.batch, tokens, step_flops, args.peak_flops),
            "compiled_memory": compiled_memory(compiled), "device_peak_bytes": device_peak_bytes()}


def bench_decode(args, cfg, frozen, trainable, rng) -> Dict[str, Any]:
    import importlib
    import jax
    try:
        decoding = importlib.import_module("prompt_t5x.decoding")
    except ModuleNotFoundError as e:
        if e.name != "prompt_t5x.decoding":
            raise
        return {"skipped": "prompt_t5x.decoding is not available"}
    method = _method(args, cfg)
    length = args.decode_len or args.decoder_len
    # eos_id=None: no early stop, every row decodes `length` tokens (fixed work per call).
    spec = decoding.DecodeSpec(strategy="greedy", max_decode_len=length, eos_id=None)
    inputs = jax.device_put(rng.integers(2, cfg.vocab_size,
                                         (args.batch, args.encoder_len - args.prompt_len),
                                         dtype=np.int32))
    start = time.perf_counter()
    greedy = jax.jit(lambda f, t, x: decoding.decode(method, f, t, x, spec).tokens)
    compiled = greedy.lower(frozen, trainable, inputs).compile()
    compile_s = time.perf_counter() - start
    timing = time_calls(lambda: compiled(frozen, trainable, inputs), args.steps, args.warmup)
    # Useful work, the same formula as the peer's: cross-attention keys/values projected once
    # (decoding.py does the same, through T5.cross_attention_kv).
    step_flops = flops_lib.greedy_decode_flops(cfg, args.batch, args.encoder_len, length,
                                               cross_kv_cached=True)
    return {"compile_s": compile_s, "decode_len": length, **timing,
            **bench_report.figures(timing, args.batch, args.batch * length, step_flops, args.peak_flops),
            "generated_tokens_per_s": args.batch * length / timing["median_s"],
            "compiled_memory": compiled_memory(compiled), "device_peak_bytes": device_peak_bytes()}


def run_ours(args) -> Dict[str, Any]:
    import jax
    from prompt_t5x import optim, train
    result: Dict[str, Any] = {"impl": "prompt_t5x", "config": vars(args).copy(),
                              "versions": bench_report.versions(), "device": bench_report.device_name()}
    result["config"].pop("json", None)
    if args.aot:
        result["aot_train"] = aot_train(args)
        return result
    cfg = model_config(args)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    frozen = random_frozen(cfg, args.seed)
    jax.block_until_ready(frozen)
    result["init_s"] = time.perf_counter() - start
    wanted = phases(args)
    if "train" in wanted:
        result["train"] = bench_train(args, cfg, frozen, rng)
    trainable = train.create_train_state(_method(args, cfg), optim.adafactor(), frozen,
                                         jax.random.PRNGKey(args.seed)).params
    if "rank" in wanted:
        result["rank"] = bench_rank(args, cfg, frozen, trainable, rng)
    if "decode" in wanted:
        result["decode"] = bench_decode(args, cfg, frozen, trainable, rng)
    return result


# ----------------------------------------------------------------------------- entry point

def _child(module: str, argv: Sequence[str], json_path: str) -> Dict[str, Any]:
    """Run ``python -m module argv --json json_path``; its stdout/stderr pass through."""
    cmd = [sys.executable, "-m", module, *argv, "--json", json_path]
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with status {proc.returncode}")
    with open(json_path) as f:
        return json.load(f)


def _strip_peer_flags(argv: Sequence[str]) -> List[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--peer" or a == "--json":
            skip = True
            continue
        if a.startswith("--peer") or a.startswith("--json="):
            continue
        out.append(a)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    validate(args)
    if args.peer:
        if args.aot:
            raise _usage_error("--aot compiles only; it cannot be combined with --peer")
        from prompt_t5x import peft_peer
        peft_peer.check_available()
        base = _strip_peer_flags(argv)
        peer_argv = base + (["--compile"] if args.peer_compile else []) + (
            ["--grad_ckpt"] if args.peer_grad_ckpt else [])
        with tempfile.TemporaryDirectory() as tmp:
            ours = _child("prompt_t5x.bench", base, os.path.join(tmp, "ours.json"))
            peer = _child("prompt_t5x.peft_peer", peer_argv, os.path.join(tmp, "peer.json"))
        print(bench_report.format_result(ours))
        print(bench_report.format_result(peer))
        print(bench_report.format_ratio(ours, peer))
        result: Dict[str, Any] = {"ours": ours, "peer": peer}
    else:
        result = run_ours(args)
        print(bench_report.format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    from prompt_t5x import cli
    sys.exit(cli.run("bench", main, sys.argv[1:]))
