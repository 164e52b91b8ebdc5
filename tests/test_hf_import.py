"""HF T5 directories: safetensors import gives transformers' logits; sharded safetensors; .bin
refused unless asked; our HF writer loads in transformers; bfloat16 safetensors."""

import json
import os

os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from prompt_t5x.checkpoints import hf_checkpoint, strict_loading
from prompt_t5x.commands import cli
from prompt_t5x.model import t5

BATCH = dict(encoder_input_tokens=np.array([[5, 6, 7, 1, 0], [3, 4, 1, 0, 0]], np.int32),
             decoder_input_tokens=np.array([[0, 9, 8], [0, 2, 3]], np.int32),
             decoder_target_tokens=np.array([[9, 8, 1], [2, 3, 1]], np.int32),
             decoder_loss_weights=np.ones((2, 3), np.float32))


def hf_logits(model, batch=BATCH):
    with torch.no_grad():
        return model(input_ids=torch.tensor(batch["encoder_input_tokens"]).long(),
                     attention_mask=torch.tensor(batch["encoder_input_tokens"] > 0).long(),
                     decoder_input_ids=torch.tensor(batch["decoder_input_tokens"]).long()
                     ).logits.float().numpy()


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=101, d_model=32, d_kv=10, d_ff=48, num_layers=2, num_decoder_layers=3,
        num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config).eval()


def _ours(params, config, **kw):
    return np.asarray(t5.T5(config.replace(dtype="float32")).apply({"params": params}, BATCH, **kw))


def test_safetensors_import_matches_transformers_logits(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "model.safetensors").is_file()
    params, config = hf_checkpoint.load_hf_t5(str(tmp_path))
    assert (config.emb_dim, config.num_heads, config.head_dim, config.mlp_dim,
            config.num_encoder_layers, config.num_decoder_layers) == (32, 4, 10, 48, 2, 3)
    np.testing.assert_allclose(_ours(params, config), hf_logits(hf_model), atol=1e-4, rtol=0)


def test_sharded_safetensors_with_index(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    params, config = hf_checkpoint.load_hf_t5(str(tmp_path))
    np.testing.assert_allclose(_ours(params, config), hf_logits(hf_model), atol=1e-4, rtol=0)
    # A shard that the index names but that is gone: clear error.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    os.remove(tmp_path / sorted(set(index["weight_map"].values()))[0])
    with pytest.raises(hf_checkpoint.HFCheckpointError, match="missing"):
        hf_checkpoint.load_hf_t5(str(tmp_path))


def test_pickle_weights_refused_by_default_and_loaded_safely_on_request(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    with pytest.raises(hf_checkpoint.HFCheckpointError, match="allow_bin=True"):
        hf_checkpoint.load_hf_t5(str(tmp_path))
    params, config = hf_checkpoint.load_hf_t5(str(tmp_path), allow_bin=True)
    np.testing.assert_allclose(_ours(params, config), hf_logits(hf_model), atol=1e-4, rtol=0)


def test_our_hf_writer_loads_in_transformers(tmp_path):
    config = t5.get_config("test")
    params = t5.init_params(config, jax.random.PRNGKey(3))
    hf_checkpoint.save_hf_t5(str(tmp_path / "single"), params, config)
    hf_checkpoint.save_hf_t5(str(tmp_path / "sharded"), params, config, max_shard_bytes=40_000)
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    for sub in ("single", "sharded"):
        model = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / sub).eval()
        np.testing.assert_allclose(hf_logits(model), _ours(params, config), atol=1e-4, rtol=0)
        back, back_config = hf_checkpoint.load_hf_t5(str(tmp_path / sub))
        assert back_config == config.replace(dtype=back_config.dtype)
        for name, value in strict_loading.flatten(params).items():
            np.testing.assert_array_equal(strict_loading.flatten(back)[name], np.asarray(value))


def test_bfloat16_safetensors_and_dtype_cast(tmp_path, hf_model):
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    hf_model.to(torch.float32)
    tensors = hf_checkpoint.read_safetensors(str(tmp_path / "model.safetensors"))
    assert {str(v.dtype) for v in tensors.values()} == {"bfloat16"}
    params, config = hf_checkpoint.load_hf_t5(str(tmp_path), dtype="float32")
    emb = params["token_embedder"]["embedding"]
    assert emb.dtype == np.float32
    expected = hf_model.shared.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(emb, expected)


def test_sharded_import_places_and_casts_each_parameter(tmp_path, hf_model):
    """Shardings and dtype go through the same strict read as T5X checkpoints."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from prompt_t5x.checkpoints import t5x_reader
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    host, _ = hf_checkpoint.load_hf_t5(str(tmp_path))
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    split = NamedSharding(mesh, P(None, "model"))

    def sharding_of(name, shape):
        return split if name == "token_embedder/embedding" else NamedSharding(mesh, P())

    params, _ = hf_checkpoint.load_hf_t5(str(tmp_path), shardings=sharding_of, dtype="bfloat16")
    emb = params["token_embedder"]["embedding"]                     # [101, 32]
    assert emb.sharding == split and emb.dtype == jax.numpy.bfloat16
    assert {s.data.shape for s in emb.addressable_shards} == {(101, 8)}
    for name, value in strict_loading.flatten(params).items():
        want = strict_loading.flatten(host)[name].astype(jax.numpy.bfloat16)
        np.testing.assert_array_equal(np.asarray(value), want, err_msg=name)
    with pytest.raises(t5x_reader.CheckpointError, match="no sharding given for parameter"):
        hf_checkpoint.load_hf_t5(str(tmp_path), shardings={"token_embedder/embedding": split})


def test_strict_check_and_bad_directories(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path / "m", safe_serialization=True)
    with pytest.raises(strict_loading.CheckpointMismatchError) as e:
        hf_checkpoint.load_hf_t5(str(tmp_path / "m"), t5.get_config("test", mlp_dim=64))
    assert "wi_0/kernel  checkpoint (32, 48) vs model (32, 64)" in str(e.value)
    with pytest.raises(hf_checkpoint.HFCheckpointError, match="no config.json"):
        hf_checkpoint.load_hf_t5(str(tmp_path))
    (tmp_path / "m" / "model.safetensors").write_bytes(
        (tmp_path / "m" / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(hf_checkpoint.HFCheckpointError, match="truncated"):
        hf_checkpoint.load_hf_t5(str(tmp_path / "m"))


def test_inspect_hf_dir(tmp_path, hf_model, capsys):
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    assert cli.main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "HF T5" in out and "d_kv            10" in out and "decoder layers  3" in out
    count = sum(p.numel() for p in hf_model.parameters())  # shared embeddings counted once
    assert count == t5.get_config("test").num_params
    assert f"parameters      {count:,}" in out
