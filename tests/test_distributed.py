"""Multi-host helpers: cluster detection from the environment, per-host data shards, writers.

Here every decision the helpers make from their inputs (environment, which process owns which
mesh device, which rows a host's stream yields), plus the one-process behaviour of
initialize/barrier/primary_writes; tests/test_multiprocess.py runs two real processes.
"""

import numpy as np
import pytest

from prompt_t5x import distributed as dist


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


def test_data_shard_rows_must_divide():
    with pytest.raises(ValueError, match="not divisible by the 3 data shards"):
        dist.DataShard(0, 3).rows(32)


def test_data_shard_on_the_fake_device_mesh_is_the_whole_batch():
    from prompt_t5x import sharding
    mesh = sharding.make_mesh(sharding.MeshConfig.parse("4x2"))
    assert dist.data_shard(mesh) == dist.DataShard(0, 1)


@pytest.mark.parametrize("count", [2, 4])
def test_generated_task_shards_make_up_the_one_process_batch(count):
    """Each host's stream is its rows of the same global batch: together, exactly what one
    process trains on, at every position (so a resumed stream needs no replay)."""
    from prompt_t5x import run_data
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
