"""``prompt-t5x quickstart``: prompt-tune a frozen tiny T5 on a generated task, offline, on CPU.

The frozen model (``assets/quickstart_t5.msgpack``, ~1 MB) is a tiny T5 1.1 that this project
pretrained with its own code on its own generated data (``prompt_t5x.data.synthetic``: four yes/no
skills, each marked by a leading skill token). The quickstart removes the marker: the inputs
alone do not say which skill is asked, so the frozen model answers some other skill (near chance
for ``contains``, whose answers are independent of the others), and a learned prompt of 8 vectors
(512 trainable numbers against ~200k frozen) must select the skill.

Re-make the asset (about a minute on 2 CPU cores)::

    prompt-t5x quickstart --pretrain --steps 3000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from prompt_t5x.base import extras
from prompt_t5x.base.errors import UsageError
from prompt_t5x.checkpoints import bundled
from prompt_t5x.data import synthetic
from prompt_t5x.methods import interface, model_tuning, prompt_init, prompt_tuning
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train

QUICKSTART_CONFIG = t5.T5Config(
    vocab_size=synthetic.VOCAB_SIZE, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128,
    num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0, dtype="float32")


def label_accuracy_fn(method: interface.Method):
    """Jitted (trainable, frozen, batch) -> accuracy of yes/no at the first target position.

    Rank classification over the two single-token label words.
    """
    label_ids = jnp.asarray([synthetic.WORD_TO_ID[w] for w in synthetic.LABELS])

    @jax.jit
    def accuracy(trainable, frozen, batch):
        logits = method.logits(frozen, trainable, batch)[:, 0, :]
        predicted = label_ids[jnp.argmax(logits[:, label_ids], axis=-1)]
        return jnp.mean((predicted == batch["decoder_target_tokens"][:, 0]).astype(jnp.float32))

    return accuracy


def pretrain(steps: int, seed: int, out_params: str, out_info: str, log=print) -> float:
    """Model-tune a tiny T5 on all skills (with markers); write the asset; return val accuracy."""
    config = QUICKSTART_CONFIG
    model = t5.T5(config)
    method = model_tuning.ModelTuning(model)
    params = t5.init_params(config, jax.random.PRNGKey(seed))
    frozen, trainable = method.split(params)
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 200, steps), weight_decay=0.0)
    state = train.create_train_state(method, opt, frozen, jax.random.PRNGKey(seed + 1), trainable)
    step = train.make_train_step(method, opt)
    batches = synthetic.mixture_batches(synthetic.SKILLS, 128, seed, with_marker=True)
    start = time.time()
    for i in range(1, steps + 1):
        state, metrics = step(state, frozen, next(batches))
        if i % 250 == 0 or i == steps:
            log(f"pretrain step {i}/{steps}  loss {float(metrics['loss']):.4f}  "
                f"{i / (time.time() - start):.1f} steps/s")
    accuracy = label_accuracy_fn(method)
    accs = {s: float(accuracy(state.params, frozen, synthetic.to_batch(
        synthetic.examples(s, 1000, 10_000 + k, with_marker=True))))
        for k, s in enumerate(synthetic.SKILLS)}
    log("pretrained accuracy with skill markers: " + ", ".join(
        f"{s} {100 * a:.1f}%" for s, a in accs.items()))
    os.makedirs(os.path.dirname(out_params) or ".", exist_ok=True)
    host = jax.tree.map(np.asarray, state.params)
    tmp = out_params + ".tmp"
    with open(tmp, "wb") as f:
        f.write(serialization.msgpack_serialize(host))
    os.replace(tmp, out_params)
    info = {"config": config.to_dict(), "vocabulary": synthetic.WORDS,
            "made_by": f"prompt-t5x quickstart --pretrain --steps {steps} --seed {seed}",
            "pretrained_accuracy_with_markers": accs}
    with open(out_info, "w") as f:
        json.dump(info, f, indent=1)
    return min(accs.values())


def eval_steps(total: int) -> List[int]:
    """When to evaluate: after every step while the prompt is learning (it selects the skill
    within about ten steps of the paper's lr 0.3), then thinning out (every 100 after step 100)
    and the last step; so the rise shows instead of one line of 100% after another."""
    steps = set(range(1, 11)) | set(range(12, 21, 2)) | {25, 30, 40, 50, 75}
    steps |= set(range(100, total + 1, 100)) | {total}
    return sorted(s for s in steps if 1 <= s <= total)


SPARK = " ▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], low: float = 0.0, high: float = 100.0) -> str:
    """One character per value, from ' ' (``low``) to '█' (``high``)."""
    scale = (len(SPARK) - 1) / max(high - low, 1e-9)
    return "".join(SPARK[int(round((min(max(v, low), high) - low) * scale))] for v in values)


def plot_curve(curve: Sequence[Tuple[int, float]], path: str, chance: float, title: str) -> str:
    """Validation accuracy (%) against training step, as a PNG (needs matplotlib)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([s for s, _ in curve], [a for _, a in curve], marker="o", markersize=3, linewidth=2,
            label="prompt tuning")
    ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:g}%)")
    # Linear up to step 10, logarithmic after: the rise happens in the first few steps.
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("training step (linear to 10, log after)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(0, curve[-1][0] * 1.1)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(frameon=False, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def prompt_tune(skill: str, steps: int, prompt_length: int, batch_size: int, seed: int,
                log=print) -> Dict[str, Any]:
    """Prompt-tune the bundled T5 on ``skill`` without its marker. Returns the validation
    accuracy (percent, as every metric of this project) before and after, the curve
    ``[(step, accuracy)]`` and the training throughput measured after compilation."""
    config, frozen = bundled.load_asset()
    model = t5.T5(config)
    method = prompt_tuning.PromptTuning(model, prompt_length=prompt_length,
                                  prompt_init=prompt_init.sampled_vocab_init(config.vocab_size))
    opt = optim.adafactor()  # the paper's recipe: lr 0.3, beta2 decay 0.8, clipping 1.0
    # One jitted program (the key made inside it) instead of a compilation per eager op of the
    # key split, the prompt draw and the optimizer's init: 11 fewer compilations at start-up.
    state = jax.jit(lambda f, s: train.create_train_state(method, opt, f, jax.random.PRNGKey(s)))(
        frozen, seed)
    n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
    log(f"frozen tiny T5: {n_frozen:,} parameters; trainable prompt: {prompt_length} x "
        f"{config.emb_dim} = {prompt_length * config.emb_dim:,} parameters")
    validation = synthetic.to_batch(synthetic.examples(skill, 1000, seed + 7, with_marker=False))
    accuracy_fn = label_accuracy_fn(method)

    def accuracy(params) -> float:
        return 100.0 * float(accuracy_fn(params, frozen, validation))

    chance = 100.0 / len(synthetic.LABELS)
    before = accuracy(state.params)
    log(f"task '{skill}' without its skill marker; validation accuracy before prompt tuning: "
        f"{before:.1f}% (chance {chance:g}%)")
    step = train.make_train_step(method, opt)
    batches = synthetic.mixture_batches([skill], batch_size, seed + 1, with_marker=False)
    curve: List[Tuple[int, float]] = [(0, before)]
    # Throughput counts training steps only: not the first (it compiles), not evaluations.
    start = time.perf_counter()
    state, metrics = step(state, frozen, next(batches))
    jax.block_until_ready(metrics)
    log(f"compiled and ran the first training step in {time.perf_counter() - start:.1f} s")
    todo = eval_steps(steps)
    if 1 in todo:
        curve.append((1, accuracy(state.params)))
        log(f"step    1/{steps}  loss {float(metrics['loss']):.4f}  val accuracy "
            f"{curve[-1][1]:5.1f}%")
    train_seconds, timed_steps = 0.0, 0
    window_seconds, window_steps = 0.0, 0   # since the last log line
    for i in range(2, steps + 1):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, next(batches))
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - t0
        train_seconds, timed_steps = train_seconds + elapsed, timed_steps + 1
        window_seconds, window_steps = window_seconds + elapsed, window_steps + 1
        if i in todo:
            acc = accuracy(state.params)
            curve.append((i, acc))
            log(f"step {i:4d}/{steps}  loss {float(metrics['loss']):.4f}  val accuracy "
                f"{acc:5.1f}%  {window_steps * batch_size / window_seconds:6.0f} ex/s")
            window_seconds, window_steps = 0.0, 0
    if curve[-1][0] != steps:
        curve.append((steps, accuracy(state.params)))
    after = curve[-1][1]
    rate = timed_steps * batch_size / train_seconds if timed_steps else float("nan")
    log(f"validation accuracy: before {before:.1f}% -> after {after:.1f}%  "
        f"(training: {rate:.0f} examples/s after compilation)")
    log(f"accuracy over steps 0..{steps}: |{sparkline([a for _, a in curve])}| "
        f"(0-100%, one mark per evaluation)")
    return {"before": before, "after": after, "curve": curve, "examples_per_second": rate,
            "chance": chance}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="prompt-t5x quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skill", default="contains", choices=synthetic.SKILLS)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps (default 400; 3000 with --pretrain)")
    parser.add_argument("--prompt_length", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain", action="store_true",
                        help="re-make the frozen model asset instead of prompt tuning")
    parser.add_argument("--out", default=bundled.ASSET_PARAMS, help="with --pretrain: params file")
    parser.add_argument("--plot", default=os.path.join(tempfile.gettempdir(),
                                                      "prompt_t5x_quickstart.png"),
                        help="accuracy-over-steps figure (.png; needs matplotlib; '' for none)")
    args = parser.parse_args(argv)
    if args.pretrain:
        worst = pretrain(args.steps or 3000, args.seed, args.out,
                         os.path.splitext(args.out)[0] + ".json")
        return 0 if worst > 0.9 else 1
    if args.plot and not args.plot.lower().endswith(".png"):
        raise UsageError(f"--plot {args.plot}: give a .png path")
    result = prompt_tune(args.skill, args.steps or 400, args.prompt_length, args.batch_size,
                         args.seed)
    if args.plot:
        if extras.available("plot"):
            path = plot_curve(result["curve"], args.plot, result["chance"],
                              f"Prompt tuning a frozen tiny T5 on '{args.skill}' "
                              f"({args.prompt_length} prompt vectors)")
            print(f"wrote {path} (validation accuracy over training steps)")
        else:
            print(f"(no plot: matplotlib is not installed; {extras.install_hint('plot')})")
    return 0 if result["after"] > result["before"] else 1


if __name__ == "__main__":
    sys.exit(main())
