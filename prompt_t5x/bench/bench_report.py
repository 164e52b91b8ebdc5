"""The figures of a benchmark run and how they are printed and saved, shared by ``prompt-t5x
bench`` (``prompt_t5x.bench.bench``) and its peer (``prompt_t5x.bench.peft_peer``), so both report
the same
numbers computed the same way (examples/s and tokens/s from the median step, MFU of the analytic
FLOPs of ``prompt_t5x.bench.flops`` over a given peak).
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

from prompt_t5x.bench import flops as flops_lib

PHASES = ("train", "rank", "decode")


def figures(timing: Dict[str, float], examples: int, tokens: int, step_flops: int,
             peak_flops: float) -> Dict[str, float]:
    t = timing["median_s"]
    return {"examples_per_s": examples / t, "tokens_per_s": tokens / t,
            "pipelined_examples_per_s": examples / timing["pipelined_s"],
            "flops_per_step": step_flops,
            "mfu": None if peak_flops is None else step_flops / t / peak_flops}


def phase_figures(phase: str, args, cfg, timing: Dict[str, float]) -> Dict[str, Any]:
    """The figures of one of ``PHASES`` timed for the bench flags ``args`` and T5 config ``cfg``.

    The work is what the flags ask for: ``train`` a step on [batch, encoder_len] inputs and
    ``decoder_len`` targets (also MFU by the issue's 2 x forward convention), ``rank`` every
    example against ``num_candidates`` labels, ``decode`` ``decode_len`` greedy tokens with
    cross-attention keys/values projected once (as both implementations do).
    """
    b, enc, dec, peak = args.batch, args.encoder_len, args.decoder_len, args.peak_flops
    if phase == "train":
        f = flops_lib.train_step_flops(cfg, b, enc, dec)
        return {**figures(timing, b, b * (enc + dec), f.total, peak),
                "mfu_issue_convention": (None if peak is None else
                                         f.issue_convention / timing["median_s"] / peak)}
    if phase == "rank":
        c = args.num_candidates
        step_flops = flops_lib.rank_classification_flops(cfg, b, enc, dec, c)
        return {"num_candidates": c, **figures(timing, b, b * (enc + c * dec), step_flops, peak)}
    if phase == "decode":
        length = args.decode_len or dec
        step_flops = flops_lib.greedy_decode_flops(cfg, b, enc, length, cross_kv_cached=True)
        return {"decode_len": length, **figures(timing, b, b * length, step_flops, peak),
                "generated_tokens_per_s": b * length / timing["median_s"]}
    raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")


def versions() -> Dict[str, str]:
    import importlib.metadata as md
    out = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def device_name() -> str:
    import jax
    d = jax.local_devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '?')}"


def _gib(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def format_phase(name: str, r: Dict[str, Any]) -> str:
    if "skipped" in r:
        return f"  {name:7s} skipped: {r['skipped']}"
    mem = r.get("device_peak_bytes")
    mem_text = (f"device peak {_gib(mem)}" if mem is not None else
                f"compiled est. {_gib(r.get('compiled_memory', {}).get('estimated_peak_bytes'))}")
    if r.get("host_peak_rss_bytes") is not None:
        mem_text = f"host RSS peak {_gib(r['host_peak_rss_bytes'])}"
    line = (f"  {name:7s} {r['examples_per_s']:10.2f} ex/s {r['tokens_per_s']:12.0f} tok/s  "
            f"median {r['median_s'] * 1e3:9.2f} ms  "
            + ("MFU    n/a" if r.get("mfu") is None else f"MFU {100 * r['mfu']:6.3g}%"))
    if r.get("mfu_issue_convention") is not None:
        line += f" (2xfwd {100 * r['mfu_issue_convention']:.3g}%)"
    line += f"  {mem_text}  compile {r.get('compile_s', 0):.1f}s"
    if "first_loss" in r:
        line += f"\n  {'':7s} loss: first step {r['first_loss']:.4f}, last {r['final_loss']:.4f}"
    if "profile" in r:
        from prompt_t5x.bench import profile_report
        line += "\n" + profile_report.format_report(name, r["profile"])
    if "profile_error" in r:
        line += f"\n  profile {name} failed: {r['profile_error']}"
    return line


def format_result(r: Dict[str, Any]) -> str:
    c = r["config"]
    head = (f"{r['impl']} on {r['device']}: size={c['size']} batch={c['batch']} "
            f"encoder={c['encoder_len']} (prompt {c['prompt_len']}) decoder={c['decoder_len']} "
            f"remat={c.get('remat')} attention={c.get('attention')} dtype={c['dtype']} "
            f"param_dtype={c['param_dtype']}")
    if c.get("cpu_cores") is not None:
        head += f" cpu_cores={','.join(map(str, c['cpu_cores']))}"
    if c.get("flush_denormal") is not None:
        head += f" flush_denormal={c['flush_denormal']}"
    if c.get("lm_head_tied"):
        head += " lm_head=tied (transformers 5.x; same FLOPs)"
    lines = [head]
    if r.get("peak_flops_source"):
        peak = c.get("peak_flops")
        lines.append(f"  MFU peak: {'-' if peak is None else f'{peak:.3g} FLOP/s'} "
                     f"({r['peak_flops_source']})")
    if "aot_train" in r:
        a = r["aot_train"]
        lines.append(f"  AOT train step: analytic {a['flops_analytic']:.4e} FLOPs, HLO dots "
                     f"{a['flops_hlo_dots']:.4e}, cost_analysis {a['flops_cost_analysis']:.4e}; "
                     f"compiled est. peak {_gib(a['compiled_memory'].get('estimated_peak_bytes'))}"
                     f" (temp {_gib(a['compiled_memory'].get('temp_size_in_bytes'))}); "
                     f"compile {a['compile_s']:.1f}s")
        lines.append(f"  saved activations {_gib(a.get('saved_residual_bytes'))} + frozen weights "
                     f"{_gib(a.get('frozen_bytes'))} (backend-independent)")
    for name in PHASES:
        if name in r:
            lines.append(format_phase(name, r[name]))
    return "\n".join(lines)


def format_ratio(ours: Dict[str, Any], peer: Dict[str, Any]) -> str:
    lines = ["ratio prompt_t5x / peer (examples/s):"]
    for name in PHASES:
        a, b = ours.get(name, {}), peer.get(name, {})
        if "examples_per_s" in a and "examples_per_s" in b:
            lines.append(f"  {name:7s} {a['examples_per_s'] / b['examples_per_s']:.3f}x")
    return "\n".join(lines)


def format_comparison(ours: Dict[str, Any], peer: Dict[str, Any]) -> str:
    """What ``--peer`` prints after both sides have printed their own blocks: the first-step
    losses (equal up to the random draw when both run the same function) and the ratios."""
    if "error" in peer:
        return f"peer failed: {peer['error']}"
    lines = []
    dtypes = [(r["config"].get("dtype"), r["config"].get("param_dtype")) for r in (ours, peer)]
    if dtypes[0] != dtypes[1]:   # each side resolves an unset --dtype by its own device
        lines.append(f"warning: the sides ran different dtypes {dtypes}; pass --dtype and "
                     "--param_dtype")
    a, b = ours.get("train", {}), peer.get("train", {})
    if "first_loss" in a and "first_loss" in b:
        lines.append(f"first-step training loss: prompt_t5x {a['first_loss']:.4f}, "
                     f"peer {b['first_loss']:.4f}")
    return "\n".join(lines + [format_ratio(ours, peer)])


def format_published(result: Dict[str, Any]) -> str:
    """A run, or ``{'ours', 'peer'}`` side by side with their ratio (a peer that failed is
    ``{'error': ...}``)."""
    if "peer" not in result:
        return format_result(result)
    ours, peer = result["ours"], result["peer"]
    if "error" in peer:
        return "\n".join([format_result(ours), f"peer failed: {peer['error']}"])
    return "\n".join([format_result(ours), format_result(peer), format_comparison(ours, peer)])


def publish(result: Dict[str, Any], json_path: Optional[str], quiet: bool = False) -> None:
    """Print ``result`` (unless ``quiet``) and save it to ``json_path`` (the ``--json`` flag)
    when one is given."""
    if not quiet:
        print(format_published(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1, default=float)
