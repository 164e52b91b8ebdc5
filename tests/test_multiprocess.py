"""Real multi-process runs: two JAX processes on this machine, 4 fake CPU devices each.

Each child joins a cluster through ``jax.distributed.initialize`` (coordinator 127.0.0.1 on a
free port; CPU collectives over gloo, jax's default here), so the mesh spans 8 devices of which
each process can only feed and read its own 4, as on two hosts.

* ``prompt-t5x train`` (a generated task, validation by rank classification during training):
  steps 1-2 on mesh 4x2 (each process owns two 'data' rows), then a resume for steps 3-4 on mesh
  1x8 (the 'model' axis spans both processes: they share the one 'data' row and must load the
  same rows). The prompts and validation metrics must be those of one process training the same
  global configuration unpartitioned, to the cross-mesh tolerances of test_sharded_training
  (rtol 1e-5 / atol 5e-5 on the prompt: only float32 reduction order differs), and only process
  0 may write metrics.
* The SeqIO stream of ``prompt-t5x train`` on a local-file task: on mesh 2x4 the two processes
  read disjoint rows, each exactly SeqIO shard i of 2; on 1x8 both read the same full batches.
* Validation's greedy decoder (free-text tasks) partitioned on 2x4 and 1x8: every process gets
  the decodes of one device.
* A batch every host holds (validation) placed on a mesh whose 'data' axis interleaves the
  processes (as a TPU topology order may): every row lands where it belongs, and the training
  data shard refuses that mesh.
* An exception on one process ends every process at once, not after jax's timeouts.

Accuracies and decodes are argmax counts, compared exactly only where the reference's top-1
margins are far above what partitioning changes (asserted, :data:`MARGIN`).

Children are started in their own process groups and killed (the whole group) when the test
fails (a non-zero exit or a traceback in a log), is interrupted or times out, and are killed by
the kernel if the pytest process dies, so nothing is left running.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from prompt_t5x.checkpoints import frozen_sources, train_checkpoints
from prompt_t5x.commands import run_train
from prompt_t5x.parallel import distributed
from prompt_t5x.training.metrics_writer import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQIO_TASK = "local_super_glue_wsc_simple_train"
TIMEOUT_S = 300
# The failing cluster must be gone well before jax's heartbeat timeout could have ended it.
FAIL_TIMEOUT_S = 150
EXIT_SPREAD_S = 15
# Read by tests/multiprocess_driver.py only: which process raises once the mesh is built.
FAIL_ENV = "MULTIPROCESS_DRIVER_FAIL_PROCESS"
# jax's coordinator could not bind its port: another program took the free port meanwhile.
BIND_FAILURE = "Failed to start RPC server"
BIND_ATTEMPTS = 3
TRACEBACK = "Traceback (most recent call last)"
# Accuracy, token accuracy and greedy decodes are argmaxes. The partitioned runs' prompts
# agree with the reference to atol 5e-5 and their float32 sums differ by reduction order only
# (~1e-6), so a top-1 margin of 1e-3 in the reference keeps every argmax; measured margins
# were >= 0.03 (validation) and >= 0.013 (decodes).
MARGIN = 1e-3
# Compiling is most of a child's time; LLVM optimisation level 0 halves it. It changes the
# machine code XLA emits for each device, not the partitioned program (the float32 prompts
# moved by ~2e-6, measured, well inside the tolerances below).
CHILD_XLA_FLAGS = "--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0"
# Random tiny T5 (the quickstart's size) with 8 heads, so that every weight splits 8 ways (1x8).
MODEL = ["--gin_file=models/quickstart.gin", "--gin_file=runs/prompt_tuning.gin",
         "--gin.CHECKPOINT=None", "--gin.t5.get_config.num_heads=8",
         "--gin.t5.get_config.head_dim=8"]


def _train_argv(model_dir, steps, mesh=None):
    argv = MODEL + [f"--gin.MODEL_DIR={model_dir}", "--gin.TASK=synthetic_contains",
                    "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.PROMPT_LENGTH=8",
                    "--gin.BATCH_SIZE=8", f"--gin.TRAIN_STEPS={steps}", "--gin.EVAL_EVERY=2",
                    "--gin.CHECKPOINT_EVERY=2", "--gin.train.max_eval_examples=16",
                    "--gin.train.progress_bar=False"]
    return argv + ([f"--gin.MESH='{mesh}'"] if mesh else [])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs first in each child and then execs its command (which keeps the setting): the kernel
# SIGKILLs the child when the pytest process dies, even by SIGKILL, which no ``finally``
# survives (Linux prctl PR_SET_PDEATHSIG = 1). A launcher, not a preexec_fn: preexec_fn may
# deadlock when the parent has threads, and jax's are running in pytest.
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL) == 0 or "
                    "os._exit(125)\n"
                    "os.getppid() == int(sys.argv[1]) or os._exit(125)  # parent already gone\n"
                    "os.execv(sys.argv[2], sys.argv[2:])\n")


def _dying_with_this_process(command: list) -> list:
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command]


class Cluster:
    """``command(flags)`` run as each process of a JAX cluster on localhost; ``flags`` are the
    process's ``--coordinator_address/--num_processes/--process_id``. ``env``: extra variables
    for the children."""

    def __init__(self, command, log_dir: pathlib.Path, name: str, processes: int = 2,
                 env=None):
        self.command = command
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        self.env.update(XLA_FLAGS=CHILD_XLA_FLAGS, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
                        **(env or {}))
        self.logs = [log_dir / f"{name}_process_{i}.log" for i in range(processes)]
        self.procs, self.attempts = [], 0
        self._start()

    def _start(self):
        self.attempts += 1
        address = f"127.0.0.1:{_free_port()}"
        self.procs, self.started = [], time.monotonic()
        try:
            for i, log in enumerate(self.logs):
                flags = [f"--coordinator_address={address}", f"--num_processes={len(self.logs)}",
                         f"--process_id={i}"]
                with open(log, "w") as out:
                    self.procs.append(subprocess.Popen(
                        _dying_with_this_process(self.command(flags)), cwd=REPO, env=self.env,
                        stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True))   # its own group: killed whole on failure
        except BaseException:
            self.kill()
            raise

    def _texts(self) -> list:
        return [log.read_text(errors="replace") for log in self.logs]

    def _restarted_if_port_taken(self, texts) -> bool:
        """The free port was taken between _free_port and the coordinator's bind: start again
        on another one (a few times)."""
        if self.attempts >= BIND_ATTEMPTS or not any(BIND_FAILURE in t for t in texts):
            return False
        self.kill()
        self._start()
        return True

    def wait(self, timeout: float = TIMEOUT_S) -> list:
        """Exit statuses, all 0, else the test fails showing the logs. Every child is killed
        first as soon as one exits non-zero or prints a traceback, on a timeout, or when the
        test is interrupted."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                texts = self._texts()
                if self._restarted_if_port_taken(texts):
                    continue
                failed = [p for p in self.procs if p.poll() not in (None, 0)]
                if failed or any(TRACEBACK in t for t in texts) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            self.kill()
        codes = [p.returncode for p in self.procs]
        if codes != [0] * len(codes):
            pytest.fail(f"multi-process run failed or timed out: {codes}\n{self.tails(codes)}")
        return codes

    def exit_times(self, timeout: float) -> list:
        """Seconds after the start at which each child ended by itself (None: still running at
        ``timeout``, then killed). Nothing is killed early: this is for failing clusters."""
        times = [None] * len(self.procs)
        try:
            while None in times and time.monotonic() < self.started + timeout:
                if self._restarted_if_port_taken(self._texts()):
                    times = [None] * len(self.procs)
                    continue
                for i, p in enumerate(self.procs):
                    if times[i] is None and p.poll() is not None:
                        times[i] = time.monotonic() - self.started
                time.sleep(0.1)
        finally:
            self.kill()
        return times

    def tails(self, codes) -> str:
        return "\n".join(f"--- {log.name} (rc {c}):\n" + text[-3000:]
                         for log, c, text in zip(self.logs, codes, self._texts()))

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:   # exited since the poll
                    pass
                p.wait()


