"""``prompt-t5x bench`` and the FLOP accounting behind its MFU (CPU, tiny configs)."""

import importlib.util
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from prompt_t5x.bench import bench, bench_protocol, flops
from prompt_t5x.commands import cli
from prompt_t5x.model import t5

SMALL = ["--batch", "2", "--encoder_len", "24", "--prompt_len", "4", "--decoder_len", "5"]
HAVE_PEER = all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft"))


def test_issue_targets_follow_from_the_flop_formula():
    """The issue's xl/xxl targets (55% MFU <-> 145 / 37 ex/s at 790 TFLOP/s) use 2 x forward."""
    for size, target in (("xl", 145), ("xxl", 37)):
        f = flops.train_step_flops(t5.get_config(size), 32, 512, 16)
        per_example = f.issue_convention / 32
        assert 0.55 * 790e12 / per_example == pytest.approx(target, rel=0.01)
        # Attention matmuls need two gradient matmuls, so the exact backward exceeds the forward.
        assert f.forward < f.backward < 1.05 * f.forward


def test_flops_hand_count_one_layer():
    """One encoder layer, batch 1, length 2 of the 'test' config, counted by hand."""
    cfg = t5.get_config("test")            # embed 32, heads*kv 40, mlp 48
    fwd, bwd = flops.encoder_layer_flops(cfg, 1, 2)
    proj, attn, mlp = 4 * 2 * 2 * 32 * 40, 2 * 2 * 2 * 2 * 40, 3 * 2 * 2 * 32 * 48
    assert (fwd, bwd) == (proj + attn + mlp, proj + 2 * attn + mlp)


def test_aot_flops_match_compiled_hlo_and_cost_analysis():
    """--aot compiles with abstract inputs; the analytic count equals every dot in the HLO."""
    args = bench_protocol.build_parser().parse_args(
        ["--size", "test", "--dtype", "float32", "--param_dtype", "float32", "--aot", *SMALL])
    bench_protocol.validate(args)
    result = bench.aot_train(args)
    assert result["flops_hlo_dots"] == result["flops_analytic"]
    # cost_analysis also counts element-wise work (softmax, GELU, norms, Adafactor): above the
    # matmul count but by far less than the matmuls themselves at these dims.
    analytic = result["flops_analytic"]
    assert analytic <= result["flops_cost_analysis"] <= 1.5 * analytic
    mem = result["compiled_memory"]
    assert mem["temp_size_in_bytes"] > 0 and mem["argument_size_in_bytes"] > 0
    # Recomputation is cost, not work: full remat adds dots but not analytic FLOPs.
    args.remat = "full"
    remat = bench.aot_train(args)
    assert remat["flops_analytic"] == result["flops_analytic"]
    assert remat["flops_hlo_dots"] > result["flops_hlo_dots"]
    # ... and it is what keeps fewer activations for the backward pass.
    assert 0 < remat["saved_residual_bytes"] < result["saved_residual_bytes"]


