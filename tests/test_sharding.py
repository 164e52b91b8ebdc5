"""Sharding on 8 fake CPU devices: T5X's rules, the golden layout of a tiny T5 1.1, and
equivalence of every mesh with a single device.

Tolerance of the mesh-vs-one-device comparisons: everything runs in float32. A sharded matmul sums
its contraction in per-device partial sums that are then all-reduced, i.e. in a different order
than one device does, so results differ by float32 rounding (eps = 1.2e-7) accumulated over the
~20 ops between input and loss. Differences measured while writing this test (on a 2+2-layer
variant of CFG) were <= 1e-7 (loss) and <= 1e-6 (prompt gradient, relative to its largest
entry); the asserted bounds are 10x those: loss rtol 1e-6,
gradient and updated prompt 1e-5 relative to their largest entries. A wrong layout (a missing
all-reduce, a shard treated as the whole) gives O(1) errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from prompt_t5x.checkpoints import frozen_sources
from prompt_t5x.methods import prompt_tuning
from prompt_t5x.model import t5
from prompt_t5x.parallel import partitioning, sharding
from prompt_t5x.training import sharded_run, train

# Every dim divisible by 8 (the largest mesh axis) and distinct, so a transposed layout shows.
CFG = t5.get_config("test", vocab_size=128, emb_dim=56, num_heads=8, head_dim=6, mlp_dim=40,
                    num_encoder_layers=1, num_decoder_layers=1)
PROMPT_LENGTH = 5

# path: (shape, logical axes, mesh axes with 1-D parameter partitioning, with 2-D).
GOLDEN = {
    "decoder/decoder_norm/scale":
        ((56,), ('embed',), (None,), ('data',)),
    "decoder/layers_0/encoder_decoder_attention/key/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "decoder/layers_0/encoder_decoder_attention/out/kernel":
        ((48, 56), ('joined_kv', 'embed'), ('model', None), ('model', 'data')),
    "decoder/layers_0/encoder_decoder_attention/query/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "decoder/layers_0/encoder_decoder_attention/value/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "decoder/layers_0/mlp/wi_0/kernel":
        ((56, 40), ('embed', 'mlp'), (None, 'model'), ('data', 'model')),
    "decoder/layers_0/mlp/wi_1/kernel":
        ((56, 40), ('embed', 'mlp'), (None, 'model'), ('data', 'model')),
    "decoder/layers_0/mlp/wo/kernel":
        ((40, 56), ('mlp', 'embed'), ('model', None), ('model', 'data')),
    "decoder/layers_0/pre_cross_attention_layer_norm/scale":
        ((56,), ('embed',), (None,), ('data',)),
    "decoder/layers_0/pre_mlp_layer_norm/scale":
        ((56,), ('embed',), (None,), ('data',)),
    "decoder/layers_0/pre_self_attention_layer_norm/scale":
        ((56,), ('embed',), (None,), ('data',)),
    "decoder/layers_0/self_attention/key/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "decoder/layers_0/self_attention/out/kernel":
        ((48, 56), ('joined_kv', 'embed'), ('model', None), ('model', 'data')),
    "decoder/layers_0/self_attention/query/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "decoder/layers_0/self_attention/value/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "decoder/logits_dense/kernel":
        ((56, 128), ('embed', 'vocab'), (None, 'model'), ('data', 'model')),
    "decoder/relpos_bias/rel_embedding":
        ((8, 32), ('heads', 'relpos_buckets'), ('model', None), ('model', None)),
    "encoder/encoder_norm/scale":
        ((56,), ('embed',), (None,), ('data',)),
    "encoder/layers_0/attention/key/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "encoder/layers_0/attention/out/kernel":
        ((48, 56), ('joined_kv', 'embed'), ('model', None), ('model', 'data')),
    "encoder/layers_0/attention/query/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "encoder/layers_0/attention/value/kernel":
        ((56, 48), ('embed', 'joined_kv'), (None, 'model'), ('data', 'model')),
    "encoder/layers_0/mlp/wi_0/kernel":
        ((56, 40), ('embed', 'mlp'), (None, 'model'), ('data', 'model')),
    "encoder/layers_0/mlp/wi_1/kernel":
        ((56, 40), ('embed', 'mlp'), (None, 'model'), ('data', 'model')),
    "encoder/layers_0/mlp/wo/kernel":
        ((40, 56), ('mlp', 'embed'), ('model', None), ('model', 'data')),
    "encoder/layers_0/pre_attention_layer_norm/scale":
        ((56,), ('embed',), (None,), ('data',)),
    "encoder/layers_0/pre_mlp_layer_norm/scale":
        ((56,), ('embed',), (None,), ('data',)),
    "encoder/relpos_bias/rel_embedding":
        ((8, 32), ('heads', 'relpos_buckets'), ('model', None), ('model', None)),
    "token_embedder/embedding":
        ((128, 56), ('vocab', 'embed'), ('model', None), ('model', 'data')),
}

# T5X's standard_logical_axis_rules, written out (t5x/partitioning.py), per
# (activation_partitioning_dims, parameter_partitioning_dims).
_T5X_REPLICATED = [("relpos_buckets", None), ("abspos_buckets", None), ("length", None),
                   ("layers", None), ("stack", None), ("mlp_activations", None)]
T5X_RULES = {
    (1, 1): [("batch", "data"), ("vocab", "model"), ("embed", None), ("mlp", "model"),
             ("heads", "model"), ("kv", None), ("joined_kv", "model")] + _T5X_REPLICATED,
    (2, 1): [("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
             ("kv", None), ("joined_kv", "model"), ("embed", "model")] + _T5X_REPLICATED,
    (1, 2): [("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
             ("kv", None), ("joined_kv", "model"), ("embed", "data")] + _T5X_REPLICATED,
    (2, 2): [("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
             ("kv", None), ("joined_kv", "model"), ("embed", "model"), ("embed", "data")]
            + _T5X_REPLICATED,
}


def _flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, P))[0]
    return {sharding._path_name(path): leaf for path, leaf in leaves}


@pytest.mark.parametrize("dims", sorted(T5X_RULES))
def test_rules_equal_t5x_standard_rules(dims):
    assert list(sharding.standard_logical_axis_rules(*dims)) == T5X_RULES[dims]
    ours = sharding.logical_axis_rules(*dims, additional_rules=[("expert", "data")])
    assert list(ours) == T5X_RULES[dims] + [("prompt", None), ("prompt_embed", None),
                                            ("tasks", None), ("memory", None),
                                            ("expert", "data")]


def test_rules_reject_unsupported_dims():
    with pytest.raises(ValueError, match="each must be 1 or 2"):
        sharding.standard_logical_axis_rules(3, 1)


def test_prompt_is_replicated_even_with_2d_parameter_partitioning():
    for dims, embed_axis in (((1, 2), "data"), ((2, 2), "model"), ((2, 1), "model")):
        rules = sharding.logical_axis_rules(*dims)
        assert sharding.logical_to_mesh_spec(sharding.PROMPT_LOGICAL_AXES, rules) == P(None, None)
        # whereas a prompt named ('prompt', 'embed') would be split
        assert sharding.logical_to_mesh_spec(P("prompt", "embed"), rules) == P(None, embed_axis)


def test_unknown_logical_axis_is_an_error_not_silent_replication():
    with pytest.raises(ValueError, match=r"encoder/x: logical axes \['embd'\] have no sharding"):
        sharding.logical_to_mesh_spec(P("embd", "mlp"), sharding.logical_axis_rules(), "encoder/x")


def test_golden_logical_axes_and_mesh_specs():
    logical = _flat(t5.logical_axes(CFG))
    shapes = {k: v.shape for k, v in _flat(t5.param_shapes(CFG)).items()}
    assert sorted(logical) == sorted(GOLDEN)
    for dims, column in (((1, 1), 2), ((1, 2), 3)):
        specs = _flat(sharding.mesh_specs(t5.logical_axes(CFG),
                                          sharding.logical_axis_rules(*dims)))
        for name, row in GOLDEN.items():
            assert shapes[name] == row[0], name
            assert tuple(logical[name]) == row[1], name
            assert tuple(specs[name]) == row[column], (name, dims)


@pytest.mark.parametrize("text,devices,shape", [
    ("4x2", 8, (4, 2)), ("1x8", 8, (1, 8)), ("-1x4", 8, (2, 4)), ("autox1", 8, (8, 1)),
    ("8 x 1", 8, (8, 1)),
])
def test_mesh_config_parse(text, devices, shape):
    assert sharding.MeshConfig.parse(text).shape(devices) == shape


@pytest.mark.parametrize("text,message", [
    ("4by2", "is not DATAxMODEL"), ("3x2", "needs 6 devices"), ("-1x3", "does not divide"),
])
def test_mesh_config_errors(text, message):
    with pytest.raises(ValueError, match=message):
        sharding.MeshConfig.parse(text).shape(8)


def test_default_mesh_configs():
    assert sharding.default_mesh_config("tpu") == sharding.MeshConfig(
        -1, 1, parameter_partitioning_dims=2)
    assert sharding.default_mesh_config("gpu", 8) == sharding.MeshConfig(-1, 8)
    assert sharding.default_mesh_config("cpu", 8) == sharding.MeshConfig(-1, 1)
    with pytest.raises(ValueError, match="no default mesh"):
        sharding.default_mesh_config("abacus")


def test_mesh_axes_are_auto_and_named_data_model():
    mesh = sharding.make_mesh(sharding.MeshConfig.parse("2x4"))
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 2, "model": 4}
    assert tuple(mesh.axis_types) == (AxisType.Auto, AxisType.Auto)


def test_uneven_split_names_the_parameter():
    mesh = sharding.make_mesh(sharding.MeshConfig.parse("1x8"))
    with pytest.raises(ValueError, match=r"token_embedder/embedding dim 0 \(size 101\)"):
        partitioning.abstract_frozen(t5.get_config("test"), mesh, sharding.logical_axis_rules())


def test_batch_rows_must_divide_the_data_axis():
    mesh = sharding.make_mesh(sharding.MeshConfig.parse("8x1"))
    with pytest.raises(ValueError, match="divisible by the 8 'data' shards"):
        sharding.shard_batch({"encoder_input_tokens": np.ones((4, 3), np.int32)}, mesh)


def test_a_batch_every_host_holds_is_cut_per_device_for_any_device_order():
    """``shard_global_batch`` (validation) gives each device exactly the rows its index names,
    also when the mesh's device order is not jax.devices()' (TPU topology orders). The
    two-process form of this, where per-host slices used to permute rows, is in
    test_multiprocess."""
    order = [5, 2, 7, 0, 3, 6, 1, 4]
    devices = np.array(jax.devices())[order].reshape(4, 2)
    mesh = jax.sharding.Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    batch = {"encoder_input_tokens": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
             "decoder_loss_weights": np.linspace(0, 1, 16, dtype=np.float32).reshape(8, 2)}
    placed = sharding.shard_global_batch(batch, mesh)
    for name, value in batch.items():
        array = placed[name]
        assert array.sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(array), value)
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), value[shard.index])
    with pytest.raises(ValueError, match="divisible by the mesh's 'data' size 4"):
        sharding.shard_global_batch({"encoder_input_tokens": np.ones((6, 3), np.int32)}, mesh)


# ---------------------------------------------------------------------------------------------
# Every mesh == one device.


def _method():
    return prompt_tuning.PromptTuning(t5.T5(CFG), prompt_length=PROMPT_LENGTH)


def _recording_optimizer():
    """Leaves the prompt unchanged and stores the step's gradient as its state, exactly.

    So one train step yields both the loss (metrics) and the prompt gradient (opt_state), with no
    second compilation of the model and no cancellation from subtracting old and new prompts.
    """
    import optax

    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


@pytest.fixture(scope="module")
def reference():
    """Loss and prompt gradient of one train step on a single device."""
    r = np.random.RandomState(0)
    batch = {"encoder_input_tokens": r.randint(2, 128, (8, 12)).astype(np.int32),
             "decoder_input_tokens": r.randint(2, 128, (8, 6)).astype(np.int32),
             "decoder_target_tokens": r.randint(2, 128, (8, 6)).astype(np.int32),
             "decoder_loss_weights": (r.rand(8, 6) > 0.2).astype(np.float32)}
    method = _method()
    frozen = t5.init_params(CFG, jax.random.PRNGKey(1))
    state = train.create_train_state(method, _recording_optimizer(), frozen,
                                     jax.random.PRNGKey(2))
    prompt = np.asarray(state.params["prompt"])
    new_state, metrics = train.make_train_step(method, _recording_optimizer(), donate=False)(
        state, frozen, batch)
    return dict(batch=batch, frozen=jax.tree.map(np.asarray, frozen), prompt=prompt,
                loss=float(metrics["loss"]), grad=np.asarray(new_state.opt_state["prompt"]))


def _close(actual, expected, rel):
    scale = float(np.max(np.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=0, atol=rel * scale)


@pytest.mark.parametrize("mesh_text,act_dims,param_dims", [
    ("1x8", 1, 1), ("2x4", 1, 1), ("4x2", 1, 1), ("8x1", 1, 1), ("4x2", 1, 2),
])
def test_mesh_matches_single_device(reference, mesh_text, act_dims, param_dims):
    config = sharding.MeshConfig.parse(mesh_text, activation_partitioning_dims=act_dims,
                                       parameter_partitioning_dims=param_dims)
    method = _method()
    optimizer = _recording_optimizer()
    # Same keys as the reference: PRNGKey(1) for the weights, PRNGKey(2) for the state.
    frozen = partitioning.init_frozen(CFG, jax.random.PRNGKey(1), sharding.make_mesh(config),
                                      config.rules())
    run = sharded_run.prepare_sharded_run(CFG, method, optimizer, config, jax.random.PRNGKey(0),
                                           donate_state=False)
    # prepare_sharded_run drew its own weights/state keys; use the reference's for comparison.
    state = sharded_run.create_train_state(method, optimizer, frozen, jax.random.PRNGKey(2),
                                            run.mesh, run.rules)
    mesh = run.mesh
    assert jax.tree.map(lambda x: x.sharding, run.frozen) == jax.tree.map(
        lambda x: x.sharding, frozen)

    # Frozen weights: created in their shards, laid out as the golden table says, same values.
    column = 3 if param_dims == 2 else 2
    mesh_sizes = dict(mesh.shape)
    for name, array in _flat(frozen).items():
        spec = GOLDEN[name][column]
        assert tuple(array.sharding.spec) == spec, name
        shard_shape = tuple(n // (mesh_sizes[a] if a else 1) for n, a in zip(array.shape, spec))
        assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, name
        np.testing.assert_array_equal(np.asarray(array), _flat(reference["frozen"])[name])

    # The trainable state: created replicated, same prompt as on one device.
    for tree in (state, run.state):
        assert tree.params["prompt"].sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(state.params["prompt"]), reference["prompt"])

    # One train step on the mesh: same loss and prompt gradient as one device.
    batch = run.shard_batch(reference["batch"])
    assert tuple(batch["encoder_input_tokens"].sharding.spec) == ("data",)
    # The model's activation constraints are applied (flax drops them outside the context).
    assert "sharding_constraint" in run.train_step.lower(state, frozen, batch).as_text()
    assert "sharding_constraint" not in run.train_step.jitted.lower(state, frozen, batch).as_text()
    new_state, metrics = run.train_step(state, frozen, batch)
    assert int(new_state.step) == 1
    assert new_state.params["prompt"].sharding.is_fully_replicated
    assert new_state.opt_state["prompt"].sharding.is_fully_replicated
    np.testing.assert_allclose(float(metrics["loss"]), reference["loss"], rtol=1e-6)
    _close(new_state.opt_state["prompt"], reference["grad"], 1e-5)


def test_2d_activation_and_parameter_rules_follow_t5x_priority():
    """With both dims 2, a weight's 'embed' gets 'data' only where 'model' is already taken."""
    specs = _flat(sharding.mesh_specs(t5.logical_axes(CFG), sharding.logical_axis_rules(2, 2)))
    assert tuple(specs["encoder/layers_0/mlp/wi_0/kernel"]) == ("data", "model")
    assert tuple(specs["encoder/layers_0/attention/out/kernel"]) == ("model", "data")
    assert tuple(specs["token_embedder/embedding"]) == ("model", "data")
    assert tuple(specs["encoder/encoder_norm/scale"]) == ("model",)