def _prompt_train(flags, argv):
    return [sys.executable, "-m", "prompt_t5x", "train", *argv, *flags]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two-process run (4x2, then resumed on 1x8) and the one-process reference."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    model_dir = tmp / "two_processes"
    first = Cluster(lambda f: _prompt_train(f, _train_argv(model_dir, 2, "4x2")), tmp, "steps12")
    try:
        # The reference trains here while the children run: one process, no mesh.
        reference_dir = tmp / "one_process"
        run, gin_text = run_train.parse_run(_train_argv(reference_dir, 4))
        reference = run_train.execute(run, gin_config=gin_text)
    except BaseException:
        first.kill()
        raise
    first.wait()
    first_pids = [p.pid for p in first.procs]   # after wait: a restart (port taken) changes them
    second = Cluster(lambda f: _prompt_train(f, _train_argv(model_dir, 4, "1x8")), tmp,
                     "steps34")
    second.wait()
    return {"dir": model_dir, "reference_dir": reference_dir, "reference": reference,
            "run": run, "pids": [first_pids, [p.pid for p in second.procs]],
            "logs": [first.logs, second.logs]}


def _top1_margins(values: np.ndarray) -> np.ndarray:
    """[..., C] -> [...]: best minus second best."""
    top = np.sort(values, axis=-1)
    return top[..., -1] - top[..., -2]


