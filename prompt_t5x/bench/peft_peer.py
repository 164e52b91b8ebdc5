"""The peer: HF PEFT prompt tuning on PyTorch, timed for the configuration ``bench`` times.

Same model (T5 1.1, untied ``lm_head``, gated-GELU) drawn with ours' random-init scales
(``t5x_init_``; HF's own init is not what a pretrained T5 looks like), same batch, lengths and
prompt length, weights and activations in ``--param_dtype``, subnormal floats flushed to zero as
XLA:CPU does, pinned to the same CPU cores with as many threads as ours (``--cpu_threads``), the
prompt prepended to the *encoder only* (``num_transformer_submodules=1``: PEFT's default for
seq2seq also prepends a second prompt to the decoder, which is a different and slower model),
Adafactor on the prompt
(``transformers.optimization.Adafactor``, ``scale_parameter=False, relative_step=False``, lr 0.3).
Options: ``--compile`` (``torch.compile`` of the PEFT model for the train step), ``--grad_ckpt``
(HF gradient checkpointing, non-reentrant). Eval phases run eager under ``torch.inference_mode``:
rank classification encodes once and decodes every candidate against the repeated encoding (as
ours does); greedy decoding is ``generate(num_beams=1, do_sample=False)`` forced to
``decode_len`` new tokens (HF caches self- and cross-attention keys/values).

Flags, random batches and the timing protocol (``prompt_t5x.bench.bench_protocol``) and the figures
(``bench_report.phase_figures``: ``prompt_t5x.bench.flops``) are ours', so MFU and examples/s
compare
directly.
Memory: ``torch.cuda.max_memory_allocated()`` on GPU; on CPU the process's peak RSS (which
includes the framework itself, so it is not comparable with ours' compiled estimate).

Optional dependency: torch, transformers and peft. transformers 5.x ties T5's ``lm_head`` to the
embedding whatever the config says (T5 1.1 unties them), so under 5.x the peer's logits are not
T5 1.1's; its work is the same (one ``[d_model, vocab]`` matmul either way, plus one scaling of
the decoder output), so the timing comparison holds, and the results record ``lm_head_tied``.
(The *parity* tests need the untied 4.x, which the ``reference`` extra pins.) Run: ``python -m
prompt_t5x.bench.peft_peer --size base ...`` or, side by side
with ours, ``prompt-t5x bench --peer peft``.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

# transformers would import TensorFlow when it is installed (this CPU machine): the peer needs
# only PyTorch.
os.environ.setdefault("USE_TF", "0")
os.environ.setdefault("USE_TORCH", "1")

from prompt_t5x.bench import bench_protocol as protocol  # noqa: E402  (flags, batches, timing)
from prompt_t5x.bench import bench_report  # noqa: E402  (the figures and their printing)

REQUIREMENTS = {"torch": "torch", "transformers": "transformers>=4.40", "peft": "peft>=0.13"}


def check_available() -> None:
    """Raise a UsageError naming what to install when torch/transformers/peft are missing."""
    missing = [spec for mod, spec in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise protocol.usage_error(
            "--peer peft needs " + ", ".join(missing) + " (pip install 'prompt_t5x[reference]' "
            "or pip install " + " ".join(repr(m) for m in missing) + ")")


def build_parser():
    p = protocol.build_parser()
    p.prog = "python -m prompt_t5x.bench.peft_peer"
    p.add_argument("--compile", action="store_true", help="torch.compile the PEFT model")
    p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing")
    return p


def validate(args) -> None:
    """The shared checks, and the flags that only ours has."""
    protocol.validate(args)
    if args.aot or args.profile:
        raise protocol.usage_error("--aot and --profile are for prompt_t5x only")


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(call, steps: int, warmup: int, device) -> Dict[str, float]:
    """``bench_protocol.time_calls`` (ours' protocol), synchronising ``device``."""
    return protocol.time_calls(call, steps, warmup, lambda _: _sync(device))


def _peak_memory(device) -> Dict[str, Optional[int]]:
    import torch
    if device.type == "cuda":
        return {"device_peak_bytes": int(torch.cuda.max_memory_allocated(device))}
    # ru_maxrss is KiB on Linux.
    return {"host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def t5x_init_(model, cfg) -> None:
    """Re-draw HF T5's random weights with the scales ours starts from
    (``bench_protocol.init_std``: T5X's), in place.

    HF's own init draws ``lm_head`` with std 1.0: logits of std ~23 at small, a first loss near
    93 instead of ~11, and subnormal softmax probabilities that are slow on a CPU; a pretrained
    T5 looks like T5X's init, not like that. HF ``Linear`` weights are ``[out, in]``.
    """
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.fill_(1.0)
                continue
            if name == "shared.weight" or "relative_attention_bias" in name:
                kind, fan_in = "table", 0
            else:
                kind = "query" if name.endswith(".q.weight") else "kernel"
                fan_in = p.shape[1]
            p.normal_(0.0, protocol.init_std(kind, fan_in, cfg.head_dim))


def build_model(args, cfg, device):
    """Random HF T5 1.1 (ours' init scales) in ``--param_dtype`` wrapped by PEFT prompt tuning
    (encoder prompt only)."""
    import torch
    import transformers
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from prompt_t5x.checkpoints import hf_interop

    torch.manual_seed(args.seed)
    hf_cfg = transformers.T5Config(**{k: v for k, v in hf_interop.hf_config_from(cfg).items()
                                      if k != "architectures"})
    hf_cfg.use_cache = False
    model = transformers.T5ForConditionalGeneration(hf_cfg)
    t5x_init_(model, cfg)
    model.to(device=device, dtype=getattr(torch, args.param_dtype))
    if args.grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_cfg = PromptTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM,
                                  num_virtual_tokens=args.prompt_len,
                                  prompt_tuning_init=PromptTuningInit.RANDOM,
                                  num_transformer_submodules=1)
    peft_model = get_peft_model(model, peft_cfg)
    peft_model.to(device)
    return peft_model


def bench_train(args, cfg, peft_model, device, rng) -> Dict[str, Any]:
    import torch
    from transformers.optimization import Adafactor

    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = Adafactor(trainable, lr=0.3, scale_parameter=False, relative_step=False,
                          warmup_init=False, clip_threshold=1.0, decay_rate=-0.8,
                          weight_decay=1e-5)
    model = torch.compile(peft_model) if args.compile else peft_model
    inputs_len = args.encoder_len - args.prompt_len
    batches = []
    for _ in range(2):
        b = protocol.random_train_batch(rng, cfg.vocab_size, args.batch, inputs_len,
                                        args.decoder_len)
        ids = torch.from_numpy(b["encoder_input_tokens"].astype(np.int64)).to(device)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": torch.from_numpy(
                            b["decoder_target_tokens"].astype(np.int64)).to(device)})
    peft_model.train()
    state = {"i": 0, "loss": None, "first": None}

    def step():
        out = model(**batches[state["i"] % 2])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["i"] += 1
        state["loss"] = out.loss
        state["first"] = state["first"] if state["first"] is not None else out.loss.detach()
        return out.loss

    start = time.perf_counter()
    step()  # first call: compilation when --compile
    _sync(device)
    first_s = time.perf_counter() - start
    timing = time_calls(step, args.steps, args.warmup, device)
    return {"compile_s": first_s, **timing,
            **bench_report.phase_figures("train", args, cfg, timing),
            **_peak_memory(device), "first_loss": float(state["first"].float().cpu()),
            "final_loss": float(state["loss"].detach().float().cpu())}


