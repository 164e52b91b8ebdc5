"""Training checkpoints: exact save/restore, manifest, prompt .npy per save, keep-last-N and
keep-best, atomic saves, damaged checkpoints, and kill -9 + resume == uninterrupted run."""

import glob
import json
import os
import signal
import subprocess
import sys

import jax
import method_contract as contract
import numpy as np
import orbax.checkpoint as ocp
import pytest

from prompt_t5x.checkpoints import train_checkpoints
from prompt_t5x.methods import prompt_init, prompt_tuning
from prompt_t5x.model import t5
from prompt_t5x.training import optim, train

DRIVER = os.path.join(os.path.dirname(__file__), "resume_driver.py")


@pytest.fixture(scope="module")
def setup():
    config = t5.get_config("test")
    frozen = t5.init_params(config, jax.random.PRNGKey(0))
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=3,
                                  prompt_init=prompt_init.random_uniform_init())
    optimizer = optim.adafactor()
    step_fn = train.make_train_step(method, optimizer, donate=False)
    batch = dict(encoder_input_tokens=np.array([[5, 6, 7, 1]], np.int32),
                 decoder_input_tokens=np.array([[0, 9, 8]], np.int32),
                 decoder_target_tokens=np.array([[9, 8, 1]], np.int32),
                 decoder_loss_weights=np.ones((1, 3), np.float32))

    def fresh(seed=1):
        return train.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(seed))

    def advance(state, n):
        for _ in range(n):
            state, _ = step_fn(state, frozen, batch)
        return state

    return config, fresh, advance


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_restore_is_exact_and_writes_manifest_and_prompt(tmp_path, setup):
    config, fresh, advance = setup
    state = advance(fresh(), 2)
    ckpt = train_checkpoints.TrainCheckpointer(str(tmp_path))
    ckpt.save(state, data_state={"next_batch": 2}, metrics={"accuracy": 0.5},
              model_config=config, frozen_checkpoint="/ckpts/t5_tiny", gin_config="x = 1\n")
    assert ckpt.latest_step() == 2
    restored, manifest = ckpt.restore(fresh(seed=9))  # a different template: values come from disk
    _tree_equal(restored, state)
    assert type(restored) is type(state) and type(restored.opt_state) is type(state.opt_state)
    assert manifest["model_config"] == config.to_dict()
    assert manifest["frozen_checkpoint"] == "/ckpts/t5_tiny" and manifest["gin_config"] == "x = 1\n"
    assert manifest["data_state"] == {"next_batch": 2} and manifest["metrics"] == {"accuracy": 0.5}
    prompt = np.load(tmp_path / "prompts" / "step_2.npy")
    np.testing.assert_array_equal(prompt, np.asarray(state.params["prompt"]))
    # Only the trainable state is saved: no frozen T5 weights on disk.
    saved = train_checkpoints.read_trainable(str(tmp_path))[0]
    assert sorted(saved) == ["prompt"]
    assert not glob.glob(str(tmp_path / "**" / "*token_embedder*"), recursive=True)


def test_keep_last_n_and_keep_best(tmp_path, setup):
    config, fresh, advance = setup
    ckpt = train_checkpoints.TrainCheckpointer(str(tmp_path), keep_last=2, best_metric="accuracy")
    state = fresh()
    for accuracy in (0.1, 0.9, 0.2, 0.3, 0.4):
        state = advance(state, 1)
        ckpt.save(state, metrics={"accuracy": accuracy}, model_config=config)
    assert ckpt.all_steps() == [2, 4, 5]  # best (step 2) + the last two
    assert sorted(os.listdir(tmp_path / "prompts")) == [f"step_{i}.npy" for i in range(1, 6)]
    low = train_checkpoints.TrainCheckpointer(str(tmp_path / "min"), keep_last=1,
                                              best_metric="loss", best_mode="min")
    for loss in (3.0, 1.0, 2.0):
        state = advance(state, 1)
        low.save(state, metrics={"loss": loss})
    assert low.all_steps() == [7, 8]


