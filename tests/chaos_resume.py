"""Chaos test of resumes (not in CI: minutes): N trials of a real ``prompt-t5x train`` run
killed at random steps with SIGKILL or SIGTERM, resumed until it finishes, and compared with an
uninterrupted reference run of the same command.

    PYTHONPATH=. python tests/chaos_resume.py --trials 20 --steps 200 --checkpoint_every 20

Per trial: 1-2 random kills (each SIGKILL or SIGTERM, chosen at random) at a random step, then
the same command again until it exits 0. A trial *resumed cleanly* when every restart exited 0
or, after a SIGTERM, 75 (saved and stopped), and no restart printed a traceback; it is
*bit-identical* when the final prompt, the final training checkpoint's trainable state and
``best.json`` equal the reference's exactly. *Steps lost* per kill: the last step the killed run
had logged minus the step its resume started from (0 when a SIGTERM saved the step it was on).
Prints one line per trial and a summary:

    trials 20 | clean resumes 20/20 | bit-identical 20/20 | steps lost median 9 max 19 | ...
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(model_dir: str, args) -> list:
    return [sys.executable, "-m", "prompt_t5x", "train", "--gin_file=models/tiny.gin",
            "--gin_file=runs/prompt_tuning.gin", f"--gin.MODEL_DIR={model_dir}",
            "--gin.TASK=synthetic_contains", "--gin.t5.get_config.vocab_size=32",
            "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.PROMPT_LENGTH=4",
            "--gin.BATCH_SIZE=4", f"--gin.TRAIN_STEPS={args.steps}",
            f"--gin.EVAL_EVERY={args.eval_every}",
            f"--gin.CHECKPOINT_EVERY={args.checkpoint_every}",
            "--gin.train.early_stopping_patience=100", "--gin.train.log_every=1",
            "--gin.train.progress_bar=False", "--gin.train.tensorboard=False"]


def environment(cache: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    return env


def logged_step(model_dir: str) -> int:
    """The last training step the run logged (log_every=1: every step)."""
    path = os.path.join(model_dir, "metrics.jsonl")
    last = 0
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue   # a record cut off by a kill
                if record.get("split") == "train":
                    last = int(record["step"])
    return last


def outcome(model_dir: str, steps: int) -> dict:
    """What a finished run leaves: final prompt, final trainable state, best.json."""
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)   # orbax's read-only notices
    from prompt_t5x.checkpoints import train_checkpoints
    trainable, step = train_checkpoints.read_trainable(model_dir, steps)
    with open(os.path.join(model_dir, "best.json")) as f:
        best = json.load(f)
    return {"prompt": np.load(os.path.join(model_dir, "prompts", f"step_{steps}.npy")),
            "trainable": trainable, "best": best, "step": step}


def same(a: dict, b: dict) -> bool:
    import jax
    leaves_a = jax.tree_util.tree_leaves(a["trainable"])
    leaves_b = jax.tree_util.tree_leaves(b["trainable"])
    return (a["step"] == b["step"] and a["best"] == b["best"]
            and np.array_equal(a["prompt"], b["prompt"]) and len(leaves_a) == len(leaves_b)
            and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b)))


def run_to_end(model_dir: str, args, env) -> subprocess.CompletedProcess:
    return subprocess.run(command(model_dir, args), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=args.timeout)


def trial(index: int, args, env, rng: random.Random, reference: dict) -> dict:
    from prompt_t5x.checkpoints import write_errors
    model_dir = os.path.join(args.work, f"trial_{index}")
    clean, lost, kills = True, [], []
    low = args.checkpoint_every // 4
    for _ in range(rng.choice([1, 2])):
        # Past every step the last kill saw, so that a restart's stale records (cut back to
        # its checkpoint when it resumes) cannot trigger this kill before it has trained.
        low = max(low, kills[-1][1] + 1 if kills else low)
        if low > args.steps - 5:
            break
        at = rng.randint(low, args.steps - 5)
        signum = rng.choice([signal.SIGKILL, signal.SIGTERM])
        victim = subprocess.Popen(command(model_dir, args), cwd=REPO, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + args.timeout
        while logged_step(model_dir) < at and victim.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if victim.poll() is not None:   # finished or failed before the kill point
            _, err = victim.communicate()
            clean &= victim.returncode == 0 and "Traceback" not in err
            break
        reached = logged_step(model_dir)
        victim.send_signal(signum)
        _, err = victim.communicate(timeout=args.timeout)
        if signum == signal.SIGTERM:
            match = re.search(r"stopped by SIGTERM after step (\d+)", err)
            finished = os.path.isdir(os.path.join(model_dir, "checkpoints", str(args.steps)))
            if match is None and finished:
                # Landed after the last step (polling lags a fast run): nothing left to stop;
                # the run either completed (0) or was ended while exiting, all saved.
                clean &= victim.returncode in (0, -signal.SIGTERM) and "Traceback" not in err
            else:
                clean &= victim.returncode == 75 and match is not None and "Traceback" not in err
        else:
            clean &= victim.returncode == -signal.SIGKILL
        good = write_errors.last_good_step(model_dir) or 0   # where the next start resumes
        lost.append(max(0, reached - good))
        kills.append((signal.Signals(signum).name, reached, good, victim.returncode))
    final = run_to_end(model_dir, args, env)
    match = re.search(r"resumed from (\d+)", final.stdout)
    resumed = int(match.group(1)) if match else None
    clean &= final.returncode == 0 and "Traceback" not in final.stderr
    if kills:   # resumed from the last good checkpoint (no "resumed" line: from scratch)
        clean &= (resumed or 0) == kills[-1][2]
    if final.returncode != 0:
        print(final.stderr[-3000:], file=sys.stderr)
    identical = final.returncode == 0 and same(outcome(model_dir, args.steps), reference)
    return {"kills": kills, "clean": clean, "identical": identical, "lost": lost,
            "resumed_from": resumed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint_every", type=int, default=20)
    parser.add_argument("--eval_every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--work", default=None, help="scratch dir (default: a temporary one)")
    args = parser.parse_args(argv)
    args.work = args.work or tempfile.mkdtemp(prefix="chaos_resume_")
    env = environment(os.path.join(args.work, "jax_cache"))
    rng = random.Random(args.seed)

    ref_dir = os.path.join(args.work, "reference")
    ref = run_to_end(ref_dir, args, env)
    if ref.returncode != 0:
        print(ref.stderr[-3000:], file=sys.stderr)
        return 1
    reference = outcome(ref_dir, args.steps)

    results = []
    for i in range(args.trials):
        r = trial(i, args, env, rng, reference)
        results.append(r)
        kills = ", ".join(f"{n} at step {s} -> checkpoint {v} (exit {rc})"
                          for n, s, v, rc in r["kills"])
        print(f"trial {i + 1:2d}: kills [{kills}] resumed from {r['resumed_from']} "
              f"clean={r['clean']} bit-identical={r['identical']} steps lost={r['lost']}",
              flush=True)
    lost = [x for r in results for x in r["lost"]]
    n = len(results)
    print(f"trials {n} | clean resumes {sum(r['clean'] for r in results)}/{n} | "
          f"bit-identical {sum(r['identical'] for r in results)}/{n} | kills "
          f"{sum(len(r['kills']) for r in results)} | steps lost median "
          f"{statistics.median(lost) if lost else 0:g} max {max(lost) if lost else 0} "
          f"(checkpoint every {args.checkpoint_every} of {args.steps} steps)")
    return 0 if all(r["clean"] and r["identical"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
