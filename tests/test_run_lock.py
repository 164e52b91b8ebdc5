"""One writer per run directory: the lock refuses a live holder, takes over a stale one; two
real ``train`` commands into one MODEL_DIR (the second refused, exit 2, nothing touched), and
SIGTERM of the first: exit 75 after a checkpoint, then a resume that ends bit-identical to an
uninterrupted run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from prompt_t5x.base.errors import UsageError
from prompt_t5x.checkpoints import run_lock

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _holder(path, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_started": None,
              "command": "train", "since": time.time(), "heartbeat": time.time()}
    record.update(fields)
    (path / run_lock.LOCK_NAME).write_text(json.dumps(record))


def _dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_lock_refuses_a_live_holder_and_releases(tmp_path):
    with run_lock.RunLock(str(tmp_path), heartbeat_seconds=0.05):
        with pytest.raises(UsageError) as err:
            run_lock.RunLock(str(tmp_path)).acquire()
        text = str(err.value)
        assert f"PID {os.getpid()}" in text and socket.gethostname() in text and "since" in text
        time.sleep(0.2)   # heartbeats rewrite the file; it stays ours
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / run_lock.LOCK_NAME).exists()
    run_lock.RunLock(str(tmp_path)).acquire().release()   # free again


@pytest.mark.parametrize("stale,reason", [
    (dict(pid=None), "is no longer running"),                              # dead PID, this host
    (dict(pid=os.getpid(), pid_started="1"), "is no longer running"),      # PID reused
    (dict(host="elsewhere", heartbeat=time.time() - 3600), "no heartbeat for"),
])
def test_stale_lock_is_taken_over_with_one_notice(tmp_path, stale, reason):
    stale = dict(stale)   # the parametrized dict is shared; fill in a fresh dead PID per run
    if stale.get("pid", 0) is None:
        stale["pid"] = _dead_pid()
    _holder(tmp_path, **stale)
    notices = []
    lock = run_lock.RunLock(str(tmp_path), notice=notices.append).acquire()
    try:
        assert len(notices) == 1 and "took over the stale lock" in notices[0], notices
        assert reason in notices[0]
        assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
        assert [n for n in os.listdir(tmp_path)] == [run_lock.LOCK_NAME]   # nothing aside left
    finally:
        lock.release()


def test_a_racer_that_took_the_stale_lock_first_keeps_it(tmp_path):
    """Two processes judge the same lock stale; the faster one replaces it by its own before
    the slower one renames: the slower one must give that fresh lock back, not remove it."""
    _holder(tmp_path, host="elsewhere", pid=1, since=1.0, heartbeat=time.time() - 3600)
    stale = json.loads((tmp_path / run_lock.LOCK_NAME).read_text())
    _holder(tmp_path, host="racer", pid=2, since=time.time())   # the racer's fresh lock
    slow = run_lock.RunLock(str(tmp_path))
    slow._record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
    assert not slow._take_over(stale)
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["host"] == "racer"
    assert os.listdir(tmp_path) == [run_lock.LOCK_NAME]   # nothing left aside
    assert slow._take_over({**stale, "host": "racer", "pid": 2,
                            "since": json.loads((tmp_path / run_lock.LOCK_NAME).read_text())[
                                "since"]})   # the judged lock itself is taken over
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["pid"] == os.getpid()


def test_remote_holder_with_a_fresh_heartbeat_is_live(tmp_path):
    _holder(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 10)
    with pytest.raises(UsageError, match="in use by 'train' \\(PID 1 on elsewhere\\)"):
        run_lock.RunLock(str(tmp_path)).acquire()


# ------------------------------------------------------------- two real `train` commands ----
def _train_argv(model_dir, steps):
    return [sys.executable, "-m", "prompt_t5x", "train", "--gin_file=models/tiny.gin",
            "--gin_file=runs/prompt_tuning.gin", f"--gin.MODEL_DIR={model_dir}",
            "--gin.TASK=synthetic_contains", "--gin.t5.get_config.vocab_size=32",
            "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.PROMPT_LENGTH=2",
            "--gin.BATCH_SIZE=4", f"--gin.TRAIN_STEPS={steps}", "--gin.EVAL_EVERY=0",
            "--gin.CHECKPOINT_EVERY=1000", "--gin.train.log_every=1",
            "--gin.train.progress_bar=False", "--gin.train.tensorboard=False"]


def _env(cache):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("XLA_FLAGS", None)   # one CPU device, as a user's run
    return env


def _metrics_steps(model_dir):
    path = os.path.join(model_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"split": "train"' in line)


def test_second_train_is_refused_and_sigterm_saves_then_resumes(tmp_path):
    cache, forever = tmp_path / "jax_cache", 10 ** 7
    model_dir = tmp_path / "run"
    first = subprocess.Popen(_train_argv(model_dir, forever), cwd=REPO, env=_env(cache),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while _metrics_steps(model_dir) < 2 and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-2000:]
        # The second command is refused while the first holds the dir, and touches nothing.
        second = subprocess.run(_train_argv(model_dir, forever), cwd=REPO, env=_env(cache),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = [ln for ln in second.stderr.splitlines() if ln.startswith("prompt-t5x")]
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"in use by 'train' (PID {first.pid} on {socket.gethostname()})" in lines[0]
        holder = json.loads((model_dir / run_lock.LOCK_NAME).read_text())
        assert holder["pid"] == first.pid   # the refused command left the lock (and dir) alone
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 75, err[-2000:]
    last = [ln for ln in err.splitlines() if ln.startswith("prompt-t5x")]
    assert len(last) == 1 and "stopped by SIGTERM after step" in last[0], err[-2000:]
    saved = int(last[0].split("after step ")[1].split(";")[0])
    assert saved >= 2 and os.path.isdir(model_dir / "checkpoints" / str(saved))
    assert not (model_dir / run_lock.LOCK_NAME).exists()

    # The lock is free: the same command resumes (to a few steps past the stop) and ends on
    # exactly the prompt of a run that was never stopped.
    end = saved + 3
    resumed = subprocess.run(_train_argv(model_dir, end), cwd=REPO, env=_env(cache),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {saved}" in resumed.stdout
    reference = subprocess.run(_train_argv(tmp_path / "ref", end), cwd=REPO, env=_env(cache),
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-2000:]
    np.testing.assert_array_equal(np.load(model_dir / "prompts" / f"step_{end}.npy"),
                                  np.load(tmp_path / "ref" / "prompts" / f"step_{end}.npy"))
