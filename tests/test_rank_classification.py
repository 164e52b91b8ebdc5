"""Rank classification on a tiny random T5 with a prompt: scores equal an independent per-label
computation through the plain teacher-forced forward pass, and the prediction is their argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prompt_t5x.inference import rank_classification as rc
from prompt_t5x.methods import prompt_init, prompt_tuning
from prompt_t5x.model import t5

LABELS = [[5], [7, 8], [9, 10, 11]]   # label token ids (no EOS), different lengths
TARGETS_LENGTH = 6


@pytest.fixture(scope="module")
def setup():
    config = t5.get_config("test")
    frozen = t5.init_params(config, jax.random.PRNGKey(0))
    method = prompt_tuning.PromptTuning(t5.T5(config), prompt_length=3,
                                  prompt_init=prompt_init.random_uniform_init(0.5))
    trainable = method.init_trainable(jax.random.PRNGKey(1), frozen)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, config.vocab_size, size=(5, 7)).astype(np.int32)
    tokens[1, 4:] = 0   # a padded row
    tokens[3, 2:] = 0
    return method, frozen, trainable, jnp.asarray(tokens)


def _independent_scores(method, frozen, trainable, tokens, length_normalize):
    """One ordinary forward pass per label over the whole batch, log-softmax in numpy."""
    scores = np.zeros((tokens.shape[0], len(LABELS)))
    for c, ids in enumerate(LABELS):
        target = np.zeros(TARGETS_LENGTH, np.int32)
        target[:len(ids) + 1] = ids + [1]
        decoder_inputs = np.concatenate([[0], target[:-1]]).astype(np.int32)
        batch = {"encoder_input_tokens": tokens,
                 "decoder_target_tokens": jnp.asarray(np.tile(target, (tokens.shape[0], 1))),
                 "decoder_input_tokens": jnp.asarray(
                     np.tile(decoder_inputs, (tokens.shape[0], 1)))}
        logits = np.asarray(method.logits(frozen, trainable, batch), np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
            -1, keepdims=True)) - logits.max(-1, keepdims=True)
        n = len(ids) + 1
        per_token = log_probs[:, np.arange(n), target[:n]]
        scores[:, c] = per_token.sum(-1) / (n if length_normalize else 1)
    return scores


@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("share_encoder", [True, False])
def test_scores_match_independent_per_label_computation(setup, length_normalize, share_encoder):
    method, frozen, trainable, tokens = setup
    labels = rc.make_label_batch(LABELS, TARGETS_LENGTH)
    classify = rc.make_rank_classifier(method, labels, length_normalize=length_normalize,
                                       share_encoder=share_encoder)
    scores, predictions = classify(frozen, trainable, tokens)
    expected = _independent_scores(method, frozen, trainable, tokens, length_normalize)
    assert scores.shape == (5, 3)
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(predictions), expected.argmax(-1))
    assert np.all(np.asarray(scores) < 0)   # log-probabilities


def test_prompt_changes_the_scores(setup):
    method, frozen, trainable, tokens = setup
    classify = rc.make_rank_classifier(method, rc.make_label_batch(LABELS, TARGETS_LENGTH))
    a, _ = classify(frozen, trainable, tokens)
    b, _ = classify(frozen, {"prompt": trainable["prompt"] + 1.0}, tokens)
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_label_batch_layout_and_errors():
    labels = rc.make_label_batch([[5], [7, 8]], 4)
    np.testing.assert_array_equal(labels.decoder_target_tokens, [[5, 1, 0, 0], [7, 8, 1, 0]])
    np.testing.assert_array_equal(labels.decoder_input_tokens, [[0, 5, 1, 0], [0, 7, 8, 1]])
    np.testing.assert_array_equal(labels.decoder_loss_weights, [[1, 1, 0, 0], [1, 1, 1, 0]])
    with pytest.raises(ValueError, match="raise targets_length"):
        rc.make_label_batch([[5, 6, 7]], 3)
    with pytest.raises(ValueError, match="at least one label"):
        rc.make_label_batch([], 3)
    encoded = rc.encode_labels(["yes", "no"], lambda s: [ord(s[0])], 3)
    assert encoded.decoder_target_tokens[:, 0].tolist() == [ord("y"), ord("n")]


def test_predicted_label_words_drop_padding_rows():
    words = rc.predicted_label_words(np.array([1, 0, 1]), ["entailment", "not_entailment"],
                                     example_mask=np.array([True, True, False]))
    assert words == ["not_entailment", "entailment"]
