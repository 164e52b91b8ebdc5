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
import time
from typing import Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

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
        f"{s} {a:.3f}" for s, a in accs.items()))
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


def prompt_tune(skill: str, steps: int, prompt_length: int, batch_size: int, seed: int,
                log=print) -> Dict[str, float]:
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
    accuracy = label_accuracy_fn(method)
    before = float(accuracy(state.params, frozen, validation))
    log(f"task '{skill}' without its skill marker; validation accuracy before prompt tuning: "
        f"{before:.3f} (chance 0.5)")
    step = train.make_train_step(method, opt)
    batches = synthetic.mixture_batches([skill], batch_size, seed + 1, with_marker=False)
    start = time.time()
    for i in range(1, steps + 1):
        state, metrics = step(state, frozen, next(batches))
        if i % 50 == 0 or i == steps:
            acc = float(accuracy(state.params, frozen, validation))
            log(f"step {i:4d}/{steps}  loss {float(metrics['loss']):.4f}  "
                f"val accuracy {acc:.3f}  {i * batch_size / (time.time() - start):.0f} ex/s")
    after = float(accuracy(state.params, frozen, validation))
    log(f"validation accuracy: before {before:.3f} -> after {after:.3f}")
    return {"before": before, "after": after}


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
    args = parser.parse_args(argv)
    if args.pretrain:
        worst = pretrain(args.steps or 3000, args.seed, args.out,
                         os.path.splitext(args.out)[0] + ".json")
        return 0 if worst > 0.9 else 1
    result = prompt_tune(args.skill, args.steps or 400, args.prompt_length, args.batch_size,
                         args.seed)
    return 0 if result["after"] > result["before"] else 1


if __name__ == "__main__":
    sys.exit(main())
