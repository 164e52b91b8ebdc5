"""Subprocess driver for the kill-and-resume test (tests/test_train_checkpoints.py).

Prompt-tunes the 'test' T5 (with dropout, so the saved rng matters) for ``--steps`` steps, saving a
training checkpoint every ``--save_every`` steps. The batch of step ``i`` depends only on ``i`` and
the data position is resumed from the checkpoint's ``data_state``. On start it resumes from the
newest intact checkpoint, if any. Prints ``step N`` after each step (flushed) so the parent can
kill it mid-run, and writes the final prompt to ``--out`` (``--method JSON``: any registry
method config instead of prompt tuning; then ``--out`` is an .npz of its flat trainable tables).

    python tests/resume_driver.py MODEL_DIR --steps 12 --save_every 3 --out prompt.npy
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prompt_t5x.checkpoints import train_checkpoints
from prompt_t5x.methods import interface, prompt_init, prompt_tuning, registry
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train


def batch_for_step(step: int, vocab: int = 101, batch: int = 4, length: int = 7):
    """Deterministic data: the batch is a function of the step alone."""
    rs = np.random.RandomState(1000 + step)
    inputs = rs.randint(2, vocab, size=(batch, length)).astype(np.int32)
    inputs[:, -1] = 1
    targets = rs.randint(2, vocab, size=(batch, 3)).astype(np.int32)
    targets[:, -1] = 1
    decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
    # Task ids (rows alternate two tasks): a task bank routes by them, other methods ignore them.
    return dict(encoder_input_tokens=inputs, decoder_input_tokens=decoder_inputs,
                decoder_target_tokens=targets, decoder_loss_weights=np.ones((batch, 3), np.float32),
                task_ids=(np.arange(batch) % 2).astype(np.int32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--save_every", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--step_delay", type=float, default=0.0)
    parser.add_argument("--method", default=None, help="a registry method config (JSON)")
    parser.add_argument("--encoder_layers", type=int, default=1,
                        help="encoder layers of the 'test' T5 (deep prompts need 2)")
    args = parser.parse_args(argv)

    config = t5.get_config("test", dropout_rate=0.1, num_encoder_layers=args.encoder_layers,
                          num_decoder_layers=1)
    frozen = t5.init_params(config, jax.random.PRNGKey(0))
    if args.method:
        method = registry.build(t5.T5(config), json.loads(args.method))
    else:
        method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=5,
                                            prompt_init=prompt_init.random_uniform_init())
    optimizer = optim.adafactor(learning_rate=0.3)
    state = train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(1))
    ckpt = train_checkpoints.TrainCheckpointer(args.model_dir, keep_last=2)
    restored, manifest = ckpt.restore_latest_good(state)
    next_batch = 0
    if restored is not None:
        state, next_batch = restored, int(manifest["data_state"]["next_batch"])
        print(f"resumed from {int(state.step)}", flush=True)
    train_step = train.make_train_step(method, optimizer)
    while int(state.step) < args.steps:
        state, _ = train_step(state, frozen, batch_for_step(next_batch))
        next_batch += 1
        step = int(state.step)
        if step % args.save_every == 0:
            ckpt.save(state, data_state={"next_batch": next_batch}, model_config=config,
                      frozen_checkpoint="random init PRNGKey(0)")
        print(f"step {step}", flush=True)
        time.sleep(args.step_delay)
    if args.method:
        np.savez(args.out, **interface.flatten_tables(state.params))
    else:
        np.save(args.out, np.asarray(state.params["prompt"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
