"""``prompt-t5x bench --method KIND``: a method's training step against prompt tuning's, as ratios.

  prompt-t5x bench --method model_tuning --size tiny --batch 8 --encoder_len 64 --prompt_len 8
  prompt-t5x bench --method prefix_tuning --method_config '{"prefix_length": 8}'

Both methods are built through ``prompt_t5x.methods.registry`` (the method from ``--method`` and
``--method_config``; prompt tuning with ``--prompt_len`` vectors, P) on the same random frozen T5
and batches of the same shapes from one seeded generator (``encoder_len - prompt_len`` input
tokens, as prompt tuning at P sees), each method adding its own encoder positions (``prompt_positions``:
P for prompt tuning, 0 for model tuning). Both steps are ``train.make_train_step`` with the same
``optim.adafactor()``, so what differs is the method alone: its forward/backward and the size of
the state the optimizer updates.

Why alternated: on a shared machine the load drifts over a run; timing one method after the
other would charge the drift to whichever ran second. Both are compiled and warmed up, then
``--rounds`` rounds each time ``--steps`` calls of both (the order flips every round), every
call synchronised. Reported: each side's median and min step time over all its calls, the ratio
of the medians (method / prompt tuning: > 1 is slower), and the per-round ratios, whose spread
shows how far the machine's noise reaches.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping

import numpy as np

from prompt_t5x.bench import bench_protocol as protocol
from prompt_t5x.bench import bench_report


def method_settings(text: str) -> Dict[str, Any]:
    """``--method_config`` JSON -> a dict of settings (UsageError when it is not one)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise protocol.usage_error(f"--method_config {text!r} is not JSON: {e}") from None
    if not isinstance(value, dict) or "kind" in value:
        raise protocol.usage_error(f"--method_config {text!r}: give a JSON object of the "
                                   "method's settings (its kind comes from --method)")
    return value


def validate(args) -> None:
    from prompt_t5x.methods import registry
    if args.method not in registry.MODULES:
        raise protocol.usage_error(f"--method {args.method!r} unknown; choose from "
                                   f"{sorted(registry.MODULES)}")
    if args.peer or args.aot or args.profile:
        raise protocol.usage_error("--method compares two of our methods; it runs without "
                                   "--peer, --aot and --profile")
    if args.rounds < 1:
        raise protocol.usage_error(f"--rounds must be >= 1, got {args.rounds}")
    method_settings(args.method_config)


def build(kind: str, settings: Mapping[str, Any], model):
    from prompt_t5x.methods import registry
    try:
        return registry.build(model, {"kind": kind, **settings})
    except (ValueError, TypeError) as e:   # UnknownMethodError is a ValueError
        raise protocol.usage_error(f"--method {kind} --method_config "
                                   f"{json.dumps(dict(settings))}: {e}") from None


def _side(name: str, method, args, cfg, frozen, optimizer, rng) -> Dict[str, Any]:
    """A compiled step, its state and its two batches: everything one side needs to be timed."""
    import jax

    from prompt_t5x.methods import interface
    from prompt_t5x.training import train
    key = jax.random.PRNGKey(args.seed)
    if method.kind == "model_tuning":   # as prompt-t5x train: it starts from the weights
        frozen, trainable = method.split(frozen)
        # A copy: the step donates its state, and the other side still needs these weights.
        trainable = jax.tree.map(jax.numpy.copy, trainable)
        state = train.create_train_state(method, optimizer, frozen, key, trainable)
    else:
        state = train.create_train_state(method, optimizer, frozen, key)
    inputs_len = args.encoder_len - args.prompt_len   # the same input tokens on both sides
    batches = [jax.device_put(protocol.random_train_batch(rng, cfg.vocab_size, args.batch,
                                                          inputs_len, args.decoder_len))
               for _ in range(2)]
    step = train.make_train_step(method, optimizer, num_microbatches=args.microbatches,
                                 enable_dropout=args.dropout > 0)
    start = time.perf_counter()
    compiled = step.lower(state, frozen, batches[0]).compile()
    return {"name": name, "method_config": method.method_config(),
            "trainable_parameters": interface.count_parameters(state.params),
            "encoder_positions": inputs_len + method.prompt_positions,
            "compile_s": time.perf_counter() - start, "compiled": compiled, "state": state,
            "frozen": frozen, "batches": batches, "i": 0, "times": [], "loss": None}


