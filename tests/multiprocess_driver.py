"""One process of the multi-process data and decoding test (tests/test_multiprocess.py).

Joins a JAX cluster (``--coordinator_address/--num_processes/--process_id``, as ``prompt-t5x
train`` does) with ``--devices`` fake CPU devices, then, for each ``--mesh``, builds the mesh and
the training stream exactly as ``prompt-t5x train`` would (``run_train.build_mesh`` and
``run_data.train_stream`` on the run parsed from the gin flags after ``--``) and saves this
host's first ``--batches`` batches, its data shard and its process index to
``OUT/mesh_<mesh>_process_<i>.npz``. It also greedy-decodes (:func:`decode_on_mesh`) with
validation's partitioned decoder (``validation.make_decode_predict``) on that mesh and saves
the strings there (``decoded``).

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

    from prompt_t5x import decoding, methods, run_data, t5
    method = methods.PromptTuning(t5.T5(config), prompt_length=4,
                                  prompt_init=methods.random_uniform_init())
    prompt = np.random.RandomState(0).uniform(-0.5, 0.5, (4, config.emb_dim)).astype(np.float32)
    batch = run_data.SyntheticData("synthetic_contains", 13, 2, batch_size=8).eval_batches()[0]
    return method, {"prompt": prompt}, decoding.DecodeSpec("greedy", max_decode_len=4), batch


def decode_on_mesh(mesh, config):
    """Greedy decodes of the eval batch by random frozen weights ``PRNGKey(1)`` created in their
    shards on ``mesh`` (a 32-id vocabulary: the generated tasks' inputs)."""
    import jax

    from prompt_t5x import partitioning, sharding, validation
    config = config.replace(vocab_size=32)
    rules = sharding.logical_axis_rules()
    frozen = partitioning.init_frozen(config, jax.random.PRNGKey(1), mesh, rules)
    method, trainable, spec, batch = decode_setup(config)
    trainable = jax.device_put(trainable, sharding.replicated(mesh))
    predict = validation.make_decode_predict(method, frozen, IdVocabulary(), spec, mesh, rules)
    return predict(trainable, batch)


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
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"

    import numpy as np

    from prompt_t5x import distributed, run_data, run_train

    run, _ = run_train.parse_run(argv[split + 1:] + [
        f"--coordinator_address={args.coordinator_address}",
        f"--num_processes={args.num_processes}", f"--process_id={args.process_id}"])
    prompt_length = run.method.prompt_length if run.method.kind == "prompt_tuning" else 0
    source = run_data.open_data(run, prompt_length)
    for mesh_text in args.mesh:
        mesh, _ = run_train.build_mesh(run.replace(mesh=mesh_text))
        stream = run_data.train_stream(source, mesh)(0)
        batches = [next(stream) for _ in range(args.batches)]
        shard = distributed.data_shard(mesh)
        arrays = {f"{k}_{i}": v for i, b in enumerate(batches) for k, v in b.items()}
        np.savez(os.path.join(args.out, f"mesh_{mesh_text}_process_{args.process_id}.npz"),
                 shard=np.asarray([shard.index, shard.count]),
                 process=np.asarray(distributed.process_index()),
                 decoded=np.asarray(decode_on_mesh(mesh, run.model)), **arrays)
    distributed.barrier("driver_done")   # nobody tears the cluster down while others read
    return 0


if __name__ == "__main__":
    sys.exit(main())
