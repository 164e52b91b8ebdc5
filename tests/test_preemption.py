"""Preemption-safe training: SIGTERM / the first Ctrl-C finish the step, checkpoint it and stop;
the resumed run ends bit-identical to an uninterrupted one; a second Ctrl-C aborts at once.

The signals are real (``os.kill`` of this process from inside the batch stream, so they arrive
at a known step); the loop is the in-memory one of test_training_loop (tiny 'test' T5).
"""

import json
import os
import signal

import jax
import numpy as np
import pytest
from test_training_loop import _batches  # the same deterministic in-memory stream

from prompt_t5x.base.errors import run_command
from prompt_t5x.checkpoints import train_checkpoints
from prompt_t5x.methods import prompt_init, prompt_tuning
from prompt_t5x.model import t5
from prompt_t5x.training import optim, preemption
from prompt_t5x.training import training_loop as loop_lib

CONFIG = t5.get_config("test", dropout_rate=0.1)   # dropout: the saved rng matters
METHOD = prompt_tuning.PromptTuning(t5.T5(CONFIG), 3, prompt_init=prompt_init.random_uniform_init())
OPTIMIZER = optim.adafactor()
STEPS = 7


def _stream(signals_at=None):
    """make_batches: test_training_loop's deterministic batches (same 'test' vocabulary), and
    ``signals`` sent to this process while the batch at ``position`` is produced (so they land
    during that step)."""
    at, signals = signals_at or (None, ())

    class Signalling(_batches(seed=7, batch_size=4, inputs=6, targets=3)):
        def __next__(self):
            if self.position == at:
                for signum in signals:
                    os.kill(os.getpid(), signum)
            return super().__next__()
    return Signalling


@pytest.fixture(scope="module")
def frozen():
    return t5.init_params(CONFIG, jax.random.PRNGKey(0))


def _run(model_dir, frozen, make_batches):
    config = loop_lib.LoopConfig(train_steps=STEPS, log_every=2, eval_every=0,
                                 checkpoint_every=3, progress_bar=False, tensorboard=False)
    return loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                             make_batches=make_batches, model_dir=str(model_dir), config=config,
                             rng=jax.random.PRNGKey(3))


def _final_state(model_dir):
    ckpt = train_checkpoints.TrainCheckpointer(str(model_dir), read_only=True)
    steps = ckpt.all_steps()
    ckpt.close()
    trainable, step = train_checkpoints.read_trainable(str(model_dir), steps[-1])
    return trainable, step


@pytest.fixture(scope="module")
def straight(tmp_path_factory, frozen):
    """The uninterrupted reference run's model dir."""
    model_dir = tmp_path_factory.mktemp("straight")
    reference = _run(model_dir, frozen, _stream())
    assert reference.stopped is None and reference.last_step == STEPS
    return model_dir


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_the_step_then_resume_is_bit_identical(tmp_path, frozen, straight, capsys,
                                                            signum):
    handler_before = signal.getsignal(signum)
    stopped = _run(tmp_path / "stopped", frozen, _stream((3, [signum])))
    # The batch at position 3 is step 4's: step 4 finishes, is saved (not a checkpoint_every
    # step), and the run stops there instead of going on to 7.
    assert stopped.stopped is not None and stopped.stopped.step == 4 == stopped.last_step
    assert stopped.stopped.signal_name == signal.Signals(signum).name
    assert signal.getsignal(signum) is handler_before   # the loop's handlers are gone again
    ckpt = train_checkpoints.TrainCheckpointer(str(tmp_path / "stopped"), read_only=True)
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.read_manifest(4)["data_state"]["position"] == 4
    ckpt.close()
    message = stopped.stopped.message(str(tmp_path / "stopped"))
    assert "after step 4" in message and "Run the same command again" in message
    if signum == signal.SIGINT:
        assert "press Ctrl-C again to abort" in capsys.readouterr().err

    resumed = _run(tmp_path / "stopped", frozen, _stream())
    assert resumed.resumed_from == 4 and resumed.last_step == STEPS and resumed.stopped is None
    got, got_step = _final_state(tmp_path / "stopped")
    want, want_step = _final_state(straight)
    assert got_step == want_step == STEPS
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])   # bit-identical


