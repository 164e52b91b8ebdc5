"""``prompt-t5x plan``: will the sharded prompt-tuning step fit? Ahead-of-time, no weights, no TPU.

  prompt-t5x plan --gin_file=models/xxl.gin --mesh=8x1 --mesh=2x4 --mesh=4x4 --mesh=4x8

For each mesh the train step that ``prompt-t5x train`` runs (the step inside its non-finite
guard, ``guarded_step.make_guarded_step``) is lowered for *abstract* arguments
(``jax.ShapeDtypeStruct`` s carrying their ``NamedSharding``; nothing is allocated) and
compiled by XLA for that many fake CPU devices (``--xla_force_host_platform_device_count``, set
here before JAX starts). The table reports, per device, what the compiled SPMD program's buffer
assignment needs (``compiled.memory_analysis()``) and its FLOPs (``compiled.cost_analysis()``),
next to the analytic matmul FLOPs of ``prompt_t5x.bench.flops`` divided by the device count.

What the numbers are: the CPU backend's buffer assignment for the same partitioned program a TPU
or GPU would run. Included: the frozen-weight shards, the replicated trainable state, the batch
shard, outputs, and every temporary the CPU schedule keeps live (activations saved for the
backward pass, all-gathered weights, collective buffers). Not included / different on a real
accelerator: TPU tiled layouts and padding, TPU/GPU fusion and scheduling (usually fewer and
smaller temporaries), the TPU compiler's rematerialisation when memory is tight, the runtime's own
reservations (XLA on GPU preallocates 75% of memory by default). Treat a row as "fits" only with
headroom.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional

from prompt_t5x.base.errors import UsageError

GIB = 1024 ** 3
# Per-device memory of the accelerators the table is judged against (GiB).
BUDGETS = (("v3", 16), ("v4", 32), ("H100", 80))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prompt-t5x plan",
        description="AOT memory/FLOPs of the sharded prompt-tuning train step on fake devices. "
                    "Gin flags (--gin_file=models/xxl.gin [--gin_file=runs/prompt_tuning.gin], "
                    "--gin.X=V) set the model and, if present, the batch and lengths; the flags "
                    "below override them.")
    p.add_argument("--size", help="T5 1.1 size (small, base, large, xl, xxl, tiny, test) when no "
                                  "gin file names one.")
    p.add_argument("--mesh", action="append", default=None, metavar="DATAxMODEL",
                   help="mesh to plan for; repeat for several rows (default 8x1).")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--inputs_length", type=int)
    p.add_argument("--targets_length", type=int)
    p.add_argument("--prompt_length", type=int)
    p.add_argument("--param_dtype", default="bfloat16",
                   help="dtype of the frozen weights (default bfloat16).")
    p.add_argument("--remat_policy", help="override the model's remat policy (none, full, dots...)")
    p.add_argument("--activation_partitioning_dims", type=int, default=1, choices=(1, 2))
    p.add_argument("--parameter_partitioning_dims", type=int, default=1, choices=(1, 2))
    p.add_argument("--num_microbatches", type=int)
    p.add_argument("--cpu_scheduler", default="memory", choices=("memory", "concurrency"),
                   help="XLA:CPU op scheduler: 'memory' (default) minimises live buffers, closer "
                        "to TPU/GPU; 'concurrency' is XLA:CPU's own default.")
    return p


def _gin_values(gin_args) -> Dict[str, object]:
    """Model config and run sizes from the gin files, read through gin-config itself."""
    import gin

    from prompt_t5x.commands import (
        gin_cli,
        run_train,  # noqa: F401  registers the 'train' configurable
    )

    try:
        gin_cli.parse(gin_args, required_files=False)
    except UsageError as e:
        # A run file's %gin.REQUIRED macros (MODEL_DIR, TASK) do not matter to a plan; gin has
        # parsed everything by the time this check complains.
        if not str(e).startswith("required gin macro(s) not set"):
            raise
    values: Dict[str, object] = {}
    try:
        values["config"] = gin_cli.call(gin.get_configurable("t5.get_config"))
    except UsageError:
        pass  # no model size in these files; --size must say it
    for key, name in (("batch_size", "%BATCH_SIZE"), ("inputs_length", "%INPUTS_LENGTH"),
                      ("targets_length", "%TARGETS_LENGTH"),
                      ("prompt_length", "interface.prompt_tuning.prompt_length"),
                      ("num_microbatches", "train.num_microbatches")):
        try:
            value = gin.query_parameter(name)
        except (ValueError, KeyError):
            continue
        if isinstance(value, int):
            values[key] = value
    return values


def _mesh_devices(meshes: List[str]) -> int:
    """Devices the largest mesh needs. Parsed without importing JAX (which must start later)."""
    counts = []
    for text in meshes:
        match = re.fullmatch(r"\s*(\d+)\s*[x×,]\s*(\d+)\s*", text.lower())
        if not match or "0" in (match.group(1), match.group(2)):
            raise UsageError(f"--mesh={text}: expected DATAxMODEL with both sizes given, "
                             "e.g. 4x2 (a plan has no real devices to fill -1 from).")
        counts.append(int(match.group(1)) * int(match.group(2)))
    return max(counts)


# XLA:CPU's default scheduler orders ops for thread concurrency, keeping more buffers alive than
# an accelerator's memory-aware scheduler would; the memory-minimising one is closer to them.
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _ensure_fake_devices(count: int, argv: List[str], memory_scheduler: bool = True
                         ) -> Optional[int]:
    """Makes JAX start with ``count`` CPU devices, or re-runs this command in a fresh process.

    Returns the child's exit status when it re-ran, None when this process can go on.
    """
    if "jax" in sys.modules:
        import jax
        if jax.default_backend() == "cpu" and jax.device_count() >= count:
            return None
        env = dict(os.environ, PROMPT_T5X_PLAN_CHILD="1")
        env.pop("XLA_FLAGS", None)
        if os.environ.get("PROMPT_T5X_PLAN_CHILD"):
            raise UsageError(f"could not get {count} fake CPU devices (XLA_FLAGS ignored?).")
        command = [sys.executable, "-m", "prompt_t5x", "plan", *argv]
        return subprocess.run(command, env=env).returncode
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(("--xla_force_host_platform_device_count",
                                  "--xla_cpu_enable_concurrency_optimized_scheduler"))]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    if memory_scheduler:
        flags.append(MEMORY_SCHEDULER_FLAG)
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"
    return None


# While XL/XXL compile (minutes each on a CPU), say every this many seconds that it still does.
HEARTBEAT_S = 15.0


@contextlib.contextmanager
def still_working(what: str, every: float = HEARTBEAT_S, out=None):
    """Print ``what`` now, then ``... N s`` every ``every`` seconds until the block ends, and
    how long it took: progress on stderr, so the table on stdout stays a clean table."""
    out = out or sys.stderr
    print(f"{what} ...", file=out, flush=True)
    done = threading.Event()
    start = time.perf_counter()

    def beat():
        while not done.wait(every):
            print(f"  ... {what}: {time.perf_counter() - start:.0f} s", file=out, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        print(f"  {what}: done in {time.perf_counter() - start:.1f} s", file=out, flush=True)


def plan_one(config, mesh_text: str, *, batch_size: int, inputs_length: int, targets_length: int,
             prompt_length: int, activation_partitioning_dims: int = 1,
             parameter_partitioning_dims: int = 1, num_microbatches: int = 1,
             progress: bool = False) -> Dict[str, object]:
    """Lower + compile one train step for abstract inputs; return the row of the table.
    ``progress``: report the lowering and the compile as they go (on stderr)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from prompt_t5x.bench import flops
    from prompt_t5x.methods import prompt_init, prompt_tuning
    from prompt_t5x.model import t5
    from prompt_t5x.parallel import partitioning, sharding
    from prompt_t5x.training import guarded_step, optim, sharded_run

    mc = sharding.MeshConfig.parse(mesh_text,
                                   activation_partitioning_dims=activation_partitioning_dims,
                                   parameter_partitioning_dims=parameter_partitioning_dims)
    data, model = mc.shape(mc.data * mc.model)
    mesh = sharding.make_mesh(mc, devices=jax.devices()[:data * model])
    rules = mc.rules()
    if batch_size % data:
        raise UsageError(f"batch size {batch_size} is not divisible by the data axis ({data}) of "
                         f"mesh {mesh_text}.")
    frozen = partitioning.abstract_frozen(config, mesh, rules)
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=prompt_length,
                                  prompt_init=prompt_init.random_uniform_init())
    optimizer = optim.adafactor()
    state = sharded_run.abstract_train_state(method, optimizer, frozen, mesh)
    rows = sharding.batch_sharding(mesh)
    batch = {
        "encoder_input_tokens": jax.ShapeDtypeStruct((batch_size, inputs_length), jnp.int32,
                                                     sharding=rows),
        "decoder_input_tokens": jax.ShapeDtypeStruct((batch_size, targets_length), jnp.int32,
                                                     sharding=rows),
        "decoder_target_tokens": jax.ShapeDtypeStruct((batch_size, targets_length), jnp.int32,
                                                      sharding=rows),
        "decoder_loss_weights": jax.ShapeDtypeStruct((batch_size, targets_length), jnp.float32,
                                                     sharding=rows),
    }
    # Exactly what `prompt-t5x train` runs: the train step inside the loop's non-finite guard,
    # with its on-device accumulators (a few scalars) as the fourth argument.
    step = guarded_step.make_guarded_step(method, optimizer, mesh, rules,
                                          partitioning.shardings_of(frozen),
                                          num_microbatches=num_microbatches)
    acc = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                      sharding=sharding.replicated(mesh)),
                       jax.eval_shape(guarded_step.fresh_accumulators))
    start = time.perf_counter()
    with still_working(f"mesh {mesh_text}: tracing the train step") if progress else \
            contextlib.nullcontext():
        lowered = step.lower(state, frozen, batch, acc)
    with still_working(f"mesh {mesh_text}: compiling for {data * model} devices") if progress \
            else contextlib.nullcontext():
        compiled = lowered.compile()
    seconds = time.perf_counter() - start

    def shard_bytes(tree):
        return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(tree))

    mem = compiled.memory_analysis()
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
    analytic = flops.train_step_flops(config, batch_size, inputs_length + prompt_length,
                                      targets_length).total
    return {
        "mesh": f"{data}x{model}", "devices": data * model,
        "dims": f"{activation_partitioning_dims}/{parameter_partitioning_dims}",
        "weights_gib": shard_bytes(frozen) / GIB,
        "arguments_gib": mem.argument_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "outputs_gib": (mem.output_size_in_bytes - mem.alias_size_in_bytes) / GIB,
        "peak_gib": peak / GIB,
        "tflops_compiled": flops.cost_analysis_flops(compiled) / 1e12,
        "tflops_analytic": analytic / (data * model) / 1e12,
        "compile_s": seconds,
        "fits": {name: peak <= budget * GIB for name, budget in BUDGETS},
    }