def _validation_margins(run, prompt: np.ndarray) -> tuple:
    """The reference's smallest top-1 margins in validation with ``prompt``: between the two
    best label scores of each example (accuracy, rank classification) and the two best logits
    at each target token (token accuracy)."""
    import jax

    from prompt_t5x.data import run_data
    from prompt_t5x.inference import rank_classification
    from prompt_t5x.model import t5
    from prompt_t5x.training import validation
    source = run_data.open_data(run, run.method.prompt_length)
    method = run.method.build(t5.T5(run.model), source.label_words, source.encode)
    frozen = frozen_sources.load_frozen_params(run.checkpoint, run.model, run.seed)
    labels = rank_classification.encode_labels(source.label_words, source.encode,
                                               run.targets_length)
    classify = jax.jit(rank_classification.rank_classifier_fn(method, labels))
    trainable = {"prompt": prompt}
    labels_margin, tokens_margin = [], []
    for batch in run_data.limit_examples(source.eval_batches(), run.max_eval_examples):
        real = np.asarray(batch["example_mask"], bool)
        scores, _ = classify(frozen, trainable, batch["encoder_input_tokens"])
        labels_margin.append(_top1_margins(np.asarray(scores))[real])
        logits = method.logits(frozen, trainable, {k: batch[k] for k in validation.MODEL_KEYS})
        counted = (np.asarray(batch["decoder_loss_weights"]) > 0) & real[:, None]
        tokens_margin.append(_top1_margins(np.asarray(logits))[counted])
    return np.concatenate(labels_margin).min(), np.concatenate(tokens_margin).min()


def _validation(model_dir):
    return {r["step"]: r for r in read_jsonl(os.path.join(model_dir, "metrics.jsonl"))
            if r["split"] == "validation"}


def test_two_processes_train_the_one_process_prompt(trained):
    for step in (2, 4):
        ours = np.load(trained["dir"] / "prompts" / f"step_{step}.npy")
        ref = np.load(trained["reference_dir"] / "prompts" / f"step_{step}.npy")
        assert ours.shape == (8, 64)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=5e-5)
    # Validation during training ran partitioned on the 8-device mesh in both processes.
    ours, ref = _validation(trained["dir"]), _validation(trained["reference_dir"])
    assert sorted(ours) == sorted(ref) == [2, 4]
    for step in (2, 4):
        prompt = np.load(trained["reference_dir"] / "prompts" / f"step_{step}.npy")
        margins = _validation_margins(trained["run"], prompt)
        assert min(margins) > MARGIN, (step, margins)   # so the argmax counts must agree
        assert ours[step]["accuracy"] == ref[step]["accuracy"]
        assert ours[step]["token_accuracy"] == ref[step]["token_accuracy"]
        assert ours[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5)
    # Both processes computed the metrics themselves and agree on the best step.
    best = json.loads((trained["dir"] / "best.json").read_text())
    assert best["step"] == trained["reference"].best_step
    for logs in trained["logs"]:
        summaries = [line for log in logs for line in log.read_text().splitlines()
                     if line.startswith("trained prompt_tuning")]
        assert len(summaries) == 2 and summaries[0] == summaries[1], summaries


def test_only_process_zero_writes_metrics(trained):
    records = read_jsonl(os.path.join(trained["dir"], "metrics.jsonl"))
    keys = [(r["step"], r["split"]) for r in records]
    assert sorted(keys) == [(2, "train"), (2, "validation"), (4, "train"), (4, "validation")]
    process_zero = {str(pids[0]) for pids in trained["pids"]}
    for split in ("train", "validation"):
        writers = {name.rsplit(".", 1)[-1] for name in os.listdir(trained["dir"] / split)}
        assert writers == process_zero, (split, writers, trained["pids"])


