"""Our T5 1.1 against HF transformers' PyTorch T5 (a reference nobody here wrote), fp32."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from prompt_t5x.checkpoints import hf_interop
from prompt_t5x.model import t5

CONFIGS = {
    # heads * d_kv (40) != d_model (32), unequal encoder/decoder depth
    "uneven": dict(vocab_size=101, d_model=32, d_kv=10, d_ff=48, num_layers=2,
                   num_decoder_layers=3, num_heads=4),
    # deeper encoder, other bucket settings
    "deep_enc": dict(vocab_size=131, d_model=48, d_kv=8, d_ff=72, num_layers=4,
                     num_decoder_layers=1, num_heads=3, relative_attention_num_buckets=16,
                     relative_attention_max_distance=40),
}


def _hf_model(name):
    torch.manual_seed(0)
    cfg = transformers.T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
                                **CONFIGS[name])
    model = transformers.T5ForConditionalGeneration(cfg).eval()
    assert model.lm_head.weight.data_ptr() != model.shared.weight.data_ptr(), \
        "reference must have an untied lm_head (transformers 5.x ties it for every T5)"
    return cfg, model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf(name):
    hf_cfg, hf = _hf_model(name)
    config = hf_interop.config_from_hf(hf_cfg.to_dict(), dtype="float32")
    assert config.num_encoder_layers != config.num_decoder_layers
    params = hf_interop.params_from_hf_state_dict(hf.state_dict(), config)
    # Our tree must be exactly the T5X tree (names and shapes).
    expected = t5.param_shapes(config)
    import jax
    got_paths = {jax.tree_util.keystr(k): v.shape for k, v in
                 jax.tree_util.tree_flatten_with_path(params)[0]}
    want_paths = {jax.tree_util.keystr(k): v.shape for k, v in
                  jax.tree_util.tree_flatten_with_path(expected)[0]}
    assert got_paths == want_paths

    rng = np.random.RandomState(1)
    vocab = hf_cfg.vocab_size
    batch, length, tlen = 3, 180, 9   # long enough for the logarithmic buckets
    ids = rng.randint(2, vocab, size=(batch, length))
    ids[:, -1] = 1
    ids[1, 120:] = 0                  # a padded row
    ids[1, 119] = 1
    dec = rng.randint(2, vocab, size=(batch, tlen))
    dec[:, 0] = 0
    targets = np.concatenate([dec[:, 1:], np.ones((batch, 1), int)], axis=1)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids > 0),
                 decoder_input_ids=torch.tensor(dec)).logits.numpy()
    ours = t5.T5(config).apply({"params": params}, {
        "encoder_input_tokens": jnp.asarray(ids, jnp.int32),
        "decoder_input_tokens": jnp.asarray(dec, jnp.int32),
        "decoder_target_tokens": jnp.asarray(targets, jnp.int32)})
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_round_trip_to_hf_names():
    hf_cfg, hf = _hf_model("uneven")
    config = hf_interop.config_from_hf(hf_cfg.to_dict(), dtype="float32")
    params = hf_interop.params_from_hf_state_dict(hf.state_dict(), config)
    back = hf_interop.hf_state_dict_from_params(params)
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert set(back) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(back[k], ref[k])
    assert hf_interop.hf_config_from(config)["d_kv"] == 10


def test_refuses_non_t5_1_1_configs():
    with pytest.raises(ValueError, match="gated-gelu"):
        hf_interop.config_from_hf({"feed_forward_proj": "relu", "tie_word_embeddings": False})
    with pytest.raises(ValueError, match="untied"):
        hf_interop.config_from_hf({"feed_forward_proj": "gated-gelu"})
    with pytest.raises(ValueError, match="no T5 1.1 counterpart"):
        hf_interop.params_from_hf_state_dict({"encoder.block.0.layer.5.foo.weight": np.zeros(2)},
                                             t5.get_config("test"))