def bench_rank(args, cfg, peft_model, device, rng) -> Dict[str, Any]:
    import torch
    base = peft_model.get_base_model()
    b, c, t = args.batch, args.num_candidates, args.decoder_len
    ids = torch.from_numpy(rng.integers(2, cfg.vocab_size, (b, args.encoder_len - args.prompt_len)
                                        ).astype(np.int64)).to(device)
    targets = rng.integers(2, cfg.vocab_size, (c, t)).astype(np.int64)
    targets[:, -1] = 1  # EOS
    targets = torch.from_numpy(np.tile(targets, (b, 1))).to(device)                 # [B*C, T]
    dec_in = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
    peft_model.eval()

    @torch.inference_mode()
    def scores():
        emb = base.get_input_embeddings()(ids)
        prompt = peft_model.get_prompt(batch_size=b).to(emb.dtype)
        x = torch.cat([prompt, emb], dim=1)
        mask = torch.ones(x.shape[:2], dtype=torch.long, device=device)
        encoded = base.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
        encoded = encoded.repeat_interleave(c, dim=0)
        mask = mask.repeat_interleave(c, dim=0)
        logits = base(encoder_outputs=(encoded,), attention_mask=mask, decoder_input_ids=dec_in,
                      use_cache=False).logits
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
        return lp.sum(-1).reshape(b, c).argmax(-1)

    start = time.perf_counter()
    scores()
    _sync(device)
    first_s = time.perf_counter() - start
    timing = time_calls(scores, args.steps, args.warmup, device)
    return {"compile_s": first_s, **timing,
            **bench_report.phase_figures("rank", args, cfg, timing), **_peak_memory(device)}