def test_resume_on_another_mesh_continues_the_run(trained):
    second = [log.read_text() for log in trained["logs"][1]]
    assert all("(resumed from 2)" in text for text in second)
    ckpt = train_checkpoints.TrainCheckpointer(str(trained["dir"]), read_only=True)
    try:
        assert ckpt.all_steps() == [2, 4]
        manifests = [ckpt.read_manifest(s) for s in (2, 4)]
    finally:
        ckpt.close()
    # The replicated state was checksummed on save, so the resume verified what it restored.
    assert all(m["checksum"] for m in manifests)
    first, last = (m["data_state"] for m in manifests)
    # 4x2: two data shards (one per process); 1x8: both processes read the one shard.
    assert (first["position"], first["num_shards"]) == (2, 2)
    assert (last["position"], last["num_shards"]) == (4, 1)


@pytest.fixture(scope="module")
def driven(tmp_path_factory, fixtures_dir):
    """tests/multiprocess_driver.py in two processes: the SeqIO stream ``prompt-t5x train``
    feeds on meshes 2x4 and 1x8, and the partitioned greedy decoder on each."""
    tmp = tmp_path_factory.mktemp("driven")
    vocab = fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model"
    argv = MODEL + [f"--gin.MODEL_DIR={tmp / 'unused'}", f"--gin.TASK={SEQIO_TASK}",
                    f"--gin.VOCABULARY={vocab}", f"--gin.DATA_DIR={fixtures_dir / 'data'}",
                    "--gin.t5.get_config.vocab_size=32128", "--gin.INPUTS_LENGTH=32",
                    "--gin.TARGETS_LENGTH=4", "--gin.BATCH_SIZE=8"]
    driver = [sys.executable, str(REPO / "tests" / "multiprocess_driver.py"), "--devices", "4",
              "--out", str(tmp), "--mesh", "2x4", "--mesh", "1x8", "--batches", "3"]
    Cluster(lambda flags: driver + flags + ["--"] + argv, tmp, "driver").wait()

    def load(mesh, process):
        return np.load(tmp / f"mesh_{mesh}_process_{process}.npz")
    return {"load": load, "argv": argv, "vocab": vocab, "tmp": tmp}


def test_seqio_stream_rows_per_process(driven, fixtures_dir):
    """The stream ``prompt-t5x train`` feeds: SeqIO shard i of 2 on 2x4; the same rows on 1x8."""
    import seqio

    import tasks
    from prompt_t5x.data import seqio_bridge
    tasks.register_all(vocab_path=str(driven["vocab"]), data_dir=str(fixtures_dir / "data"))
    spec = seqio_bridge.BatchSpec(32, 4, 8, prompt_length=8)

    def load(mesh, process):
        saved = driven["load"](mesh, process)
        batches = [{k: saved[f"{k}_{i}"] for k in seqio_bridge.MODEL_FEATURES} for i in range(3)]
        return tuple(saved["shard"]), int(saved["process"]), batches

    def expected(index, count):
        stream = seqio_bridge.train_batches(SEQIO_TASK, spec, seed=0,
                                    shard_info=seqio.ShardInfo(index, count))
        return [next(stream) for _ in range(3)]

    hosts = [load("2x4", p) for p in (0, 1)]
    assert [(h[0], h[1]) for h in hosts] == [((0, 2), 0), ((1, 2), 1)]
    for (shard, _, batches) in hosts:
        for got, want in zip(batches, expected(*shard)):
            assert got["encoder_input_tokens"].shape == (4, 32)
            for k in seqio_bridge.MODEL_FEATURES:
                np.testing.assert_array_equal(got[k], want[k])
    rows = [{r.tobytes() for b in h[2] for r in b["encoder_input_tokens"]} for h in hosts]
    assert rows[0] and rows[1] and not rows[0] & rows[1]

    shared = [load("1x8", p) for p in (0, 1)]
    assert [s[0] for s in shared] == [(0, 1), (0, 1)]
    for a, b, want in zip(shared[0][2], shared[1][2], expected(0, 1)):
        assert a["encoder_input_tokens"].shape == (8, 32)
        for k in seqio_bridge.MODEL_FEATURES:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], want[k])