HEADER = ("| mesh | devices | act/param dims | frozen weights | arguments | temporaries | peak | "
          "TFLOP compiled | TFLOP analytic | " + " | ".join(f"fits {n} {b} GiB" for n, b in BUDGETS)
          + " | compile s |")


def format_row(row: Dict[str, object]) -> str:
    fits = " | ".join("yes" if row['fits'][name] else "no" for name, _ in BUDGETS)
    return (f"| {row['mesh']} | {row['devices']} | {row['dims']} | {row['weights_gib']:.3g} | "
            f"{row['arguments_gib']:.3g} | {row['temp_gib']:.3g} | {row['peak_gib']:.3g} | "
            f"{row['tflops_compiled']:.3g} | {row['tflops_analytic']:.3g} | {fits} | "
            f"{row['compile_s']:.0f} |")


def main(argv: List[str]) -> int:
    argv = list(argv)
    # The device count must be fixed before anything imports JAX (gin_cli does, via the model).
    pre = argparse.ArgumentParser(prog="prompt-t5x plan", add_help=False)
    pre.add_argument("--mesh", action="append", default=None)
    pre.add_argument("--cpu_scheduler", default="memory")
    known = pre.parse_known_args(argv)[0]
    meshes = known.mesh or ["8x1"]
    rerun = _ensure_fake_devices(_mesh_devices(meshes), argv,
                                 memory_scheduler=known.cpu_scheduler == "memory")
    if rerun is not None:
        return rerun

    from prompt_t5x.commands import gin_cli
    gin_args = gin_cli.split_argv(argv)
    args = _parser().parse_args(gin_args.rest)

    from prompt_t5x.model import t5
    values = _gin_values(gin_args) if (gin_args.files or gin_args.bindings) else {}
    if args.size:
        try:
            config = t5.get_config(args.size)
        except ValueError as e:
            raise UsageError(str(e)) from None
    elif "config" in values:
        config = values["config"]
    else:
        raise UsageError("no model: pass --gin_file=models/xxl.gin or --size=xxl")
    overrides = {"param_dtype": args.param_dtype, "dropout_rate": config.dropout_rate}
    if args.remat_policy:
        overrides["remat_policy"] = args.remat_policy
    try:
        config = config.replace(**overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None

    def pick(name, default):
        flag = getattr(args, name)
        return flag if flag is not None else values.get(name, default)

    sizes = dict(batch_size=pick("batch_size", 32), inputs_length=pick("inputs_length", 512),
                 targets_length=pick("targets_length", 8), prompt_length=pick("prompt_length", 100))
    import jax
    print(f"# prompt-t5x plan: {config.num_params / 1e9:.2f}B-param T5 1.1 (d_model "
          f"{config.emb_dim}, {config.num_encoder_layers}+{config.num_decoder_layers} layers), "
          f"frozen weights {config.param_dtype}, activations {config.dtype}, remat "
          f"{config.remat_policy}; batch {sizes['batch_size']}, inputs {sizes['inputs_length']} "
          f"+ prompt {sizes['prompt_length']}, targets {sizes['targets_length']}. Per-device GiB "
          f"from XLA:CPU AOT buffer assignment ({args.cpu_scheduler} scheduler) on "
          f"{jax.device_count()} fake devices (jax {jax.__version__}).", flush=True)
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
    for mesh_text in meshes:
        try:
            row = plan_one(config, mesh_text,
                           activation_partitioning_dims=args.activation_partitioning_dims,
                           parameter_partitioning_dims=args.parameter_partitioning_dims,
                           num_microbatches=pick("num_microbatches", 1), progress=True,
                           **sizes)
        except ValueError as e:  # uneven shard sizes etc.: name the mesh and carry on
            print(f"| {mesh_text} | - | cannot plan: {e} |", flush=True)
            continue
        print(format_row(row), flush=True)
    return 0