def bench_decode(args, cfg, peft_model, device, rng) -> Dict[str, Any]:
    import torch
    length = args.decode_len or args.decoder_len
    ids = torch.from_numpy(rng.integers(2, cfg.vocab_size,
                                        (args.batch, args.encoder_len - args.prompt_len)
                                        ).astype(np.int64)).to(device)
    peft_model.eval()
    base = peft_model.get_base_model()
    base.config.use_cache = True

    @torch.inference_mode()
    def generate():
        return peft_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=length, min_new_tokens=length,
                                   do_sample=False, num_beams=1, use_cache=True)

    start = time.perf_counter()
    out = generate()
    _sync(device)
    first_s = time.perf_counter() - start
    timing = time_calls(generate, args.steps, args.warmup, device)
    return {"compile_s": first_s, "generated_shape": list(out.shape), **timing,
            **bench_report.phase_figures("decode", args, cfg, timing), **_peak_memory(device)}


def run_peer(args) -> Dict[str, Any]:
    check_available()
    cores = protocol.pin_cpus(args.cpu_threads)   # before torch starts its thread pools
    import torch
    torch.set_num_threads(len(cores))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    protocol.resolve_dtypes(args, device.type == "cpu")
    cfg = protocol.model_config(args)
    config = {k: v for k, v in vars(args).items() if k != "json"}
    config["cpu_cores"] = cores
    # XLA:CPU flushes subnormal floats to zero; PyTorch computes them (slowly) unless told.
    config["flush_denormal"] = bool(torch.set_flush_denormal(True))
    config["remat"] = "grad_ckpt" if args.grad_ckpt else "none"
    config["attention"] = "hf-eager" + ("+torch.compile" if args.compile else "")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result: Dict[str, Any] = {"impl": "peft", "config": config,
                              "versions": bench_report.versions(),
                              "device": f"{device.type}:{name}"}
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    peft_model = build_model(args, cfg, device)
    result["init_s"] = time.perf_counter() - start
    base = peft_model.get_base_model()
    result["config"]["lm_head_tied"] = (
        base.lm_head.weight.data_ptr() == base.shared.weight.data_ptr())
    wanted = protocol.phases(args)
    if "train" in wanted:
        result["train"] = bench_train(args, cfg, peft_model, device, rng)
    if "rank" in wanted:
        result["rank"] = bench_rank(args, cfg, peft_model, device, rng)
    if "decode" in wanted:
        result["decode"] = bench_decode(args, cfg, peft_model, device, rng)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    validate(args)
    bench_report.publish(run_peer(args), args.json)
    return 0


if __name__ == "__main__":
    from prompt_t5x.base.errors import run_command
    sys.exit(run_command("bench --peer peft", main, sys.argv[1:]))