def test_saves_are_atomic_and_stray_temporaries_ignored(tmp_path, setup, monkeypatch):
    config, fresh, advance = setup
    ckpt = train_checkpoints.TrainCheckpointer(str(tmp_path))
    seen = []
    original = ocp.StandardCheckpointHandler.async_save

    async def spy(self, directory, *args, **kwargs):
        # Where orbax writes the arrays, and whether the final step dir is visible meanwhile.
        seen.append((str(directory), os.path.exists(tmp_path / "checkpoints" / "1")))
        return await original(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", spy)
    ckpt.save(advance(fresh(), 1))
    monkeypatch.undo()
    assert seen and all(".orbax-checkpoint-tmp" in d and not final_exists
                        for d, final_exists in seen)
    assert ckpt.all_steps() == [1]
    # What a crash in the middle of saving step 7 leaves behind: orbax's temporary directory.
    stray = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp"
    (stray / "train_state").mkdir(parents=True)
    reopened = train_checkpoints.TrainCheckpointer(str(tmp_path))
    assert reopened.all_steps() == [1] and reopened.latest_step() == 1
    reopened.save(advance(fresh(), 2))  # the manager removes unfinished temporaries first
    assert not stray.exists()
    assert reopened.all_steps() == [1, 2]
    assert not glob.glob(str(tmp_path / "checkpoints" / "*tmp*"))


def _damage_data(step_dir):
    """Truncate every array data file of a saved train_state (as a crashed copy would)."""
    files = [f for f in glob.glob(os.path.join(step_dir, "train_state", "**", "*"), recursive=True)
             if os.path.isfile(f) and os.sep + "d" + os.sep in f]
    assert files
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 3)


@pytest.mark.parametrize("damage", ["truncate_data", "garble_data", "truncate_manifest"])
def test_damaged_checkpoint_errors_clearly_and_previous_restores(tmp_path, setup, damage, caplog):
    config, fresh, advance = setup
    ckpt = train_checkpoints.TrainCheckpointer(str(tmp_path), keep_last=5)
    good = advance(fresh(), 1)
    ckpt.save(good)
    ckpt.save(advance(good, 1))
    step_dir = ckpt.step_dir(2)
    if damage == "truncate_data":
        _damage_data(step_dir)
    elif damage == "garble_data":  # same size, wrong bytes: only the checksum can tell
        for f in glob.glob(os.path.join(step_dir, "train_state", "**", "d", "*"), recursive=True):
            data = bytearray(open(f, "rb").read())
            data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
            open(f, "wb").write(bytes(data))
    else:
        manifest = os.path.join(step_dir, "manifest", "metadata")
        with open(manifest, "r+b") as fh:
            fh.truncate(10)
    with pytest.raises(train_checkpoints.TrainCheckpointError) as e:
        ckpt.restore(fresh(seed=5))
    assert step_dir in str(e.value)
    state, manifest = ckpt.restore_latest_good(fresh(seed=5))
    assert manifest["step"] == 1
    _tree_equal(state, good)
    assert "damaged checkpoint" in caplog.text
    # The damaged step was moved aside, so the resumed run can save step 2 again.
    assert ckpt.all_steps() == [1]
    assert os.listdir(tmp_path / "checkpoints_damaged")
    ckpt.save(advance(good, 1))
    assert ckpt.all_steps() == [1, 2]


