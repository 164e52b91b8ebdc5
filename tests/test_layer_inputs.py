"""Per-layer inputs for the methods after prompt tuning: key/value prefixes and deep prompts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_t5x.model import t5


@pytest.fixture(scope="module")
def tiny():
    config = t5.get_config("test")
    return config, t5.T5(config), t5.init_params(config, jax.random.PRNGKey(0))


def _batch():
    ids = np.array([[5, 17, 33, 8, 1, 0], [9, 9, 1, 0, 0, 0]], np.int32)
    tgt = np.array([[4, 6, 1], [7, 1, 0]], np.int32)
    dec = np.concatenate([np.zeros((2, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": jnp.asarray(ids), "decoder_input_tokens": jnp.asarray(dec),
            "decoder_target_tokens": jnp.asarray(tgt)}


def _prefixes(config, batch, length, seed, layers):
    rng = np.random.RandomState(seed)
    shape = (layers, batch, length, config.num_heads, config.head_dim)
    return (jnp.asarray(rng.randn(*shape), jnp.float32), jnp.asarray(rng.randn(*shape), jnp.float32))


def test_prefixes_enter_every_attention_kind_and_broadcast_over_batch(tiny):
    config, model, params = tiny
    batch = _batch()
    base = model.apply({"params": params}, batch)
    for key, layers in (("encoder", config.num_encoder_layers),
                        ("decoder_self", config.num_decoder_layers),
                        ("decoder_cross", config.num_decoder_layers)):
        shared = _prefixes(config, 1, 3, seed=1, layers=layers)
        out = model.apply({"params": params}, batch, prefixes={key: shared})
        assert np.abs(np.asarray(out) - np.asarray(base)).max() > 1e-3, key
        explicit = tuple(jnp.repeat(x, 2, axis=1) for x in shared)
        same = model.apply({"params": params}, batch, prefixes={key: explicit})
        np.testing.assert_allclose(np.asarray(same), np.asarray(out), atol=1e-5)


def test_prefix_gradient_flows_and_frozen_params_are_constants(tiny):
    config, model, params = tiny
    batch = _batch()
    k, v = _prefixes(config, 1, 2, seed=2, layers=config.num_encoder_layers)

    def loss(prefix_k):
        return jnp.sum(model.apply({"params": params}, batch, prefixes={"encoder": (prefix_k, v)}))
    g = jax.grad(loss)(k)
    assert g.shape == k.shape and float(jnp.abs(g).max()) > 0


def test_deep_prompts_replace_prompt_positions_after_layer_zero(tiny):
    config, model, params = tiny
    batch = _batch()
    prompt = jnp.asarray(np.random.RandomState(3).randn(4, config.emb_dim), jnp.float32)
    layers = config.num_encoder_layers
    deep = jnp.asarray(np.random.RandomState(4).randn(layers, 4, config.emb_dim), jnp.float32)
    shallow = model.apply({"params": params}, batch, prompt=prompt)
    out = model.apply({"params": params}, batch, prompt=prompt, deep_prompts=deep)
    assert np.abs(np.asarray(out) - np.asarray(shallow)).max() > 1e-3
    # layer 0's deep prompt is unused (the input prompt is layer 0's)
    deep2 = deep.at[0].set(0.0)
    out2 = model.apply({"params": params}, batch, prompt=prompt, deep_prompts=deep2)
    np.testing.assert_allclose(np.asarray(out2), np.asarray(out), atol=1e-6)
    for mode in ("after_bos", "before_eos"):   # works with every combine mode
        model.apply({"params": params}, batch, prompt=prompt, prompt_mode=mode, deep_prompts=deep)
    with pytest.raises(ValueError, match="need a prompt"):
        model.apply({"params": params}, batch, deep_prompts=deep)