def _call(side: Dict[str, Any]):
    side["state"], metrics = side["compiled"](side["state"], side["frozen"],
                                              side["batches"][side["i"] % 2])
    side["i"] += 1
    side["loss"] = metrics["loss"]
    return side["state"]


def run(args, random_frozen: Callable, compiled_memory: Callable) -> Dict[str, Any]:
    """Time ``--method`` and prompt tuning alternately (module docstring); the figures.
    ``random_frozen`` / ``compiled_memory``: ``bench``'s own (passed in: bench imports us)."""
    cores = protocol.pin_cpus(args.cpu_threads)   # before JAX sizes its CPU thread pools
    import jax

    from prompt_t5x.model import t5
    from prompt_t5x.training import optim
    protocol.resolve_dtypes(args, jax.default_backend() == "cpu")
    cfg = protocol.model_config(args)
    model = t5.T5(cfg)
    # Built first: a bad --method_config is reported before any weight is made.
    theirs = build(args.method, method_settings(args.method_config), model)
    ours = build("prompt_tuning", {"prompt_length": args.prompt_len}, model)
    frozen = random_frozen(cfg, args.seed)
    rng = np.random.default_rng(args.seed)
    optimizer = optim.adafactor()
    sides = [_side(args.method, theirs, args, cfg, frozen, optimizer, rng),
             _side("prompt_tuning", ours, args, cfg, frozen, optimizer, rng)]
    for side in sides:
        for _ in range(args.warmup):
            jax.block_until_ready(_call(side))
    round_ratios: List[float] = []
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            side["round"] = []
            for _ in range(args.steps):
                start = time.perf_counter()
                jax.block_until_ready(_call(side))
                side["round"].append(time.perf_counter() - start)
            side["times"] += side["round"]
        round_ratios.append(statistics.median(sides[0]["round"])
                            / statistics.median(sides[1]["round"]))
    out = {"impl": "prompt_t5x", "kind": "method_bench", "device": bench_report.device_name(),
           "config": {k: v for k, v in vars(args).items() if k != "json"} | {"cpu_cores": cores},
           "versions": bench_report.versions(), "sides": []}
    for side in sides:
        median = statistics.median(side["times"])
        out["sides"].append({
            "name": side["name"], "method_config": side["method_config"],
            "trainable_parameters": side["trainable_parameters"],
            "encoder_positions": side["encoder_positions"], "compile_s": side["compile_s"],
            "median_s": median, "min_s": min(side["times"]), "calls": len(side["times"]),
            "examples_per_s": args.batch / median, "final_loss": float(side["loss"]),
            "compiled_memory": compiled_memory(side["compiled"])})
    a, b = out["sides"]
    out["ratio_median_step_time"] = a["median_s"] / b["median_s"]
    out["round_ratios"] = round_ratios
    return out


def format_result(r: Dict[str, Any]) -> str:
    c = r["config"]
    lines = [f"train step, {r['kind']} on {r['device']}: size={c['size']} batch={c['batch']} "
             f"inputs={c['encoder_len'] - c['prompt_len']} decoder={c['decoder_len']} "
             f"dtype={c['dtype']}; {c['rounds']} alternated rounds x {c['steps']} calls each"]
    width = max(len(s["name"]) for s in r["sides"])
    for s in r["sides"]:
        peak = s["compiled_memory"].get("estimated_peak_bytes")
        lines.append(
            f"  {s['name']:<{width}}  {json.dumps(s['method_config'])}: "
            f"{s['trainable_parameters']:,} trainable, encoder {s['encoder_positions']}  "
            f"median {s['median_s'] * 1e3:.2f} ms (min {s['min_s'] * 1e3:.2f})  "
            f"{s['examples_per_s']:.1f} ex/s  compile {s['compile_s']:.1f} s"
            + (f"  compiled peak {peak / 2**20:.1f} MiB" if peak else ""))
    a, b = r["sides"]
    ratios = r["round_ratios"]
    lines.append(f"ratio {a['name']} / {b['name']} (median step time): "
                 f"{r['ratio_median_step_time']:.2f}x; per round "
                 f"{min(ratios):.2f}x to {max(ratios):.2f}x")
    return "\n".join(lines)


def main(args, random_frozen: Callable, compiled_memory: Callable) -> int:
    validate(args)
    result = run(args, random_frozen, compiled_memory)
    print(format_result(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return 0
