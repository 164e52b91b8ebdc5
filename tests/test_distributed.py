"""Multi-host helpers: cluster detection from the environment, per-host data shards, writers.

Here every decision the helpers make from their inputs (environment, which process owns which
mesh device, which rows a host's stream yields), plus the one-process behaviour of
initialize/barrier/primary_writes; tests/test_multiprocess.py runs two real processes.
"""

import os

import numpy as np
import pytest

from prompt_t5x.parallel import distributed as dist


@pytest.mark.parametrize("env,flags,expected", [
    ({}, {}, dist.ClusterPlan("single")),
    ({"JAX_COORDINATOR_ADDRESS": "n0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}, {},
     dist.ClusterPlan("explicit", "n0:1234", 4, 2)),
    # flags win over the environment
    ({"JAX_COORDINATOR_ADDRESS": "n0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"},
     {"coordinator_address": "n9:99", "process_id": 3},
     dist.ClusterPlan("explicit", "n9:99", 4, 3)),
    ({"JAX_COORDINATOR_ADDRESS": "n0:1", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, {},
     dist.ClusterPlan("single")),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}, {},
     dist.ClusterPlan("tpu_pod")),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, {}, dist.ClusterPlan("single")),  # v4-8: one host
    ({"MEGASCALE_NUM_SLICES": "2", "TPU_WORKER_HOSTNAMES": "h0"}, {}, dist.ClusterPlan("tpu_pod")),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8"}, {}, dist.ClusterPlan("slurm")),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1"}, {}, dist.ClusterPlan("single")),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, {}, dist.ClusterPlan("ompi")),
])
def test_detect_cluster(env, flags, expected):
    assert dist.detect_cluster(env, **flags) == expected


