"""One process of the multi-process data and decoding test (tests/test_multiprocess.py).

Joins a JAX cluster (``--coordinator_address/--num_processes/--process_id``, as ``prompt-t5x
train`` does) with ``--devices`` fake CPU devices, then, for each ``--mesh``, builds the mesh and
the training stream exactly as ``prompt-t5x train`` would (``run_train.build_mesh`` and
``run_data.train_stream`` on the run parsed from the gin flags after ``--``) and saves this
host's first ``--batches`` batches, its data shard and its process index to
``OUT/mesh_<mesh>_process_<i>.npz``. It also greedy-decodes (:func:`decode_on_mesh`) with
validation's partitioned decoder (``validation.make_decode_predict``) on that mesh and saves
the strings there (``decoded``). Then it places a batch every host holds on a mesh whose 'data'
axis interleaves the processes (:func:`interleaved_mesh`) and saves it gathered back, with
the training data shard's refusal of that mesh, to ``OUT/interleaved_process_<i>.npz``.

With ``$MULTIPROCESS_DRIVER_FAIL_PROCESS=<i>`` (the test's switch; no product code reads it)
process i raises once the first mesh is built and the others wait in a collective: the run
must end at once, through ``distributed.exit_at_once_on_error`` like ``prompt-t5x train``.

    python tests/multiprocess_driver.py --devices 4 --coordinator_address 127.0.0.1:PORT \\
        --num_processes 2 --process_id 0 --out DIR --mesh 2x4 --mesh 1x8 -- --gin_file=...
"""

import argparse
import os
import sys


class IdVocabulary:
    """A ``decode``-only vocabulary that spells out the ids (a random model emits any id)."""

    @staticmethod
    def decode(ids):
        return " ".join(str(i) for i in ids)


def decode_setup(config):
    """(method, trainable prompt, decode spec, eval batch): the same in every process and in
    the test's one-device reference."""
    import numpy as np

    from prompt_t5x.data import run_data
    from prompt_t5x.inference import decoding
    from prompt_t5x.methods import prompt_init, prompt_tuning
    from prompt_t5x.model import t5
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=4,
                                  prompt_init=prompt_init.random_uniform_init())
    prompt = np.random.RandomState(0).uniform(-0.5, 0.5, (4, config.emb_dim)).astype(np.float32)
    batch = run_data.SyntheticData("synthetic_contains", 13, 2, batch_size=8).eval_batches()[0]
    return method, {"prompt": prompt}, decoding.DecodeSpec("greedy", max_decode_len=4), batch


def decode_on_mesh(mesh, config):
    """Greedy decodes of the eval batch by random frozen weights ``PRNGKey(1)`` created in their
    shards on ``mesh`` (a 32-id vocabulary: the generated tasks' inputs)."""
    import jax

    from prompt_t5x.parallel import partitioning, sharding
    from prompt_t5x.training import validation
    config = config.replace(vocab_size=32)
    rules = sharding.logical_axis_rules()
    frozen = partitioning.init_frozen(config, jax.random.PRNGKey(1), mesh, rules)
    method, trainable, spec, batch = decode_setup(config)
    trainable = jax.device_put(trainable, sharding.replicated(mesh))
    predict = validation.make_decode_predict(method, frozen, IdVocabulary(), spec, mesh, rules)
    return predict(trainable, batch)


def interleaved_mesh():
    """A 4x2 ('data', 'model') mesh of two processes' 4 devices each, whose 'data' rows belong
    to processes 0, 1, 0, 1 (an order a TPU topology may produce)."""
    import jax
    import numpy as np

    from prompt_t5x.parallel import sharding
    mine = [[d for d in jax.devices() if d.process_index == p] for p in range(2)]
    assert [len(m) for m in mine] == [4, 4], "made for two processes of 4 devices"
    rows = [mine[0][:2], mine[1][:2], mine[0][2:], mine[1][2:]]
    return jax.sharding.Mesh(np.array(rows), sharding.MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)


def place_on_interleaved_mesh(out_dir: str, process_id: int) -> None:
    import numpy as np

    from prompt_t5x.parallel import distributed, sharding
    mesh = interleaved_mesh()
    try:
        distributed.data_shard(mesh)
        refusal = ""
    except ValueError as e:
        refusal = str(e)
    batch = {"rows": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    gathered = sharding.to_host(sharding.shard_global_batch(batch, mesh)["rows"])
    np.savez(os.path.join(out_dir, f"interleaved_process_{process_id}.npz"),
             gathered=gathered, refusal=np.asarray(refusal))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--coordinator_address", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--mesh", action="append", required=True)
    parser.add_argument("--batches", type=int, default=3)
    args = parser.parse_args(argv[:split])
    # Appended: the caller's flags (e.g. the test's LLVM optimisation level) stay in force.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                               f"device_count={args.devices}").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    fail_process = os.environ.get("MULTIPROCESS_DRIVER_FAIL_PROCESS")

    from prompt_t5x.parallel import distributed
    with distributed.exit_at_once_on_error("multiprocess_driver"):
        return drive(args, argv[split + 1:], fail_process)


def drive(args, gin_argv, fail_process) -> int:
    """Everything :func:`main` describes, inside the cluster."""
    import numpy as np

    from prompt_t5x.commands import run_train
    from prompt_t5x.data import run_data
    from prompt_t5x.parallel import distributed

    run_config, _ = run_train.parse_run(gin_argv + [
        f"--coordinator_address={args.coordinator_address}",
        f"--num_processes={args.num_processes}", f"--process_id={args.process_id}"])
    prompt_length = (run_config.method.prompt_length
                     if run_config.method.kind == "prompt_tuning" else 0)
    source = run_data.open_data(run_config, prompt_length)
    for mesh_text in args.mesh:
        mesh, _ = run_train.build_mesh(run_config.replace(mesh=mesh_text))
        if fail_process is not None:
            distributed.barrier("mesh_built")   # one collective done, as in any real run
            if int(fail_process) == args.process_id:
                raise RuntimeError(f"injected failure on process {args.process_id}")
            distributed.barrier("never_reached_by_the_failing_process")
            raise AssertionError("a barrier passed without the failing process")
        stream = run_data.train_stream(source, mesh)(0)
        batches = [next(stream) for _ in range(args.batches)]
        shard = distributed.data_shard(mesh)
        arrays = {f"{k}_{i}": v for i, b in enumerate(batches) for k, v in b.items()}
        np.savez(os.path.join(args.out, f"mesh_{mesh_text}_process_{args.process_id}.npz"),
                 shard=np.asarray([shard.index, shard.count]),
                 process=np.asarray(distributed.process_index()),
                 decoded=np.asarray(decode_on_mesh(mesh, run_config.model)), **arrays)
    place_on_interleaved_mesh(args.out, args.process_id)
    distributed.barrier("driver_done")   # nobody tears the cluster down while others read
    return 0


if __name__ == "__main__":
    sys.exit(main())
