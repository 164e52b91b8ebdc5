"""T5X checkpoints: the real legacy fixture, legacy write/read, Orbax layout, strict loading,
sharded/dtype restore, config inference, and ``prompt-t5x inspect``."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from prompt_t5x.base import storage
from prompt_t5x.checkpoints import strict_loading, t5x_reader, t5x_writer
from prompt_t5x.commands import cli
from prompt_t5x.model import t5

FIXTURE = "t5x/t5_1_1_tiny_checkpoint_3"


def _batch():
    return dict(encoder_input_tokens=np.array([[5, 6, 7, 1, 0], [8, 1, 0, 0, 0]], np.int32),
                decoder_input_tokens=np.array([[0, 9, 8], [0, 4, 0]], np.int32),
                decoder_target_tokens=np.array([[9, 8, 1], [4, 1, 0]], np.int32),
                decoder_loss_weights=np.array([[1, 1, 1], [1, 1, 0]], np.float32))


@pytest.fixture(scope="module")
def test_params():
    config = t5.get_config("test")
    return config, jax.tree_util.tree_map(np.asarray, t5.init_params(config, jax.random.PRNGKey(0)))


def _assert_same(a, b):
    fa, fb = strict_loading.flatten(a), strict_loading.flatten(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        np.testing.assert_array_equal(np.asarray(fa[name]), np.asarray(fb[name]), err_msg=name)


def test_real_fixture_loads_strictly_with_inferred_config_and_runs(fixtures_dir):
    ckpt = t5x_reader.open_checkpoint(str(fixtures_dir / FIXTURE))
    assert ckpt.format == t5x_reader.FORMAT_LEGACY and ckpt.step == 3
    config = ckpt.infer_config()
    assert (config.vocab_size, config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim,
            config.num_encoder_layers, config.num_decoder_layers, config.relpos_buckets) == \
        (32128, 4, 2, 2, 8, 2, 2, 4)
    # Both storage kinds are present in the real file: zarr kernels and inline scales.
    assert not ckpt.params["token_embedder/embedding"].is_inline
    assert ckpt.params["encoder/encoder_norm/scale"].is_inline
    params, used = ckpt.load_params()
    assert used == config
    strict_loading.check_tree(params, t5.param_shapes(config))  # nothing missing or extra
    assert "state/param_states/encoder/encoder_norm/scale/v" in ckpt.arrays
    logits = t5.T5(config.replace(dtype="float32")).apply({"params": params}, _batch())
    assert logits.shape == (2, 3, 32128) and np.isfinite(np.asarray(logits)).all()
    # Trained weights, not an init: layer-norm scales moved away from 1.
    assert not np.allclose(params["encoder"]["encoder_norm"]["scale"], 1.0)


def test_model_dir_picks_latest_or_requested_step(tmp_path, test_params):
    config, params = test_params
    for step in (1, 5):
        t5x_writer.save_t5x_checkpoint(str(tmp_path / f"checkpoint_{step}"), params, step=step)
    assert t5x_reader.checkpoint_steps(str(tmp_path)) == [1, 5]
    assert t5x_reader.open_checkpoint(str(tmp_path)).step == 5
    assert t5x_reader.open_checkpoint(str(tmp_path), step=1).step == 1
    with pytest.raises(t5x_reader.CheckpointError, match=r"available steps: \[1, 5\]"):
        t5x_reader.open_checkpoint(str(tmp_path), step=3)


def test_given_config_is_checked_with_a_clear_error(fixtures_dir):
    wrong = t5.get_config("tiny")
    with pytest.raises(ValueError) as e:
        t5x_reader.load_t5x(str(fixtures_dir / FIXTURE), wrong)
    msg = str(e.value)
    assert "emb_dim: config 64 vs checkpoint 4" in msg and "mlp_dim: config 96" in msg


def test_sharded_restore_reads_only_each_devices_slices_and_casts(fixtures_dir, monkeypatch):
    ckpt = t5x_reader.open_checkpoint(str(fixtures_dir / FIXTURE))
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    shardings = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, P()),
                                       t5.param_shapes(ckpt.infer_config()))
    shardings["token_embedder"]["embedding"] = NamedSharding(mesh, P("model", None))
    reads = []
    original = t5x_reader.LazyArray.read

    def spy(self, index=(), dtype=None):
        reads.append((self.name, index))
        return original(self, index, dtype)

    monkeypatch.setattr(t5x_reader.LazyArray, "read", spy)
    params, _ = ckpt.load_params(shardings=shardings, dtype="bfloat16")
    emb = params["token_embedder"]["embedding"]
    assert emb.dtype == jax.numpy.bfloat16 and emb.sharding == shardings["token_embedder"][
        "embedding"]
    assert {s.data.shape for s in emb.addressable_shards} == {(32128 // 4, 4)}
    emb_reads = [idx for name, idx in reads if name == "target/token_embedder/embedding"]
    assert len(emb_reads) == 4  # one read per distinct slice, never the whole table
    assert all(idx[0].stop - idx[0].start == 32128 // 4 for idx in emb_reads)
    monkeypatch.undo()
    full = ckpt.params["token_embedder/embedding"].read()
    np.testing.assert_array_equal(np.asarray(emb), full.astype(jax.numpy.bfloat16))


@pytest.mark.parametrize("root", ["local", "memory"])
def test_legacy_write_read_round_trip(tmp_path, test_params, root):
    config, params = test_params
    base = str(tmp_path) if root == "local" else f"memory://{tmp_path.name}"
    slots = {"encoder": {"encoder_norm": {"scale": {"v": np.arange(32, dtype=np.float32)}}}}
    t5x_writer.save_t5x_checkpoint(storage.join(base, "checkpoint_42"), params, step=42,
                                   param_states=slots)
    loaded = t5x_reader.load_t5x(base)  # model dir -> latest checkpoint_<step>
    assert loaded.step == 42 and loaded.format == t5x_reader.FORMAT_LEGACY
    assert loaded.config == config.replace(dropout_rate=0.1, dtype="bfloat16")
    _assert_same(loaded.params, params)
    ckpt = t5x_reader.open_checkpoint(storage.join(base, "checkpoint_42"))
    np.testing.assert_array_equal(
        ckpt.arrays["state/param_states/encoder/encoder_norm/scale/v"].read(), np.arange(32))
    assert not ckpt.params["decoder/logits_dense/kernel"].is_inline
    if root == "local":
        assert os.path.isfile(tmp_path / "checkpoint_42" / "target.decoder.logits_dense.kernel"
                              / ".zarray")


def test_sharded_arrays_are_written_shard_by_shard(tmp_path, test_params):
    config, params = test_params
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    sharded = dict(params)
    sharded["token_embedder"] = {"embedding": jax.device_put(
        params["token_embedder"]["embedding"][:100], NamedSharding(mesh, P("model", "data")))}
    t5x_writer.save_t5x_checkpoint(str(tmp_path / "checkpoint_1"), sharded, step=1)
    got = t5x_reader.open_checkpoint(str(tmp_path)).params["token_embedder/embedding"].read()
    np.testing.assert_array_equal(got, params["token_embedder"]["embedding"][:100])


def test_gs_paths_map_to_gcs_kvstores_with_relative_array_paths():
    ckpt_dir = "gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_base/checkpoint_1100000"
    # What T5X wrote on GCS: a relative path and a placeholder bucket.
    saved = {"driver": "zarr", "metadata": {"shape": [768, 2048], "dtype": "<f4"},
             "kvstore": {"driver": "gcs", "bucket": "t5x-dummy-bucket",
                         "path": "target.encoder.layers_0.mlp.wi_0.kernel"}}
    spec = t5x_reader._legacy_spec(ckpt_dir, saved, "target/encoder/layers_0/mlp/wi_0/kernel")
    resolved = ts.Spec(spec).to_json()["kvstore"]
    assert resolved["driver"] == "gcs" and resolved["bucket"] == "t5-data"
    assert resolved["path"].rstrip("/") == ("pretrained_models/t5x/t5_1_1_lm100k_base/"
                                            "checkpoint_1100000/target.encoder.layers_0.mlp."
                                            "wi_0.kernel")


def test_single_msgpack_file_with_everything_inline_and_bf16(tmp_path, test_params):
    config, params = test_params
    path = str(tmp_path / "all_inline.msgpack")
    t5x_writer.save_t5x_checkpoint(path, params, step=7, single_file=True, dtype="bfloat16")
    ckpt = t5x_reader.open_checkpoint(path)
    assert ckpt.step == 7 and all(a.is_inline for a in ckpt.arrays.values())
    loaded, _ = ckpt.load_params(config)
    for name, value in strict_loading.flatten(params).items():
        got = strict_loading.flatten(loaded)[name]
        assert got.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(got, value.astype(jax.numpy.bfloat16))


def _orbax_save(directory, step: int, state, use_ocdbt: bool) -> None:
    """Save ``state`` as current T5X does: CheckpointManager(step_prefix='checkpoint') with one
    'state' item written by the PyTree handler."""
    manager = ocp.CheckpointManager(
        str(directory), item_names=("state",),
        item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=use_ocdbt)},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()


@pytest.mark.parametrize("use_ocdbt", [False, True])
def test_orbax_layout_written_like_t5x_is_read(tmp_path, test_params, use_ocdbt):
    config, params = test_params
    # The state dict of current T5X: {'target': params, 'state': {step, param_states}}.
    state = {"target": params,
             "state": {"step": np.int32(1100), "param_states": {
                 "decoder": {"decoder_norm": {"scale": {"v": np.ones(32, np.float32)}}}}}}
    _orbax_save(tmp_path, 1100, state, use_ocdbt)
    assert os.path.isfile(tmp_path / "checkpoint_1100" / "state" / "_METADATA")
    assert t5x_reader.detect_format(str(tmp_path / "checkpoint_1100")) == t5x_reader.FORMAT_ORBAX
    ckpt = t5x_reader.open_checkpoint(str(tmp_path))
    assert ckpt.format == t5x_reader.FORMAT_ORBAX and ckpt.step == 1100
    mesh = jax.make_mesh((8,), ("model",))
    loaded, used = ckpt.load_params(shardings=NamedSharding(mesh, P()))
    assert used.emb_dim == 32 and used.num_decoder_layers == 3
    _assert_same(loaded, params)
    np.testing.assert_array_equal(
        ckpt.arrays["state/param_states/decoder/decoder_norm/scale/v"].read(), np.ones(32))


@pytest.mark.parametrize("keep_metadata", [True, False])
def test_older_orbax_aggregate_file_layout(tmp_path, test_params, keep_metadata):
    """Older orbax (2023 T5X) kept non-partitioned leaves such as the step in an aggregate msgpack
    file ``state/checkpoint``, with ``PLACEHOLDER://<name>`` for arrays stored separately."""
    import shutil

    from flax import serialization

    config, params = test_params
    _orbax_save(tmp_path, 77, {"target": params, "state": {"step": np.int32(0)}}, False)
    state_dir = tmp_path / "checkpoint_77" / "state"
    shutil.rmtree(state_dir / "state.step")
    placeholders = {k: f"PLACEHOLDER://target.{k.replace('/', '.')}"
                    for k in strict_loading.flatten(params)}
    aggregate = {"target": strict_loading.unflatten(placeholders),
                 "state": {"step": np.int32(77)}}
    (state_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(aggregate))
    meta_path = state_dir / "_METADATA"
    if keep_metadata:
        meta = json.loads(meta_path.read_text())
        meta["tree_metadata"]["('state', 'step')"]["value_metadata"]["skip_deserialize"] = True
        meta_path.write_text(json.dumps(meta))
    else:
        meta_path.unlink()
    ckpt = t5x_reader.open_checkpoint(str(tmp_path / "checkpoint_77"))
    assert ckpt.format == t5x_reader.FORMAT_ORBAX and ckpt.step == 77
    assert ckpt.arrays["state/step"].is_inline
    _assert_same(ckpt.load_params(config)[0], params)


