"""``prompt-t5x train`` on a device mesh (conftest's 8 fake CPU devices).

The same quickstart prompt-tuning run on one device (a 1x1 mesh), 2x4 and 4x2 must produce the same
prompt: the only permitted difference is float32 reduction order (the batch and the 'model'-split
contractions are summed across devices in another order), which after three Adafactor steps at
learning rate 0.3 moves prompt entries of magnitude ~3.5 by ~1e-5 (measured); the tolerance is atol
5e-5 / rtol 1e-5. The default run (one device = a 1x1 mesh) and the plain jitted train step on the
same batches must agree bit for bit.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from prompt_t5x.checkpoints import train_checkpoints
from prompt_t5x.commands import cli, run_train
from prompt_t5x.model import t5
from prompt_t5x.parallel import sharding


def _argv(model_dir, mesh=None, *extra):
    argv = ["train", "--gin_file=models/quickstart.gin", "--gin_file=runs/prompt_tuning.gin",
            f"--gin.MODEL_DIR={model_dir}", "--gin.TASK=synthetic_contains",
            "--gin.INPUTS_LENGTH=13", "--gin.TARGETS_LENGTH=2", "--gin.PROMPT_LENGTH=8",
            "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=3", "--gin.EVAL_EVERY=3",
            "--gin.train.progress_bar=False", "--gin.train.tensorboard=False"]
    if mesh is not None:
        argv.append(f"--gin.MESH='{mesh}'")
    return argv + list(extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """mesh -> (final prompt, LoopResult) for the same run on each mesh."""
    out = {}
    for mesh in (None, "2x4", "4x2"):   # None: the default, one device as a 1x1 mesh
        model_dir = tmp_path_factory.mktemp(f"mesh_{mesh}")
        run, gin_text = run_train.parse_run(_argv(model_dir, mesh)[1:])
        result = run_train.execute(run, gin_config=gin_text)
        prompt = np.asarray(train_checkpoints.read_trainable(str(model_dir))[0]["prompt"])
        out[mesh] = (prompt, result, run)
    return out


def test_default_run_is_the_one_by_one_mesh_and_equals_a_plain_jitted_step(runs):
    """One device is a 1x1 mesh (no second, unpartitioned path), and that partitioned run computes
    exactly what the plain jitted train step computes on the same batches: bit-identical."""
    from prompt_t5x.checkpoints import frozen_sources
    from prompt_t5x.data import run_data
    from prompt_t5x.training import train
    used = runs[None][1].frozen_shardings["token_embedder"]["embedding"]
    assert dict(used.mesh.shape) == {"data": 1, "model": 1}

    run = runs[None][2]
    source = run_data.open_data(run, run.method.prompt_length)
    method = run.method.build(t5.T5(run.model), source.label_words, source.encode)
    frozen = frozen_sources.load_frozen_params(run.checkpoint, run.model, run.seed)
    state = train.create_train_state(method, run.optimizer, frozen, jax.random.PRNGKey(run.seed))
    step = train.make_train_step(method, run.optimizer, z_loss=run.loop.z_loss)
    batches = run_data.train_stream(source)(0)
    for _ in range(run.loop.train_steps):
        state, _ = step(state, frozen, next(batches))
    np.testing.assert_array_equal(np.asarray(state.params["prompt"]), runs[None][0])


@pytest.mark.parametrize("mesh", ["2x4", "4x2"])
def test_mesh_gives_the_single_device_prompt(runs, mesh):
    reference, ref_result, _ = runs[None]
    prompt, result, _ = runs[mesh]
    assert prompt.shape == (8, 64)
    assert result.last_step == 3
    np.testing.assert_allclose(prompt, reference, rtol=1e-5, atol=5e-5)
    # Validation on the sharded run (frozen weights sharded, prompt replicated) agrees too.
    (ours,), (ref,) = result.evaluations, ref_result.evaluations
    assert ours["accuracy"] == ref["accuracy"]
    assert ours["loss"] == pytest.approx(ref["loss"], rel=1e-5)


@pytest.mark.parametrize("mesh,shape", [("2x4", (2, 4)), ("4x2", (4, 2))])
def test_frozen_weights_are_sharded_by_the_rules(runs, mesh, shape):
    _, result, run = runs[mesh]
    used = result.frozen_shardings
    assert tuple(next(iter(
        used["token_embedder"].values())).mesh.shape.values()) == shape
    expected = sharding.mesh_specs(t5.logical_axes(run.model), sharding.logical_axis_rules())
    flat_used = dict(_flatten(used))
    flat_expected = dict(_flatten(expected, leaf=P))
    assert flat_used.keys() == flat_expected.keys()
    for name, spec in flat_expected.items():
        assert flat_used[name].spec == spec, name
    # Spot checks of the T5X table: vocab and the MLP / heads dims over 'model', embed whole.
    assert flat_used["token_embedder/embedding"].spec == P("model", None)
    assert flat_used["encoder/layers_0/mlp/wi_0/kernel"].spec == P(None, "model")
    assert flat_used["decoder/layers_1/self_attention/out/kernel"].spec == P("model", None)
    assert flat_used["encoder/relpos_bias/rel_embedding"].spec == P("model", None)
    model = shape[1]
    assert flat_used["encoder/layers_0/mlp/wi_0/kernel"].shard_shape((64, 128)) == (64,
                                                                                    128 // model)


def _flatten(tree, prefix="", leaf=None):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, name + "/", leaf)
        else:
            yield name, value


@pytest.mark.parametrize("extra,phrase", [
    (("--gin.MESH='2by4'",), "is not DATAxMODEL"),
    (("--gin.MESH='3x1'",), "needs 3 devices"),
    (("--gin.MESH='8x1'", "--gin.BATCH_SIZE=4"), "not divisible by the mesh's 'data' size 8"),
    (("--gin.MESH='1x8'",), "does not fit the model"),
    (("--gin.train.parameter_partitioning_dims=3",), "must be one of 1, 2"),
])
def test_bad_mesh_is_one_clear_usage_error(tmp_path, capsys, extra, phrase):
    model_dir = tmp_path / "run"
    assert cli.main(_argv(model_dir, None, *extra)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("prompt-t5x")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert phrase in err, err
    assert not model_dir.exists()