class _ProcessOne:
    """This test process as process 1 of 2: ``broadcast_from_primary`` answers with process 0's
    values, which the test scripts (its listing is ours; ``zero_restores[step]`` is whether its
    restore of ``step`` succeeded). restore_latest_good alternates the two broadcasts: the
    candidate step, then process 0's verdict on it."""

    def __init__(self, monkeypatch, zero_restores):
        from prompt_t5x.parallel import distributed
        self.zero_restores, self.step, self.calls = zero_restores, None, []
        monkeypatch.setattr(distributed, "broadcast_from_primary", self.broadcast)
        monkeypatch.setattr(distributed, "process_index", lambda: 1)
        monkeypatch.setattr(distributed, "is_primary", lambda: False)

    def broadcast(self, value):
        self.calls.append(value)
        if len(self.calls) % 2:          # the candidate step: process 0 lists what we list
            self.step = int(value)
            return int(value)
        return int(self.zero_restores[self.step])


def _two_steps(tmp_path, setup):
    _, fresh, advance = setup
    ckpt = train_checkpoints.TrainCheckpointer(str(tmp_path), keep_last=5)
    good = advance(fresh(), 1)
    ckpt.save(good)
    ckpt.save(advance(good, 1))
    return ckpt, good


def test_process_zero_picks_the_step_every_process_resumes(tmp_path, setup, monkeypatch):
    """Process 0 could not restore step 2 (its verdict is broadcast): this process restores
    step 1 like it, although its own copy of step 2 is fine, and leaves moving step 2 aside
    to process 0."""
    ckpt, good = _two_steps(tmp_path, setup)
    process = _ProcessOne(monkeypatch, {2: False, 1: True})
    state, manifest = ckpt.restore_latest_good(setup[1](seed=5))
    assert manifest["step"] == 1
    _tree_equal(state, good)
    assert process.calls == [2, True, 1, True]   # both restored here; process 0 took 1
    assert os.path.isdir(ckpt.step_dir(2)) and not (tmp_path / "checkpoints_damaged").exists()


def test_a_process_that_cannot_restore_process_zeros_step_raises(tmp_path, setup, monkeypatch):
    """Step 2 is damaged only in this process's view: resuming from step 1 here while process 0
    resumes from step 2 would train on different states, so it is an error naming both."""
    ckpt, _ = _two_steps(tmp_path, setup)
    _damage_data(ckpt.step_dir(2))
    _ProcessOne(monkeypatch, {2: True, 1: True})
    with pytest.raises(train_checkpoints.TrainCheckpointError,
                       match="process 1 cannot restore training checkpoint step 2, which "
                             "process 0 restored"):
        ckpt.restore_latest_good(setup[1](seed=5))
    assert ckpt.all_steps() == [1, 2]   # nothing moved: this process never quarantines


def _run_driver(model_dir, out, *extra, cache_dir):
    # A shared persistent compilation cache (the method contract's, per test process): only the
    # first run pays for XLA compilation.
    env = contract.driver_env(cache_dir)
    return subprocess.Popen([sys.executable, DRIVER, str(model_dir), "--steps", "6",
                             "--save_every", "2", "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def test_sigkill_mid_run_then_resume_matches_uninterrupted_run(tmp_path):
    cache = contract.driver_cache_dir()
    reference = _run_driver(tmp_path / "uninterrupted", tmp_path / "ref.npy", cache_dir=cache)
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    victim = _run_driver(tmp_path / "killed", tmp_path / "killed.npy", "--step_delay", "0.5",
                         cache_dir=cache)
    for line in victim.stdout:
        if line.strip() == "step 3":
            victim.send_signal(signal.SIGKILL)
            break
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.npy").exists()

    resumed = _run_driver(tmp_path / "killed", tmp_path / "killed.npy", cache_dir=cache)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert out.splitlines()[0] in ("resumed from 2", "resumed from 4"), out
    ref, got = np.load(tmp_path / "ref.npy"), np.load(tmp_path / "killed.npy")
    np.testing.assert_array_equal(got, ref)  # bit-exact
    manifest = json.loads(open(tmp_path / "killed" / "checkpoints" / "6" / "manifest" /
                               "metadata").read())
    assert manifest["step"] == 6 and manifest["data_state"] == {"next_batch": 6}