def test_strict_loading_lists_missing_unexpected_and_misshaped_at_once(tmp_path, test_params):
    config, params = test_params
    bad = strict_loading.flatten(params)
    del bad["decoder/logits_dense/kernel"]
    bad["encoder/layers_0/attention/extra/kernel"] = np.zeros((32, 40), np.float32)
    bad["encoder/layers_1/mlp/wo/kernel"] = np.zeros((40, 32), np.float32)  # model wants (48, 32)
    t5x_writer.save_t5x_checkpoint(str(tmp_path / "checkpoint_1"), strict_loading.unflatten(bad),
                                   step=1)
    with pytest.raises(strict_loading.CheckpointMismatchError) as e:
        t5x_reader.load_t5x(str(tmp_path), config)
    err = e.value
    assert err.missing == ["decoder/logits_dense/kernel"]
    assert err.unexpected == ["encoder/layers_0/attention/extra/kernel"]
    assert err.mismatched == [("encoder/layers_1/mlp/wo/kernel", (40, 32), (48, 32))]
    msg = str(err)
    assert "1 missing, 1 unexpected, 1 with the wrong shape" in msg
    assert "checkpoint (40, 32) vs model (48, 32)" in msg and str(tmp_path) in msg


def test_allow_list_partial_load_is_explicit(tmp_path, test_params):
    config, params = test_params
    partial = strict_loading.flatten(params)
    del partial["decoder/logits_dense/kernel"]
    t5x_writer.save_t5x_checkpoint(str(tmp_path / "checkpoint_1"),
                                   strict_loading.unflatten(partial), step=1)
    loaded = t5x_reader.load_t5x(str(tmp_path), config,
                                  allow_missing=["decoder/logits_dense/*"]).params
    assert "logits_dense" not in loaded["decoder"]  # absent, never silently random
    with pytest.raises(strict_loading.CheckpointMismatchError):
        strict_loading.merge_partial(loaded, {}, t5.param_shapes(config))
    merged = strict_loading.merge_partial(loaded, {"decoder": {"logits_dense": {
        "kernel": params["decoder"]["logits_dense"]["kernel"]}}}, t5.param_shapes(config))
    _assert_same(merged, params)