def test_bench_smoke_tiny(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--size", "tiny", *SMALL, "--steps", "2", "--warmup", "1",
                     "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    cfg = t5.get_config("tiny")
    # Unset dtypes are float32 on a CPU (bf16 matmuls would be float32 behind converts there).
    assert r["config"]["param_dtype"] == r["config"]["dtype"] == "float32"
    train = r["train"]
    assert train["examples_per_s"] > 0 and math.isfinite(train["final_loss"])
    assert train["flops_per_step"] == flops.train_step_flops(cfg, 2, 24, 5).total
    assert train["examples_per_s"] == pytest.approx(2 / train["median_s"])
    assert train["compiled_memory"]["estimated_peak_bytes"] > 0
    assert r["rank"]["flops_per_step"] == flops.rank_classification_flops(cfg, 2, 24, 5, 2)
    assert r["decode"]["examples_per_s"] > 0 and r["decode"]["decode_len"] == 5


def test_time_calls_syncs_each_timed_call_and_the_pipelined_run_once():
    """The protocol ours and the peer share: warmup and timed calls synced one by one, then
    ``steps`` calls back to back with a single sync of the last output."""
    calls, synced = [], []

    def call():
        calls.append(None)
        return len(calls)

    timing = bench_protocol.time_calls(call, steps=3, warmup=2, sync=synced.append)
    assert len(calls) == 2 + 3 + 3 and synced == [1, 2, 3, 4, 5, 8]
    assert timing["steps"] == 3 and 0 <= timing["min_s"] <= timing["median_s"]
    assert timing["pipelined_s"] >= 0


def test_usage_errors(capsys):
    assert cli.main(["bench", "--encoder_len", "10", "--prompt_len", "10"]) == 2
    assert "must exceed --prompt_len" in capsys.readouterr().err
    assert cli.main(["bench", "--remat", "sometimes"]) == 2
    assert cli.main(["bench", "--batch", "6", "--microbatches", "4"]) == 2


def test_bench_imports_no_tensorflow():
    code = ("import sys, prompt_t5x.bench.bench, prompt_t5x.bench.peft_peer, prompt_t5x.inference.decoding, "
            "prompt_t5x.inference.rank_classification; "
            "assert 'tensorflow' not in sys.modules and 'seqio' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hlo_dot_parser():
    hlo = """
  %p0 = bf16[6,8]{1,0} parameter(0)
  %p1 = bf16[5,8]{1,0} parameter(1)
  ROOT %dot.3 = f32[6,5]{1,0} dot(bf16[6,8]{1,0} %p0, bf16[5,8]{1,0} %p1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
"""
    (d,) = flops.hlo_dots(hlo)
    assert d["out"] == (6, 5) and d["lhs"] == (6, 8) and d["flops"] == 2 * 6 * 5 * 8


@pytest.mark.skipif(not HAVE_PEER, reason="torch/transformers/peft not installed")
def test_peer_side_by_side(tmp_path, capfd):
    """--peer peft: ours, then HF PEFT, each in its own process pinned to the same cores; each
    block is printed once, then the first-step losses and the ratio."""
    out = tmp_path / "pair.json"
    assert cli.main(["bench", "--size", "tiny", *SMALL, "--steps", "1", "--warmup", "0",
                     "--phases", "train,rank", "--peer", "peft", "--cpu_threads", "1",
                     "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    ours, peer = r["ours"], r["peer"]
    assert peer["impl"] == "peft" and ours["impl"] == "prompt_t5x"
    # Same work by the same formula: identical FLOPs per step, so MFU ratio = throughput ratio.
    assert peer["train"]["flops_per_step"] == ours["train"]["flops_per_step"]
    assert peer["config"]["lm_head_tied"] is False   # transformers 4.x: T5 1.1's untied head
    assert np.isfinite(peer["train"]["final_loss"]) and peer["rank"]["examples_per_s"] > 0
    # Both start from T5X-scaled weights: first losses near ln(vocab) (HF's own init: ~30 at
    # tiny). Ten target tokens only, so the closeness of the two is tested below, on more.
    first = ours["train"]["first_loss"], peer["train"]["first_loss"]
    assert all(abs(x - math.log(32128)) < 1.5 for x in first), first
    assert peer["config"]["flush_denormal"] is True
    cores = ours["config"]["cpu_cores"]
    assert peer["config"]["cpu_cores"] == cores and len(cores) == 1
    printed = capfd.readouterr().out
    assert printed.count("prompt_t5x on ") == 1 and printed.count("peft on ") == 1
    assert "ratio prompt_t5x / peer" in printed and "first-step training loss" in printed


@pytest.mark.skipif(not HAVE_PEER, reason="torch/transformers/peft not installed")
def test_peer_init_has_our_scales_and_runs_our_function():
    """The peer's weights are drawn like ours (T5X's scales, not HF's lm_head std 1.0), and the
    HF model computes our T5's loss on them."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from prompt_t5x.bench import peft_peer
    from prompt_t5x.checkpoints import hf_interop
    from prompt_t5x.training import train

    cfg = t5.get_config("tiny", dtype="float32", param_dtype="float32")
    hf_cfg = transformers.T5Config(**{k: v for k, v in hf_interop.hf_config_from(cfg).items()
                                      if k != "architectures"})
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(hf_cfg).eval()
    assert float(hf.lm_head.weight.detach().std()) > 0.5   # HF's own init: what the peer replaces
    peft_peer.t5x_init_(hf, cfg)
    theirs = hf_interop.params_from_hf_state_dict(hf.state_dict(), cfg)
    ours = bench.random_frozen(cfg, 0)
    flat = lambda tree: {jax.tree_util.keystr(k): np.asarray(v)   # noqa: E731
                         for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    a, b = flat(ours), flat(theirs)
    assert a.keys() == b.keys()
    for name in a:
        if a[name].size >= 1000:   # enough draws for a std to within a few %
            assert b[name].std() == pytest.approx(a[name].std(), rel=0.1), name
    assert a["['decoder']['logits_dense']['kernel']"].std() == pytest.approx(64 ** -0.5, rel=0.05)

    batch = bench_protocol.random_train_batch(np.random.default_rng(0), cfg.vocab_size, 16, 20, 8)
    model = t5.T5(cfg)

    def loss(params):
        logits = model.apply({"params": params}, jax.tree.map(jnp.asarray, batch))
        ce, _, _, weight = train.cross_entropy_sums(logits, batch["decoder_target_tokens"],
                                                    batch["decoder_loss_weights"], 0.0)
        return float(ce / weight)

    with torch.no_grad():
        hf_loss = float(hf(input_ids=torch.from_numpy(batch["encoder_input_tokens"].astype(np.int64)),
                           labels=torch.from_numpy(batch["decoder_target_tokens"].astype(np.int64))
                           ).loss)
    assert loss(theirs) == pytest.approx(hf_loss, abs=1e-4)   # the same function
    # Two draws of one distribution on 128 target tokens: close, and near ln(vocab).
    assert abs(loss(ours) - hf_loss) < 0.5 and abs(hf_loss - math.log(cfg.vocab_size)) < 1.5


def test_peer_failure_keeps_ours(tmp_path, monkeypatch, capsys):
    """--peer: ours is saved before the peer starts; a failed peer is reported, exit 1."""
    from prompt_t5x.bench import bench, peft_peer
    saved, argvs = [], {}

    def child(module, argv, json_path):
        argvs[module] = list(argv)
        if module == "prompt_t5x.bench.peft_peer":
            saved.append(json.loads(out.read_text()))   # what a killed run would leave
            raise RuntimeError("peer exited with status 1")
        return {"impl": "prompt_t5x", "config": {"size": "test", "batch": 2, "encoder_len": 8,
                                                 "prompt_len": 2, "decoder_len": 2,
                                                 "dtype": "float32", "param_dtype": "float32",
                                                 "peak_flops": 5e10},
                "peak_flops_source": "measured", "device": "cpu:cpu"}

    monkeypatch.setattr(peft_peer, "check_available", lambda: None)
    monkeypatch.setattr(bench.side_by_side, "_child", child)
    out = tmp_path / "r.json"
    assert bench.main(["--size", "test", "--peer", "peft", "--profile", str(tmp_path / "p"),
                       "--json", str(out)]) == 1
    assert saved[0]["ours"]["impl"] == "prompt_t5x"
    # Ours keeps --profile; the peer gets neither it nor the --peer flags.
    # Both get the same explicit core count; the peer gets the MFU peak ours resolved.
    threads = ["--cpu_threads", str(len(bench_protocol.cpu_cores(None)))]
    assert argvs["prompt_t5x.bench.bench"] == ["--size", "test", "--profile",
                                               str(tmp_path / "p"), *threads]
    assert argvs["prompt_t5x.bench.peft_peer"] == ["--size", "test", *threads,
                                                   "--peak_flops", "50000000000.0"]
    result = json.loads(out.read_text())
    assert result["ours"]["impl"] == "prompt_t5x"
    assert result["peer"] == {"error": "peer exited with status 1"}
    assert "peer failed: peer exited with status 1" in capsys.readouterr().out
