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

Children are started in their own process groups and killed (the whole group) when the test
fails, is interrupted or times out, so nothing is left running.
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

from prompt_t5x import run_train, train_checkpoints
from prompt_t5x.metrics_writer import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQIO_TASK = "local_super_glue_wsc_simple_train"
TIMEOUT_S = 300
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


class Cluster:
    """``command(flags)`` run as each process of a JAX cluster on localhost; ``flags`` are the
    process's ``--coordinator_address/--num_processes/--process_id``."""

    def __init__(self, command, log_dir: pathlib.Path, name: str, processes: int = 2):
        env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
        env.update(XLA_FLAGS=CHILD_XLA_FLAGS, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
        address = f"127.0.0.1:{_free_port()}"
        self.logs = [log_dir / f"{name}_process_{i}.log" for i in range(processes)]
        self.procs = []
        try:
            for i, log in enumerate(self.logs):
                flags = [f"--coordinator_address={address}", f"--num_processes={processes}",
                         f"--process_id={i}"]
                with open(log, "w") as out:
                    self.procs.append(subprocess.Popen(
                        command(flags), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                        start_new_session=True))   # its own group: killed whole on failure
        except BaseException:
            self.kill()
            raise

    def wait(self, timeout: float = TIMEOUT_S) -> list:
        """Exit statuses; on a failure, a hang or a timeout every child is killed first."""
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                failed = [p for p in self.procs if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            self.kill()
        codes = [p.returncode for p in self.procs]
        if codes != [0] * len(codes):
            tails = "\n".join(f"--- {log.name} (rc {c}):\n" + log.read_text()[-3000:]
                              for log, c in zip(self.logs, codes))
            pytest.fail(f"multi-process run failed or timed out: {codes}\n{tails}")
        return codes

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
    first_pids = [p.pid for p in first.procs]
    first.wait()
    second = Cluster(lambda f: _prompt_train(f, _train_argv(model_dir, 4, "1x8")), tmp,
                     "steps34")
    second.wait()
    return {"dir": model_dir, "reference_dir": reference_dir, "reference": reference,
            "pids": [first_pids, [p.pid for p in second.procs]],
            "logs": [first.logs, second.logs]}


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
    return {"load": load, "argv": argv, "vocab": vocab}


def test_seqio_stream_rows_per_process(driven, fixtures_dir):
    """The stream ``prompt-t5x train`` feeds: SeqIO shard i of 2 on 2x4; the same rows on 1x8."""
    import seqio
    import tasks

    from prompt_t5x import data
    tasks.register_all(vocab_path=str(driven["vocab"]), data_dir=str(fixtures_dir / "data"))
    spec = data.BatchSpec(32, 4, 8, prompt_length=8)

    def load(mesh, process):
        saved = driven["load"](mesh, process)
        batches = [{k: saved[f"{k}_{i}"] for k in data.MODEL_FEATURES} for i in range(3)]
        return tuple(saved["shard"]), int(saved["process"]), batches

    def expected(index, count):
        stream = data.train_batches(SEQIO_TASK, spec, seed=0,
                                    shard_info=seqio.ShardInfo(index, count))
        return [next(stream) for _ in range(3)]

    hosts = [load("2x4", p) for p in (0, 1)]
    assert [(h[0], h[1]) for h in hosts] == [((0, 2), 0), ((1, 2), 1)]
    for (shard, _, batches) in hosts:
        for got, want in zip(batches, expected(*shard)):
            assert got["encoder_input_tokens"].shape == (4, 32)
            for k in data.MODEL_FEATURES:
                np.testing.assert_array_equal(got[k], want[k])
    rows = [{r.tobytes() for b in h[2] for r in b["encoder_input_tokens"]} for h in hosts]
    assert rows[0] and rows[1] and not rows[0] & rows[1]

    shared = [load("1x8", p) for p in (0, 1)]
    assert [s[0] for s in shared] == [(0, 1), (0, 1)]
    for a, b, want in zip(shared[0][2], shared[1][2], expected(0, 1)):
        assert a["encoder_input_tokens"].shape == (8, 32)
        for k in data.MODEL_FEATURES:
            np.testing.assert_array_equal(a[k], b[k])
            np.testing.assert_array_equal(a[k], want[k])


def test_partitioned_greedy_decoding_matches_one_device(driven):
    """Validation's decoder for free-text tasks (``validation.make_decode_predict``) on 2x4 and
    1x8 across the two processes: every process gets all decodes, those of one device."""
    import jax
    import multiprocess_driver

    from prompt_t5x import evaluation, t5
    run, _ = run_train.parse_run(driven["argv"])
    config = run.model.replace(vocab_size=32)
    method, trainable, spec, batch = multiprocess_driver.decode_setup(config)
    frozen = t5.init_params(config, jax.random.PRNGKey(1))
    want = evaluation.make_decode_predict(method, frozen, multiprocess_driver.IdVocabulary(),
                                          spec)(trainable, batch)
    assert len(want) == 8 and len(set(want)) > 1   # not one constant output
    for mesh in ("2x4", "1x8"):
        for process in (0, 1):
            assert list(driven["load"](mesh, process)["decoded"]) == want, (mesh, process)
