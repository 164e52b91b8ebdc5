"""``prompt-t5x bench``: throughput, MFU and memory of prompt tuning a frozen T5 on random data.

What is timed (all on random tokens, every position real, no padding):

- ``train``: the jitted, state-donating prompt-tuning step (``train.make_train_step`` with
  ``prompt_tuning.PromptTuning`` and ``optim.adafactor``), frozen weights an argument.
- ``rank``: rank classification, one encoder pass per example and a teacher-forced decoder pass
  per label candidate (``rank_classification.make_rank_classifier``).
- ``decode``: cached greedy decoding of ``--decode_len`` tokens with EOS disabled, so every row
  runs every step (``decoding.decode``, jitted).

Each phase is compiled ahead of time (compile time, ``cost_analysis`` and ``memory_analysis`` come
from the executable that is timed), warmed up, then timed call by call with
``jax.block_until_ready`` (median reported) and once more as a back-to-back run with a single
sync at the end (``pipelined``: what a training loop with no host sync sees). Batches are placed
on the device before timing. MFU = analytic matmul FLOPs (``prompt_t5x.bench.flops``) / median time
/
``--peak_flops``. Peak memory: ``device.memory_stats()['peak_bytes_in_use']`` where the backend
has it (GPU/TPU); always also the compiled executable's ``memory_analysis()`` (on CPU the only
figure; see docs/performance.md for its caveats).

``--aot`` compiles the train step for abstract inputs (``jax.ShapeDtypeStruct``: no weight is
allocated) and reports FLOPs and the compiled memory analysis only: how xl/xxl are sized on a
machine without the memory to run them.

``--peer peft`` runs ours and then ``prompt_t5x.bench.peft_peer`` (HF PEFT on PyTorch) for the same
configuration, each in a child process of this command so each has the accelerator to itself
(JAX keeps the memory it reserved until its process exits), and prints both and the ratio.

The flags, random batches and timing protocol are shared with the peer
(``prompt_t5x.bench.bench_protocol``), as are the figures and their printing
(``prompt_t5x.bench.bench_report``).
This module imports no TensorFlow (the GPU machine has none).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from prompt_t5x.bench import bench_protocol as protocol
from prompt_t5x.bench import bench_report, side_by_side
from prompt_t5x.bench import flops as flops_lib

# ----------------------------------------------------------------------------- inputs

def random_frozen(cfg, seed: int):
    """Frozen weights with T5X's scales (``bench_protocol.init_std``, the peer's too), generated
    on the device leaf by leaf.

    One small jitted generator per distinct shape instead of ``t5.init_params``' single program
    over every layer: far quicker to compile for xl/xxl, same shapes, dtypes and magnitudes
    (query kernels N(0, 1/(fan_in * head_dim)), other kernels N(0, 1/fan_in), embeddings and
    position tables N(0, 1), norm scales 1).
    """
    import functools

    import jax
    import jax.numpy as jnp

    from prompt_t5x.model import t5

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
        else:  # kernels are [fan_in, out]; the rest are the token embedding, position tables
            kind = ("table" if "kernel" not in name else
                    "query" if "['query']" in name else "kernel")
            std = protocol.init_std(kind, s.shape[0], cfg.head_dim)
            out.append(normal(jax.random.fold_in(key, i), s.shape, s.dtype, std))
    return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------ compile, time, memory

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


def _compile(jitted, *inputs):
    """``(executable, seconds)``: ``jitted`` compiled ahead of time for ``inputs``."""
    start = time.perf_counter()
    compiled = jitted.lower(*inputs).compile()
    return compiled, time.perf_counter() - start


def _measure(phase: str, args, cfg, compiled, compile_s: float, call,
             after_timing: Callable[[], Dict[str, Any]] = dict) -> Dict[str, Any]:
    """Time ``call`` (runs ``compiled``) by the shared protocol: its figures and memory, what
    ``after_timing()`` reads before anything else runs, then (``--profile``) the profile."""
    import jax
    timing = protocol.time_calls(call, args.steps, args.warmup, jax.block_until_ready)
    out = {"compile_s": compile_s, **timing,
           **bench_report.phase_figures(phase, args, cfg, timing),
           "compiled_memory": compiled_memory(compiled), "device_peak_bytes": device_peak_bytes(),
           **after_timing()}
    if args.profile:
        out.update(_profile(phase, args, compiled, call, out))
    return out


PROFILED_STEPS = 3


def _profile(phase: str, args, compiled, call, figures: Dict[str, Any]) -> Dict[str, Any]:
    """``--profile``: trace a few more calls, after the timing (tracing slows what it sees) and
    the peak-memory reading, and split their device time. A failure here (a profiler that the
    machine refuses, say) is recorded and never costs the timing already taken."""
    import jax

    from prompt_t5x.bench import profile_report
    try:
        where = profile_report.capture(call, min(args.steps, PROFILED_STEPS),
                                       os.path.join(args.profile, phase), compiled.as_text(),
                                       jax.block_until_ready)
        return {"profile": profile_report.report(where, figures["flops_per_step"],
                                                 args.peak_flops, figures["median_s"])}
    except Exception as e:  # noqa: BLE001 - any profiler failure is reported, not raised
        return {"profile_error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------- phases

def _method(args, cfg):
    from prompt_t5x.methods import prompt_init, prompt_tuning
    from prompt_t5x.model import t5
    return prompt_tuning.PromptTuning(t5.T5(cfg), prompt_length=args.prompt_len,
                                prompt_init=prompt_init.random_uniform_init())


def _abstract_train_inputs(args, cfg, method, optimizer):
    import jax
    import jax.numpy as jnp

    from prompt_t5x.model import t5
    from prompt_t5x.training import train
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
    from prompt_t5x.training import train
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

    from prompt_t5x.training import train
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

    from prompt_t5x.training import optim
    cfg = protocol.model_config(args)
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

    from prompt_t5x.training import optim, train
    method, optimizer = _method(args, cfg), optim.adafactor()
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(args.seed))
    inputs_len = args.encoder_len - args.prompt_len
    batches = [jax.device_put(protocol.random_train_batch(rng, cfg.vocab_size, args.batch,
                                                          inputs_len, args.decoder_len))
               for _ in range(2)]
    compiled, compile_s = _compile(_make_step(args, method, optimizer), state, frozen, batches[0])
    holder = {"state": state, "i": 0, "metrics": None, "first": None}

    def call():
        holder["state"], holder["metrics"] = compiled(holder["state"], frozen,
                                                      batches[holder["i"] % 2])
        holder["first"] = holder["first"] or holder["metrics"]   # read after timing: no sync
        holder["i"] += 1
        return holder["state"]

    return _measure("train", args, cfg, compiled, compile_s, call, lambda: {
        "flops_cost_analysis": flops_lib.cost_analysis_flops(compiled),
        "first_loss": float(holder["first"]["loss"]),
        "final_loss": float(holder["metrics"]["loss"])})   # before any profiled call


def bench_rank(args, cfg, frozen, trainable, rng) -> Dict[str, Any]:
    import jax

    from prompt_t5x.inference import rank_classification as rank
    method = _method(args, cfg)
    labels = [list(rng.integers(2, cfg.vocab_size, args.decoder_len - 1))
              for _ in range(args.num_candidates)]
    classify = rank.make_rank_classifier(method, rank.make_label_batch(labels, args.decoder_len))
    inputs = jax.device_put(rng.integers(2, cfg.vocab_size,
                                         (args.batch, args.encoder_len - args.prompt_len),
                                         dtype=np.int32))
    compiled, compile_s = _compile(classify, frozen, trainable, inputs)
    return _measure("rank", args, cfg, compiled, compile_s,
                    lambda: compiled(frozen, trainable, inputs))


def bench_decode(args, cfg, frozen, trainable, rng) -> Dict[str, Any]:
    import importlib

    import jax
    try:
        decoding = importlib.import_module("prompt_t5x.inference.decoding")
    except ModuleNotFoundError as e:
        if e.name != "prompt_t5x.inference.decoding":
            raise
        return {"skipped": "prompt_t5x.inference.decoding is not available"}
    method = _method(args, cfg)
    length = args.decode_len or args.decoder_len
    # eos_id=None: no early stop, every row decodes `length` tokens (fixed work per call).
    spec = decoding.DecodeSpec(strategy="greedy", max_decode_len=length, eos_id=None)
    inputs = jax.device_put(rng.integers(2, cfg.vocab_size,
                                         (args.batch, args.encoder_len - args.prompt_len),
                                         dtype=np.int32))
    greedy = jax.jit(lambda f, t, x: decoding.decode(method, f, t, x, spec).tokens)
    compiled, compile_s = _compile(greedy, frozen, trainable, inputs)
    # Figures count cross-attention keys/values projected once, as the peer's do: decoding.py
    # projects them once per batch (T5.cross_attention_kv).
    return _measure("decode", args, cfg, compiled, compile_s,
                    lambda: compiled(frozen, trainable, inputs))


def run_ours(args) -> Dict[str, Any]:
    cores = protocol.pin_cpus(args.cpu_threads)   # before JAX sizes its CPU thread pools
    import jax

    from prompt_t5x.training import optim, train
    protocol.resolve_dtypes(args, jax.default_backend() == "cpu")
    source = None if args.aot else protocol.resolve_peak_flops(args)   # in the resolved dtype
    result: Dict[str, Any] = {"impl": "prompt_t5x", "config": vars(args).copy(),
                              "peak_flops_source": source,
                              "versions": bench_report.versions(),
                              "device": bench_report.device_name()}
    result["config"].pop("json", None)
    result["config"]["cpu_cores"] = cores
    if args.aot:
        result["aot_train"] = aot_train(args)
        return result
    cfg = protocol.model_config(args)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    frozen = random_frozen(cfg, args.seed)
    jax.block_until_ready(frozen)
    result["init_s"] = time.perf_counter() - start
    wanted = protocol.phases(args)
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

def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = protocol.build_parser().parse_args(argv)
    protocol.validate(args)
    if args.method:   # another method's train step against prompt tuning's, as ratios
        from prompt_t5x.bench import method_bench
        return method_bench.main(args, random_frozen, compiled_memory)
    if args.peer:
        # Each child has printed its own block; print only what compares them.
        result = side_by_side.run(args, argv)
        print(bench_report.format_comparison(result["ours"], result["peer"]))
        bench_report.publish(result, args.json, quiet=True)
    else:
        result = run_ours(args)
        bench_report.publish(result, args.json)
    return 1 if "error" in result.get("peer", {}) else 0


if __name__ == "__main__":
    from prompt_t5x.base.errors import run_command
    sys.exit(run_command("bench", main, sys.argv[1:]))