def test_second_ctrl_c_aborts_without_saving(tmp_path, frozen):
    handler_before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", frozen, _stream((4, [signal.SIGINT, signal.SIGINT])))
    assert signal.getsignal(signal.SIGINT) is handler_before
    ckpt = train_checkpoints.TrainCheckpointer(str(tmp_path / "run"), read_only=True)
    assert ckpt.all_steps() == [3]      # step 5 was never saved; the last good one stays
    ckpt.close()


def test_keyboard_interrupt_is_one_line_and_status_130(capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    assert run_command("train", interrupted, []) == preemption.EXIT_ABORTED == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; stopped without saving" in err


def test_one_process_never_reaches_a_preemption_sync_point():
    # One process has no multi-host agreement to ask: only the local handlers stop a run.
    watch = preemption.StopWatch()
    assert not any(watch.should_stop(step) for step in range(1, 5))
    watch.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert watch.should_stop(5) and watch.stopped(5).signal_name == "SIGTERM"
    finally:
        watch.uninstall()
    assert preemption.EXIT_STOPPED == 75


# ------------------------------------------ early stopping across a kill after best.json ----
# The metric of each step, looked up by the exact bytes of the prompt reached at that step
# (learned from the uninterrupted run): a resumed run that is bit-identical sees the same
# values, and the schedule is chosen so that early stopping fires at a known step.
SCHEDULE = {1: 1.0, 2: 2.0, 3: 1.5, 4: 1.2, 5: 1.1, 6: 3.0, 7: 0.0}
PATIENCE = 3    # best at step 2, then 3, 4, 5 without improvement: stop after step 5


class _Killed(BaseException):
    """Stands in for SIGKILL between writing best.json and writing the checkpoint."""


def _scored_run(model_dir, frozen, table, learn):
    def evaluate(trainable):
        key = np.asarray(trainable["prompt"]).tobytes()
        if learn:
            table[key] = len(table) + 1      # eval_every=1: the n-th evaluation is step n
        return {"score": SCHEDULE[table[key]]}
    config = loop_lib.LoopConfig(train_steps=STEPS, log_every=1, eval_every=1,
                                 checkpoint_every=100, metric="score", metric_mode="max",
                                 early_stopping_patience=PATIENCE, progress_bar=False,
                                 tensorboard=False)
    return loop_lib.run_loop(method=METHOD, optimizer=OPTIMIZER, frozen=frozen,
                             make_batches=_stream(), model_dir=str(model_dir), config=config,
                             evaluate=evaluate, rng=jax.random.PRNGKey(3))


def test_early_stopping_decides_the_same_after_a_kill_between_best_json_and_checkpoint(
        tmp_path, frozen, monkeypatch):
    table = {}
    reference = _scored_run(tmp_path / "straight", frozen, table, learn=True)
    assert reference.stopped_early and reference.last_step == 5 and reference.best_step == 2

    real_save = train_checkpoints.TrainCheckpointer.save

    def killed_at_2(self, state, **kw):
        if int(state.step) == 2:
            raise _Killed()     # best.json already says step 2 (an improvement)
        return real_save(self, state, **kw)
    monkeypatch.setattr(train_checkpoints.TrainCheckpointer, "save", killed_at_2)
    with pytest.raises(_Killed):
        _scored_run(tmp_path / "killed", frozen, table, learn=False)
    best_json = tmp_path / "killed" / "best.json"
    assert json.loads(best_json.read_text())["step"] == 2     # ahead of checkpoint 1
    monkeypatch.setattr(train_checkpoints.TrainCheckpointer, "save", real_save)

    resumed = _scored_run(tmp_path / "killed", frozen, table, learn=False)
    assert resumed.resumed_from == 1
    # Step 2 re-evaluated counts as the improvement it is: the same stop at step 5.
    assert resumed.stopped_early and resumed.last_step == reference.last_step == 5
    assert resumed.evaluations == reference.evaluations[1:]
    assert (json.loads(best_json.read_text())
            == json.loads((tmp_path / "straight" / "best.json").read_text()))
    np.testing.assert_array_equal(np.load(tmp_path / "killed" / "prompts" / "best.npy"),
                                  np.load(tmp_path / "straight" / "prompts" / "best.npy"))
    manifest = train_checkpoints.TrainCheckpointer(str(tmp_path / "killed"), read_only=True)
    assert manifest.read_manifest(5)["best"]["evaluations_since_best"] == PATIENCE
    manifest.close()