def test_restore_t5x_checkpoint_straight_into_shards(fixtures_dir):
    """The real T5X fixture checkpoint read into a 4x2 mesh with 2-D parameter partitioning."""
    from prompt_t5x.checkpoints import t5x_reader

    path = str(fixtures_dir / "t5x" / "t5_1_1_tiny_checkpoint_3")
    config = t5x_reader.open_checkpoint(path).infer_config()
    mesh_config = sharding.MeshConfig.parse("4x2", parameter_partitioning_dims=2)
    mesh, rules = sharding.make_mesh(mesh_config), mesh_config.rules()
    restored = _flat(frozen_sources.restore_frozen(path, config, mesh, rules))
    on_host = _flat(t5x_reader.load_t5x(path, config).params)
    expected_specs = _flat(sharding.mesh_specs(t5.logical_axes(config), rules))
    assert sorted(restored) == sorted(on_host)
    for name, array in restored.items():
        assert array.sharding.mesh == mesh and array.sharding.spec == expected_specs[name], name
        assert array.dtype == np.float32
        np.testing.assert_array_equal(np.asarray(array), on_host[name])
    # e.g. the embedding [vocab, embed] is split both ways: vocab over model, embed over data
    assert tuple(restored["token_embedder/embedding"].sharding.spec) == ("model", "data")
    assert {s.data.shape for s in restored["token_embedder/embedding"].addressable_shards} == {
        (32128 // 2, 4 // 4)}