def test_damaged_or_foreign_paths_give_clear_errors(tmp_path, fixtures_dir):
    with pytest.raises(t5x_reader.CheckpointError, match="is not a T5X checkpoint"):
        t5x_reader.open_checkpoint(str(tmp_path))
    truncated = tmp_path / "checkpoint_3"
    truncated.mkdir()
    raw = (fixtures_dir / FIXTURE / "checkpoint").read_bytes()
    (truncated / "checkpoint").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(t5x_reader.CheckpointError, match="truncated") as e:
        t5x_reader.open_checkpoint(str(truncated))
    assert str(truncated / "checkpoint") in str(e.value)


def test_chunk_shapes_tile_the_array_and_fit_the_budget():
    for shape, itemsize in [((32128, 4096), 4), ((4096, 10240), 2), ((7, 3), 4), ((), 4)]:
        chunk = t5x_writer._chunk_shape(shape, itemsize)
        assert all(s % c == 0 for s, c in zip(shape, chunk))
        assert int(np.prod(chunk)) * itemsize <= 64 * 1024 * 1024


def test_inspect_cli(fixtures_dir, tmp_path, capsys):
    assert cli.main(["inspect", str(fixtures_dir / FIXTURE)]) == 0
    out = capsys.readouterr().out
    for text in ("T5X legacy", "step            3", "d_model         4", "heads           2",
                 "d_kv            2", "d_ff            8", "vocab           32128",
                 f"parameters      {257856:,}"):
        assert text in out, text
    assert cli.main(["inspect", str(fixtures_dir / "prompts" / "t5_1_1_lm100k_base_rte.npy")]) == 0
    assert "[100, 768]" in capsys.readouterr().out
    (tmp_path / "notes.txt").write_text("hello")
    assert cli.main(["inspect", str(tmp_path)]) == 2
    assert "not a checkpoint prompt-t5x understands" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