def test_partitioned_greedy_decoding_matches_one_device(driven):
    """Validation's decoder for free-text tasks (``validation.make_decode_predict``) on 2x4 and
    1x8 across the two processes: every process gets all decodes, those of one device."""
    import jax
    import multiprocess_driver

    from prompt_t5x.inference import decoding
    from prompt_t5x.model import t5
    run, _ = run_train.parse_run(driven["argv"])
    config = run.model.replace(vocab_size=32)
    method, trainable, spec, batch = multiprocess_driver.decode_setup(config)
    frozen = t5.init_params(config, jax.random.PRNGKey(1))
    out = decoding.decode_jit(method, frozen, trainable, batch["encoder_input_tokens"], spec)
    want = [multiprocess_driver.IdVocabulary().decode(row.tolist())
            for row in np.asarray(out.tokens)]
    assert len(want) == 8 and len(set(want)) > 1   # not one constant output
    # Every greedy choice (up to and including EOS) wins by MARGIN over the runner-up.
    tokens = np.array([[int(t) for t in text.split()] for text in want], np.int32)
    shifted = np.concatenate([np.zeros((8, 1), np.int32), tokens[:, :-1]], axis=1)
    logits = method.logits(frozen, trainable, {"encoder_input_tokens":
                                               batch["encoder_input_tokens"],
                                               "decoder_input_tokens": shifted})
    chosen = np.cumsum(shifted == spec.eos_id, axis=1) == 0   # before the row ended
    assert np.all(np.argmax(np.asarray(logits), -1)[chosen] == tokens[chosen])
    assert _top1_margins(np.asarray(logits))[chosen].min() > MARGIN
    for mesh in ("2x4", "1x8"):
        for process in (0, 1):
            assert list(driven["load"](mesh, process)["decoded"]) == want, (mesh, process)


def test_a_batch_every_host_holds_survives_a_mesh_that_interleaves_hosts(driven):
    """Validation's ``sharding.shard_global_batch`` on a 4x2 mesh whose 'data' rows go to
    processes 0, 1, 0, 1: gathered back, the batch is unchanged on both processes (per-host
    contiguous slices permuted its rows). Training's data shard refuses that mesh."""
    want = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    for process in (0, 1):
        saved = np.load(driven["tmp"] / f"interleaved_process_{process}.npz")
        np.testing.assert_array_equal(saved["gathered"], want)
        assert "interleaves hosts" in str(saved["refusal"]), str(saved["refusal"])


def test_an_error_on_one_process_ends_every_process_at_once(tmp_path):
    """Process 1 raises once the mesh is built while process 0 waits for it in a collective
    (``FAIL_ENV``, read by the test driver only). Both leave through
    ``distributed.exit_at_once_on_error``: process 1 at once, process 0 when its collective
    loses the peer, instead of waiting in jax's shutdown barrier and collectives for minutes."""
    argv = MODEL + [f"--gin.MODEL_DIR={tmp_path / 'unused'}", "--gin.TASK=synthetic_contains",
                    "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.BATCH_SIZE=8"]
    driver = [sys.executable, str(REPO / "tests" / "multiprocess_driver.py"), "--devices", "4",
              "--out", str(tmp_path), "--mesh", "4x2"]
    cluster = Cluster(lambda flags: driver + flags + ["--"] + argv, tmp_path, "failing",
                      env={FAIL_ENV: "1"})
    times = cluster.exit_times(FAIL_TIMEOUT_S)
    codes = [p.returncode for p in cluster.procs]
    report = f"exit times {times}\n{cluster.tails(codes)}"
    assert None not in times, report
    # The failing process leaves through the handler's os._exit(1) at once. The waiting one
    # either sees its collective lose the peer (the handler again, seconds later) or, when it
    # is not in a collective that notices (seen under CPU load), is aborted by the coordination
    # service once the peer's heartbeats stop (distributed.HEARTBEAT_TIMEOUT_S, -SIGABRT).
    # Without the handler both abort only after jax's shutdown barrier times out (measured:
    # 62 s with our 60 s timeout; jax's own is 300 s).
    assert codes[1] == 1 and codes[0] in (1, -signal.SIGABRT), report
    assert times[0] - times[1] < distributed.HEARTBEAT_TIMEOUT_S + EXIT_SPREAD_S, report
    failing, waiting = (log.read_text() for log in reversed(cluster.logs))
    assert TRACEBACK in failing and "RuntimeError: injected failure on process 1" in failing
    assert "process 1 of 2 failed; exiting now" in failing, report
    assert codes[0] != 1 or "process 0 of 2 failed; exiting now" in waiting, report
