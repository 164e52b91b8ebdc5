"""Prompt combining (positions, masks, variable lengths) and prompt initializers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_t5x.methods import prompt_init
from prompt_t5x.model import prompt_inputs, t5


def _reference_combine(embedded, mask, prompt, mode):
    """Row-by-row python construction of the combined sequence."""
    out, out_mask = [], []
    for b in range(embedded.shape[0]):
        n = int(mask[b].sum())
        k = {"prepend": 0, "after_bos": 1, "before_eos": max(n - 1, 0)}[mode]
        p = prompt if prompt.ndim == 2 else prompt[b]
        out.append(np.concatenate([embedded[b, :k], p, embedded[b, k:]]))
        out_mask.append(np.concatenate([mask[b, :k], np.ones(len(p), bool), mask[b, k:]]))
    return np.stack(out), np.stack(out_mask)


@pytest.mark.parametrize("mode", prompt_inputs.COMBINE_MODES)
@pytest.mark.parametrize("per_example", [False, True])
def test_combine_matches_rowwise_reference(mode, per_example):
    rng = np.random.RandomState(0)
    lengths = [6, 3, 1, 5]
    mask = np.array([[i < n for i in range(6)] for n in lengths])
    embedded = rng.randn(4, 6, 5).astype(np.float32) * mask[..., None]
    prompt = rng.randn(*((4, 3, 5) if per_example else (3, 5))).astype(np.float32)
    got, got_mask, index = prompt_inputs.combine_prompt(jnp.asarray(embedded), jnp.asarray(mask),
                                                  jnp.asarray(prompt), mode)
    want, want_mask = _reference_combine(embedded, mask, prompt, mode)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
    # index marks exactly the 3 prompt rows of each example, in order
    idx = np.asarray(index)
    for b in range(4):
        assert list(idx[b][idx[b] >= 0]) == [0, 1, 2]


def test_bad_prompt_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="does not fit"):
        prompt_inputs.combine_prompt(jnp.zeros((2, 4, 8)), jnp.ones((2, 4), bool), jnp.zeros((3, 7)))
    with pytest.raises(ValueError, match="unknown prompt combine mode"):
        prompt_inputs.insertion_points(jnp.ones((2, 4), bool), "middle")


@pytest.fixture(scope="module")
def tiny():
    config = t5.get_config("test")
    return config, t5.T5(config), t5.init_params(config, jax.random.PRNGKey(0))


def _batch(ids, targets):
    dec = np.concatenate([np.zeros((len(targets), 1), int), targets[:, :-1]], axis=1)
    return {"encoder_input_tokens": jnp.asarray(ids, jnp.int32),
            "decoder_input_tokens": jnp.asarray(dec, jnp.int32),
            "decoder_target_tokens": jnp.asarray(targets, jnp.int32)}


@pytest.mark.parametrize("mode", prompt_inputs.COMBINE_MODES)
def test_padding_is_masked_and_prompt_visible(tiny, mode):
    """A padded row gives the same logits as the same row alone without padding."""
    config, model, params = tiny
    rng = np.random.RandomState(3)
    prompt = jnp.asarray(rng.randn(4, config.emb_dim), jnp.float32)
    row = np.array([[5, 17, 33, 8, 1]])
    padded = np.array([[5, 17, 33, 8, 1, 0, 0, 0], [9, 9, 1, 0, 0, 0, 0, 0]])
    targets = np.array([[7, 11, 1]])
    alone = model.apply({"params": params}, _batch(row, targets), prompt=prompt, prompt_mode=mode)
    both = model.apply({"params": params}, _batch(padded, np.repeat(targets, 2, 0)),
                       prompt=prompt, prompt_mode=mode)
    np.testing.assert_allclose(np.asarray(both[0]), np.asarray(alone[0]), atol=1e-5)
    # The prompt is visible: changing it changes the logits; the decoder length is unchanged.
    other = model.apply({"params": params}, _batch(row, targets), prompt=prompt + 1.0,
                        prompt_mode=mode)
    assert other.shape == alone.shape == (1, 3, config.vocab_size)
    assert np.abs(np.asarray(other) - np.asarray(alone)).max() > 1e-3


def test_padding_tokens_content_is_ignored(tiny):
    config, model, params = tiny
    ids = np.array([[5, 17, 1, 0, 0]])
    prompt = jnp.ones((3, config.emb_dim))
    a = model.apply({"params": params}, _batch(ids, np.array([[4, 1]])), prompt=prompt)
    # Same mask, different embeddings behind the padding: swap the embedding row of id 0.
    params2 = jax.tree.map(lambda x: x, params)
    emb = np.asarray(params["token_embedder"]["embedding"]).copy()
    emb[0] += 10.0
    params2["token_embedder"]["embedding"] = jnp.asarray(emb)
    # id 0 is also the decoder start token, so compare encoder outputs only.
    enc_a, _ = model.apply({"params": params}, jnp.asarray(ids), prompt=prompt, method=t5.T5.encode)
    enc_b, _ = model.apply({"params": params2}, jnp.asarray(ids), prompt=prompt,
                           method=t5.T5.encode)
    real = np.array([True] * 3 + [True, True, True, False, False])  # 3 prompt + 3 tokens + 2 pad
    np.testing.assert_allclose(np.asarray(enc_a)[0, real], np.asarray(enc_b)[0, real], atol=1e-5)
    assert a.shape == (1, 2, config.vocab_size)


def test_random_uniform_ranges():
    key = jax.random.PRNGKey(0)
    p = np.asarray(prompt_init.random_uniform(key, 50, 40, scale=0.5))
    assert p.shape == (50, 40) and p.min() >= 0.0 and p.max() < 0.5 and p.min() < 0.05
    s = np.asarray(prompt_init.random_uniform(key, 50, 40, scale=0.5, symmetric=True))
    assert s.min() >= -0.5 and s.max() < 0.5 and s.min() < -0.4


def test_sampled_vocab_draws_distinct_rows_from_the_first_n():
    emb = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
    p = np.asarray(prompt_init.sampled_vocab(jax.random.PRNGKey(1), emb, 20, population=50))
    ids = p[:, 0] / 3
    assert np.all(ids < 50) and len(set(ids.tolist())) == 20
    np.testing.assert_array_equal(p, emb[ids.astype(int)])


def test_class_labels_with_the_real_t5_vocabulary(fixtures_dir):
    import sentencepiece as spm
    vocab = fixtures_dir / "vocab" / "t5_cc_all_32000_100extra.spm.model"
    emb = np.load(fixtures_dir / "prompts" / "tiny_embeddings_32128x4.npy")
    sp = spm.SentencePieceProcessor(model_file=str(vocab))
    labels = ["positive", "negative", "not_entailment"]
    p = np.asarray(prompt_init.class_labels(jax.random.PRNGKey(0), emb, 10, labels, str(vocab)))
    assert p.shape == (10, 4)
    for i, label in enumerate(labels):
        ids = sp.encode(label)
        np.testing.assert_allclose(p[i], emb[ids].mean(axis=0), rtol=1e-6)
    assert len(sp.encode("not_entailment")) > 1          # a multi-piece label is averaged
    rest_rows = {tuple(r) for r in emb[:5000]}
    assert all(tuple(r) in rest_rows for r in p[3:])       # the rest: sampled vocabulary
    with pytest.raises(ValueError, match="do not fit"):
        prompt_init.class_labels(jax.random.PRNGKey(0), emb, 2, labels, str(vocab))


def test_from_npy_checks_shape_and_refuses_pickles(tmp_path, fixtures_dir):
    released = prompt_init.from_npy(fixtures_dir / "prompts" / "t5_1_1_lm100k_base_sst2.npy",
                                (100, 768))
    assert released.shape == (100, 768) and np.isfinite(released).all()
    with pytest.raises(ValueError, match="expected"):
        prompt_init.from_npy(fixtures_dir / "prompts" / "prompt_5x256.npy", (100, 256))
    bad = tmp_path / "obj.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric"):
        prompt_init.from_npy(bad)
    with pytest.raises(FileNotFoundError):
        prompt_init.from_npy(tmp_path / "missing.npy")