@pytest.mark.parametrize("env,message", [
    ({"JAX_COORDINATOR_ADDRESS": "n0:1234"}, "--num_processes / $JAX_NUM_PROCESSES"),
    ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "--coordinator_address"),
    ({"JAX_COORDINATOR_ADDRESS": "n0", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"},
     "needs a port"),
    ({"JAX_COORDINATOR_ADDRESS": "n0:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "must be in [0, 2)"),
    ({"JAX_COORDINATOR_ADDRESS": "n0:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "is not an integer"),
])
def test_detect_cluster_rejects_incomplete_explicit_setup(env, message):
    with pytest.raises(ValueError, match=None) as err:
        dist.detect_cluster(env)
    assert message in str(err.value)


def test_initialize_single_process_is_a_no_op():
    import jax
    assert dist.initialize(dist.ClusterPlan("single")) == dist.ClusterPlan("single")
    assert not jax.distributed.is_initialized()
    assert dist.is_primary() and dist.process_count() == 1


def test_data_shards_four_hosts_pure_data_parallel():
    # mesh 8x2 (data, model); host h owns data rows 2h, 2h+1 (both model columns).
    grid = np.repeat(np.arange(4), 2)[:, None].repeat(2, axis=1)
    shards = [dist.data_shard_from_process_grid(grid, 0, p) for p in range(4)]
    assert shards == [dist.DataShard(i, 4) for i in range(4)]
    assert shards[2].rows(32) == slice(16, 24)


def test_data_shards_model_parallel_across_hosts_share_a_shard():
    # mesh 2x8 (data, model) over 4 hosts of 4 devices: hosts 0,1 hold data row 0; 2,3 row 1.
    grid = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [2, 2, 2, 2, 3, 3, 3, 3]])
    shards = [dist.data_shard_from_process_grid(grid, 0, p) for p in range(4)]
    assert shards == [dist.DataShard(0, 2), dist.DataShard(0, 2),
                      dist.DataShard(1, 2), dist.DataShard(1, 2)]
    # the same mesh given as (model, data): the data axis is found by index
    assert dist.data_shard_from_process_grid(grid.T, 1, 3) == dist.DataShard(1, 2)


def test_data_shards_reject_hosts_straddling_data_rows_unevenly():
    grid = np.array([[0, 0], [0, 1], [1, 1]])  # host 0 owns rows {0,1}, host 1 rows {1,2}
    with pytest.raises(ValueError, match="unevenly"):
        dist.data_shard_from_process_grid(grid, 0, 0)
    with pytest.raises(ValueError, match="owns no device"):
        dist.data_shard_from_process_grid(grid, 0, 5)


def test_data_shards_reject_hosts_at_non_adjacent_data_rows():
    # mesh 4x2 in a topology order that interleaves hosts: host 0 at data rows 0 and 2, host 1
    # at 1 and 3. Equal, disjoint sets, but a host's one contiguous slice of the batch would
    # be laid out over rows {0, 2}: refused, naming the rows.
    grid = np.array([[0, 0], [1, 1], [0, 0], [1, 1]])
    for process in (0, 1):
        with pytest.raises(ValueError, match=r"interleaves hosts.*0 hold rows \[0, 2\]; "
                                             r"1 hold rows \[1, 3\]"):
            dist.data_shard_from_process_grid(grid, 0, process)


def test_data_shard_rows_must_divide():
    with pytest.raises(ValueError, match="not divisible by the 3 data shards"):
        dist.DataShard(0, 3).rows(32)


def test_data_shard_on_the_fake_device_mesh_is_the_whole_batch():
    from prompt_t5x.parallel import sharding
    mesh = sharding.make_mesh(sharding.MeshConfig.parse("4x2"))
    assert dist.data_shard(mesh) == dist.DataShard(0, 1)


@pytest.mark.parametrize("count", [2, 4])
def test_generated_task_shards_make_up_the_one_process_batch(count):
    """Each host's stream is its rows of the same global batch: together, exactly what one
    process trains on, at every position (so a resumed stream needs no replay)."""
    from prompt_t5x.data import run_data
    source = run_data.SyntheticData("synthetic_contains", 13, 2, batch_size=8, seed=3)
    whole = source.train_batches(5)
    hosts = [source.train_batches(5, dist.DataShard(i, count)) for i in range(count)]
    for _ in range(2):
        expected = next(whole)
        parts = [next(h) for h in hosts]
        assert all(p["encoder_input_tokens"].shape == (8 // count, 13) for p in parts)
        for key, value in expected.items():
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value)
    assert hosts[1].state() == {"name": "synthetic_contains", "seed": 3, "position": 7,
                                "shard_index": 1, "num_shards": count}


def test_primary_writes_yields_true_on_the_only_process(tmp_path):
    with dist.primary_writes("save_prompt") as write:
        assert write is True
        (tmp_path / "prompt.npy").write_bytes(b"x")
    dist.barrier("done")  # one process: returns at once


def test_initialize_passes_short_timeouts_jax_accepts(monkeypatch):
    """The heartbeat/shutdown timeouts reach jax.distributed.initialize under names its
    signature has (a typo would only fail on a real cluster)."""
    import inspect

    import jax
    real = jax.distributed.initialize
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "_joined_as", dist._joined_as)   # restored after the test
    dist.initialize(dist.ClusterPlan("explicit", "n0:1234", 2, 1))
    dist.initialize(dist.ClusterPlan("slurm"))
    assert [c["heartbeat_timeout_seconds"] for c in calls] == [dist.HEARTBEAT_TIMEOUT_S] * 2
    assert [c["shutdown_timeout_seconds"] for c in calls] == [dist.SHUTDOWN_TIMEOUT_S] * 2
    assert calls[0]["process_id"] == 1 and calls[0]["num_processes"] == 2
    for kw in calls:
        inspect.signature(real).bind(**kw)
    assert dist.HEARTBEAT_TIMEOUT_S < 100 and dist.SHUTDOWN_TIMEOUT_S < 300   # jax's defaults


class _Exited(Exception):
    pass


@pytest.mark.parametrize("error,code,last_line", [
    (RuntimeError("disk on fire"), 1, "RuntimeError: disk on fire"),
    (None, 2, "prompt-t5x train: error: train.mesh: bad"),   # a UsageError
    (KeyboardInterrupt(), 130, "KeyboardInterrupt"),
])
def test_an_error_in_a_joined_process_exits_at_once(monkeypatch, capsys, error, code,
                                                    last_line):
    """In a cluster, raising would wait in jax's shutdown barrier for processes that wait for
    this one: the traceback is printed and the process leaves through os._exit at once."""
    import jax

    from prompt_t5x.base.errors import UsageError
    error = error if error is not None else UsageError("train.mesh: bad")
    exits = []

    def fake_exit(status):
        exits.append(status)
        raise _Exited()

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.os, "_exit", fake_exit)
    with pytest.raises(_Exited):
        with dist.exit_at_once_on_error("prompt-t5x train"):
            raise error
    assert exits == [code]
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    lines = err.strip().splitlines()
    assert lines[-2] == last_line and "failed; exiting now" in lines[-1]


def test_outside_a_cluster_errors_propagate_unchanged():
    with pytest.raises(ValueError, match="plain"):
        with dist.exit_at_once_on_error("prompt-t5x train"):
            raise ValueError("plain")


def test_legacy_t5x_writer_refuses_several_processes(tmp_path, monkeypatch):
    import jax

    from prompt_t5x.checkpoints import t5x_writer
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(RuntimeError, match="single-process only, but this run has 2 processes"):
        t5x_writer.save_t5x_checkpoint(str(tmp_path / "checkpoint_1"),
                                       {"w": np.ones((2, 2), np.float32)}, step=1)
    assert not os.listdir(tmp_path)


def test_train_refuses_a_mesh_that_interleaves_hosts_before_loading_weights(tmp_path,
                                                                           monkeypatch):
    """``run_train.build_mesh`` asks for this host's data shard, so a mesh whose 'data' axis
    splits the hosts badly is a usage error (exit 2) before any weights load."""
    from prompt_t5x.base.errors import UsageError
    from prompt_t5x.commands import run_train
    run, _ = run_train.parse_run([
        "--gin_file=models/quickstart.gin", "--gin_file=runs/prompt_tuning.gin",
        "--gin.CHECKPOINT=None", f"--gin.MODEL_DIR={tmp_path / 'run'}",
        "--gin.TASK=synthetic_contains", "--gin.BATCH_SIZE=8", "--gin.MESH='4x2'"])
    interleaved = np.array([[0, 0], [1, 1], [0, 0], [1, 1]])
    monkeypatch.setattr(dist, "data_shard",
                        lambda mesh: dist.data_shard_from_process_grid(interleaved, 0, 0))
    with pytest.raises(UsageError, match=r"train.mesh='4x2' \(4x2\): the mesh's 'data' axis "
                                         "interleaves hosts"):
        run_train.build_mesh(run)
    assert not (tmp_path / "run").exists()
